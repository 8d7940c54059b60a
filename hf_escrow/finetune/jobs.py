"""The job flows on an `EscrowClient`: post (buyer), run and submit (seller), verify (verifier), status.

The money moves only through the client: `post_job` locks the budget in a benchmark-
gated escrow, `run_job` trains and calls `submit_result` with the adapter's sha256, and
`verify_job` re-scores the adapter on the held-out data and calls `verify`. With the
verifier "self" (the seeds' behaviour) the ledger releases on the seller's own score;
by default a job names the buyer, and the seller's score is only a claim.

A milestone job (`[benchmark] milestones`) pays in parts: the seller's run scores its
adapter every `training.stage_steps` and submits each stage's snapshot as soon as it reaches
the next milestone (waiting for the verdict on the one before, which must pass first); each
`verify_job` that passes pays that milestone's share at once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from .._exceptions import ArtifactMismatch, Forbidden, JobError
from .._models import Escrow, Receipt
from .artifact import ArtifactError, adapter_sha256, private_copy
from .data import file_sha256, generate
from .spec import META_KIND, JobSpec
from .train import Log, Stage, TrainResult, evaluate_adapter, train_adapter

WAIT_POLL_S = 0.25


@dataclass
class JobRun:
    escrow_id: str | None
    spec: JobSpec
    result: TrainResult
    receipt: Receipt | None
    seconds: float
    receipts: list[Receipt] = field(default_factory=list)   # every submission of a milestone run
    stages: list[tuple[int, float]] = field(default_factory=list)  # (step, validation score) per stage


@dataclass
class Verdict:
    escrow_id: str
    metric: str
    threshold: float
    submitted_score: float | None
    score: float | None               # the verifier's own score; None when the artifact was refused
    passed: bool
    sha256_ok: bool
    refused: str | None               # why the artifact was refused without evaluation
    receipt: Receipt | None
    rows: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    milestone: int | None = None      # the milestone judged, on a milestone job


@dataclass
class JobStatus:
    escrow_id: str
    name: str
    task: str
    status: str
    buyer: str
    seller: str
    verifier: str
    metric: str
    threshold: float
    higher_is_better: bool
    submitted_score: float | None
    verified_score: float | None
    verdict: str | None               # "passed", "failed" or None (not judged yet)
    amount: Decimal
    paid: Decimal
    fees: Decimal
    referral: Decimal
    refunded: Decimal
    remaining: Decimal
    expires_at: datetime
    artifact_sha256: str | None
    milestones: list | None = None    # hf_escrow.Milestone per milestone, on a milestone job


# ---- buyer ---------------------------------------------------------------------------


def make_data(spec: JobSpec, *, force: bool = False) -> dict[str, Path]:
    """Write the spec's generated train and held-out files (kept when present, unless `force`).

    Example:
        >>> make_data(JobSpec.load("jobs/minilm-negation-sentiment.toml"))   # doctest: +SKIP
        {'train': PosixPath('.../train.jsonl'), 'held_out': PosixPath('.../held_out.jsonl')}
    """
    files = {"train": spec.train, "held_out": spec.held_out}
    if spec.generate is None:
        missing = [str(p) for p in files.values() if p is not None and not p.is_file()]
        if missing:
            raise JobError(f"missing data files {', '.join(missing)} and the spec has no [data.generate] recipe")
        return files
    g = spec.generate
    if force or not spec.train.is_file():
        generate(g.generator, spec.train, seed=g.train_seed, rows=g.train_rows)
    if spec.held_out is not None and (force or not spec.held_out.is_file()):
        if g.held_out_seed == g.train_seed:
            raise JobError("held_out_seed must differ from train_seed: held-out rows must be new to the seller")
        generate(g.generator, spec.held_out, seed=g.held_out_seed, rows=g.held_out_rows)
    return files


def post_job(client: Any, spec: JobSpec | str | Path, *, seller: str | None = None, verifier: str | None = None,
             budget: Any = None, ttl_seconds: float | None = None, idempotency_key: str | None = None) -> Escrow:
    """As the buyer: lock the job's budget in a benchmark-gated escrow for its seller.

    The escrow's meta carries the job (base model, task, training data and its sha256,
    metric, threshold, training defaults and limits) and commits to the held-out data by
    sha256 only. Data files are generated first if the spec has a recipe.

    Example:
        >>> buyer = hf_escrow.connect(agent="buyer-1")
        >>> e = post_job(buyer, "jobs/minilm-negation-sentiment.toml")
        >>> e.status, e.release_condition["verifier"]
        ('active', 'buyer')
    """
    if not isinstance(spec, JobSpec):
        spec = JobSpec.load(spec)
    if verifier is not None:
        spec = _replace(spec, verifier=verifier)
    seller = seller or spec.seller
    if not seller:
        raise JobError("name the seller: [escrow] seller in the spec, or seller=...")
    if spec.held_out is None:
        raise JobError("the spec names no held-out data ([data] held_out): the verifier would have nothing to score")
    make_data(spec)
    meta = spec.public_meta()
    escrow = client.create_escrow(
        seller, budget if budget is not None else spec.budget,
        ttl_seconds=ttl_seconds if ttl_seconds is not None else spec.ttl_seconds,
        description=spec.description or f"LoRA fine-tune of {spec.base_model}: {spec.name} ({gate_text(spec)})",
        meta=meta, release_condition=spec.release_condition(), idempotency_key=idempotency_key)
    _remember(escrow.id, spec)
    return escrow


# ---- seller --------------------------------------------------------------------------


def run_job(client: Any, target: str | Path | JobSpec, *, output_dir: str | Path | None = None,
            base_model: str | Path | None = None, training: dict | None = None, submit: bool = True,
            progress: Any = None, log: Log | None = None, wait_s: float = 600.0) -> JobRun:
    """As the seller: train the job's LoRA adapter and submit its score and sha256.

    `target` is an escrow id (the job is read from its meta), or a spec (file or
    JobSpec): then the newest active escrow of that job for this seller is used.
    `training` changes hyperparameters within the job's limits. With `submit=False`
    nothing touches the ledger (a dry run; a spec target needs no escrow then).

    A milestone job submits during training: after each stage that reaches the next
    milestone, that stage's adapter snapshot (waiting up to `wait_s` at a stage for the
    verdict on the milestone before; training goes on meanwhile if it does not come).

    Example:
        >>> seller = hf_escrow.connect(agent="seller-1")
        >>> run = run_job(seller, escrow.id, training={"epochs": 2})
        >>> run.receipt.status                 # the buyer verifies next
        'awaiting_verification'
    """
    started = time.perf_counter()
    escrow = None
    if isinstance(target, JobSpec) or _is_spec_file(target):
        spec = target if isinstance(target, JobSpec) else JobSpec.load(target)
        if submit:
            escrow = _find_escrow(client, spec)
    else:
        escrow = client.get(str(target))
        spec = JobSpec.from_meta(escrow.meta)
    if escrow is not None and submit:
        me = whoami(client)
        if escrow.seller != me:
            raise Forbidden(f"only the seller {escrow.seller!r} runs escrow {escrow.id}; you are {me!r}")
        if escrow.status != "active" and not (spec.milestones and escrow.status == "awaiting_verification"):
            raise JobError(f"escrow {escrow.id} is {escrow.status}; a result can only be submitted while it is active")
        _check_metric(spec, escrow.meta)
    spec = spec.with_training(**(training or {}))
    work = Path(output_dir) if output_dir else jobs_home() / (escrow.id if escrow else f"{spec.name}-dry-run")
    train_path = _training_data(spec, work)
    say = log or (lambda message: None)
    seller = _MilestoneSeller(client, escrow.id if escrow and submit else None, spec, wait_s, say) \
        if spec.milestones else None
    result = train_adapter(spec, work, train_path=train_path, base_model=base_model, progress=progress, log=say,
                           on_stage=seller)
    say(f"{spec.metric} on the validation split: {result.score:.4f} ({gate_text(spec)}); "
        f"adapter sha256 {result.sha256}")
    if seller is not None:
        return JobRun(escrow.id if escrow else None, spec, result, seller.receipts[-1] if seller.receipts else None,
                      time.perf_counter() - started, receipts=seller.receipts, stages=seller.stages)
    receipt = submit_job(client, escrow.id, result) if escrow is not None and submit else None
    return JobRun(escrow.id if escrow else None, spec, result, receipt, time.perf_counter() - started)


class _MilestoneSeller:
    """The seller's side of a milestone job, called at every stage of training (see `run_job`)."""

    def __init__(self, client: Any, escrow_id: str | None, spec: JobSpec, wait_s: float, say: Log):
        self.client, self.escrow_id, self.spec, self.wait_s, self.say = client, escrow_id, spec, wait_s, say
        self.receipts: list[Receipt] = []
        self.stages: list[tuple[int, float]] = []

    def __call__(self, stage: Stage) -> bool:
        """Submit `stage` if it reaches the next milestone due; True when nothing is left to earn."""
        self.stages.append((stage.step, stage.score))
        self.say(f"stage at step {stage.step}: {self.spec.metric} {stage.score:.4f} on the validation split")
        if self.escrow_id is None:
            return False
        escrow = self._settled()
        if not escrow.is_open:
            self.say(f"escrow {escrow.id} is {escrow.status}: training stops")
            return True
        if escrow.status == "awaiting_verification":
            self.say(f"milestone {escrow.result.get('milestone')} still awaits its verdict; training goes on")
            return False
        due = next((m for m in escrow.milestones if m.status != "paid"), None)
        if due is None:
            return True
        if not milestone_reached(self.spec, due.threshold, stage.score):
            return False
        receipt = self.client.submit_result(self.escrow_id, metric=self.spec.metric, score=stage.score,
                                            artifact=stage.artifact(), milestone=due.number,
                                            # keys are the agent's: this escrow, milestone, try and adapter
                                            idempotency_key=f"{self.escrow_id}:milestone-{due.number}-try-"
                                                            f"{due.failures}-{stage.sha256}")
        self.receipts.append(receipt)
        self.say(f"submitted milestone {due.number} ({self.spec.metric} {stage.score:.4f}, step {stage.step}); "
                 "it awaits the verifier")
        return False

    def _settled(self) -> Escrow:
        """The escrow once no milestone awaits its verdict, or as it is after `wait_s`."""
        deadline = time.monotonic() + self.wait_s
        escrow = self.client.get(self.escrow_id)
        while escrow.status == "awaiting_verification" and time.monotonic() < deadline:
            time.sleep(WAIT_POLL_S)
            escrow = self.client.get(self.escrow_id)
        return escrow


