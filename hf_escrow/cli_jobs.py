"""`hf-escrow jobs ...`: benchmark-gated LoRA fine-tune jobs from the command line.

    hf-escrow jobs make-data SPEC                 # write the spec's generated data files
    hf-escrow jobs post SPEC --agent buyer-1      # buyer: lock the budget in a gated escrow
    hf-escrow jobs run ESCROW_ID --agent seller-1 # seller: train LoRA, save + hash, submit
    hf-escrow jobs verify ESCROW_ID --agent buyer-1   # verifier: re-score on held-out data
    hf-escrow jobs status [ESCROW_ID] --agent buyer-1

A milestone job's run submits each stage that reaches the next milestone while it trains
(waiting up to --wait seconds at a stage for the verdict on the one before); the verifier
runs `jobs verify` once per submitted milestone; `jobs status` shows which were paid.

Like every escrow command: the embedded ledger (`--agent`, `--database-url`) by default,
or a server with `--url` and `--api-key`. Exit codes: 0 done (verify: passed), 1 verify
failed or the artifact was refused, 2 an error (message on stderr).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ._exceptions import ArtifactMismatch, EscrowError
from ._models import Receipt, as_dict
from .cli_options import AgentOpt, DbOpt, JsonOpt, KeyIdOpt, KeyOpt, UrlOpt, open_client

jobs_app = typer.Typer(help="Benchmark-gated LoRA fine-tune jobs: post, run, verify, status.",
                       no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True, log_path=False)

BaseModelOpt = typer.Option(None, "--base-model", help="Local folder of the job's base model (default: resolve "
                                                       "the job's model name; packaged models need no network).")


def _guard(action: Callable[[], Any], as_json: bool) -> Any:
    """Run an action; escrow and job errors become a message and exit code 2."""
    try:
        return action()
    except ArtifactMismatch:
        raise
    except (EscrowError, FileNotFoundError) as error:   # job and artifact errors are EscrowErrors
        code = getattr(error, "code", type(error).__name__)
        message = getattr(error, "message", str(error))
        if as_json:
            print(json.dumps({"error": code, "message": message, "status": getattr(error, "status_code", None)}))
        else:
            err_console.print(f"[red]error[/red] ({code}): {message}")
        raise typer.Exit(2) from None


def _receipt_lines(receipt: Receipt | None) -> str:
    if receipt is None:
        return ""
    text = f"escrow [bold]{receipt.escrow_id}[/bold] is now [bold]{receipt.status}[/bold]"
    if receipt.gross:
        text += (f"; paid {receipt.gross} USDC (seller {receipt.net}, fee {receipt.fee}, "
                 f"of which referral {receipt.referral})")
    return text


def _usdc(amount: Any) -> str:
    text = f"{amount:f}".rstrip("0")
    return text + "00" if text.endswith(".") else text


def _print_json(data: Any) -> None:
    print(json.dumps(as_dict(data), indent=2, default=str))


@jobs_app.command("make-data")
def make_data_cmd(spec: Path = typer.Argument(..., help="Job spec (TOML)."),
                  force: bool = typer.Option(False, "--force", help="Write the files again even if present."),
                  as_json: bool = JsonOpt):
    """Write the spec's generated train and held-out files (deterministic)."""
    from .finetune import JobSpec, make_data
    from .finetune.data import count_rows, file_sha256
    files = _guard(lambda: make_data(JobSpec.load(spec), force=force), as_json)
    rows = {name: {"path": str(path), "rows": count_rows(path), "sha256": file_sha256(path)}
            for name, path in files.items() if path is not None}
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"data for {spec}")
    for column in ("file", "rows", "sha256", "path"):
        table.add_column(column)
    for name, info in rows.items():
        table.add_row(name, str(info["rows"]), info["sha256"][:16], info["path"])
    console.print(table)


