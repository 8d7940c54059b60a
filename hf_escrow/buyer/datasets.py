"""Per-shard billing for `datasets` streaming: the buyer's side, and a local form.

Over HTTP (the seller runs `hf-escrow datasets serve DIR`, see `hf_escrow.seller.shardserver`):

    >>> import hf_escrow
    >>> from hf_escrow.datasets import load_paid_dataset
    >>> buyer = hf_escrow.connect("http://127.0.0.1:8787", api_key=BUYER_KEY)   # the key stays here
    >>> ds = load_paid_dataset("http://127.0.0.1:8790/", escrow=buyer, budget="0.05")   # sends e.spend_token
    >>> for batch in ds.iter(batch_size=1000): ...

`load_paid_dataset` returns the ordinary streaming `datasets.IterableDataset`, built the
way `load_dataset(fmt, data_files=urls, streaming=True, storage_options={"headers":
{"X-Escrow-Token": e.spend_token}})` builds it, so `map`, `filter`,
`shuffle`, `take`, `iter(batch_size=...)`, a torch `DataLoader(num_workers>0)` and
`state_dict()`/`load_state_dict()` work as usual. Two things are added:

- before the stream opens a shard it pays for it (``POST`` to the shard's URL; free if
  this escrow paid for it already), so a short escrow stops the stream with
  `InsufficientFunds` between two shards - never inside one, and without `datasets`'
  connection retries on a 402;
- the data files are handed over resolved (with the server's etags) and the features
  come from the server's listing, so that loading reads no shard: only the shards that
  are iterated are paid for.

The shard server only ever sees the escrow's spend token, which lets it be paid from
that one escrow and nothing else; the buyer's API key stays with the buyer's client.

A progress bar (`datasets`' own tqdm; `datasets.disable_progress_bars()` silences it)
counts the shards opened and shows the escrow's spend. DataLoader workers pay for their
own shards and draw no bar.

The local form, `paid_shards`, bills any streaming dataset per `ds.shard(n, i)`, for
sellers who hand the files over another way (a gated repo, a bucket).
"""

from __future__ import annotations

import base64
import fnmatch
import logging
import os
import sys
import time
from decimal import Decimal
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import httpx

from .._exceptions import (
    Forbidden, InsufficientFunds, StateConflict, TransportError, ValidationError, error_for_status,
)
from ..money import parse_usdc, to_usdc
from ..challenge import TOKEN_HEADER, check_token
from ..retries import Backoff
from ..shardformats import shard_format

logger = logging.getLogger(__name__)

PAY_TIMEOUT_S = 30.0
PAY_BACKOFF = Backoff(0.2, tries=3)   # connection failures retried; HTTP errors are answers, not retried

__all__ = ["load_paid_dataset", "paid_shards", "PaidShards", "shard_catalog"]


# ---------------------------------------------------------------------------- catalogue

