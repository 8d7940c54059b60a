"""Streaming through the metered gateway vs straight to the upstream, in one run.

    python benchmarks/gateway.py [--model gemma|tiny] [--calls 6] [--max-tokens 32]

tokens/s and time to first token (TTFT), interleaved so drift hits both alike.
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
from hf_escrow.serving import serve_in_thread  # noqa: E402

PRICES = {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}
MSGS = [{"role": "user", "content": "Write one sentence about escrow."}]


def stream_once(client: InferenceClient, model: str, max_tokens: int) -> tuple[float, int, float]:
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in client.chat_completion(MSGS, model=model, max_tokens=max_tokens, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return (first - start) * 1000, tokens, end - start


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
        key = ledger.register("buyer")["api_key"]
        ledger.register("seller")
        ledger.deposit("buyer", "10")
        escrow = hf_escrow.connect(agent="buyer", database_url=db).create_escrow("seller", "5")
        with served_model(folder) as upstream:
            app = create_gateway(upstream, escrow=hf_escrow.connect(agent="seller", database_url=db),
                                 pricing=PRICES, tokenizer=str(folder))
            with serve_in_thread(app) as gateway:
                direct = InferenceClient(base_url=upstream)
                metered = InferenceClient(base_url=f"{gateway}/v1", api_key=key, headers={"X-Escrow-Id": escrow.id})
                stream_once(direct, str(folder), 4)
                stream_once(metered, str(folder), 4)
                rows = {"direct": [], "gateway": []}
                for _ in range(args.calls):
                    rows["direct"].append(stream_once(direct, str(folder), args.max_tokens))
                    rows["gateway"].append(stream_once(metered, str(folder), args.max_tokens))
    tps = {k: sum(t for _, t, _ in v) / sum(s for _, _, s in v) for k, v in rows.items()}
    ttft = {k: median([f for f, _, _ in v]) for k, v in rows.items()}
    show(f"gateway benchmark ({args.model}, {args.calls} streams x {args.max_tokens} tokens each way)", [
        ("direct tokens/s", f"{tps['direct']:.1f}", ""),
        ("gateway tokens/s", f"{tps['gateway']:.1f}", ""),
        ("gateway / direct tokens/s", f"{tps['gateway'] / tps['direct']:.3f}", "goal >= 0.99"),
        ("direct TTFT p50 (ms)", f"{ttft['direct']:.1f}", ""),
        ("gateway TTFT p50 (ms)", f"{ttft['gateway']:.1f}", ""),
        ("added TTFT (ms)", f"{ttft['gateway'] - ttft['direct']:.1f}", "goal <= +5 ms"),
    ])


if __name__ == "__main__":
    main()
