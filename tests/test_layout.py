"""The layout's one-way arrows, read from the source: the buyer's adapters never import
the seller's faces (nor the other way), the ledger never imports ML or HTTP libraries,
and the old import paths are the moved modules themselves."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_escrow"
MOVED = {"inference": "buyer", "datasets": "buyer", "metering": "buyer", "vllm": "buyer", "autopay": "buyer",
         "gateway": "seller", "shardserver": "seller", "gate": "seller", "till": "seller"}
ML_AND_HTTP = {"torch", "transformers", "datasets", "gradio", "gradio_client", "huggingface_hub", "peft", "httpx",
               "fastapi", "starlette", "uvicorn", "requests", "mcp"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved to `hf_escrow.`-absolute names."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("side, other", [("buyer", "seller"), ("seller", "buyer")])
def test_one_side_never_imports_the_other(side, other):
    old_names = {f"hf_escrow.{name}" for name, pkg in MOVED.items() if pkg == other}
    crossing = {f"{path.name}: {name}" for path in _files(side) for name in _imports(path)
                if name.startswith(f"hf_escrow.{other}") or name in old_names}
    assert not crossing, f"the {side} side imports the {other} side: {sorted(crossing)}"


def test_the_ledger_imports_no_ml_or_http_library():
    found = {f"{path.relative_to(PACKAGE)}: {name}" for path in _files("ledger") for name in _imports(path)
             if name.split(".")[0] in ML_AND_HTTP}
    assert not found, f"the ledger imports {sorted(found)}"


def test_the_ledger_imports_neither_side_nor_the_faces():
    found = {f"{path.name}: {name}" for path in _files("ledger") for name in _imports(path)
             if name.startswith(("hf_escrow.buyer", "hf_escrow.seller", "hf_escrow.server", "hf_escrow.client"))}
    assert not found, found


@pytest.mark.parametrize("name", sorted(MOVED))
def test_old_import_paths_are_the_moved_modules(name):
    old = importlib.import_module(f"hf_escrow.{name}")
    new = importlib.import_module(f"hf_escrow.{MOVED[name]}.{name}")
    assert old is new
    assert new.__name__ == f"hf_escrow.{MOVED[name]}.{name}"


def test_the_public_names_still_resolve_from_the_top():
    import hf_escrow
    import hf_escrow.gate
    assert hf_escrow.gate.paid is hf_escrow.paid
    assert hf_escrow.PaidInferenceClient.__module__ == "hf_escrow.buyer.inference"
    assert hf_escrow.Gate.__module__ == "hf_escrow.seller.gate"
