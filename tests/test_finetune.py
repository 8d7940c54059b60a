"""Benchmark-gated LoRA fine-tune jobs, end to end on real models and the real ledger.

MiniLM (packaged all-MiniLM-L6-v2) jobs train on generated data in a few seconds to
half a minute; one good adapter is trained once (through the CLI) and reused where a
test is about the verifier rather than the training. The gemma-3-270m causal-LM job
runs in the slow, `model`-marked test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hf_escrow
from hf_escrow.client import EmbeddedTransport, EscrowClient, embedded_ledger
from hf_escrow.cli import app
from hf_escrow.finetune import (
    ArtifactError, ArtifactMismatch, JobError, JobSpec, adapter_sha256, job_status, make_data, post_job, run_job,
    submit_job, train_adapter, verify_job,
)
from hf_escrow.ledger import Ledger, LedgerConfig

from .helpers import assert_audit_clean, snapshot

REPO = Path(__file__).resolve().parent.parent
MINILM_SPEC = REPO / "jobs" / "minilm-negation-sentiment.toml"
GEMMA_SPEC = REPO / "jobs" / "gemma-negation-verdict.toml"

runner = CliRunner()


@contextlib.contextmanager
def environ(**values: str):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def spec_copy(source: Path, folder: Path, **replace: str) -> Path:
    """The shipped spec in `folder` (so its data is generated there), one CPU thread, some lines changed."""
    text = source.read_text().replace("\nseed = 0\n", "\nseed = 0\nthreads = 1\n")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    target.write_text(text)
    return target


def cli(*args: str) -> dict:
    result = runner.invoke(app, ["jobs", *args, "--json"])
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def clients(ledger: Ledger, *names: str) -> dict[str, EscrowClient]:
    return {name: EscrowClient(EmbeddedTransport(ledger), agent=name) for name in names}


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def market(tmp_path):
    """A ledger with a clock the test moves, and funded buyer, seller, auditor, outsider."""
    clock = Clock()
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", config=LedgerConfig(), clock=clock)
    for name in ("buyer-1", "seller-1", "auditor-1", "mallory"):
        ledger.register(name)
    ledger.deposit("buyer-1", "50")
    yield ledger, clock, clients(ledger, "buyer-1", "seller-1", "auditor-1", "mallory")
    ledger.close()


@pytest.fixture(scope="module")
def good_job(tmp_path_factory):
    """Posted and run through the CLI: a well-trained MiniLM adapter awaiting the buyer's verdict."""
    home = tmp_path_factory.mktemp("good-job")
    db = f"sqlite:///{home / 'ledger.db'}"
    with environ(HF_ESCROW_HOME=str(home)):
        ledger = embedded_ledger(db)
        referrer = ledger.register("referrer-1")
        ledger.register("seller-1", referral_code=referrer["referral_code"])
        ledger.register("buyer-1")
        ledger.deposit("buyer-1", "50")
        spec = spec_copy(MINILM_SPEC, home / "spec")
        posted = cli("post", str(spec), "--agent", "buyer-1", "--database-url", db)
        run = cli("run", str(spec), "--agent", "seller-1", "--database-url", db)  # finds the escrow from the spec
    return {"home": home, "db": db, "spec": spec, "escrow_id": posted["id"], "run": run, "ledger": ledger}


@pytest.fixture(scope="module")
def brief_adapter(tmp_path_factory):
    """A MiniLM adapter trained for 8 steps: far below the threshold."""
    folder = tmp_path_factory.mktemp("brief")
    spec = JobSpec.load(spec_copy(MINILM_SPEC, folder / "spec"))
    make_data(spec)
    return spec, train_adapter(spec.with_training(max_steps=8), folder / "run")


def posted_spec(tmp_path: Path, **replace: str) -> JobSpec:
    spec = JobSpec.load(spec_copy(MINILM_SPEC, tmp_path / "spec", **replace))
    make_data(spec)
    return spec


def copy_adapter(source: Path, target: Path) -> dict:
    shutil.copytree(source, target)
    return {"repo": str(target), "revision": "test", "sha256": adapter_sha256(target)}


# ---- specs, data, hashes ---------------------------------------------------------------


