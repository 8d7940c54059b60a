"""`hf-escrow space deploy`: a Space template made into a folder a Space builds, and uploaded.

A Space installs `requirements.txt` before the rest of the repository is there, so the
folder carries the `hf_escrow` package source itself (vendored next to `app.py`) and a
`requirements.txt` of published packages only, each pinned to the version the suite passed
with (`constraints.txt` in a checkout; the installed versions otherwise). The seller's key
becomes a Space secret and the other settings Space variables.

A Space's disk is not kept across restarts: money on an embedded ledger there would be
lost. So the Space talks to an escrow server (`escrow_url`), unless the operator gave it
persistent storage and says where (`embedded_ledger="/data"`).
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ._exceptions import ValidationError

PACKAGE = "hf_escrow"
_SELF = re.compile(r"^hf[-_]escrow(\[(?P<extras>[^\]]*)\])?\s*(?P<spec>[<>=!~].*)?$", re.I)
_NAME = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<extras>\[[^\]]*\])?\s*(?P<spec>[<>=!~;].*)?$")
_SKIPPED = ("__pycache__", "*.pyc", "*.pyo")
SELLER_KEY_SECRET = "HF_ESCROW_SELLER_KEY"


@dataclass
class SpacePlan:
    """What a deploy writes and sets: the folder, the Space's SDK, its variables and secrets."""

    folder: Path
    sdk: str
    variables: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """For people and logs: secrets by name only."""
        return {"folder": str(self.folder), "sdk": self.sdk, "variables": self.variables,
                "secrets": sorted(self.secrets)}


def template_dir(template: str | Path) -> Path:
    """A packaged template by name (`paid-chat`, `paid-embeddings`) or a folder with an app.py."""
    path = Path(template)
    if (path / "app.py").is_file():
        return path
    root = _templates_root()
    if "/" not in str(template) and (root / str(template) / "app.py").is_file():
        return root / str(template)
    names = sorted(p.name for p in root.iterdir() if (p / "app.py").is_file())
    raise ValidationError(f"no Space template {str(template)!r}: give a folder with an app.py, or one of {names}")


