"""`hf-escrow space deploy`: the folder a Space builds, and the hub calls that upload it."""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal
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


def dry_run(tmp_path: Path, template: str = "paid-chat", *, escrow_url: str = "http://127.0.0.1:8787",
            seller_key: str = SELLER_KEY, seller: str = "paid-chat") -> tuple[Path, dict]:
    out = tmp_path / template
    result = CliRunner().invoke(cli, ["space", "deploy", template, "--repo", "seller/space", "--escrow-url",
                                      escrow_url, "--seller-key", seller_key, "--seller", seller,
                                      "--dry-run", str(out), "--json"])
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


SPACE_INSTALL_ENV = "HF_ESCROW_TEST_SPACE_INSTALL"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(SPACE_INSTALL_ENV) != "1",
                    reason=f"installs a deployed Space's requirements into a fresh venv (about 6 minutes on 2 busy "
                           f"cores): set {SPACE_INSTALL_ENV}=1")
def test_a_deployed_folder_installs_and_answers_a_paid_call(tmp_path):
    """What a Space runs: requirements.txt installed from a folder holding only it (offline,
    from wheels of this environment's packages), then `python app.py` in the full folder,
    billing through `hf-escrow serve`."""
    import time

    import httpx
    from gradio_client import Client

    import hf_escrow
    from tests.liveserver import free_port, wait_http
    from tests.wheelhouse import build_wheelhouse

    port, space_port = free_port(), free_port()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "HF_ESCROW_URL",
                                                             "HF_ESCROW_API_KEY", "HF_ESCROW_DATABASE_URL")}
    server = subprocess.Popen([sys.executable, "-m", "hf_escrow.cli", "serve", "--port", str(port),
                               "--database-url", f"sqlite:///{tmp_path / 'ledger.db'}"],
                              env=dict(clean, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    space = None
    try:
        wait_http(base + "/healthz", timeout_s=120)
        seller_key = httpx.post(base + "/register", json={"agent_id": "paid-embeddings"}).json()["api_key"]
        buyer_key = httpx.post(base + "/register", json={"agent_id": "space-buyer"}).json()["api_key"]
        buyer = hf_escrow.connect(base, api_key=buyer_key)
        buyer.claim_faucet()
        folder, plan = dry_run(tmp_path, "paid-embeddings", escrow_url=base, seller_key=seller_key,
                               seller="paid-embeddings")

        only = tmp_path / "only-requirements"
        only.mkdir()
        (only / "requirements.txt").write_bytes((folder / "requirements.txt").read_bytes())
        packages = [line for line in (only / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith(("#", "-"))]
        wheels = build_wheelhouse(packages, Path.home() / ".cache" / "hf-escrow-test" / "wheelhouse",
                                  skip={"torch"})  # torch's CPU wheel lies in pip's find-links already
        venv = tmp_path / "venv"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=clean)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                        str(wheels), "-r", "requirements.txt"], cwd=only, check=True, timeout=1500, env=clean)
        print(f"installed the Space's requirements.txt in {time.monotonic() - started:.0f} s")
        assert subprocess.run([str(venv / "bin" / "python"), "-c", "import hf_escrow"], cwd=only,
                              env=clean).returncode != 0  # only the folder's vendored copy provides it

        space_env = dict(clean, **plan["variables"], HF_ESCROW_SELLER_KEY=seller_key,
                         GRADIO_SERVER_PORT=str(space_port), GRADIO_SERVER_NAME="127.0.0.1",
                         GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
        space = subprocess.Popen([str(venv / "bin" / "python"), "app.py"], cwd=folder, env=space_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{space_port}/", timeout_s=300)
        e = buyer.create_escrow("paid-embeddings", "0.01")
        client = Client(f"http://127.0.0.1:{space_port}", headers={"X-Escrow-Token": e.spend_token}, verbose=False)
        result, receipt = client.predict("an escrow pays the seller\nthe buyer gets the rest", api_name="/embed")
        assert result["count"] == 2 and result["dim"] == 384
        assert receipt["charged_usdc"] == "0.000200"
        assert buyer.get(e.id).paid == Decimal("0.0002")  # on the escrow server, not in the Space
    finally:
        for process in (space, server):
            if process is not None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()

