"""`hf-escrow demo`: the product end to end on the embedded default, in one command.

Registers a buyer, a seller and a referrer on the SQLite ledger in `$HF_ESCROW_HOME`,
funds the buyer from the faucet, then runs each kind of paid work the toolkit sells:

1. a streamed chat with the local gemma-3-270m served by `transformers serve`, billed per token;
2. a parquet dataset streamed with `datasets` from a local shard server, billed per shard;
3. calls to a Gradio app behind the `@paid` gate, made with `gradio_client`, billed per call;
4. a LoRA fine-tune of all-MiniLM-L6-v2 that is paid only when the buyer's own re-scoring
   on held-out data passes the benchmark.

It ends with every escrow's money, the balances and a clean audit. Everything stays on
127.0.0.1 and every step moves real (test) USDC through the same ledger. The sellers' faces (the shard
server, the Gradio gate) get only each escrow's spend token; the buyer's key stays with it.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.table import Table

from .client import connect, embedded_ledger
from .ledger import audit

PRICES = {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}
SHARDS, ROWS_PER_SHARD, PRICE_PER_SHARD = 4, 250, "0.002"
PRICE_PER_CALL = "0.001"
# The packaged gemma-3-270m is a base model, not instruction-tuned: asked a question in chat
# turns it answers gibberish. Shown a pattern it completes the next sentence well, and greedy
# decoding (temperature 0) gives the same answer every run. Instruction-tuned models do as well.
CHAT_EXAMPLES = (("The capital of Italy is", "Rome."), ("The capital of Japan is", "Tokyo."))
CHAT_SENTENCE = "The capital of France is"
CHAT_MAX_TOKENS = 8
# A smaller cut of jobs/minilm-negation-sentiment.toml: the same task, about 20 s on 2 cores.
FINETUNE_JOB = {
    "name": "demo-minilm-negation-sentiment", "task": "sequence-classification",
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "escrow": {"verifier": "buyer", "budget_usdc": "0.50", "ttl_seconds": 3600},
    "benchmark": {"metric": "accuracy", "threshold": 0.9, "higher_is_better": True},
    "data": {"train": "train.jsonl", "held_out": "held_out.jsonl", "labels": ["negative", "positive"],
             "generate": {"generator": "negation-sentiment", "train_seed": 1, "train_rows": 600,
                          "held_out_seed": 2, "held_out_rows": 200}},
    "training": {"epochs": 2, "learning_rate": 1e-3, "batch_size": 8, "max_length": 32, "lora_r": 8,
                 "lora_alpha": 32, "target_modules": ["query", "key", "value", "dense"]},
}


def run_demo(*, chat: bool = True, datasets: bool = True, space: bool = True, finetune: bool = True,
             model_url: str | None = None, model_dir: Path | None = None, console: Console | None = None) -> dict:
    """Run the demo; returns `ok` (the audit's verdict, which the exit code reflects), the
    audit report, the agents' ids, the escrows (one per step run) and the buyer's API key.

    Args:
        chat, datasets, space, finetune: which kinds of paid work to run.
        model_url: an OpenAI-compatible server (ending in /v1) to chat with instead of
            starting `transformers serve` on the local gemma-3-270m.
        model_dir: the model folder to serve (default: the converted gemma-3-270m); with
            `model_url`, its tokenizer counts streams that end without usage.

    Example:
        >>> report = run_demo(chat=False, finetune=False)  # doctest: +SKIP
        >>> report["ok"]
        True
    """
    console = console or Console()
    tag = secrets.token_hex(3)  # a fresh cast each run, so the demo can run again on one ledger
    names = {"buyer": f"demo-buyer-{tag}", "seller": f"demo-seller-{tag}", "referrer": f"demo-referrer-{tag}"}
    ledger = embedded_ledger()
    console.rule("hf-escrow demo")
    console.print(f"ledger: {ledger.url}")
    referrer = connect(agent=names["referrer"]).register()
    seller = connect(agent=names["seller"])
    seller.register(referral_code=referrer.referral_code)
    buyer = connect(agent=names["buyer"])
    buyer_key = buyer.register().api_key
    console.print(f"faucet credited {buyer.claim_faucet()} USDC to {names['buyer']}")
    steps: list[tuple[str, Callable[[], str]]] = []
    if chat:
        steps.append(("paid chat, per token (gemma-3-270m via transformers serve)",
                      lambda: _chat(buyer, names["seller"], console, model_url, model_dir)))
    if datasets:
        steps.append(("paid dataset stream, per shard (datasets streaming)",
                      lambda: _dataset(buyer, seller, console)))
    if space:
        steps.append(("paid Gradio calls, per call (gradio_client)",
                      lambda: _gradio(buyer, seller, console)))
    if finetune:
        steps.append(("benchmark-gated LoRA fine-tune (peft + transformers Trainer)",
                      lambda: _finetune(buyer, seller, console)))
    escrow_ids = []
    for title, step in steps:
        console.rule(title)
        escrow_ids.append(step())
    console.rule("escrows and balances")
    console.print(_escrow_table(buyer, escrow_ids))
    console.print(_balance_table(names))
    report = audit(ledger.engine)
    console.print("[green]audit clean[/green]: every transaction balances, all accounts sum to zero"
                  if report["ok"] else f"[red]audit found problems[/red]: {report['problems']}")
    console.print(f"see them on the dashboard: hf-escrow serve, open http://127.0.0.1:8787/dashboard "
                  f"and enter the buyer's key {buyer_key}")
    return {"ok": report["ok"], "audit": report, "agents": names, "escrow_ids": escrow_ids, "buyer_key": buyer_key}


# ---- the four kinds of paid work ------------------------------------------------------


def chat_messages(sentence: str = CHAT_SENTENCE) -> list[dict]:
    """A few completed sentences, then the one to complete: a base model follows the pattern."""
    messages: list[dict] = []
    for start, end in CHAT_EXAMPLES:
        messages += [{"role": "user", "content": f"Complete the sentence. {start}"},
                     {"role": "assistant", "content": end}]
    return messages + [{"role": "user", "content": f"Complete the sentence. {sentence}"}]


def first_sentence(chunks: Any) -> Iterator[str]:
    """The streamed text up to the end of its first sentence; the stream is left there (a
    paid stream then settles on what was delivered)."""
    started = False
    for chunk in chunks:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if not started and piece:
            piece = piece.lstrip()  # a line break before the answer does not end it
            started = bool(piece)
        if not piece:
            continue
        cut = min((i for i in (piece.find("."), piece.find("\n")) if i >= 0), default=-1)
        if cut >= 0:
            if piece[:cut + 1].strip():
                yield piece[:cut + 1].rstrip("\n")
            return
        yield piece


def served_model_name(url: str, folder: Path | None) -> str:
    """What the escrow names: the served model (its folder's name, or the server's first model id)."""
    if folder is not None:
        return Path(folder).name
    import httpx
    try:
        model_id = httpx.get(url.rstrip("/") + "/models", timeout=30).json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return url
    return Path(model_id).name if model_id.startswith("/") else model_id


def _chat(buyer, seller: str, console: Console, model_url: str | None, model_dir: Path | None) -> str:
    from .buyer.inference import PaidInferenceClient
    with _model_server(console, model_url, model_dir) as (url, tokenizer):
        model = served_model_name(url, model_dir if model_url else Path(tokenizer))
        # The escrow names the model, not the server's URL: the dashboard's spend per model reads well.
        opened = buyer.create_escrow(seller, "0.05", ttl_seconds=3600, pricing=PRICES,
                                     meta={"model": model, "kind": "inference"})
        client = PaidInferenceClient(url, escrow=buyer, escrow_id=opened.id, pricing=PRICES, tokenizer=tokenizer)
        try:
            console.print(f"[{model}] {CHAT_SENTENCE} ", end="", markup=False)
            stream = client.chat_completion(chat_messages(), max_tokens=CHAT_MAX_TOKENS, stream=True, temperature=0)
            for piece in first_sentence(stream):
                console.print(piece, end="", markup=False)
            stream.close()
            console.print()
            receipt = client.receipts[-1]
        finally:
            client.finish()
    console.print(f"tokens in/out {receipt.tokens_in}/{receipt.tokens_out} (counted by {receipt.counted_by}): "
                  f"paid {receipt.gross} USDC, the rest of the 0.05 budget refunded")
    return client.escrow_id


@contextlib.contextmanager
def _model_server(console: Console, model_url: str | None, model_dir: Path | None) -> Iterator[tuple[str, Any]]:
    if model_url is not None:
        yield model_url, str(model_dir) if model_dir else None
        return
    from .localmodel import prepare_model, served_model
    with console.status("preparing the local model (about a minute the first time)..."):
        folder = model_dir or prepare_model()
    with contextlib.ExitStack() as stack:
        with console.status("starting transformers serve on 127.0.0.1..."):
            url = stack.enter_context(served_model(folder))
        yield url, str(folder)


def _dataset(buyer, seller, console: Console) -> str:
    import datasets

    from .buyer.datasets import load_paid_dataset
    from .serving import serve_in_thread
    from .seller.shardserver import create_shard_app
    datasets.disable_progress_bars()  # the demo prints its own one line per step
    with tempfile.TemporaryDirectory(prefix="hf-escrow-demo-shards-") as folder:
        _write_shards(Path(folder))
        app = create_shard_app(folder, escrow=seller, price_per_shard=PRICE_PER_SHARD)
        with serve_in_thread(app) as url:
            # opens the escrow and hands the shard server its spend token, never the buyer's key
            ds = load_paid_dataset(url, escrow=buyer, budget="0.01", progress=False)
            rows = sum(len(batch["id"]) for batch in ds.iter(batch_size=100))
    closed = buyer.cancel(ds.escrow_id)  # the shards were paid as they opened; the rest goes back
    console.print(f"streamed {rows} rows from {SHARDS} shards at {PRICE_PER_SHARD} USDC each: "
                  f"paid {buyer.get(ds.escrow_id).paid} USDC, refunded {closed.refunded} of the 0.01 budget")
    return ds.escrow_id


def _write_shards(folder: Path) -> None:
    from datasets import Dataset
    for shard in range(SHARDS):
        ids = range(shard * ROWS_PER_SHARD, (shard + 1) * ROWS_PER_SHARD)
        Dataset.from_dict({"id": list(ids), "text": [f"example {i}" for i in ids]}).to_parquet(
            folder / f"train-{shard:05d}-of-{SHARDS:05d}.parquet")


def _gradio(buyer, seller, console: Console) -> str:
    import gradio as gr
    from gradio_client import Client

    from .seller.gate import Gate
    gate = Gate(seller)

    @gate.paid(price=PRICE_PER_CALL, with_receipt=True)
    def shout(text: str) -> str:
        return text.upper()

    app = gr.Interface(shout, gr.Textbox(), [gr.Textbox(), gr.JSON()], api_name="shout")
    escrow = buyer.create_escrow(seller.agent, "0.01", description="demo: Gradio calls",
                                 meta={"model": "gradio:shout"})
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, headers={"X-Escrow-Token": escrow.spend_token}, verbose=False)
        for text in ("pay", "per", "call"):
            answer, receipt = client.predict(text, api_name="/shout")
            console.print(f"{text!r} -> {answer!r}: charged {receipt['charged_usdc']}, "
                          f"left {receipt['remaining_usdc']} USDC")
    finally:
        app.close()
    closed = buyer.cancel(escrow.id)
    console.print(f"3 calls at {PRICE_PER_CALL} USDC: refunded {closed.refunded} of the 0.01 budget")
    return escrow.id


def _finetune(buyer, seller, console: Console) -> str:
    from .finetune import JobSpec, post_job, run_job, verify_job
    from .finetune.progress import quiet_training_logs
    quiet_training_logs()  # e.g. the fresh classifier head's load report is expected, not news
    with tempfile.TemporaryDirectory(prefix="hf-escrow-demo-job-") as folder:
        spec = JobSpec.from_dict(FINETUNE_JOB, base_dir=Path(folder))
        escrow = post_job(buyer, spec, seller=seller.agent)
        console.print(f"buyer locked {escrow.amount} USDC; accuracy >= {spec.threshold} on held-out data releases it")
        with console.status("seller trains the LoRA adapter..."):
            run = run_job(seller, escrow.id, output_dir=Path(folder) / "adapter")
        console.print(f"seller's own score {run.result.score:.3f} in {run.seconds:.1f} s; submitted with the "
                      f"adapter's sha256")
        with console.status("buyer re-scores the adapter on its held-out data..."):
            verdict = verify_job(buyer, escrow.id, spec=spec)
    outcome = "passed: escrow released to the seller" if verdict.passed else "failed: the seller is not paid"
    console.print(f"buyer's score {verdict.score:.3f} vs threshold {verdict.threshold}: {outcome}")
    return escrow.id


# ---- plumbing ----------------------------------------------------------------------------


def _escrow_table(buyer, escrow_ids: list[str]) -> Table:
    table = Table(title="escrows (USDC)")
    for column in ("escrow", "for", "status", "locked", "paid", "refunded"):
        table.add_column(column, justify="right" if column in ("locked", "paid", "refunded") else "left")
    for escrow_id in escrow_ids:
        e = buyer.get(escrow_id)
        table.add_row(e.id, (e.model or e.description or (e.meta or {}).get("name") or "")[:40],
                      e.status, str(e.amount), str(e.paid), str(e.refunded))
    return table


def _balance_table(names: dict) -> Table:
    table = Table(title="balances")
    for column in ("agent", "role", "balance (USDC)"):
        table.add_column(column)
    for role, name in names.items():
        table.add_row(name, role, str(connect(agent=name).me().balance))
    return table


__all__ = ["run_demo"]
