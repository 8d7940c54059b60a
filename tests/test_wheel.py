"""The package as users get it: `python -m build`, the wheel installed (not editable) into a
fresh virtual environment, and the installed console script run from outside the checkout.

The fresh environment gets its third-party dependencies by a path line pointing at this
interpreter's site-packages (installing them again would take minutes and prove nothing
about this package); `hf_escrow` itself must come from the wheel, which the test checks
before anything else: a file the wheel forgot fails here, not on a user's machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

import hf_escrow
from tests.liveserver import free_port, wait_http

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "wheel-test-operator-key-0123"


def _tracked(*paths: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", *paths], cwd=ROOT, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Build from a copy of the tracked files only (what a clean clone holds), install into a fresh venv."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are tracked")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    for rel in _tracked():
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_file():
            shutil.copy2(ROOT / rel, target)
    # --no-isolation: the build backend (setuptools) is the one the lock pins, already here.
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(work / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((work / "dist").glob("hf_escrow-*.whl"))
    venv = work / "venv"
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # Installed before the dependencies' path is added: pip sees an empty environment.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--force-reinstall", "--no-compile", str(wheel)], check=True, capture_output=True, timeout=300,
                   env=clean_env)
    # A plain path line, not `site.addsitedir`: the shared site-packages' own .pth files
    # (an editable install of this checkout among them) are not run.
    (purelib / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = dict(clean_env, HF_ESCROW_HOME=str(work / "home"), HF_HUB_OFFLINE="1",
               PATH=f"{venv / 'bin'}:{clean_env.get('PATH', '')}")
    return {"wheel": wheel, "venv": venv, "python": python, "purelib": purelib, "env": env, "cwd": work}


def _run(built: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=built["cwd"], env=built["env"], capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_carries_every_package_file(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    wanted = {rel for rel in _tracked("hf_escrow")} | {"hf_escrow/spaces/" + rel[len("spaces/"):]
                                                       for rel in _tracked("spaces")}
    missing = sorted(wanted - names)
    if missing:
        raise AssertionError(f"the wheel lacks {missing}: list the new package in pyproject.toml "
                             "[tool.setuptools] packages, or its files in package-data")
    assert f"hf_escrow-{hf_escrow.__version__}-py3-none-any.whl" == built["wheel"].name


def test_the_installed_package_is_the_wheel_not_the_checkout(built):
    probe = ("import hf_escrow, hf_escrow.server.app, importlib.metadata as m, json; "
             "print(json.dumps([hf_escrow.__file__, hf_escrow.server.app.__file__, hf_escrow.__version__, "
             "str(m.distribution('hf-escrow').locate_file(''))]))")
    out = _run(built, str(built["python"]), "-c", probe)
    assert out.returncode == 0, out.stderr
    package, server, version, dist = json.loads(out.stdout)
    for path in (package, server, dist):
        assert Path(path).resolve().is_relative_to(built["purelib"].resolve()), path
    assert version == hf_escrow.__version__
    assert _run(built, "hf-escrow", "--version").stdout.strip() == f"hf-escrow {hf_escrow.__version__}"


def test_migration_from_empty_then_audit(built):
    db = built["cwd"] / "empty.db"
    out = _run(built, "hf-escrow", "audit", "--json", "--database-url", f"sqlite:///{db}")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["transactions"] == 0
    import sqlite3
    heads = sorted(p.name.split("_")[0] for p in (ROOT / "hf_escrow/ledger/migrations/versions").glob("*.py"))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == heads[-1]


def test_installed_server_serves_an_escrow_lifecycle(built):
    port = free_port()
    env = dict(built["env"], HF_ESCROW_ADMIN_KEY=ADMIN_KEY)
    server = subprocess.Popen(["hf-escrow", "serve", "--port", str(port), "--database-url",
                               f"sqlite:///{built['cwd'] / 'served.db'}"],
                              cwd=built["cwd"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", timeout_s=60)
        page = httpx.get(base + "/dashboard")
        assert page.status_code == 200 and "dashboard.js" in page.text
        assert httpx.get(base + "/dashboard.js").status_code == 200
        assert httpx.get(base + "/readyz").json() == {"ok": True}

        def key_of(agent: str) -> dict:
            answer = httpx.post(base + "/register", json={"agent_id": agent})
            assert answer.status_code == 201, answer.text
            return {"Authorization": f"Bearer {answer.json()['api_key']}"}

        buyer, seller = key_of("wheel-buyer"), key_of("wheel-seller")
        assert httpx.post(base + "/claim", json={"agent_id": "wheel-buyer"}, headers=buyer).status_code == 200
        escrow = httpx.post(base + "/api/escrow", json={"seller_id": "wheel-seller", "amount_usdc": 1.0},
                            headers=buyer).json()
        hold = httpx.post(base + "/api/holds", json={"spend_token": escrow["spend_token"], "amount_usdc": 0.5},
                          headers=seller).json()
        captured = httpx.post(f"{base}/api/holds/{hold['id']}/capture", json={"amount_usdc": 0.25, "final": True},
                              headers=seller)
        assert captured.status_code == 200, captured.text
        released = httpx.post(f"{base}/api/escrow/{escrow['id']}/release", json={"amount_usdc": 0.25},
                              headers=buyer).json()
        assert released["status"] == "released"
        final = httpx.get(f"{base}/api/escrow/{escrow['id']}", headers=buyer).json()
        assert (final["paid_micro"], final["refunded_micro"]) == (500_000, 500_000)
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert httpx.get(base + "/api/audit", headers=admin).json()["ok"] is True
        metrics = httpx.get(base + "/metrics", headers=admin)
        assert metrics.status_code == 200 and "hf_escrow_ledger_paid_micro 500000.0" in metrics.text
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
