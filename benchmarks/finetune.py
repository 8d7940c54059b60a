"""Fine-tune jobs: the escrow's share of a job's wall time, and train/eval time per epoch.

    python benchmarks/finetune.py [--threads 1] [--epochs 2] [--gemma] [--gemma-dir DIR]

One MiniLM job (jobs/minilm-negation-sentiment.toml, data generated in a temp folder)
runs end to end on a fresh embedded ledger: post (buyer), run (seller: load, train,
score, save, hash, submit), verify (buyer: copy, hash, re-score on 400 held-out rows,
verify). Every escrow client call is timed; its share of the job's wall time is the
cost of the escrow (goal: at most 1%). `--gemma` adds the gemma-3-270m causal-LM job.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _table import show  # noqa: E402


class TimedClient:
    """An EscrowClient whose calls are timed (every method; attributes pass through)."""

    def __init__(self, inner):
        self._inner = inner
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed


def run_job_once(spec_path: Path, work: Path, *, threads: int, epochs: float | None,
                 base_model: str | None = None) -> dict:
    import hf_escrow
    from hf_escrow.client import embedded_ledger
    from hf_escrow.finetune import JobSpec, make_data, post_job, run_job, verify_job

    os.environ["HF_ESCROW_HOME"] = str(work / "home")
    db = f"sqlite:///{work / 'ledger.db'}"
    spec = JobSpec.load(spec_path).with_data_dir(work / "data").with_training(threads=threads, epochs=epochs)
    make_data(spec)
    buyer = TimedClient(hf_escrow.connect(agent="buyer-1", database_url=db))
    seller = TimedClient(hf_escrow.connect(agent="seller-1", database_url=db))
    buyer.register()
    seller.register()
    embedded_ledger(db).deposit("buyer-1", "100")
    buyer.seconds = seller.seconds = 0.0
    buyer.calls = seller.calls = 0

    start = time.perf_counter()
    escrow = post_job(buyer, spec)
    run = run_job(seller, escrow.id, output_dir=work / "run", base_model=base_model)
    verdict = verify_job(buyer, escrow.id, base_model=base_model)
    wall = time.perf_counter() - start
    assert verdict.receipt.status in ("released", "active"), verdict
    return {"spec": spec, "run": run, "verdict": verdict, "wall": wall,
            "escrow_s": buyer.seconds + seller.seconds, "escrow_calls": buyer.calls + seller.calls}


def rows_for(name: str, r: dict) -> list[tuple[str, str, str]]:
    run, verdict, spec = r["run"], r["verdict"], r["spec"]
    t = run.result.timings
    epochs = max(run.result.epochs, 1e-9)
    share = r["escrow_s"] / r["wall"] * 100
    integrity = r["escrow_s"] + t["hash_s"] + verdict.timings["hash_s"]
    return [
        (f"{name}: job wall time (post + run + verify)", f"{r['wall']:.1f} s", f"{run.result.steps} steps"),
        (f"{name}: escrow calls", f"{r['escrow_calls']} in {r['escrow_s'] * 1000:.1f} ms",
         "create, get, submit_result, get, verify"),
        (f"{name}: escrow share of wall time", f"{share:.3f} %", "goal <= 1 %" + (" OK" if share <= 1 else " MISSED")),
        (f"{name}: escrow + artifact integrity share", f"{integrity / r['wall'] * 100:.3f} %",
         "plus seller hash, verifier private copy + hash"),
        (f"{name}: train time per epoch", f"{t['train_s'] / epochs:.1f} s",
         f"{run.result.train_rows} rows, batch {spec.training.batch_size}, {run.result.epochs:g} epochs"),
        (f"{name}: seller eval (validation)", f"{t['eval_s']:.2f} s", f"{run.result.validation_rows} rows"),
        (f"{name}: verifier eval (held-out)", f"{verdict.timings['eval_s']:.2f} s",
         f"{verdict.rows} rows, incl. model + adapter load"),
        (f"{name}: model load (seller)", f"{t['load_s']:.2f} s", "tokenizer, base model, LoRA, data"),
        (f"{name}: save + sha256", f"{(t['save_s'] + t['hash_s']) * 1000:.0f} ms", "seller side"),
        (f"{name}: scores", f"{run.result.score:.3f} / {verdict.score:.3f}",
         f"seller validation / verifier held-out; threshold {spec.threshold}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--epochs", type=float, default=None, help="override the spec's epochs")
    parser.add_argument("--gemma", action="store_true", help="also run the gemma-3-270m causal-LM job (minutes)")
    parser.add_argument("--gemma-dir", default=None, help="converted gemma folder (default: prepare_model())")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    rows: list[tuple[str, str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="hf-escrow-bench-ft-"))
    try:
        minilm = run_job_once(REPO / "jobs" / "minilm-negation-sentiment.toml", work / "minilm",
                              threads=args.threads, epochs=args.epochs)
        rows += rows_for("MiniLM seq-cls", minilm)
        if args.gemma:
            gemma_dir = args.gemma_dir
            if gemma_dir is None:
                from hf_escrow.localmodel import prepare_model
                gemma_dir = str(prepare_model())
            gemma = run_job_once(REPO / "jobs" / "gemma-negation-verdict.toml", work / "gemma",
                                 threads=args.threads, epochs=None, base_model=gemma_dir)
            rows += rows_for("gemma causal-LM", gemma)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch
    show(f"fine-tune jobs (torch threads: {args.threads or torch.get_num_threads()}, "
         f"{os.cpu_count()} CPUs, embedded SQLite ledger)", rows)


if __name__ == "__main__":
    main()