def shard_catalog(url: str, *, timeout: float = PAY_TIMEOUT_S) -> dict:
    """The shard server's public listing: ``{"seller", "price_per_shard", "files": [{path, url, size, ...}]}``."""
    try:
        answer = httpx.get(url, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as error:
        raise TransportError(f"cannot reach the shard server at {url}: {error}") from None
    if answer.status_code >= 400:
        raise error_for_status(answer.status_code, _json(answer), response=answer)
    data = _json(answer)
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise ValidationError(f"{url} is not an hf-escrow shard server listing (GET / must answer JSON files)")
    return data


def _json(answer: httpx.Response) -> Any:
    try:
        return answer.json()
    except ValueError:
        return answer.text[:200]


def _root(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/"


def _resolve_files(url_or_files: str | Sequence[str], pattern: str | None,
                   timeout: float) -> tuple[list[str], dict[str, dict], dict]:
    """The shard URLs to read, their catalogue entries by URL, and the catalogue."""
    if isinstance(url_or_files, str) and shard_format(urlsplit(url_or_files).path) is None:
        catalog = shard_catalog(url_or_files, timeout=timeout)
        entries = [f for f in catalog["files"] if pattern is None or fnmatch.fnmatch(f["path"], pattern)]
        if not entries:
            raise ValidationError(f"the shard server at {url_or_files} lists no shard"
                                  + (f" matching {pattern!r}" if pattern else ""))
        return [f["url"] for f in entries], {f["url"]: f for f in entries}, catalog
    files = [url_or_files] if isinstance(url_or_files, str) else list(url_or_files)
    if not files or not all(isinstance(f, str) and f.startswith(("http://", "https://")) for f in files):
        raise ValidationError("give the shard server's URL, or a list of its http(s) shard URLs")
    roots = {_root(f) for f in files}
    if len(roots) != 1:
        raise ValidationError(f"all shards must come from one shard server; got {sorted(roots)}")
    catalog = shard_catalog(roots.pop(), timeout=timeout)
    by_url = {f["url"]: f for f in catalog["files"]}
    missing = [f for f in files if f not in by_url]
    if missing:
        raise ValidationError(f"the shard server does not list {missing[:3]}; GET {_root(files[0])} lists its shards")
    return files, by_url, catalog


def _format(files: list[str], given: str | None) -> str:
    if given:
        return given
    formats = {shard_format(urlsplit(f).path) for f in files}
    if len(formats) != 1 or None in formats:
        raise ValidationError(f"cannot infer one format from the file names ({sorted(map(str, formats))}); "
                              "filter the files (pattern='*.parquet') or pass format=")
    return formats.pop()


def _features(entry: dict | None) -> Any:
    if not entry or not entry.get("schema"):
        return None
    import pyarrow as pa
    from datasets import Features
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(entry["schema"])))
    return Features.from_arrow_schema(schema)


# ---------------------------------------------------------------------------- paying per shard

class ShardPayer:
    """Pays for a shard before it is opened; picklable, so DataLoader workers pay their own shards."""

    def __init__(self, headers: dict[str, str], *, escrow_id: str, total: int, progress: bool = True,
                 timeout: float = PAY_TIMEOUT_S):
        self.headers = dict(headers)
        self.escrow_id = escrow_id
        self.total = total
        self.progress = progress
        self.timeout = timeout
        self.latencies_ms: list[float] = []
        self._reset()

    def _reset(self) -> None:
        self._client: httpx.Client | None = None
        self._pid = os.getpid()
        self._bar: Any = None
        self._seen: set[str] = set()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in ("_client", "_bar"):
            state[name] = None
        state["_seen"] = set()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = -1

    def _http(self) -> httpx.Client:
        if self._client is None or self._pid != os.getpid():
            if self._pid != os.getpid():  # a forked worker: start afresh, draw no bar
                self._pid, self._bar, self._seen = os.getpid(), None, set()
            self._client = httpx.Client(timeout=self.timeout)
        return self._client

    def pay(self, url: str) -> dict:
        """Pay for the shard at `url` (free when this escrow paid already); raise EscrowError if refused."""
        client = self._http()
        started = time.perf_counter()
        answer = None
        for attempt in range(PAY_BACKOFF.tries):
            try:
                answer = client.post(url, headers=self.headers)
                break
            except httpx.TransportError as error:
                if PAY_BACKOFF.last(attempt):
                    raise TransportError(f"cannot reach the shard server to pay for {url}: {error}") from None
                time.sleep(PAY_BACKOFF.delay_s(attempt))
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        body = _json(answer)
        if answer.status_code >= 400:
            raise error_for_status(answer.status_code, body, response=answer)
        self._show(url, body if isinstance(body, dict) else {})
        return body

    def _show(self, url: str, body: dict) -> None:
        """One tick per shard opened for the first time in this process; the escrow's spend beside it."""
        if not self.progress or _in_worker() or url in self._seen:
            return
        self._seen.add(url)
        if self._bar is None:
            from datasets.utils.tqdm import tqdm
            self._bar = tqdm(total=self.total, unit="shard", desc=f"paid shards ({self.escrow_id})")
        if "paid_micro" in body:
            self._bar.set_postfix_str(f"spent {to_usdc(int(body['paid_micro']))} USDC, "
                                      f"left {to_usdc(int(body['remaining_micro']))}", refresh=False)
        self._bar.update(1)
        if len(self._seen) >= self.total:
            self._bar.close()


