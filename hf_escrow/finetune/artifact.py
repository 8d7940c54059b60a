"""The adapter as an artifact: a content hash over its files, and a private copy to verify.

`adapter_sha256(folder)` hashes every file under the folder in a stable order (sorted
POSIX relative paths): sha256 over the lines ``<relative path>\\0<sha256 of the file>\\n``
after a version header. Adding, removing, renaming or changing any file changes it.

The verifier never evaluates the seller's folder in place: `private_copy` copies it
(refusing links and anything but plain files), and the hash is taken of that copy, so
what is hashed is exactly what gets loaded.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from .._exceptions import ArtifactError
from .data import file_sha256

HEADER = b"hf-escrow-adapter-sha256-v1\n"
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")


def adapter_files(folder: Path) -> list[str]:
    folder = Path(folder)
    names = []
    for path in folder.rglob("*"):
        if path.is_symlink():
            raise ArtifactError(f"{path} is a symbolic link; an adapter must hold plain files only")
        if path.is_file():
            names.append(path.relative_to(folder).as_posix())
        elif not path.is_dir():
            raise ArtifactError(f"{path} is not a plain file")
    return sorted(names)


def adapter_sha256(folder: str | Path) -> str:
    """The artifact hash submitted with the result and checked by the verifier.

    Example:
        >>> adapter_sha256("runs/esc_123/adapter")  # doctest: +SKIP
        '9f2c...'
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"no adapter folder at {folder}")
    digest = hashlib.sha256(HEADER)
    for name in adapter_files(folder):
        digest.update(name.encode("utf-8") + b"\0" + file_sha256(folder / name).encode() + b"\n")
    return digest.hexdigest()


def private_copy(source: str | Path, target: Path) -> Path:
    """Copy an adapter folder (plain files only) to `target`; refuses pickled weights."""
    source = Path(source)
    if not source.is_dir():
        raise ArtifactError(f"the submitted adapter {source} does not exist (or is not a folder here)")
    names = adapter_files(source)
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise ArtifactError(f"the adapter at {source} lacks {', '.join(missing)} "
                            "(only safetensors adapters are loaded, never pickles)")
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name, follow_symlinks=False)
    return target