def test_shipped_specs_load_and_keep_held_out_data_out_of_the_escrow(tmp_path):
    for source in (MINILM_SPEC, GEMMA_SPEC):
        spec = JobSpec.load(spec_copy(source, tmp_path / source.stem))
        assert spec.verifier == "buyer" and spec.held_out is not None
        files = make_data(spec)
        first = {name: path.read_bytes() for name, path in files.items()}
        make_data(spec, force=True)
        assert {name: path.read_bytes() for name, path in files.items()} == first  # deterministic
        train_rows = {line for line in first["train"].splitlines()}
        held_rows = [line for line in first["held_out"].splitlines()]
        assert sum(row in train_rows for row in held_rows) < len(held_rows) * 0.05  # new rows for the verifier
        meta = spec.public_meta()
        text = json.dumps(meta)
        assert str(spec.held_out) not in text and "held_out.jsonl" not in text
        assert meta["job"]["held_out"]["rows"] == len(held_rows) and len(meta["job"]["held_out"]["sha256"]) == 64
        seller_view = JobSpec.from_meta(meta)
        assert seller_view.held_out is None and seller_view.training == spec.training
        assert seller_view.train_sha256 == meta["job"]["train"]["sha256"]


def test_bad_specs_and_runs_over_the_limits_are_refused(tmp_path):
    with pytest.raises(JobError, match="task"):
        JobSpec.load(spec_copy(MINILM_SPEC, tmp_path / "a", **{'task = "sequence-classification"': 'task = "rlhf"'}))
    with pytest.raises(JobError, match="unknown keys"):
        JobSpec.load(spec_copy(MINILM_SPEC, tmp_path / "b", **{"max_length = 32": "max_len = 32"}))
    with pytest.raises(JobError, match="metric module"):
        JobSpec.load(spec_copy(MINILM_SPEC, tmp_path / "c", **{'metric = "accuracy"': 'metric = "bleu"'}))
    spec = JobSpec.load(MINILM_SPEC)
    with pytest.raises(JobError, match="limit"):
        spec.with_training(epochs=9)
    with pytest.raises(JobError, match="limit"):
        spec.with_training(max_steps=5000)


def test_adapter_sha256_covers_every_file_in_a_stable_order(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "b.json").write_text("{}")
    (folder / "a.bin").write_bytes(b"\0\1")
    digest = adapter_sha256(folder)
    assert digest == adapter_sha256(folder) and len(digest) == 64
    (folder / "a.bin").write_bytes(b"\0\2")
    assert adapter_sha256(folder) != digest
    (folder / "a.bin").write_bytes(b"\0\1")
    (folder / "sub").mkdir()
    (folder / "sub" / "c").write_text("")
    assert adapter_sha256(folder) != digest
    (folder / "sub" / "c").unlink()
    (folder / "sub").rmdir()
    assert adapter_sha256(folder) == digest
    (folder / "link").symlink_to(folder / "b.json")
    with pytest.raises(ArtifactError, match="link"):
        adapter_sha256(folder)


# ---- MiniLM end to end -----------------------------------------------------------------


def test_good_job_is_verified_and_paid_with_exact_fee_and_referral(good_job, monkeypatch):
    monkeypatch.setenv("HF_ESCROW_HOME", str(good_job["home"]))  # where the buyer's post left its record
    run, db, escrow_id = good_job["run"], good_job["db"], good_job["escrow_id"]
    assert run["escrow_id"] == escrow_id and run["score"] >= 0.9
    assert run["receipt"]["status"] == "awaiting_verification" and Decimal(run["receipt"]["gross"]) == 0
    assert run["artifact"]["sha256"] == adapter_sha256(run["artifact"]["repo"])

    verdict = cli("verify", escrow_id, "--agent", "buyer-1", "--database-url", db)
    assert verdict["passed"] and verdict["sha256_ok"] and verdict["score"] >= 0.9 and verdict["rows"] == 400
    receipt = verdict["receipt"]
    assert receipt["status"] == "released"
    assert (Decimal(receipt["gross"]), Decimal(receipt["fee"]), Decimal(receipt["referral"]),
            Decimal(receipt["net"])) == (Decimal("5"), Decimal("0.05"), Decimal("0.0075"), Decimal("4.95"))

    buyer = hf_escrow.connect(agent="buyer-1", database_url=db)
    escrow = buyer.get(escrow_id)
    assert (escrow.status, escrow.paid, escrow.fees, escrow.referral, escrow.refunded, escrow.remaining) == (
        "released", Decimal("5"), Decimal("0.05"), Decimal("0.0075"), Decimal("0"), Decimal("0"))
    balances = {name: hf_escrow.connect(agent=name, database_url=db).me().balance
                for name in ("buyer-1", "seller-1", "referrer-1")}
    assert balances == {"buyer-1": Decimal("45"), "seller-1": Decimal("4.95"), "referrer-1": Decimal("0.0075")}
    assert_audit_clean(good_job["ledger"])

    status = cli("status", "--agent", "buyer-1", "--database-url", db)
    assert [(s["escrow_id"], s["status"], s["verdict"]) for s in status] == [(escrow_id, "released", "passed")]
    assert status[0]["submitted_score"] == run["score"] and status[0]["verified_score"] == verdict["score"]