def _in_worker() -> bool:
    if "torch" not in sys.modules:
        return False
    from torch.utils.data import get_worker_info
    return get_worker_info() is not None


class _PaidTables:
    """A builder's `_generate_tables`, paying for each shard before handing it over.

    It keeps the builder, not its bound method: once this wrapper is the builder's
    `_generate_tables`, a pickled bound method (DataLoader workers under spawn) would
    come back as the wrapper itself.
    """

    def __init__(self, builder: Any, payer: ShardPayer):
        self.builder = builder
        self.payer = payer

    def _tables(self, **gen_kwargs: Any) -> Iterator:
        return type(self.builder)._generate_tables(self.builder, **gen_kwargs)

    def __call__(self, **gen_kwargs: Any) -> Iterator:
        name = "files" if "files" in gen_kwargs else "base_files"
        files = list(gen_kwargs[name])
        for index, url in enumerate(files):
            self.payer.pay(url)
            if len(files) == 1:
                yield from self._tables(**gen_kwargs)
            else:  # one call per file, each paid just before it is read
                yield from self._tables(**{
                    key: [value[index]] if isinstance(value, list) and len(value) == len(files) else value
                    for key, value in gen_kwargs.items()})


def load_paid_dataset(url_or_files: str | Sequence[str], *, escrow: Any = None, budget: Any = None,
                      seller: str | None = None, escrow_id: str | None = None, spend_token: str | None = None,
                      format: str | None = None, pattern: str | None = None, features: Any = None,
                      split: str = "train", progress: bool = True, ttl_seconds: float = 3600,
                      timeout: float = PAY_TIMEOUT_S, **load_kwargs: Any):
    """Stream a seller's shards with `datasets`, paying each shard once from the buyer's escrow.

    The shard server gets the escrow's spend token (``X-Escrow-Token``) and nothing else:
    the buyer's API key never leaves `escrow`, the buyer's own client.

    Args:
        url_or_files: the shard server's URL (all its shards, in path order; `pattern`
            filters them by path, e.g. ``"train/*.parquet"``), or a list of its shard URLs.
        escrow: an `EscrowClient` acting as the buyer (embedded, or over HTTP with the
            buyer's key, which stays in it).
        budget (and seller): open a new escrow of `budget` USDC (seller: the one the
            server names) and pay with its spend token; or
        escrow_id: an escrow the buyer holds with this seller: a new spend token is minted
            for it (pass `spend_token` too to reuse one, e.g. to resume with the token that
            paid, which reads paid shards again even once the escrow is closed); or
        spend_token: only a token (given by whoever funds the escrow); `escrow` is then
            not needed and `ds.escrow_id` is `escrow_id` (None if not given).
        format: the `datasets` builder (parquet, json, csv, arrow); inferred from extensions.
        features: `datasets.Features`; default: the schema the server lists (parquet,
            arrow). Without either, `datasets` reads the first shard at load to infer the
            columns, and that shard is paid for first.
        split: the split name of the returned stream.
        progress: draw a progress bar of shards and spend.
        **load_kwargs: passed on to `datasets.load_dataset_builder` (e.g. `columns`, `batch_size`).

    Returns:
        The ordinary streaming `datasets.IterableDataset`, one shard per file, with
        `escrow_id` and `spend_token` set on it.

    A shard is paid when the stream opens it. Note that `datasets`' `take(n)` asks for
    one more table after its n-th row: when the n-th row is in the last table (row group)
    of shard k, shard k+1 is opened, so paid. `itertools.islice(ds, n)`, `ds.shard()` or
    a shorter file list open exactly the shards they need.

    Raises:
        InsufficientFunds: while iterating, before a shard the escrow cannot pay for.
        Forbidden: another seller's escrow, or a revoked token (while iterating).
        StateConflict: a closed escrow.

    Example:
        >>> ds = load_paid_dataset("http://127.0.0.1:8790/", escrow=buyer, budget="0.05")
        >>> next(iter(ds)), ds.escrow_id
        ({'id': 0, 'text': '...'}, 'esc_...')
    """
    from datasets import load_dataset_builder
    from datasets.data_files import DataFilesDict, DataFilesList

    urls, entries, catalog = _resolve_files(url_or_files, pattern, timeout)
    fmt = _format(urls, format)
    escrow_id, token = _escrow_and_token(escrow, catalog.get("seller"), budget=budget, seller=seller,
                                         escrow_id=escrow_id, spend_token=spend_token, ttl_seconds=ttl_seconds,
                                         description=f"dataset shards from {_root(urls[0])}", shards=len(urls))
    headers = {TOKEN_HEADER: token}
    payer = ShardPayer(headers, escrow_id=escrow_id or "spend token", total=len(urls), progress=progress,
                       timeout=timeout)
    if features is None:
        features = _features(entries.get(urls[0]))
        if features is not None and load_kwargs.get("columns"):
            features = type(features)({name: features[name] for name in load_kwargs["columns"] if name in features})
    if features is None and fmt in ("parquet", "arrow", "json"):
        payer.pay(urls[0])  # datasets reads it at load to infer the columns: pay first, cleanly
    data_files = DataFilesDict({split: DataFilesList(
        urls, [(str(entries[u]["etag"]),) if entries.get(u, {}).get("etag") else () for u in urls])})
    builder = load_dataset_builder(fmt, data_files=data_files, features=features,
                                   storage_options={"headers": headers}, **load_kwargs)
    builder._generate_tables = _PaidTables(builder, payer)  # the builder's per-shard hook
    dataset = builder.as_streaming_dataset(split=split)
    dataset.escrow_id, dataset.spend_token = escrow_id, token
    return dataset


