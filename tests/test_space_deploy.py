"""`hf-escrow space deploy`: the folder a Space builds, and the hub calls that upload it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hf_escrow.cli import app as cli
from tests.hub_recorder import committed_files, create_hub
from tests.liveserver import serve_app

ROOT = Path(__file__).resolve().parent.parent
SELLER_KEY = "hfe_" + "s" * 40
HUB_TOKEN = "hf_" + "t" * 34


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def dry_run(tmp_path: Path, template: str = "paid-chat", *extra: str) -> tuple[Path, dict]:
    out = tmp_path / template
    result = CliRunner().invoke(cli, ["space", "deploy", template, "--repo", "seller/space", "--escrow-url",
                                      "http://127.0.0.1:8787", "--seller-key", SELLER_KEY, "--seller", "paid-chat",
                                      "--dry-run", str(out), "--json", *extra])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output)


def test_dry_run_writes_a_space_of_published_pinned_packages_and_vendored_source(tmp_path):
    out, plan = dry_run(tmp_path)
    assert plan["uploaded"] is False and plan["sdk"] == "gradio"
    assert plan["variables"] == {"HF_ESCROW_URL": "http://127.0.0.1:8787", "HF_ESCROW_SELLER": "paid-chat"}
    assert plan["secrets"] == ["HF_ESCROW_SELLER_KEY"]
    pins = lock()
    requirements = [line for line in (out / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements  # torch's CPU build
    packages = [line for line in requirements if not line.startswith("-")]
    assert packages and not [line for line in packages if "hf-escrow" in line or "/" in line]
    for line in packages:
        name, version = re.match(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==(\S+)$", line).groups()
        assert pins[re.sub(r"[-_.]+", "-", name).lower()] == version, line
    assert {"gradio", "transformers[serving]", "sqlalchemy", "alembic"} <= {line.split("==")[0] for line in packages}
    # The package source is there, data files included, and that is what the Space imports.
    for rel in ("hf_escrow/ledger/migrations/versions/0001_initial.py", "hf_escrow/server/dashboard.html",
                "hf_escrow/gate.py", "app.py", "README.md"):
        assert (out / rel).is_file(), rel
    assert not list(out.rglob("__pycache__")) and not (out / "hf_escrow" / "spaces").exists()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([sys.executable, "-c", "import hf_escrow; print(hf_escrow.__file__)"], cwd=out, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(out.resolve())
    assert SELLER_KEY not in "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())


def test_deploy_refuses_what_would_lose_money_or_leak(tmp_path):
    runner = CliRunner()
    base = ["space", "deploy", "paid-chat", "--repo", "seller/space", "--dry-run"]
    nowhere = runner.invoke(cli, [*base, str(tmp_path / "a")])
    assert nowhere.exit_code == 2 and "lose money" in nowhere.output
    both = runner.invoke(cli, [*base, str(tmp_path / "b"), "--escrow-url", "http://x", "--embedded-ledger", "/data"])
    assert both.exit_code == 2
    no_key = runner.invoke(cli, [*base, str(tmp_path / "c"), "--escrow-url", "http://127.0.0.1:8787"],
                           env={"HF_ESCROW_SELLER_KEY": ""})
    assert no_key.exit_code == 2 and "seller's API key" in no_key.output
    unknown = runner.invoke(cli, ["space", "deploy", "no-such-template", "--repo", "a/b", "--embedded-ledger",
                                  "/data", "--dry-run", str(tmp_path / "d")])
    assert unknown.exit_code == 2 and "paid-embeddings" in unknown.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    busy = runner.invoke(cli, [*base, str(tmp_path / "full"), "--embedded-ledger", "/data"])
    assert busy.exit_code == 2 and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    persistent = runner.invoke(cli, [*base, str(tmp_path / "e"), "--embedded-ledger", "/data", "--json"])
    assert persistent.exit_code == 0, persistent.output
    assert json.loads(persistent.output)["variables"] == {"HF_ESCROW_HOME": "/data"}


def test_deploy_creates_the_space_uploads_the_folder_and_sets_its_settings(tmp_path):
    """The real huggingface_hub client against a recording stand-in for the Hub (HF_ENDPOINT)."""
    reference, _ = dry_run(tmp_path / "reference", "paid-embeddings")
    hub = create_hub()
    with serve_app(hub) as endpoint:
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_ENDPOINT=endpoint, HF_TOKEN=HUB_TOKEN,
                   HF_ESCROW_SELLER_KEY=SELLER_KEY, HF_HUB_DISABLE_TELEMETRY="1")
        env.pop("HF_HUB_OFFLINE", None)
        done = subprocess.run([sys.executable, "-m", "hf_escrow.cli", "space", "deploy", "paid-embeddings",
                               "--repo", "seller/embed", "--escrow-url", "http://127.0.0.1:8787", "--private",
                               "--var", "HF_ESCROW_PRICE=0.0001", "--json"],
                              env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
    calls = hub.state.calls
    assert {call["authorization"] for call in calls} == {f"Bearer {HUB_TOKEN}"}
    create = json.loads(next(c["body"] for c in calls if c["path"] == "/api/repos/create"))
    assert create == {"name": "embed", "organization": "seller", "visibility": "private", "type": "space",
                      "sdk": "gradio"}
    files = committed_files(calls)
    expected = {p.relative_to(reference).as_posix(): p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    assert files == expected  # exactly the dry run's folder
    secrets = [json.loads(c["body"]) for c in calls if c["path"] == "/api/spaces/seller/embed/secrets"]
    assert secrets == [{"key": "HF_ESCROW_SELLER_KEY", "value": SELLER_KEY}]
    variables = {json.loads(c["body"])["key"]: json.loads(c["body"])["value"]
                 for c in calls if c["path"] == "/api/spaces/seller/embed/variables"}
    assert variables == {"HF_ESCROW_URL": "http://127.0.0.1:8787", "HF_ESCROW_PRICE": "0.0001"}
    assert not [c for c in calls if SELLER_KEY.encode() in c["body"] and not c["path"].endswith("/secrets")]
    assert json.loads(done.stdout)["url"].endswith("/spaces/seller/embed")
