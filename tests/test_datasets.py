"""Per-shard billing of `datasets` streaming: real load_dataset over HTTP from the real gated
shard server (uvicorn on 127.0.0.1), generated parquet shards, a real SQLite ledger."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import datasets
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import hf_escrow
from hf_escrow import Forbidden, InsufficientFunds, StateConflict, Unauthorized
from hf_escrow.datasets import load_paid_dataset, paid_shards
from hf_escrow.ledger import Ledger
from hf_escrow.shardserver import create_shard_app

from .helpers import assert_audit_clean
from .liveserver import free_port, serve_app, wait_http

PRICE = Decimal("0.002")
SHARDS, ROWS = 10, 120



@pytest.fixture(autouse=True, scope="module")
def _quiet_bars():
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if was_enabled:
        datasets.enable_progress_bars()


def write_shards(folder: Path, shards: int = SHARDS, rows: int = ROWS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for s in range(shards):
        ids = list(range(s * rows, (s + 1) * rows))
        table = pa.table({"id": ids, "text": [f"shard {s} row {i}" for i in ids],
                          "score": [i / 7 for i in ids]})
        files.append(folder / f"train-{s:05d}-of-{shards:05d}.parquet")
        pq.write_table(table, files[-1], row_group_size=50)
    return files


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "data"
    write_shards(folder)
    (folder / "notes.txt").write_text("not a shard")
    return folder


@pytest.fixture(scope="module")
def unpaid_rows(shard_dir) -> list[dict]:
    files = sorted(str(p) for p in shard_dir.glob("*.parquet"))
    return list(datasets.load_dataset("parquet", data_files=files, split="train", streaming=True))


class Market:
    def __init__(self, tmp_path: Path):
        self.db = f"sqlite:///{tmp_path / 'l.db'}"
        self.ledger = Ledger(self.db)
        self.keys = {name: self.ledger.register(name)["api_key"] for name in ("buyer", "buyer2", "seller", "seller2")}
        for name in ("buyer", "buyer2"):
            self.ledger.deposit(name, "10")
        self.seller = hf_escrow.connect(agent="seller", database_url=self.db)
        self.buyer = hf_escrow.connect(agent="buyer", database_url=self.db)
        self.buyer2 = hf_escrow.connect(agent="buyer2", database_url=self.db)

    def escrow(self, amount: str = "0.05", client=None, seller: str = "seller"):
        return (client or self.buyer).create_escrow(seller, amount, ttl_seconds=600)

    def deductions(self, escrow_id: str) -> list[str]:
        return [e.data.get("reason") for e in self.seller.get(escrow_id).events if e.kind == "deducted"]

    def headers(self, escrow_id: str, who: str = "buyer") -> dict:
        return {"X-Escrow-Id": escrow_id, "Authorization": f"Bearer {self.keys[who]}"}


@pytest.fixture
def market(tmp_path):
    m = Market(tmp_path)
    yield m
    assert_audit_clean(m.ledger)
    m.ledger.close()


@pytest.fixture
def server(market, shard_dir):
    app = create_shard_app(shard_dir, escrow=market.seller, price_per_shard=str(PRICE))
    requests: list[tuple[str, str, str | None]] = []

    @app.middleware("http")
    async def record(request, call_next):
        requests.append((request.method, request.url.path, request.headers.get("range")))
        return await call_next(request)

    with serve_app(app) as url:
        yield url, requests


def test_rows_identical_charged_once_per_shard(market, server, unpaid_rows):
    url, requests = server
    e = market.escrow()
    ds = load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id, api_key=market.keys["buyer"])
    assert isinstance(ds, datasets.IterableDataset) and ds.num_shards == SHARDS
    assert not [r for r in requests if r[0] != "GET" or r[1] != "/"], "loading must read no shard"
    assert list(ds) == unpaid_rows
    assert market.buyer.get(e.id).paid == SHARDS * PRICE
    # a second epoch, batches, map/filter/shuffle: every shard again, nothing charged twice
    assert sum(len(b["id"]) for b in ds.iter(batch_size=64)) == SHARDS * ROWS
    evens = ds.filter(lambda r: r["id"] % 2 == 0).map(lambda r: {"double": r["id"] * 2})
    assert [r["double"] for r in evens] == [r["id"] * 2 for r in unpaid_rows if r["id"] % 2 == 0]
    assert sorted(r["id"] for r in ds.shuffle(seed=1, buffer_size=100)) == list(range(SHARDS * ROWS))
    reasons = market.deductions(e.id)
    assert sorted(reasons) == sorted(f"shard train-{s:05d}-of-{SHARDS:05d}.parquet" for s in range(SHARDS))
    assert market.buyer.get(e.id).paid == SHARDS * PRICE
    assert any(r[0] == "GET" and r[2] for r in requests) and any(r[0] == "HEAD" for r in requests)


def test_plain_load_dataset_over_gated_http(market, server, unpaid_rows):
    """The ordinary datasets call with the escrow headers: identical rows, each shard paid once."""
    url, requests = server
    e = market.escrow()
    files = [f"{url}/train-{s:05d}-of-{SHARDS:05d}.parquet" for s in range(SHARDS)]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True,
                               storage_options={"headers": market.headers(e.id)})
    assert list(ds) == unpaid_rows
    assert list(ds.take(5)) == unpaid_rows[:5]
    assert market.buyer.get(e.id).paid == SHARDS * PRICE and len(market.deductions(e.id)) == SHARDS


def test_three_of_ten_shards_cost_three(market, server, unpaid_rows):
    url, _ = server
    e = market.escrow()
    ds = load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id, api_key=market.keys["buyer"])
    picked = [1, 4, 7]
    rows = [r for i in picked for r in ds.shard(num_shards=SHARDS, index=i)]
    assert rows == [r for r in unpaid_rows if r["id"] // ROWS in picked]
    assert market.buyer.get(e.id).paid == 3 * PRICE
    # reading the first three shards row by row and stopping there costs three, too
    e2 = market.escrow()
    ds2 = load_paid_dataset(url, escrow=market.buyer, escrow_id=e2.id, api_key=market.keys["buyer"])
    assert list(itertools.islice(ds2, 3 * ROWS)) == unpaid_rows[:3 * ROWS]
    assert market.buyer.get(e2.id).paid == 3 * PRICE
    # a list of shard URLs, and an escrow opened from a budget
    ds3 = load_paid_dataset([f"{url}/train-00009-of-00010.parquet"], escrow=market.buyer, budget="0.01",
                            api_key=market.keys["buyer"])
    assert [r["id"] for r in ds3] == list(range(9 * ROWS, 10 * ROWS))
    assert market.buyer.get(ds3.escrow_id).paid == PRICE


def test_resume_from_state_dict_charges_nothing_twice(market, server, unpaid_rows):
    url, requests = server
    e = market.escrow()
    ds = load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id, api_key=market.keys["buyer"])
    seen, state = [], None
    for row in ds:
        seen.append(row)
        if len(seen) == 2 * ROWS + 30:  # inside shard 2
            state = ds.state_dict()
            break
    assert market.buyer.get(e.id).paid == 3 * PRICE
    resumed = load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id, api_key=market.keys["buyer"])
    resumed.load_state_dict(state)
    seen += list(resumed)
    assert seen == unpaid_rows
    assert market.buyer.get(e.id).paid == SHARDS * PRICE and len(market.deductions(e.id)) == SHARDS
    shard2 = f"/train-00002-of-{SHARDS:05d}.parquet"
    assert sum(1 for r in requests if r[:2] == ("POST", shard2)) == 2  # asked twice, paid once


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_dataloader_two_workers_split_shards_without_double_charge(market, server, start):
    import torch.utils.data
    url, requests = server
    e = market.escrow()
    ds = load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id, api_key=market.keys["buyer"])
    loader = torch.utils.data.DataLoader(ds.with_format("torch"), batch_size=40, num_workers=2,
                                         multiprocessing_context=start)
    ids = sorted(int(i) for batch in loader for i in batch["id"])
    assert ids == list(range(SHARDS * ROWS))
    assert market.buyer.get(e.id).paid == SHARDS * PRICE and len(market.deductions(e.id)) == SHARDS
    posts = [r[1] for r in requests if r[0] == "POST"]
    assert sorted(posts) == sorted(set(posts)) and len(posts) == SHARDS  # each shard asked for by one worker


def test_budget_cap_stops_between_shards(market, server, unpaid_rows):
    url, requests = server
    e = market.escrow("0.005")  # two shards and a half
    ds = load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id, api_key=market.keys["buyer"])
    rows = []
    with pytest.raises(InsufficientFunds, match="shard train-00002-of-00010.parquet costs 0.002000 USDC") as info:
        for row in ds:
            rows.append(row)
    assert "no bytes were sent" in str(info.value)
    assert rows == unpaid_rows[:2 * ROWS]  # whole shards only
    got = market.buyer.get(e.id)
    assert got.paid == 2 * PRICE and got.remaining == Decimal("0.001")
    assert not [r for r in requests if r[1].startswith("/train-00002") and r[0] in ("GET", "HEAD")]


def test_refusals_no_bytes_without_funds_head_and_range(market, server, shard_dir):
    url, _ = server
    shard = f"{url}/train-00003-of-{SHARDS:05d}.parquet"
    poor = market.escrow("0.001")
    answer = httpx.get(shard, headers=market.headers(poor.id))
    assert answer.status_code == 402 and b"PAR1" not in answer.content
    assert answer.json()["error"] == "insufficient_funds" and "no bytes were sent" in answer.json()["message"]
    e = market.escrow()
    assert httpx.get(shard, headers={**market.headers(e.id), "Authorization": "Bearer hfe_wrong"}).status_code == 401
    assert httpx.get(shard, headers={"X-Escrow-Id": e.id}).status_code == 401
    assert httpx.get(shard, headers=market.headers(e.id, who="buyer2")).status_code == 403  # another buyer's
    other = market.escrow(seller="seller2")
    assert httpx.get(shard, headers=market.headers(other.id)).status_code == 403  # not this seller's escrow
    assert httpx.get(f"{url}/notes.txt", headers=market.headers(e.id)).status_code == 404
    for bad in ("../l.db", "%2e%2e/l.db", "%2e%2e/", ".hidden.parquet", "train-00003-of-00010.parquet/x"):
        assert httpx.get(f"{url}/{bad}", headers=market.headers(e.id)).status_code == 404, bad
    with pytest.raises(Unauthorized):
        next(iter(load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id, api_key="hfe_wrong")))
    with pytest.raises(hf_escrow.NotFound):
        load_paid_dataset(url, escrow=market.buyer2, escrow_id=e.id, api_key=market.keys["buyer2"])
    with pytest.raises(Forbidden, match="sells for seller"):
        load_paid_dataset(url, escrow=market.buyer, escrow_id=other.id, api_key=market.keys["buyer"])
    # HEAD tells the size and charges nothing; ranged GETs pay once
    head = httpx.head(shard, headers=market.headers(e.id))
    data = (shard_dir / f"train-00003-of-{SHARDS:05d}.parquet").read_bytes()
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    assert market.buyer.get(e.id).paid == 0
    for start, end in ((0, 99), (100, 499), (len(data) - 8, len(data) - 1)):
        part = httpx.get(shard, headers={**market.headers(e.id), "Range": f"bytes={start}-{end}"})
        assert part.status_code == 206 and part.content == data[start:end + 1]
        assert part.headers["content-range"] == f"bytes {start}-{end}/{len(data)}"
    assert httpx.get(shard, headers=market.headers(e.id)).content == data
    assert market.buyer.get(e.id).paid == PRICE
    listing = httpx.get(url).json()
    assert listing["seller"] == "seller" and len(listing["files"]) == SHARDS
    assert listing["files"][3] | {"url": None, "etag": None, "schema": None} == {
        "path": f"train-00003-of-{SHARDS:05d}.parquet", "size": len(data), "format": "parquet", "price": 0.002,
        "price_micro": 2000, "url": None, "etag": None, "schema": None}
    market.buyer.release(e.id)  # closed: the paid shard can still be read, a new one cannot be bought
    assert httpx.get(shard, headers=market.headers(e.id)).content == data
    answer = httpx.get(f"{url}/train-00004-of-{SHARDS:05d}.parquet", headers=market.headers(e.id))
    assert answer.status_code == 409
    with pytest.raises(StateConflict):
        load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id, api_key=market.keys["buyer"])


def test_charged_once_across_restarts_and_two_servers(market, shard_dir):
    e = market.escrow()
    shard = f"/train-00005-of-{SHARDS:05d}.parquet"
    for _ in range(2):  # a restart: new app, fresh caches, same ledger
        seller = hf_escrow.connect(agent="seller", database_url=market.db)
        with serve_app(create_shard_app(shard_dir, escrow=seller, price_per_shard="0.002")) as one, \
                serve_app(create_shard_app(shard_dir, escrow=seller, price_per_shard="0.002")) as two:
            for base in (one, two, one):
                assert httpx.get(base + shard, headers=market.headers(e.id)).status_code == 200
    assert market.buyer.get(e.id).paid == PRICE and len(market.deductions(e.id)) == 1


def test_large_shard_many_ranged_reads_one_charge(market, tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    blobs = [os.urandom(100_000) for _ in range(70)]  # about 7 MB: more than one fsspec block
    pq.write_table(pa.table({"i": list(range(70)), "blob": blobs}), folder / "big.parquet", row_group_size=10)
    app = create_shard_app(folder, escrow=market.seller, price_per_shard="0.002")
    ranged = []

    @app.middleware("http")
    async def record(request, call_next):
        if request.method == "GET" and request.headers.get("range"):
            ranged.append(request.headers["range"])
        return await call_next(request)

    with serve_app(app) as url:
        e = market.escrow()
        ds = load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id, api_key=market.keys["buyer"])
        rows = list(ds)
    assert [r["i"] for r in rows] == list(range(70)) and [r["blob"] for r in rows] == blobs
    assert len(ranged) >= 2
    assert market.buyer.get(e.id).paid == PRICE


@pytest.mark.parametrize("role", ["buyer", "seller"])
def test_local_form_paid_shards(market, shard_dir, unpaid_rows, role):
    files = sorted(str(p) for p in shard_dir.glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    e = market.escrow("0.009")
    client = market.buyer if role == "buyer" else market.seller
    stream = paid_shards(ds, escrow=client, escrow_id=e.id, price_per_shard="0.002", shards=[0, 3, 6],
                         dataset_name="demo", progress=False)
    assert stream.role == role
    assert list(stream) == [r for r in unpaid_rows if r["id"] // ROWS in (0, 3, 6)]
    assert stream.spent == 3 * PRICE and market.buyer.get(e.id).paid == 3 * PRICE
    again = paid_shards(ds, escrow=client, escrow_id=e.id, price_per_shard="0.002", shards=[3, 6],
                        dataset_name="demo", batch_size=50, progress=False)
    assert sum(len(b["id"]) for b in again) == 2 * ROWS
    assert market.buyer.get(e.id).paid == 3 * PRICE  # a rerun pays nothing twice
    short = paid_shards(ds, escrow=client, escrow_id=e.id, price_per_shard="0.002", shards=[8, 9],
                        dataset_name="demo", progress=False)
    with pytest.raises(InsufficientFunds, match="shard 9 of demo"):
        list(short)
    assert market.buyer.get(e.id).paid == 4 * PRICE and short.paid == [8]
    if role == "buyer":
        assert market.buyer.get(e.id).status == "active"


def test_remote_ledger_over_http(market, shard_dir):
    """Seller and buyer both talk to an escrow server (`--escrow-url`); the buyer's key comes from its client."""
    from hf_escrow.server.app import create_app
    with serve_app(create_app(market.ledger, sweep_interval_s=0, mcp=False)) as escrow_url:
        seller = hf_escrow.connect(escrow_url, api_key=market.keys["seller"])
        buyer = hf_escrow.connect(escrow_url, api_key=market.keys["buyer"])
        with serve_app(create_shard_app(shard_dir, escrow=seller, price_per_shard="0.002")) as url:
            ds = load_paid_dataset(url, escrow=buyer, budget="0.01", progress=False)
            assert [r["id"] for r in itertools.islice(ds, 2 * ROWS)] == list(range(2 * ROWS))
            assert buyer.get(ds.escrow_id).paid == 2 * PRICE
            second = load_paid_dataset(url, escrow=buyer, escrow_id=ds.escrow_id, pattern="*-0000[01]-*")
            assert len(list(second)) == 2 * ROWS and buyer.get(ds.escrow_id).paid == 2 * PRICE
        seller.close()
        buyer.close()


def test_cli_serve_embedded(shard_dir):
    from hf_escrow.ledger.storage import default_database_url
    home = Path(os.environ["HF_ESCROW_HOME"])
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_escrow.cli", "datasets", "serve", str(shard_dir), "--seller", "data-seller",
         "--price-per-shard", "0.002", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/", timeout_s=60)
        ledger = Ledger(default_database_url(home))
        key = ledger.register("cli-buyer")["api_key"]
        ledger.deposit("cli-buyer", "1")
        buyer = hf_escrow.connect(agent="cli-buyer", home=home)
        ds = load_paid_dataset(url, escrow=buyer, budget="0.01", api_key=key, progress=False)
        assert [r["id"] for r in ds.shard(num_shards=SHARDS, index=2)] == list(range(2 * ROWS, 3 * ROWS))
        assert buyer.get(ds.escrow_id).paid == PRICE and buyer.get(ds.escrow_id).seller == "data-seller"
        assert_audit_clean(ledger)
        ledger.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
