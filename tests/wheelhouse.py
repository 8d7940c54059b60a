"""A local wheelhouse for installing requirements offline: the distributions already
installed in this environment, packed back into wheels (what pip would have downloaded),
so that a fresh virtual environment can install a requirements.txt with `--no-index`.

Only what the requirements need (their dependency closure, markers evaluated) is packed;
distributions that already lie on the machine as wheels (torch's CPU build) are skipped.
Packed wheels are cached by name and version across runs.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

MAX_DISTRIBUTIONS = 500


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Every installed distribution the requirements need, by canonical name."""
    found: dict[str, md.Distribution] = {}
    seen: set[tuple[str, frozenset]] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        if len(seen) > MAX_DISTRIBUTIONS:
            raise RuntimeError("dependency closure larger than expected")
        requirement = todo.pop()
        key, extras = canonical(requirement.name), frozenset(requirement.extras)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        dist = found.setdefault(key, md.distribution(requirement.name))
        for text in dist.requires or ():
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras or {""}):
                todo.append(sub)
    return found


def pack(dist: md.Distribution, out: Path) -> Path:
    """The installed distribution as a wheel in `out` (cached)."""
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")] or ["py3-none-any"]
    # Several tags (py2-none-any, py3-none-any) compress into one name: py2.py3-none-any.
    parts = [list(dict.fromkeys(tag.split("-")[i] for tag in tags)) for i in range(3)]
    name = re.sub(r"[-.]+", "_", dist.metadata["Name"])
    wheel = out / f"{name}-{dist.version}-{'-'.join('.'.join(p) for p in parts)}.whl"
    if wheel.exists():
        return wheel
    partial = wheel.with_suffix(".partial")
    root = Path(dist.locate_file(""))
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
        for entry in dist.files or ():
            rel = entry.as_posix()
            if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc") \
                    or rel.endswith(("direct_url.json", "/INSTALLER", "/REQUESTED")):
                continue
            path = root / rel
            if path.is_file():
                archive.write(path, rel)
    partial.rename(wheel)
    return wheel


def build_wheelhouse(requirements: list[str], out: Path, *, skip: set[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for key, dist in closure(requirements).items():
        if key not in skip:
            pack(dist, out)
    return out
