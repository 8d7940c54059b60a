"""Paid vs unpaid inference through the same local server, in one run.

    python benchmarks/inference.py [--model gemma|tiny] [--calls 6] [--max-tokens 32]

tokens/s of `PaidInferenceClient` vs a plain `InferenceClient` (interleaved, same prompt,
same max_tokens), and the billing overhead per call (the ledger hold + the settling
release: the time the paid client spends outside the model call) on the embedded ledger
and over HTTP.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _table import median, percentile, show  # noqa: E402

from huggingface_hub import InferenceClient  # noqa: E402

import hf_escrow  # noqa: E402
from hf_escrow.ledger import Ledger  # noqa: E402
from hf_escrow.localmodel import prepare_model, served_model  # noqa: E402

PRICES = {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}
MSGS = [{"role": "user", "content": "Write one sentence about escrow."}]


def model_dir(kind: str, tmp: Path) -> Path:
    if kind == "gemma":
        return prepare_model()
    from tests.models import build_tiny_chat_model
    return build_tiny_chat_model(tmp / "tiny")


def timed_calls(client, model: str | None, calls: int, max_tokens: int) -> tuple[int, float]:
    tokens, elapsed = 0, 0.0
    for _ in range(calls):
        start = time.perf_counter()
        out = client.chat_completion(MSGS, model=model, max_tokens=max_tokens)
        elapsed += time.perf_counter() - start
        tokens += out.usage.completion_tokens
    return tokens, elapsed


def billing_overhead_ms(buyer, url: str, calls: int) -> list[float]:
    client = hf_escrow.PaidInferenceClient(url, escrow=buyer, seller="seller", budget="1", pricing=PRICES)
    overhead = []
    for _ in range(calls):
        start = time.perf_counter()
        out = client.chat_completion(MSGS, max_tokens=4)
        total_ms = (time.perf_counter() - start) * 1000
        receipt = client.receipts[-1]
        overhead.append(total_ms - receipt.latency_ms)  # all time outside the model call
        assert out.usage.completion_tokens > 0
    client.finish()
    return overhead


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["gemma", "tiny"], default="gemma")
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--overhead-calls", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_dir(args.model, Path(tmp))
        db = f"sqlite:///{Path(tmp) / 'ledger.db'}"
        ledger = Ledger(db)
        seller_key = ledger.register("seller")["api_key"]
        buyer_key = ledger.register("buyer")["api_key"]
        ledger.deposit("buyer", "100")
        embedded = hf_escrow.connect(agent="buyer", database_url=db)
        with served_model(folder) as url:
            plain = InferenceClient(base_url=url)
            paid = hf_escrow.PaidInferenceClient(url, escrow=embedded, seller="seller", budget="5", pricing=PRICES)
            timed_calls(plain, str(folder), 1, 4)  # warm the server
            paid_tokens = paid_s = plain_tokens = plain_s = 0
            for _ in range(args.calls):  # interleaved, so drift hits both alike
                t, s = timed_calls(plain, str(folder), 1, args.max_tokens)
                plain_tokens, plain_s = plain_tokens + t, plain_s + s
                t, s = timed_calls(paid, None, 1, args.max_tokens)
                paid_tokens, paid_s = paid_tokens + t, paid_s + s
            paid.finish()
            embedded_ms = billing_overhead_ms(embedded, url, args.overhead_calls)
            from hf_escrow.server import create_app
            from hf_escrow.serving import serve_in_thread
            with serve_in_thread(create_app(ledger, sweep_interval_s=0, mcp=False)) as escrow_url:
                http_ms = billing_overhead_ms(hf_escrow.connect(escrow_url, api_key=buyer_key), url,
                                              args.overhead_calls)
        del seller_key
    unpaid_tps, paid_tps = plain_tokens / plain_s, paid_tokens / paid_s
    show(f"paid inference benchmark ({args.model}, {args.calls} calls x {args.max_tokens} tokens each way)", [
        ("unpaid tokens/s", f"{unpaid_tps:.1f}", "plain InferenceClient"),
        ("paid tokens/s", f"{paid_tps:.1f}", "PaidInferenceClient, embedded ledger"),
        ("paid / unpaid", f"{paid_tps / unpaid_tps:.3f}", "goal >= 0.99"),
        ("billing overhead p50, embedded (ms)", f"{median(embedded_ms):.2f}", "goal <= 2 ms"),
        ("billing overhead p99, embedded (ms)", f"{percentile(embedded_ms, 99):.2f}", ""),
        ("billing overhead p50, HTTP (ms)", f"{median(http_ms):.2f}", "goal <= 5 ms"),
        ("billing overhead p99, HTTP (ms)", f"{percentile(http_ms, 99):.2f}", ""),
    ])


if __name__ == "__main__":
    main()