def milestone_reached(spec: JobSpec, threshold: float, score: float) -> bool:
    return score >= threshold if spec.higher_is_better else score <= threshold


def gate_text(spec: JobSpec) -> str:
    """What releases the job's money, for people: "accuracy >= 0.9" or its milestones."""
    sign = ">=" if spec.higher_is_better else "<="
    if not spec.milestones:
        return f"{spec.metric} {sign} {spec.threshold}"
    parts = []
    for m in spec.milestones:
        share = "the rest" if m["rest"] else f"{m['share_bps'] / 100:g}%"
        parts.append(f"{m['threshold']:g} pays {share}")
    return f"{spec.metric} {sign} " + ", ".join(parts)


def submit_job(client: Any, escrow_id: str, result: TrainResult, *, score: float | None = None,
               idempotency_key: str | None = None) -> Receipt:
    """As the seller: submit the run's score (or `score`) with the adapter as the artifact."""
    return client.submit_result(escrow_id, metric=result.metric, score=result.score if score is None else score,
                                artifact=result.artifact(), idempotency_key=idempotency_key)


# ---- verifier ------------------------------------------------------------------------


def verify_job(client: Any, escrow_id: str, *, held_out: str | Path | None = None,
               spec: JobSpec | str | Path | None = None, base_model: str | Path | None = None,
               log: Log | None = None, idempotency_key: str | None = None) -> Verdict:
    """As the named verifier: check the adapter's sha256, score it on held-out data, record the verdict.

    The held-out file is `held_out`, else the spec's (given, or remembered from
    `post_job` on this machine); it must hash to the commitment in the escrow's meta.
    The adapter is copied to a private folder and hashed there; a missing, unsafe or
    changed adapter is refused without evaluation: a failing verdict is recorded and
    `ArtifactMismatch` raised. Otherwise the verifier's own score decides: pass releases
    the escrow to the seller, fail returns it to active until its TTL refunds the buyer.
    On a milestone job the result is judged against its milestone's threshold, and a pass
    pays that milestone's share.

    Example:
        >>> verdict = verify_job(buyer, escrow.id)
        >>> verdict.passed, verdict.receipt.status
        (True, 'released')
    """
    say = log or (lambda message: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    escrow = client.get(escrow_id)
    job = JobSpec.from_meta(escrow.meta)
    me = whoami(client)
    if escrow.verifier is None:
        raise JobError(f"escrow {escrow_id} has verifier \"self\": it settled on the seller's own score at submit")
    if escrow.verifier != me:
        raise Forbidden(f"only the named verifier {escrow.verifier!r} may verify escrow {escrow_id}; you are {me!r}")
    if escrow.status != "awaiting_verification":
        raise JobError(f"escrow {escrow_id} is {escrow.status}; there is no submitted result to verify")
    local = _local_spec(escrow_id, spec)
    if local is not None:
        _check_metric(local, escrow.meta)
        job = _replace(job, metric_module=local.metric_module)
    else:
        _check_metric(job, escrow.meta)
    data = Path(held_out) if held_out else (local.held_out if local is not None else None)
    if data is None:
        raise JobError(f"no held-out data for {escrow_id}: pass held_out=... (or the job's spec)")
    if not data.is_file():
        raise JobError(f"held-out data {data} does not exist")
    if job.held_out_sha256 and file_sha256(data) != job.held_out_sha256:
        raise JobError(f"held-out data {data} is not the data this job committed to (sha256 differs); "
                       "verify with the file the job was posted with")
    result = escrow.result or {}
    artifact = result.get("artifact") or {}
    submitted = result.get("score")
    milestone = result.get("milestone") if escrow.milestones else None
    if milestone is not None:  # judged against the threshold of the milestone it was submitted for
        job = _replace(job, threshold=escrow.milestones[milestone - 1].threshold)
    timings["escrow_read_s"] = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="hf-escrow-verify-") as work:
        start = time.perf_counter()
        refused = None
        try:
            if not artifact.get("repo") or not artifact.get("sha256"):
                raise ArtifactError("the result carries no artifact repo and sha256")
            copy = private_copy(artifact["repo"], Path(work) / "adapter")
            actual = adapter_sha256(copy)
            if actual != artifact["sha256"]:
                raise ArtifactError(f"adapter sha256 {actual} does not match the submitted {artifact['sha256']}")
        except ArtifactError as error:
            refused = str(error)
        timings["hash_s"] = time.perf_counter() - start
        if refused is not None:
            say(f"refused: {refused}")
            start = time.perf_counter()
            receipt = client.verify(escrow_id, score=refusal_score(job), idempotency_key=idempotency_key)
            timings["escrow_verify_s"] = time.perf_counter() - start
            verdict = Verdict(escrow_id, job.metric, job.threshold, submitted, None, False, False, refused, receipt,
                              timings=timings, milestone=milestone)
            raise ArtifactMismatch(f"escrow {escrow_id}: {refused}; recorded as failed", verdict)
        evaluation = evaluate_adapter(job, copy, data, base_model=base_model, log=say)
        timings["eval_s"] = evaluation.seconds
    say(f"{job.metric} on {evaluation.rows} held-out rows: {evaluation.score:.4f} (threshold {job.threshold}, "
        f"seller claimed {submitted})")
    start = time.perf_counter()
    receipt = client.verify(escrow_id, score=evaluation.score, idempotency_key=idempotency_key)
    timings["escrow_verify_s"] = time.perf_counter() - start
    return Verdict(escrow_id, job.metric, job.threshold, submitted, evaluation.score, bool(receipt.passed), True, None,
                   receipt, rows=evaluation.rows, timings=timings, milestone=milestone)