def test_undertrained_job_fails_verification_and_is_refunded_at_ttl(market, tmp_path):
    ledger, clock, c = market
    spec = posted_spec(tmp_path)
    escrow = post_job(c["buyer-1"], spec, ttl_seconds=3600)
    run = run_job(c["seller-1"], escrow.id, output_dir=tmp_path / "run", training={"max_steps": 8})
    assert run.result.steps == 8 and run.receipt.status == "awaiting_verification"

    verdict = verify_job(c["buyer-1"], escrow.id)
    assert not verdict.passed and verdict.score < 0.7 and verdict.sha256_ok
    assert verdict.receipt.status == "active" and verdict.receipt.gross == 0
    assert c["buyer-1"].me().balance == Decimal("45")

    clock.now += 3601
    assert ledger.expire_due() == 1
    escrow = c["buyer-1"].get(escrow.id)
    assert (escrow.status, escrow.paid, escrow.fees, escrow.refunded) == ("expired", 0, 0, Decimal("5"))
    assert c["buyer-1"].me().balance == Decimal("50") and c["seller-1"].me().balance == 0
    assert [s.verdict for s in job_status(c["buyer-1"], escrow.id)] == ["failed"]
    with pytest.raises(hf_escrow.StateConflict):
        submit_job(c["seller-1"], escrow.id, run.result)
    assert_audit_clean(ledger)


def test_a_dry_run_on_an_escrow_submits_nothing(market, tmp_path):
    ledger, clock, c = market
    escrow = post_job(c["buyer-1"], posted_spec(tmp_path), ttl_seconds=3600)
    before = snapshot(ledger)
    run = run_job(c["seller-1"], escrow.id, output_dir=tmp_path / "dry", training={"max_steps": 1}, submit=False)
    assert run.result.steps == 1 and run.receipt is None and run.escrow_id == escrow.id
    assert c["buyer-1"].get(escrow.id).status == "active" and snapshot(ledger) == before


def test_inflated_self_reported_score_is_caught_by_the_verifier(market, tmp_path, brief_adapter):
    ledger, clock, c = market
    _, result = brief_adapter
    spec = posted_spec(tmp_path)
    escrow = post_job(c["buyer-1"], spec)
    receipt = submit_job(c["seller-1"], escrow.id, result, score=0.99)   # claims 0.99
    assert receipt.status == "awaiting_verification" and receipt.gross == 0

    verdict = verify_job(c["buyer-1"], escrow.id, held_out=spec.held_out)
    assert verdict.submitted_score == 0.99 and verdict.score < 0.7 and not verdict.passed
    assert verdict.receipt.status == "active" and c["seller-1"].me().balance == 0

    # The seeds' behaviour, verifier "self": the same claim is paid at once. Hence the default.
    trusting = post_job(c["buyer-1"], spec, verifier="self")
    paid = submit_job(c["seller-1"], trusting.id, result, score=0.99)
    assert paid.status == "released" and paid.gross == Decimal("5")
    with pytest.raises(JobError, match="self"):
        verify_job(c["buyer-1"], trusting.id)
    assert_audit_clean(ledger)


@pytest.mark.parametrize("tamper", ["change-weights", "add-file"])
def test_tampered_adapter_is_refused_without_payment(market, tmp_path, good_job, tamper):
    ledger, clock, c = market
    spec = posted_spec(tmp_path)
    escrow = post_job(c["buyer-1"], spec)
    artifact = copy_adapter(Path(good_job["run"]["artifact"]["repo"]), tmp_path / "adapter")
    c["seller-1"].submit_result(escrow.id, "accuracy", 0.99, artifact=artifact)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    if tamper == "change-weights":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (tmp_path / "adapter" / "extra.py").write_text("print('hi')\n")

    with pytest.raises(ArtifactMismatch, match="sha256") as refused:
        verify_job(c["buyer-1"], escrow.id)
    verdict = refused.value.verdict
    assert verdict.refused and verdict.score is None and not verdict.sha256_ok and not verdict.passed
    escrow = c["buyer-1"].get(escrow.id)
    assert escrow.status == "active" and escrow.paid == 0 and c["seller-1"].me().balance == 0
    assert [e.kind for e in escrow.events][-1] == "benchmark_failed"
    assert_audit_clean(ledger)


