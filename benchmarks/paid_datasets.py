"""Billed vs plain `datasets` streaming over the same shard server code and files, in one run.

    python benchmarks/paid_datasets.py [--shards 6] [--rows 500000] [--repeats 6] [--per-row]

Two `hf-escrow datasets serve` processes on the same folder: one sells each shard at
0.002 USDC from the embedded ledger, the other serves it free (price 0). The buyer reads
every shard with `load_paid_dataset` (a fresh escrow per run, so every shard is really
paid; the server gets only the escrow's spend token) and, as the baseline, with the plain `datasets.load_dataset(..., streaming=True)`;
loading is not timed. Runs come in pairs, plain first in one pair and billed first in
the next, so that drift and warm-up hit both alike; the ratio is the median of the
per-pair ratios, rows/s the median of the runs.

Billing costs a fixed time per shard (the buyer's pay request: a ledger hold made from the
spend token, then its capture),
so its share is that time over the time one shard takes to read. `ds.iter(batch_size=1000)`
is the fast reader (about 1M short rows/s here), the hard case; shards of 500k short rows
(about 9 MB of parquet) are still small next to the 100-500 MB shards of Hub datasets.
`--per-row` adds the common `for row in ds` loop (about 15x slower per row) on one shard.
Billing latency: that pay request, p50 and p95 over every shard paid.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import _table  # noqa: E402

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import hf_escrow  # noqa: E402
from hf_escrow.datasets import load_paid_dataset  # noqa: E402
from hf_escrow.ledger import Ledger, audit  # noqa: E402
from hf_escrow.ledger.storage import default_database_url  # noqa: E402
from tests.liveserver import free_port, wait_http  # noqa: E402

PRICE = "0.002"


def write_shards(folder: Path, shards: int, rows: int) -> int:
    folder.mkdir(parents=True)
    for s in range(shards):
        ids = pa.array(range(s * rows, (s + 1) * rows), pa.int64())
        text = pa.array([f"example {i}: a short line of text for the shard benchmark" for i in range(rows)])
        score = pc.divide(pc.cast(ids, pa.float64()), 7.0)
        pq.write_table(pa.table({"id": ids, "text": text, "score": score}), folder / f"train-{s:05d}.parquet")
    return sum(p.stat().st_size for p in folder.iterdir())


def start_server(folder: Path, port: int, price: str, env: dict) -> subprocess.Popen:
    code = "from hf_escrow.cli_datasets import datasets_app; datasets_app()"
    return subprocess.Popen([sys.executable, "-c", code, "serve", str(folder), "--seller", "bench-seller",
                             "--price-per-shard", price, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_all(ds, mode: str) -> tuple[int, float]:
    start = time.perf_counter()
    if mode == "batches":
        count = sum(len(batch["id"]) for batch in ds.iter(batch_size=1000))
    else:
        count = sum(1 for _ in ds)
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--rows", type=int, default=500_000, help="Rows per shard.")
    parser.add_argument("--repeats", type=int, default=6, help="Pairs of runs per mode.")
    parser.add_argument("--per-row", action="store_true", help="Also time `for row in ds` on one shard.")
    parser.add_argument("--verbose", action="store_true", help="Print every run.")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    modes = [("batches", args.shards)] + ([("rows", 1)] if args.per_row else [])
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        env = {**os.environ, "HF_ESCROW_HOME": str(home)}
        for name in ("HF_ESCROW_URL", "HF_ESCROW_API_KEY", "HF_ESCROW_DATABASE_URL", "HF_ESCROW_AGENT"):
            env.pop(name, None)
        folder = Path(tmp) / "shards"
        size = write_shards(folder, args.shards, args.rows)
        billed_port, plain_port = free_port(), free_port()
        servers = [start_server(folder, billed_port, PRICE, env), start_server(folder, plain_port, "0", env)]
        try:
            billed_url, plain_url = f"http://127.0.0.1:{billed_port}/", f"http://127.0.0.1:{plain_port}/"
            wait_http(billed_url, 60)
            wait_http(plain_url, 60)
            ledger = Ledger(default_database_url(home))
            ledger.register("bench-buyer")
            ledger.deposit("bench-buyer", "1000")
            buyer = hf_escrow.connect(agent="bench-buyer", home=home)
            runs: dict[tuple[str, str], list[float]] = {}
            latencies: list[float] = []
            for mode, shards in modes:
                names = [f"train-{s:05d}.parquet" for s in range(shards)]
                for repeat in range(args.repeats):
                    # alternate which side runs first: a run can warm or crowd the next one
                    for side in (("plain", "billed") if repeat % 2 == 0 else ("billed", "plain")):
                        if side == "plain":
                            ds = datasets.load_dataset("parquet", data_files=[plain_url + n for n in names],
                                                       split="train", streaming=True)
                        else:
                            ds = load_paid_dataset([billed_url + n for n in names], escrow=buyer, budget="1",
                                                   ttl_seconds=600, progress=False)
                        count, seconds = read_all(ds, mode)
                        assert count == shards * args.rows, count
                        runs.setdefault((side, mode), []).append(count / seconds)
                        if side == "billed":
                            paid = buyer.get(ds.escrow_id)
                            assert paid.paid == shards * Decimal(PRICE) and paid.held == 0, paid
                            latencies += ds._ex_iterable.generate_tables_fn.payer.latencies_ms
                    if args.verbose:
                        print(f"{mode}: plain {runs[('plain', mode)][-1]:,.0f} rows/s, "
                              f"billed {runs[('billed', mode)][-1]:,.0f} rows/s", flush=True)
            report = audit(ledger.engine)
        finally:
            for server in servers:
                server.terminate()
                server.wait(15)
    rows = []
    for mode, shards in modes:
        label = "ds.iter(batch_size=1000)" if mode == "batches" else "for row in ds"
        plain, billed = runs[("plain", mode)], runs[("billed", mode)]
        ratio = _table.median([b / p for b, p in zip(billed, plain)])
        rows.append((f"plain rows/s, {label}", f"{_table.median(plain):,.0f}",
                     f"free server, load_dataset; {shards} shard(s)"))
        rows.append((f"billed rows/s, {label}", f"{_table.median(billed):,.0f}", "priced server, load_paid_dataset"))
        rows.append((f"billed / plain, {label}", f"{ratio:.3f}",
                     f"goal >= 0.98 (pairs: {min(b / p for b, p in zip(billed, plain)):.2f}"
                     f"..{max(b / p for b, p in zip(billed, plain)):.2f})"))
    rows.append(("per-shard billing p50 (ms)", f"{_table.percentile(latencies, 50):.1f}",
                 f"p95 {_table.percentile(latencies, 95):.1f} ms over {len(latencies)} shards paid"))
    rows.append(("shards x rows", f"{args.shards} x {args.rows:,}",
                 f"{size / 1e6 / args.shards:.1f} MB parquet each, {args.repeats} pairs per mode"))
    rows.append(("ledger audit", "clean" if report["ok"] else "NOT clean", f"{report['transactions']} transactions"))
    _table.show("datasets streaming: per-shard billing vs plain", rows)


if __name__ == "__main__":
    main()