def build_space(template: str | Path, out: str | Path, *, escrow_url: str | None = None,
                embedded_ledger: str | None = None, seller: str | None = None, seller_key: str | None = None,
                variables: dict[str, str] | None = None) -> SpacePlan:
    """Write the Space folder for `template` into `out` (which must be empty or absent)."""
    if bool(escrow_url) == bool(embedded_ledger):
        raise ValidationError("give --escrow-url (the escrow server the Space bills through), or, for a Space "
                              "with persistent storage only, --embedded-ledger /data: a Space's disk is not kept, "
                              "and an embedded ledger there would lose money")
    if escrow_url and not re.match(r"^https?://", escrow_url):
        raise ValidationError("--escrow-url must be an http(s) URL of an `hf-escrow serve`")
    if escrow_url and not seller_key:
        raise ValidationError("the Space needs its seller's API key on the escrow server: --seller-key or "
                              "$HF_ESCROW_SELLER_KEY (from `hf-escrow register` against that server)")
    source = template_dir(template)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValidationError(f"{out} is not empty: give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name != "requirements.txt" and not item.name.endswith((".pyc", ".pyo")):
            shutil.copy2(item, out / item.name)
    package = Path(__file__).resolve().parent
    shutil.copytree(package, out / PACKAGE, ignore=shutil.ignore_patterns(*_SKIPPED, "spaces"))
    (out / "requirements.txt").write_text(pinned_requirements(source / "requirements.txt"))

    settings = dict(variables or {})
    if escrow_url:
        settings["HF_ESCROW_URL"] = escrow_url.rstrip("/")
    else:
        settings["HF_ESCROW_HOME"] = embedded_ledger
    if seller:
        settings["HF_ESCROW_SELLER"] = seller
    return SpacePlan(out, _sdk(source), settings, {SELLER_KEY_SECRET: seller_key} if seller_key else {})


def deploy(plan: SpacePlan, repo_id: str, *, private: bool = False, token: str | None = None,
           endpoint: str | None = None) -> str:
    """Create the Space if needed, upload the folder, set its secrets and variables; its URL."""
    from huggingface_hub import HfApi
    if not re.match(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$", repo_id):
        raise ValidationError(f"--repo must be OWNER/NAME, not {repo_id!r}")
    api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(repo_id, repo_type="space", space_sdk=plan.sdk, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=plan.folder,
                      commit_message="Deploy with hf-escrow space deploy")
    for name, value in plan.secrets.items():
        api.add_space_secret(repo_id, name, value)
    for name, value in plan.variables.items():
        api.add_space_variable(repo_id, name, value)
    return str(url)


def pinned_requirements(template_requirements: Path) -> str:
    """The template's requirements with `hf-escrow[extras]` replaced by what those extras
    need, every package pinned; option lines (an extra index for torch) kept."""
    pins = _lock()
    lines: list[str] = ["# Written by `hf-escrow space deploy`: published packages only, pinned; the hf_escrow",
                        "# package itself is vendored in this folder."]
    wanted: list[str] = []
    for raw in template_requirements.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            lines.append(line)
            continue
        own = _SELF.match(line)
        if own:
            extras = [e.strip() for e in (own.group("extras") or "").split(",") if e.strip()]
            wanted += _package_requirements(extras)
        else:
            wanted.append(line)
    seen: set[str] = set()
    for requirement in wanted:
        match = _NAME.match(requirement)
        if match is None:
            raise ValidationError(f"cannot read the requirement {requirement!r}")
        key = _canonical(match.group("name"))
        if key in seen:
            continue
        seen.add(key)
        version = pins.get(key)
        if version is None:
            raise ValidationError(f"{match.group('name')} has no pinned version (not in constraints.txt, not "
                                  "installed here): install it, or pin it in the template's requirements.txt")
        lines.append(f"{match.group('name')}{match.group('extras') or ''}=={version}")
    return "\n".join(lines) + "\n"


def _package_requirements(extras: list[str]) -> list[str]:
    """hf-escrow's own dependencies plus those of `extras` (self-references followed)."""
    project = _checkout_project()
    if project is not None:
        optional = project.get("optional-dependencies", {})
        found, todo, done = list(project["dependencies"]), list(extras), set()
        while todo:
            extra = todo.pop()
            if extra in done:
                continue
            done.add(extra)
            for requirement in optional.get(extra, ()):
                own = _SELF.match(requirement)
                if own:
                    todo += [e.strip() for e in (own.group("extras") or "").split(",") if e.strip()]
                else:
                    found.append(requirement)
        return found
    from packaging.requirements import Requirement
    found = []
    for text in importlib.metadata.requires("hf-escrow") or ():
        requirement = Requirement(text)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras):
            if _canonical(requirement.name) != "hf-escrow":
                found.append(str(requirement).split(";")[0].strip())
    return found


def _templates_root() -> Path:
    """`spaces/` in a checkout; in an installed wheel, the copy packaged as hf_escrow.spaces."""
    if _checkout_project() is not None:
        return Path(__file__).resolve().parent.parent / "spaces"
    return Path(str(resources.files(f"{PACKAGE}.spaces")))


def _checkout_project() -> dict | None:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "hf-escrow":
            return project
    return None


def _lock() -> dict[str, str]:
    """Package -> version: constraints.txt in a checkout, else what is installed here."""
    constraints = Path(__file__).resolve().parent.parent / "constraints.txt"
    if _checkout_project() is not None and constraints.is_file():
        pins = {}
        for line in constraints.read_text().splitlines():
            if "==" in line and not line.lstrip().startswith("#"):
                name, version = line.split("==", 1)
                pins[_canonical(name.strip())] = version.strip()
        return pins
    return {_canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sdk(template: Path) -> str:
    readme = template / "README.md"
    if readme.is_file():
        match = re.search(r"^sdk:\s*(\S+)\s*$", readme.read_text(), re.M)
        if match:
            return match.group(1)
    return "gradio"