def refusal_score(spec: JobSpec) -> float:
    """The verdict recorded for an artifact that could not be evaluated: a score that fails."""
    t = spec.threshold
    if spec.higher_is_better:
        return 0.0 if t > 0 else t - 1.0
    return t + 1.0


# ---- anyone --------------------------------------------------------------------------


def job_status(client: Any, escrow_id: str | None = None, *, limit: int = 50) -> list[JobStatus]:
    """One job escrow (by id), or this agent's job escrows as buyer or seller, newest first."""
    escrows = [client.get(escrow_id)] if escrow_id else [
        client.get(e.id) for e in client.history(limit=limit) if _is_job(e.meta)]
    return [_status(e) for e in escrows if _is_job(e.meta)]


def whoami(client: Any) -> str:
    """The agent a client acts for (embedded: its `agent`; over HTTP: its key's owner)."""
    return client.agent or client.me().agent_id


def jobs_home() -> Path:
    """Where runs and the buyer's job records go: `$HF_ESCROW_HOME/jobs` (default ~/.cache/hf-escrow/jobs)."""
    home = os.environ.get("HF_ESCROW_HOME") or Path.home() / ".cache" / "hf-escrow"
    return Path(home).expanduser() / "jobs"


# ---- helpers -------------------------------------------------------------------------