def _escrow_and_token(escrow: Any, listed_seller: str | None, *, budget: Any, seller: str | None,
                      escrow_id: str | None, spend_token: str | None, ttl_seconds: float, description: str,
                      shards: int) -> tuple[str | None, str]:
    """The escrow to pay from (checked against the server's seller) and the spend token for it."""
    if spend_token is not None:
        check_token(spend_token)
    if escrow is None:
        if spend_token is None:
            raise ValidationError("give escrow= (the buyer's EscrowClient) with budget= or escrow_id=, "
                                  "or a spend_token=")
        return escrow_id, spend_token
    if escrow_id is None:
        if spend_token is not None:
            return None, spend_token
        if budget is None:
            raise ValidationError("give budget= to open an escrow, escrow_id= (an escrow you hold with the "
                                  "seller), or spend_token=")
        seller = seller or listed_seller
        if not seller:
            raise ValidationError("the shard server names no seller; pass seller=")
        opened = escrow.create_escrow(seller, budget, ttl_seconds=ttl_seconds, description=description,
                                      meta={"kind": "dataset", "shards": shards})
    else:
        opened = escrow.get(escrow_id)
    if listed_seller and opened.seller != listed_seller:
        raise Forbidden(f"escrow {opened.id} is with seller {opened.seller}, but this shard server sells for "
                        f"{listed_seller}; open an escrow with {listed_seller}")
    if not opened.is_open and spend_token is None:
        raise StateConflict(f"escrow {opened.id} is {opened.status}; open a new one to read shards")
    return opened.id, spend_token or opened.spend_token or escrow.mint_spend_token(opened.id)


# ---------------------------------------------------------------------------- the local form

