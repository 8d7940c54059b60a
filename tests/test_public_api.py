"""`hf_escrow.__all__` and its lazy imports agree: every exported name resolves, every lazy
name is exported, every public object bound at import is exported, and `import hf_escrow`
stays light (the adapters' heavy libraries load only when their names are asked for)."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import hf_escrow

# What the adapters and the server bring in; none of it may load with `import hf_escrow`.
HEAVY = ("httpx", "fastapi", "starlette", "pydantic", "gradio", "datasets", "huggingface_hub", "transformers",
         "torch", "numpy", "typer", "rich", "mcp", "uvicorn")


def test_every_exported_name_resolves_and_is_listed_once():
    assert len(hf_escrow.__all__) == len(set(hf_escrow.__all__)), "a name listed twice in __all__"
    for name in hf_escrow.__all__:
        assert getattr(hf_escrow, name) is not None, name


def test_lazy_names_are_exported_and_come_from_their_module():
    lazy = hf_escrow._LAZY
    assert set(lazy) <= set(hf_escrow.__all__), sorted(set(lazy) - set(hf_escrow.__all__))
    for name, module in lazy.items():
        assert name not in vars(hf_escrow), f"{name} is imported eagerly and listed as lazy"
        assert getattr(hf_escrow, name) is getattr(importlib.import_module(f"hf_escrow.{module}"), name), name


def test_what_is_exported_is_bound_now_or_lazily_and_nothing_public_is_left_out():
    bound = {name for name, value in vars(hf_escrow).items()
             if not name.startswith("_") and not inspect.ismodule(value)}
    exported = set(hf_escrow.__all__)
    assert exported <= bound | set(hf_escrow._LAZY), sorted(exported - bound - set(hf_escrow._LAZY))
    assert bound <= exported, f"imported into hf_escrow but not in __all__: {sorted(bound - exported)}"


def test_an_unknown_name_is_an_attribute_error():
    try:
        hf_escrow.NoSuchThing
    except AttributeError as error:
        assert "NoSuchThing" in str(error)
    else:
        raise AssertionError("hf_escrow.NoSuchThing resolved")


def test_import_hf_escrow_stays_light():
    code = ("import sys, hf_escrow; "
            f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(hf_escrow.__file__).parent.parent).stdout.strip()
    assert loaded == "", f"import hf_escrow loaded {loaded}"