def _replace(spec: JobSpec, **changes: Any) -> JobSpec:
    import dataclasses
    return dataclasses.replace(spec, **changes)


def _is_spec_file(target: Any) -> bool:
    if isinstance(target, Path):
        return True
    return isinstance(target, str) and (target.endswith(".toml") or Path(target).is_file())


def _is_job(meta: dict | None) -> bool:
    job = meta.get("job") if isinstance(meta, dict) else None
    return isinstance(job, dict) and job.get("kind") == META_KIND


def _find_escrow(client: Any, spec: JobSpec) -> Escrow:
    fingerprint = spec.sha256()
    for escrow in client.history(role="seller", limit=100):
        job = (escrow.meta or {}).get("job") or {}
        usable = escrow.status == "active" or (spec.milestones and escrow.status == "awaiting_verification")
        if usable and _is_job(escrow.meta) and job.get("spec_sha256") == fingerprint:
            return escrow
    raise JobError(f"no active escrow for job {spec.name!r} with you as the seller; the buyer posts it with "
                   "`hf-escrow jobs post SPEC` (or run with --dry-run to train without one)")


def _check_metric(spec: JobSpec, meta: dict | None) -> None:
    expected = ((meta or {}).get("job") or {}).get("metric_sha256")
    if expected and file_sha256(spec.metric_path()) != expected:
        raise JobError(f"the metric module {spec.metric_path()} differs from the one this job was posted with; "
                       "use the job's spec (its metric_module) or the same hf-escrow version")


