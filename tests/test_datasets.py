"""Per-shard billing of `datasets` streaming: real load_dataset over HTTP from the real gated
shard server (uvicorn on 127.0.0.1), generated parquet shards, a real SQLite ledger."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import datasets
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

import hf_escrow
from hf_escrow import Forbidden, InsufficientFunds, PaymentRequired, StateConflict
from hf_escrow.datasets import load_paid_dataset, paid_shards
from hf_escrow.money import parse_usdc
from hf_escrow.ledger import Ledger
from hf_escrow.ledger.schema import holds, idempotency_keys
from hf_escrow.shardserver import SHARD_HOLD_TTL_S, create_shard_app, hold_key

from .helpers import assert_audit_clean
from .liveserver import free_port, serve_app, wait_http

PRICE = Decimal("0.002")
PRICE_MICRO = parse_usdc(PRICE)
SHARDS, ROWS = 10, 120



@pytest.fixture(autouse=True, scope="module")
def _quiet_bars():
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if was_enabled:
        datasets.enable_progress_bars()


def paid_shards_of(ledger: Ledger, escrow_id: str, seller: str) -> list[str]:
    """One path per shard payment of the escrow, from the ledger: each capture that paid
    moved money out of a hold, and its idempotency key names the shard."""
    with ledger.engine.connect() as conn:
        keys = list(conn.scalars(select(idempotency_keys.c.key).where(
            idempotency_keys.c.agent_id == seller, idempotency_keys.c.key.like(f"shard:{escrow_id}:%"))))
        captured = conn.execute(select(holds.c.status, holds.c.captured_micro).where(
            holds.c.escrow_id == escrow_id)).all()
    assert all(status in ("captured", "voided") for status, _ in captured), captured  # nothing left held
    assert sum(1 for _, micro in captured if micro) == len(keys)  # every payment is one captured hold
    assert all(micro in (0, PRICE_MICRO) for _, micro in captured)
    return sorted(key.split(":", 2)[2] for key in keys)


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

    def payments(self, escrow_id: str) -> list[str]:
        """The shards the escrow paid for, one entry per payment (the captures' keys name them)."""
        return paid_shards_of(self.ledger, escrow_id, "seller")


@pytest.fixture
def market(tmp_path):
    m = Market(tmp_path)
    yield m
    assert_audit_clean(m.ledger)
    m.ledger.close()


def token_headers(token: str) -> dict:
    return {"X-Escrow-Token": token}


@pytest.fixture
def server(market, shard_dir):
    app = create_shard_app(shard_dir, escrow=market.seller, price_per_shard=str(PRICE))
    requests: list[tuple[str, str, str | None]] = []
    seen_headers: list[dict] = []

    @app.middleware("http")
    async def record(request, call_next):
        requests.append((request.method, request.url.path, request.headers.get("range")))
        seen_headers.append(dict(request.headers))
        return await call_next(request)

    with serve_app(app) as url:
        yield url, requests, seen_headers


def test_rows_identical_charged_once_per_shard(market, server, unpaid_rows):
    url, requests, _ = server
    ds = load_paid_dataset(url, escrow=market.buyer, budget="0.05")
    assert isinstance(ds, datasets.IterableDataset) and ds.num_shards == SHARDS
    assert not [r for r in requests if r[0] != "GET" or r[1] != "/"], "loading must read no shard"
    assert list(ds) == unpaid_rows
    assert market.buyer.get(ds.escrow_id).paid == SHARDS * PRICE
    # a second epoch, batches, map/filter/shuffle: every shard again, nothing charged twice
    assert sum(len(b["id"]) for b in ds.iter(batch_size=64)) == SHARDS * ROWS
    evens = ds.filter(lambda r: r["id"] % 2 == 0).map(lambda r: {"double": r["id"] * 2})
    assert [r["double"] for r in evens] == [r["id"] * 2 for r in unpaid_rows if r["id"] % 2 == 0]
    assert sorted(r["id"] for r in ds.shuffle(seed=1, buffer_size=100)) == list(range(SHARDS * ROWS))
    assert market.payments(ds.escrow_id) == [f"train-{s:05d}-of-{SHARDS:05d}.parquet" for s in range(SHARDS)]
    assert market.buyer.get(ds.escrow_id).paid == SHARDS * PRICE and market.buyer.holds(ds.escrow_id) == []
    assert any(r[0] == "GET" and r[2] for r in requests) and any(r[0] == "HEAD" for r in requests)


def test_seller_never_sees_the_buyers_key(market, server, unpaid_rows):
    """Every header the shard server receives: the spend token, and no trace of the buyer's key."""
    url, requests, seen = server
    ds = load_paid_dataset(url, escrow=market.buyer, budget="0.05", progress=False)
    assert list(itertools.islice(ds, 3 * ROWS)) == unpaid_rows[:3 * ROWS]
    paying = [h for h, r in zip(seen, requests) if r[1] != "/"]
    assert len(paying) >= 3 * 3  # a POST, a HEAD and ranged GETs per shard
    assert all(h["x-escrow-token"] == ds.spend_token and ds.spend_token.startswith("est_") for h in paying)
    for headers in seen:
        assert "authorization" not in headers and "x-escrow-id" not in headers
        assert not any(market.keys["buyer"] in value or "hfe_" in value for value in headers.values())


def test_a_buyer_key_is_refused_with_the_tills_message(market, server, shard_dir):
    url, _, _ = server
    shard = f"{url}/train-00003-of-{SHARDS:05d}.parquet"
    e = market.escrow()
    key = market.keys["buyer"]
    for headers in ({"X-Escrow-Token": key}, {"Authorization": f"Bearer {key}"},
                    {"X-Escrow-Id": e.id, "Authorization": f"Bearer {key}"}):
        for method in ("GET", "POST", "HEAD"):
            answer = httpx.request(method, shard, headers=headers)
            assert answer.status_code == 402 and b"PAR1" not in answer.content, (method, headers)
            if method != "HEAD":
                assert answer.json()["error"] == "payment_required"
                assert "never send it to a seller" in answer.json()["message"]
                assert "X-Escrow-Token" in answer.json()["message"]
    for headers in ({}, {"X-Escrow-Id": e.id}):
        answer = httpx.get(shard, headers=headers)
        assert answer.status_code == 402 and "send the escrow's spend token" in answer.json()["message"]
    assert httpx.get(shard, headers=token_headers("not-a-token")).json()["reason"] == "token_malformed"
    assert market.buyer.get(e.id).paid == 0 and market.buyer.holds(e.id) == []


def test_plain_load_dataset_over_gated_http(market, server, unpaid_rows):
    """The ordinary datasets call with the spend token header: identical rows, each shard paid once."""
    url, _, _ = server
    e = market.escrow()
    files = [f"{url}/train-{s:05d}-of-{SHARDS:05d}.parquet" for s in range(SHARDS)]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True,
                               storage_options={"headers": token_headers(e.spend_token)})
    assert list(ds) == unpaid_rows
    assert list(ds.take(5)) == unpaid_rows[:5]
    assert market.buyer.get(e.id).paid == SHARDS * PRICE and len(market.payments(e.id)) == SHARDS