class PaidShards:
    """Rows (or batches) of `ds.shard(num_shards, i)` for each chosen shard, each shard paid first.

    Who pays whom: the buyer's escrow pays the seller, once per shard, under the
    idempotency key ``shard:<escrow id>:<dataset_name>:<i>/<num_shards>``, so reading a
    shard again (a rerun, a retry) is free. The client decides how:

    - acting as the escrow's **seller** (the seller runs the process that feeds the
      buyer, e.g. a training job it operates), each shard is a seller `deduct`;
    - acting as the escrow's **buyer** (the buyer reads files the seller handed over
      another way, and pays as it reads), each shard is a buyer `release(amount,
      refund_remainder=False)`, which keeps the escrow open.

    A shard the escrow cannot cover raises `InsufficientFunds` before any of its rows.
    """

    def __init__(self, ds: Any, *, escrow: Any, escrow_id: str, price_per_shard: Any,
                 num_shards: int | None = None, shards: Iterable[int] | None = None,
                 dataset_name: str | None = None, batch_size: int | None = None, progress: bool = True):
        self.ds = ds
        self.escrow = escrow
        self.escrow_id = escrow_id
        self.price_micro = parse_usdc(price_per_shard, what="price_per_shard")
        self.num_shards = num_shards or ds.num_shards
        self.shards = list(range(self.num_shards)) if shards is None else list(shards)
        bad = [i for i in self.shards if not isinstance(i, int) or not 0 <= i < self.num_shards]
        if bad:
            raise ValidationError(f"shard indices must be 0..{self.num_shards - 1}; got {bad[:5]}")
        self.dataset_name = dataset_name or getattr(ds.info, "dataset_name", None) or "dataset"
        self.batch_size = batch_size
        self.progress = progress
        self.paid: list[int] = []
        self.spent = Decimal(0)
        self.receipts: list[Any] = []
        state = escrow.get(escrow_id)
        me = escrow.agent or escrow.me().agent_id
        if me == state.seller:
            self.role = "seller"
        elif me == state.buyer:
            self.role = "buyer"
        else:
            raise Forbidden(f"{me} is neither the buyer nor the seller of escrow {escrow_id}")

    def key(self, index: int) -> str:
        return f"shard:{self.escrow_id}:{self.dataset_name}:{index}/{self.num_shards}"

    def pay(self, index: int) -> Any:
        """Pay for shard `index` (a repeat answers the stored receipt and moves nothing)."""
        amount, reason = to_usdc(self.price_micro), f"shard {index}/{self.num_shards} of {self.dataset_name}"
        if self.role == "seller":
            receipt = self.escrow.deduct(self.escrow_id, amount, reason=reason, idempotency_key=self.key(index))
        else:
            receipt = self.escrow.release(self.escrow_id, amount, refund_remainder=False,
                                          meta={"kind": "dataset-shard", "reason": reason},
                                          idempotency_key=self.key(index))
        self.paid.append(index)
        self.receipts.append(receipt)
        self.spent += receipt.gross
        return receipt

    def __iter__(self) -> Iterator[Any]:
        bar = None
        if self.progress:
            from datasets.utils.tqdm import tqdm
            bar = tqdm(total=len(self.shards), unit="shard", desc=f"paid shards ({self.escrow_id})")
        try:
            for index in self.shards:
                try:
                    receipt = self.pay(index)
                except InsufficientFunds as error:
                    raise InsufficientFunds(f"shard {index} of {self.dataset_name} costs "
                                            f"{to_usdc(self.price_micro)} USDC: {error.message}",
                                            details=error.details) from None
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"left {receipt.remaining} USDC", refresh=True)
                part = self.ds.shard(num_shards=self.num_shards, index=index)
                yield from (part.iter(batch_size=self.batch_size) if self.batch_size else part)
        finally:
            if bar is not None:
                bar.close()


def paid_shards(ds: Any, *, escrow: Any, escrow_id: str, price_per_shard: Any, num_shards: int | None = None,
                shards: Iterable[int] | None = None, dataset_name: str | None = None, batch_size: int | None = None,
                progress: bool = True) -> PaidShards:
    """Bill any streaming dataset per shard in one process: see `PaidShards` for who pays whom.

    Example:
        >>> ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        >>> rows = paid_shards(ds, escrow=buyer, escrow_id=e.id, price_per_shard="0.002", shards=[0, 1, 2])
        >>> for row in rows: ...
        >>> rows.spent
        Decimal('0.006000')
    """
    return PaidShards(ds, escrow=escrow, escrow_id=escrow_id, price_per_shard=price_per_shard,
                      num_shards=num_shards, shards=shards, dataset_name=dataset_name, batch_size=batch_size,
                      progress=progress)

