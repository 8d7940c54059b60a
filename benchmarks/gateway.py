"""Streaming through the metered gateway vs straight to the upstream, in one run.

    python benchmarks/gateway.py [--model gemma|tiny] [--calls 6] [--max-tokens 32]

tokens/s and time to first token (TTFT), interleaved so drift hits both alike. The
gateway pays the way it does in production: the buyer sends only the escrow's spend
token, every request is one ledger hold for its worst case, streams are captured as they
flow and settled with the server's usage.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["gemma", "tiny"], default="gemma")
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "gemma":
            folder = prepare_model()
        else:
            from tests.models import build_tiny_chat_model
            folder = build_tiny_chat_model(Path(tmp) / "tiny")
        db = f"sqlite:///{Path(tmp) / 'l.db'}"
        ledger = Ledger(db)
        ledger.register("buyer")
        ledger.register("seller")
        ledger.deposit("buyer", "10")
        escrow = hf_escrow.connect(agent="buyer", database_url=db).create_escrow("seller", "5")
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
