"""Benchmark-gated LoRA fine-tune jobs: post (buyer), run and submit (seller), verify (verifier).

The HuggingFace guide's flow, made trustworthy: the buyer locks the budget in an escrow
whose release condition is a benchmark (metric >= threshold); the seller trains a PEFT
LoRA adapter with the transformers Trainer and submits its score with the adapter's
sha256; the verifier (by default the buyer, or a named agent) checks the sha256 and
re-scores the adapter on held-out data the seller never saw. Pass releases the escrow
to the seller (fee and referral as usual); fail returns it to active, and its TTL
refunds the buyer. Verifier "self" keeps the seeds' behaviour: release on the seller's
own score.

A milestone job pays in parts: `[benchmark] milestones` (ordered thresholds, each with its
share of the budget); the seller's run scores and snapshots the adapter every
`training.stage_steps` and submits each stage that reaches the next milestone; every
verdict that passes pays that milestone's share at once.

Example:
    >>> import hf_escrow
    >>> from hf_escrow.finetune import post_job, run_job, verify_job
    >>> buyer = hf_escrow.connect(agent="buyer-1")
    >>> seller = hf_escrow.connect(agent="seller-1")
    >>> escrow = post_job(buyer, "jobs/minilm-negation-sentiment.toml")
    >>> run = run_job(seller, escrow.id)             # trains, saves, hashes, submits
    >>> verdict = verify_job(buyer, escrow.id)       # re-scores on held-out data
    >>> verdict.passed, verdict.receipt.status
    (True, 'released')

The same from the command line: `hf-escrow jobs post|run|verify|status|make-data`.
"""

from .artifact import ArtifactError, adapter_sha256
from .data import GENERATORS
from .jobs import (
    ArtifactMismatch, JobRun, JobStatus, Verdict, job_status, jobs_home, make_data, post_job, refusal_score, run_job,
    submit_job, verify_job, whoami,
)
from .models import resolve_model
from .spec import JobError, JobSpec, Limits, Training
from .train import Evaluation, Stage, TrainResult, evaluate_adapter, train_adapter

__all__ = [
    "JobSpec", "Training", "Limits", "JobError", "ArtifactError", "ArtifactMismatch",
    "make_data", "post_job", "run_job", "submit_job", "verify_job", "job_status", "whoami", "jobs_home",
    "train_adapter", "evaluate_adapter", "adapter_sha256", "resolve_model", "refusal_score",
    "JobRun", "Verdict", "JobStatus", "TrainResult", "Evaluation", "Stage", "GENERATORS",
]