def test_three_of_ten_shards_cost_three(market, server, unpaid_rows):
    url, _, _ = server
    e = market.escrow()
    ds = load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id)  # an existing escrow: a token is minted
    picked = [1, 4, 7]
    rows = [r for i in picked for r in ds.shard(num_shards=SHARDS, index=i)]
    assert rows == [r for r in unpaid_rows if r["id"] // ROWS in picked]
    assert market.buyer.get(e.id).paid == 3 * PRICE and ds.spend_token != e.spend_token
    # the escrow's first token, given as is: shards it already paid are free, stopping at three costs three
    ds2 = load_paid_dataset(url, spend_token=e.spend_token)
    assert ds2.escrow_id is None
    assert list(itertools.islice(ds2, 5 * ROWS)) == unpaid_rows[:5 * ROWS]
    assert market.payments(e.id) == [f"train-{s:05d}-of-{SHARDS:05d}.parquet" for s in (0, 1, 2, 3, 4, 7)]
    # a list of shard URLs, and an escrow opened from a budget
    ds3 = load_paid_dataset([f"{url}/train-00009-of-00010.parquet"], escrow=market.buyer, budget="0.01")
    assert [r["id"] for r in ds3] == list(range(9 * ROWS, 10 * ROWS))
    assert market.buyer.get(ds3.escrow_id).paid == PRICE


def test_resume_from_state_dict_charges_nothing_twice(market, server, unpaid_rows):
    url, requests, _ = server
    ds = load_paid_dataset(url, escrow=market.buyer, budget="0.05")
    seen, state = [], None
    for row in ds:
        seen.append(row)
        if len(seen) == 2 * ROWS + 30:  # inside shard 2
            state = ds.state_dict()
            break
    assert market.buyer.get(ds.escrow_id).paid == 3 * PRICE
    resumed = load_paid_dataset(url, escrow=market.buyer, escrow_id=ds.escrow_id, spend_token=ds.spend_token)
    resumed.load_state_dict(state)
    seen += list(resumed)
    assert seen == unpaid_rows
    assert market.buyer.get(ds.escrow_id).paid == SHARDS * PRICE and len(market.payments(ds.escrow_id)) == SHARDS
    shard2 = f"/train-00002-of-{SHARDS:05d}.parquet"
    assert sum(1 for r in requests if r[:2] == ("POST", shard2)) == 2  # asked twice, paid once


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_dataloader_two_workers_split_shards_without_double_charge(market, server, start):
    import torch.utils.data
    url, requests, _ = server
    ds = load_paid_dataset(url, escrow=market.buyer, budget="0.05")
    loader = torch.utils.data.DataLoader(ds.with_format("torch"), batch_size=40, num_workers=2,
                                         multiprocessing_context=start)
    ids = sorted(int(i) for batch in loader for i in batch["id"])
    assert ids == list(range(SHARDS * ROWS))
    assert market.buyer.get(ds.escrow_id).paid == SHARDS * PRICE and len(market.payments(ds.escrow_id)) == SHARDS
    posts = [r[1] for r in requests if r[0] == "POST"]
    assert sorted(posts) == sorted(set(posts)) and len(posts) == SHARDS  # each shard asked for by one worker


def test_budget_cap_stops_between_shards(market, server, unpaid_rows):
    url, requests, _ = server
    ds = load_paid_dataset(url, escrow=market.buyer, budget="0.005")  # two shards and a half
    rows = []
    with pytest.raises(InsufficientFunds, match="shard train-00002-of-00010.parquet costs 0.002000 USDC") as info:
        for row in ds:
            rows.append(row)
    assert "no bytes were sent" in str(info.value)
    assert rows == unpaid_rows[:2 * ROWS]  # whole shards only
    got = market.buyer.get(ds.escrow_id)
    assert got.paid == 2 * PRICE and got.remaining == Decimal("0.001") and got.held == 0
    assert not [r for r in requests if r[1].startswith("/train-00002") and r[0] in ("GET", "HEAD")]


def test_refusals_no_bytes_without_funds_head_and_range(market, server, shard_dir):
    url, _, _ = server
    shard = f"{url}/train-00003-of-{SHARDS:05d}.parquet"
    poor = market.escrow("0.001")
    answer = httpx.get(shard, headers=token_headers(poor.spend_token))
    assert answer.status_code == 402 and b"PAR1" not in answer.content
    assert answer.json()["error"] == "insufficient_funds" and "no bytes were sent" in answer.json()["message"]
    e = market.escrow()
    unknown = httpx.get(shard, headers=token_headers("est_" + "x" * 40))
    assert unknown.status_code == 402 and unknown.json()["reason"] == "token_unknown_or_revoked"
    assert httpx.get(f"{url}/notes.txt", headers=token_headers(e.spend_token)).status_code == 404
    for bad in ("../l.db", "%2e%2e/l.db", "%2e%2e/", ".hidden.parquet", "train-00003-of-00010.parquet/x"):
        assert httpx.get(f"{url}/{bad}", headers=token_headers(e.spend_token)).status_code == 404, bad
    with pytest.raises(PaymentRequired, match="never send it to a seller"):
        load_paid_dataset(url, spend_token=market.keys["buyer"])
    with pytest.raises(hf_escrow.NotFound):
        load_paid_dataset(url, escrow=market.buyer2, escrow_id=e.id)
    # HEAD tells the size and charges nothing; ranged GETs pay once
    head = httpx.head(shard, headers=token_headers(e.spend_token))
    data = (shard_dir / f"train-00003-of-{SHARDS:05d}.parquet").read_bytes()
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    assert market.buyer.get(e.id).paid == 0
    for start, end in ((0, 99), (100, 499), (len(data) - 8, len(data) - 1)):
        part = httpx.get(shard, headers={**token_headers(e.spend_token), "Range": f"bytes={start}-{end}"})
        assert part.status_code == 206 and part.content == data[start:end + 1]
        assert part.headers["content-range"] == f"bytes {start}-{end}/{len(data)}"
    assert httpx.get(shard, headers=token_headers(e.spend_token)).content == data
    assert market.buyer.get(e.id).paid == PRICE
    listing = httpx.get(url).json()
    assert listing["seller"] == "seller" and len(listing["files"]) == SHARDS
    assert listing["headers"] == {"X-Escrow-Token": "<the escrow's spend token, est_...>"}
    assert listing["files"][3] | {"url": None, "etag": None, "schema": None} == {
        "path": f"train-00003-of-{SHARDS:05d}.parquet", "size": len(data), "format": "parquet", "price": 0.002,
        "price_micro": 2000, "url": None, "etag": None, "schema": None}
    market.buyer.release(e.id)  # closed: the paid shard can still be read, a new one cannot be bought
    assert httpx.get(shard, headers=token_headers(e.spend_token)).content == data
    answer = httpx.get(f"{url}/train-00004-of-{SHARDS:05d}.parquet", headers=token_headers(e.spend_token))
    assert answer.status_code == 402 and answer.json()["reason"] == "escrow_closed"
    with pytest.raises(StateConflict):
        load_paid_dataset(url, escrow=market.buyer, escrow_id=e.id)
    assert market.payments(e.id) == [f"train-00003-of-{SHARDS:05d}.parquet"]


def test_another_sellers_token_is_refused(market, server):
    """A token scoped to an escrow with seller2 pays nothing here, and loading such an escrow is refused."""
    url, _, _ = server
    other = market.escrow(seller="seller2")
    shard = f"{url}/train-00001-of-{SHARDS:05d}.parquet"
    for method in ("GET", "POST"):
        answer = httpx.request(method, shard, headers=token_headers(other.spend_token))
        assert answer.status_code == 402 and "another seller" in answer.json()["message"]
        assert answer.json()["reason"] == "token_unknown_or_revoked"
        assert b"PAR1" not in answer.content
    with pytest.raises(Forbidden, match="another seller"):
        next(iter(load_paid_dataset(url, spend_token=other.spend_token, progress=False)))
    with pytest.raises(Forbidden, match="sells for seller"):
        load_paid_dataset(url, escrow=market.buyer, escrow_id=other.id)
    got = market.buyer.get(other.id)
    assert got.paid == 0 and got.held == 0 and got.remaining == got.amount


@pytest.mark.parametrize("stop", ["revoke", "cancel"])
def test_revoke_or_cancel_stops_new_shards_at_once(market, server, unpaid_rows, stop):
    url, _, _ = server
    ds = load_paid_dataset(url, escrow=market.buyer, budget="0.05", progress=False)
    rows = iter(ds)
    assert [next(rows) for _ in range(ROWS)] == unpaid_rows[:ROWS]  # shard 0 paid and read
    if stop == "revoke":
        assert market.buyer.revoke_spend_tokens(ds.escrow_id) == 1
    else:
        market.buyer.cancel(ds.escrow_id)
    with pytest.raises(Forbidden if stop == "revoke" else StateConflict):
        next(rows)  # the very next shard, on a server that just served this token
    shard0, shard1 = (f"{url}/train-0000{i}-of-{SHARDS:05d}.parquet" for i in (0, 1))
    refused = httpx.get(shard1, headers=token_headers(ds.spend_token)).json()
    assert refused["reason"] == ("token_unknown_or_revoked" if stop == "revoke" else "escrow_closed")
    # what the escrow paid for stays readable with the token that paid it (no money moves)
    assert httpx.get(shard0, headers=token_headers(ds.spend_token)).status_code == 200
    again = load_paid_dataset([shard0], spend_token=ds.spend_token, progress=False)
    assert list(again) == unpaid_rows[:ROWS]
    got = market.buyer.get(ds.escrow_id)
    assert got.paid == PRICE and got.held == 0 and market.payments(ds.escrow_id) == [shard0.rsplit("/", 1)[1]]
    if stop == "cancel":
        assert got.refunded == Decimal("0.05") - PRICE


def test_charged_once_across_restarts_and_two_servers(market, shard_dir):
    e = market.escrow()
    shard = f"/train-00005-of-{SHARDS:05d}.parquet"

    def fresh_servers():  # a restart: new apps, fresh memory, same ledger
        seller = hf_escrow.connect(agent="seller", database_url=market.db)
        app = create_shard_app(shard_dir, escrow=seller, price_per_shard="0.002")
        return serve_app(app), serve_app(create_shard_app(shard_dir, escrow=seller, price_per_shard="0.002"))

    for _ in range(2):
        first, second = fresh_servers()
        with first as one, second as two:
            for base in (one, two, one):
                assert httpx.get(base + shard, headers=token_headers(e.spend_token)).status_code == 200
    # another token of the same escrow: its hold finds the shard paid, and is voided
    other = market.buyer.mint_spend_token(e.id)
    first, second = fresh_servers()
    with first as one, second as two:
        assert httpx.post(one + shard, headers=token_headers(other)).json()["paid_micro"] == PRICE_MICRO
        market.buyer.cancel(e.id)  # closed: the token that paid still reads it, in a process that never saw it
        assert httpx.get(two + shard, headers=token_headers(e.spend_token)).status_code == 200
        assert httpx.get(two + "/train-00006-of-00010.parquet", headers=token_headers(e.spend_token)).status_code \
            == 402
    got = market.buyer.get(e.id)
    assert got.paid == PRICE and got.refunded == got.amount - PRICE and market.payments(e.id) == [shard[1:]]


def test_a_server_that_died_between_hold_and_capture_costs_nothing_twice(market, server):
    """The stored hold of a crashed attempt (made, never captured, since freed) gives way to a new one."""
    url, _, _ = server
    e = market.escrow()
    path = f"train-00007-of-{SHARDS:05d}.parquet"
    stale = market.seller.hold(e.spend_token, PRICE, ttl_seconds=SHARD_HOLD_TTL_S,
                               idempotency_key=hold_key(e.spend_token, path, PRICE_MICRO))
    market.seller.void(stale.id)  # what its expiry would do
    for _ in range(2):
        assert httpx.get(f"{url}/{path}", headers=token_headers(e.spend_token)).status_code == 200
    got = market.buyer.get(e.id)
    assert got.paid == PRICE and got.held == 0 and market.payments(e.id) == [path]


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
        ds = load_paid_dataset(url, escrow=market.buyer, budget="0.05")
        rows = list(ds)
    assert [r["i"] for r in rows] == list(range(70)) and [r["blob"] for r in rows] == blobs
    assert len(ranged) >= 2
    assert market.buyer.get(ds.escrow_id).paid == PRICE


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
    """Seller and buyer both talk to an escrow server; the buyer's key stays in its client."""
    from hf_escrow.server.app import create_app
    with serve_app(create_app(market.ledger, sweep_interval_s=0, mcp=False)) as escrow_url:
        seller = hf_escrow.connect(escrow_url, api_key=market.keys["seller"])
        buyer = hf_escrow.connect(escrow_url, api_key=market.keys["buyer"])
        app = create_shard_app(shard_dir, escrow=seller, price_per_shard="0.002")
        seen: list[str] = []

        @app.middleware("http")
        async def record(request, call_next):
            seen.extend(f"{name}: {value}" for name, value in request.headers.items())
            return await call_next(request)

        with serve_app(app) as url:
            ds = load_paid_dataset(url, escrow=buyer, budget="0.01", progress=False)
            assert [r["id"] for r in itertools.islice(ds, 2 * ROWS)] == list(range(2 * ROWS))
            assert buyer.get(ds.escrow_id).paid == 2 * PRICE
            second = load_paid_dataset(url, escrow=buyer, escrow_id=ds.escrow_id, pattern="*-0000[01]-*")
            assert len(list(second)) == 2 * ROWS and buyer.get(ds.escrow_id).paid == 2 * PRICE
        assert f"x-escrow-token: {ds.spend_token}" in seen
        assert not [line for line in seen if market.keys["buyer"] in line or line.startswith("authorization")]
        seller.close()
        buyer.close()


@contextlib.contextmanager
def shard_server_processes(folder: Path, database_url: str, seller: str, count: int):
    """`hf-escrow datasets serve` in `count` OS processes on one ledger database; yields their URLs."""
    ports = [free_port() for _ in range(count)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_ESCROW_") or k == "HF_ESCROW_HOME"}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "hf_escrow.cli", "datasets", "serve", str(folder), "--seller", seller,
         "--price-per-shard", str(PRICE), "--port", str(port), "--database-url", database_url],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for port in ports]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url in urls:
            wait_http(url + "/", timeout_s=90)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def read_until_refused(urls: list[str], token: str) -> tuple[list[int], list[dict], Exception | None]:
    """Stream the shards in the given order until the escrow refuses one: (shards read, rows, the refusal)."""
    ds = load_paid_dataset(urls, spend_token=token, progress=False)
    rows: list[dict] = []
    try:
        for batch in ds.iter(batch_size=ROWS):
            rows += [dict(zip(batch, values)) for values in zip(*batch.values())]
    except InsufficientFunds as refused:
        return sorted({r["id"] // ROWS for r in rows}), rows, refused
    return sorted({r["id"] // ROWS for r in rows}), rows, None


def test_two_server_processes_share_one_short_escrow(db_url, shard_dir, unpaid_rows):
    """Two `datasets serve` processes, four readers racing on one escrow worth 5.5 of 10 shards."""
    ledger = Ledger(db_url)
    ledger.register("data-seller")
    ledger.register("racer")
    ledger.deposit("racer", "1")
    buyer = hf_escrow.connect(agent="racer", database_url=db_url)
    e = buyer.create_escrow("data-seller", "0.011", ttl_seconds=600)
    names = [f"train-{s:05d}-of-{SHARDS:05d}.parquet" for s in range(SHARDS)]
    with shard_server_processes(shard_dir, db_url, "data-seller", 2) as (one, two):
        plans = [[f"{base}/{n}" for n in (names if forward else names[::-1])]
                 for base in (one, two) for forward in (True, False)]
        with ThreadPoolExecutor(len(plans)) as pool:
            results = list(pool.map(lambda urls: read_until_refused(urls, e.spend_token), plans))
    delivered = set()
    for (shards, rows, refused), plan in zip(results, plans):
        assert refused is not None, plan[0]  # nobody reads all ten shards on 5.5 shards' money
        assert rows == [r for s in (shards if plan[0].endswith(names[0]) else shards[::-1])
                        for r in unpaid_rows[s * ROWS:(s + 1) * ROWS]]  # whole shards, in order
        delivered.update(shards)
    assert 0 in results[0][0] and 0 in results[2][0]  # shard 0 delivered by both processes, paid once
    got = buyer.get(e.id)
    assert got.paid == len(delivered) * PRICE <= got.amount and got.held == 0
    assert got.remaining == got.amount - got.paid and len(delivered) == 5
    assert paid_shards_of(ledger, e.id, "data-seller") == sorted(names[s] for s in delivered)
    assert_audit_clean(ledger)
    ledger.close()