def test_only_the_named_verifier_can_verify(market, tmp_path, good_job):
    ledger, clock, c = market
    spec = posted_spec(tmp_path, **{'verifier = "buyer"': 'verifier = "auditor-1"'})
    escrow = post_job(c["buyer-1"], spec)
    assert escrow.verifier == "auditor-1"
    artifact = copy_adapter(Path(good_job["run"]["artifact"]["repo"]), tmp_path / "adapter")
    c["seller-1"].submit_result(escrow.id, "accuracy", good_job["run"]["score"], artifact=artifact)

    for name in ("buyer-1", "seller-1"):
        with pytest.raises(hf_escrow.Forbidden, match="auditor-1"):
            verify_job(c[name], escrow.id)
        with pytest.raises(hf_escrow.Forbidden):
            c[name].verify(escrow.id, score=1.0)                   # the ledger refuses too
    with pytest.raises(hf_escrow.NotFound):
        verify_job(c["mallory"], escrow.id)
    with pytest.raises(JobError, match="committed"):
        verify_job(c["auditor-1"], escrow.id, held_out=spec.train)  # not the committed held-out set
    assert c["buyer-1"].get(escrow.id).status == "awaiting_verification"

    verdict = verify_job(c["auditor-1"], escrow.id, held_out=spec.held_out)
    assert verdict.passed and verdict.receipt.status == "released"
    assert c["seller-1"].me().balance == Decimal("4.95") and c["auditor-1"].me().balance == 0
    assert_audit_clean(ledger)


def test_seller_cannot_run_a_job_without_its_escrow(market, tmp_path):
    ledger, clock, c = market
    spec = posted_spec(tmp_path)
    with pytest.raises(JobError, match="no active escrow"):
        run_job(c["seller-1"], spec.path)
    escrow = post_job(c["buyer-1"], spec)
    with pytest.raises(hf_escrow.Forbidden, match="seller"):
        run_job(c["buyer-1"], escrow.id)
    with pytest.raises(hf_escrow.NotFound):
        run_job(c["mallory"], escrow.id)
    with pytest.raises(JobError, match="limit"):
        run_job(c["seller-1"], escrow.id, training={"epochs": 50})


def test_jobs_over_http_with_api_keys(tmp_path, brief_adapter):
    """The same flow against `hf-escrow serve`: CLI with --url/--api-key, library over HTTP."""
    from hf_escrow.server.app import create_app

    from .liveserver import serve_app
    _, result = brief_adapter
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", config=LedgerConfig())
    keys = {name: ledger.register(name)["api_key"] for name in ("buyer-1", "seller-1")}
    ledger.deposit("buyer-1", "20")
    spec = spec_copy(MINILM_SPEC, tmp_path / "spec")
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as url:
        posted = cli("post", str(spec), "--url", url, "--api-key", keys["buyer-1"])
        seller = hf_escrow.connect(url, api_key=keys["seller-1"])
        receipt = submit_job(seller, posted["id"], result)
        assert receipt.status == "awaiting_verification"
        verdict = cli("verify", posted["id"], "--url", url, "--api-key", keys["buyer-1"])
        assert not verdict["passed"] and verdict["sha256_ok"] and verdict["receipt"]["status"] == "active"
        status = cli("status", posted["id"], "--url", url, "--api-key", keys["seller-1"])
        assert status[0]["verdict"] == "failed" and status[0]["submitted_score"] == result.score
    assert_audit_clean(ledger)
    ledger.close()


# ---- gemma-3-270m causal LM ------------------------------------------------------------


@pytest.mark.model
@pytest.mark.slow
def test_causal_lm_job_on_gemma_end_to_end(market, tmp_path, gemma_dir):
    """A 2-step run fails the held-out check and reopens the escrow; the full run then passes and is paid."""
    ledger, clock, c = market
    spec = JobSpec.load(spec_copy(GEMMA_SPEC, tmp_path / "spec", **{"held_out_rows = 100": "held_out_rows = 64"}))
    make_data(spec)
    escrow = post_job(c["buyer-1"], spec)

    brief = run_job(c["seller-1"], escrow.id, output_dir=tmp_path / "brief", base_model=gemma_dir,
                    training={"max_steps": 2})
    assert brief.result.steps == 2 and brief.receipt.status == "awaiting_verification"
    failed = verify_job(c["buyer-1"], escrow.id, base_model=gemma_dir)
    assert not failed.passed and failed.score < 0.5 and failed.receipt.status == "active"

    run = run_job(c["seller-1"], escrow.id, output_dir=tmp_path / "run", base_model=gemma_dir)
    assert run.result.steps == 24 and run.result.score >= 0.9
    assert run.receipt.status == "awaiting_verification"
    verdict = verify_job(c["buyer-1"], escrow.id, base_model=gemma_dir)
    assert verdict.passed and verdict.score >= 0.9 and verdict.rows == 64
    assert verdict.receipt.status == "released" and c["seller-1"].me().balance == Decimal("19.8")
    assert [s.verdict for s in job_status(c["buyer-1"], escrow.id)] == ["passed"]
    assert_audit_clean(ledger)