@jobs_app.command("post")
def post_cmd(spec: Path = typer.Argument(..., help="Job spec (TOML)."),
             seller: Optional[str] = typer.Option(None, help="Seller agent (default: the spec's)."),
             verifier: Optional[str] = typer.Option(None, help="\"buyer\", \"self\" or an agent id "
                                                               "(default: the spec's, else buyer)."),
             budget: Optional[str] = typer.Option(None, help="USDC to lock (default: the spec's budget_usdc)."),
             ttl: Optional[float] = typer.Option(None, "--ttl", help="Seconds until refund (default: the spec's)."),
             idempotency_key: Optional[str] = KeyIdOpt, url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt,
             agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """As the buyer: lock the job's budget in an escrow released only on a passing benchmark."""
    from .finetune import post_job
    client = open_client(url, api_key, agent, database_url)
    escrow = _guard(lambda: post_job(client, spec, seller=seller, verifier=verifier, budget=budget, ttl_seconds=ttl,
                                     idempotency_key=idempotency_key), as_json)
    if as_json:
        _print_json(escrow)
        return
    condition = escrow.release_condition or {}
    job = escrow.meta["job"]
    console.print(f"posted job [bold]{job['name']}[/bold]: escrow [bold]{escrow.id}[/bold], "
                  f"{escrow.amount} USDC locked for {escrow.seller} until {escrow.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    from .finetune import JobSpec
    from .finetune.jobs import gate_text
    console.print(f"released {'in parts ' if escrow.milestones else ''}when "
                  f"{gate_text(JobSpec.from_meta(escrow.meta))}, as scored by {condition.get('verifier')} on "
                  f"{job['held_out'].get('rows')} held-out rows (sha256 {job['held_out'].get('sha256', '')[:16]}...)")
    console.print(f"seller runs: hf-escrow jobs run {escrow.id}")


@jobs_app.command("run")
def run_cmd(target: str = typer.Argument(..., help="Escrow id, or a job spec (finds its active escrow)."),
            output: Optional[Path] = typer.Option(None, help="Run folder (default: $HF_ESCROW_HOME/jobs/<escrow>)."),
            base_model: Optional[Path] = BaseModelOpt,
            epochs: Optional[float] = typer.Option(None, help="Epochs (within the job's limits)."),
            max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
            learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr"),
            batch_size: Optional[int] = typer.Option(None),
            seed: Optional[int] = typer.Option(None),
            threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 is often fastest on a busy CPU)."),
            stage_steps: Optional[int] = typer.Option(None, help="Milestone jobs: score and snapshot every N steps."),
            wait: float = typer.Option(600, help="Milestone jobs: seconds to wait at a stage for the verdict on the "
                                                 "milestone before (training goes on after)."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Train and score; submit nothing."),
            url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
            database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """As the seller: train the LoRA adapter, save it with its sha256, submit the score."""
    from .finetune import run_job
    from .finetune.progress import RichProgress, quiet_training_logs
    quiet_training_logs()
    client = open_client(url, api_key, agent, database_url)
    training = {"epochs": epochs, "max_steps": max_steps, "learning_rate": learning_rate, "batch_size": batch_size,
                "seed": seed, "threads": threads, "stage_steps": stage_steps}
    log = None if as_json else (lambda message: err_console.log(message))
    progress = None if as_json else RichProgress(err_console)
    run = _guard(lambda: run_job(client, target, output_dir=output, base_model=base_model, training=training,
                                 submit=not dry_run, progress=progress, log=log, wait_s=wait), as_json)
    result = run.result
    if as_json:
        _print_json({"escrow_id": run.escrow_id, "metric": result.metric, "score": result.score,
                     "steps": result.steps, "epochs": result.epochs, "train_loss": result.train_loss,
                     "stopped_by": result.stopped_by, "artifact": result.artifact(), "timings": result.timings,
                     "seconds": run.seconds, "receipt": run.receipt, "receipts": run.receipts, "stages": run.stages})
        return
    table = Table(title=f"run of {run.spec.name}")
    table.add_column("item")
    table.add_column("value")
    for name, value in (("escrow", run.escrow_id or "(dry run)"), (result.metric, f"{result.score:.4f}"),
                        ("threshold", str(run.spec.threshold)),
                        ("steps / epochs", f"{result.steps} / {result.epochs:g}"),
                        ("train loss", f"{result.train_loss:.4f}" if result.train_loss is not None else "-"),
                        ("stopped by limit", result.stopped_by or "-"), ("adapter", str(result.adapter_dir)),
                        ("sha256", result.sha256),
                        ("stages", ", ".join(f"{step}: {score:.3f}" for step, score in run.stages) or "-"),
                        ("time", ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))):
        table.add_row(name, value)
    console.print(table)
    for receipt in run.receipts:
        console.print(f"submitted milestone {receipt.milestone} (score {receipt.score})")
    if run.receipt is not None:
        console.print(_receipt_lines(run.receipt))
        if run.receipt.status == "awaiting_verification":
            console.print(f"the verifier runs: hf-escrow jobs verify {run.escrow_id}")


@jobs_app.command("verify")
def verify_cmd(escrow_id: str = typer.Argument(..., help="The escrow awaiting verification."),
               held_out: Optional[Path] = typer.Option(None, help="Held-out data (default: the posted spec's)."),
               spec: Optional[Path] = typer.Option(None, help="The job spec (default: remembered at post)."),
               base_model: Optional[Path] = BaseModelOpt, idempotency_key: Optional[str] = KeyIdOpt,
               url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
               database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """As the verifier: check the adapter's sha256, re-score it on held-out data; pass releases, fail reopens."""
    from .finetune import verify_job
    from .finetune.progress import quiet_training_logs
    quiet_training_logs()
    client = open_client(url, api_key, agent, database_url)
    log = None if as_json else (lambda message: err_console.log(message))
    try:
        verdict = _guard(lambda: verify_job(client, escrow_id, held_out=held_out, spec=spec, base_model=base_model,
                                            log=log, idempotency_key=idempotency_key), as_json)
    except ArtifactMismatch as mismatch:
        verdict = mismatch.verdict
    if as_json:
        _print_json(verdict)
    else:
        if verdict.refused:
            console.print(f"[red]refused[/red]: {verdict.refused}")
        else:
            mark = "[green]passed[/green]" if verdict.passed else "[red]failed[/red]"
            if verdict.milestone is not None:
                mark += f" milestone {verdict.milestone}"
            console.print(f"{mark}: {verdict.metric} {verdict.score:.4f} on {verdict.rows} held-out rows "
                          f"(threshold {verdict.threshold}; the seller reported {verdict.submitted_score})")
        console.print(_receipt_lines(verdict.receipt))
        if not verdict.passed and verdict.receipt is not None:
            console.print(f"back to active until {verdict.receipt.escrow.expires_at:%Y-%m-%d %H:%M:%S} UTC; "
                          "then the buyer is refunded")
    raise typer.Exit(0 if verdict.passed else 1)


@jobs_app.command("status")
def status_cmd(escrow_id: Optional[str] = typer.Argument(None, help="One job's escrow (default: all of yours)."),
               limit: int = typer.Option(50, help="How many recent escrows to look through."),
               url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
               database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """Your fine-tune jobs: state, scores claimed and verified, money moved."""
    from .finetune import job_status
    client = open_client(url, api_key, agent, database_url)
    rows = _guard(lambda: job_status(client, escrow_id, limit=limit), as_json)
    if as_json:
        _print_json(rows)
        return
    table = Table(title="fine-tune jobs", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("escrow / job", no_wrap=True)
    table.add_column("status")
    table.add_column("gate / verifier")
    table.add_column("score claimed -> verified", justify="right")
    table.add_column("USDC paid / refunded / locked", justify="right")

    def score(value: Any) -> str:
        return "-" if value is None else f"{float(value):.3f}"
    for s in rows:
        table.add_row(f"{s.escrow_id}\n{s.name}", s.status + (f"\n{s.verdict}" if s.verdict else ""),
                      (f"{len(s.milestones)} milestones" if s.milestones else
                       f"{s.metric}{'>=' if s.higher_is_better else '<='}{s.threshold:g}") + f"\nby {s.verifier}",
                      f"{score(s.submitted_score)} -> {score(s.verified_score)}",
                      f"{_usdc(s.paid)} / {_usdc(s.refunded)} / {_usdc(s.amount)}")
        for m in s.milestones or ():
            table.add_row(f"  milestone {m.number}", m.status + (f" ({m.failures} failed)" if m.failures else ""),
                          f"{s.metric}{'>=' if s.higher_is_better else '<='}{m.threshold:g}",
                          f"-> {score(m.verified_score)}",
                          f"{_usdc(m.paid)} of {_usdc(m.amount)}{' (rest)' if m.rest else ''}")
    console.print(table)