def _training_data(spec: JobSpec, work: Path) -> Path:
    """The training file, regenerated from the job's recipe when it is not on this machine."""
    path = spec.train
    if not path.is_file():
        if spec.generate is None:
            raise JobError(f"training data {path} is not on this machine and the job has no recipe to make it")
        path = work / "data" / spec.train.name
        g = spec.generate
        generate(g.generator, path, seed=g.train_seed, rows=g.train_rows)
    if spec.train_sha256 and file_sha256(path) != spec.train_sha256:
        raise JobError(f"training data {path} is not the data the job was posted with (sha256 differs)")
    return path


def _remember(escrow_id: str, spec: JobSpec) -> None:
    """The buyer's local record of a posted job: where its spec and held-out data are."""
    folder = jobs_home() / "posted"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"escrow_id": escrow_id, "spec": str(spec.path) if spec.path else None,
              "held_out": str(spec.held_out) if spec.held_out else None,
              "metric_module": str(spec.metric_module) if spec.metric_module else None}
    tmp = folder / f".{escrow_id}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(folder / f"{escrow_id}.json")


def _local_spec(escrow_id: str, spec: JobSpec | str | Path | None) -> JobSpec | None:
    if isinstance(spec, JobSpec):
        return spec
    if spec is not None:
        return JobSpec.load(spec)
    record_path = jobs_home() / "posted" / f"{escrow_id}.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if record.get("spec") and Path(record["spec"]).is_file():
        loaded = JobSpec.load(record["spec"])
        if record.get("held_out"):
            loaded = _replace(loaded, held_out=Path(record["held_out"]))
        return loaded
    return None


def _status(escrow: Escrow) -> JobStatus:
    job = escrow.meta["job"]
    condition = escrow.release_condition or {}
    result = escrow.result or {}
    verified, verdict = None, None
    for event in escrow.events:
        if event.kind in ("benchmark_passed", "benchmark_failed", "milestone_passed", "milestone_failed"):
            verdict = "passed" if event.kind.endswith("_passed") else "failed"
            verified = event.data.get("score") if escrow.verifier else None
    if escrow.milestones:
        paid = sum(m.status == "paid" for m in escrow.milestones)
        verdict = f"{paid}/{len(escrow.milestones)} milestones paid"
    return JobStatus(
        escrow_id=escrow.id, name=job["name"], task=job["task"], status=escrow.status, buyer=escrow.buyer,
        seller=escrow.seller, verifier=escrow.verifier or "self", metric=job["metric"],
        threshold=float(condition.get("threshold", job["threshold"])),
        higher_is_better=bool(condition.get("higher_is_better", job["higher_is_better"])),
        submitted_score=result.get("score"),
        verified_score=verified, verdict=verdict, amount=escrow.amount, paid=escrow.paid, fees=escrow.fees,
        referral=escrow.referral, refunded=escrow.refunded, remaining=escrow.remaining,
        expires_at=escrow.expires_at, artifact_sha256=(result.get("artifact") or {}).get("sha256"),
        milestones=escrow.milestones)
