"""The seller's shard server: the files of a folder over HTTP, each shard paid once per escrow.

`create_shard_app(folder, escrow=seller_client, price_per_shard="0.002")` serves every
parquet, jsonl/json, csv and arrow file under `folder` at ``/<path relative to folder>``,
with HEAD and Range (206, Content-Range) as `datasets` streaming needs, and lists them
at ``GET /`` as JSON (path, size, price, url, format, etag; for parquet and arrow also
the Arrow schema, so that a buyer learns the columns without paying for a shard).

Who may read: a request carries the escrow's spend token (``X-Escrow-Token: est_...``,
which `create_escrow` returns), never the buyer's API key: a key, sent as the token or
as ``Authorization: Bearer``, is refused (402) with a message that says to send the
token. The seller's own client makes the holds; the ledger checks that the token is live
and pays this seller.

What is charged: the first GET (or POST, see below) of a shard by an escrow pays the
shard's price, once, through the till's ledger: one hold of the price, captured in full
(`ShardGate`). Further ranged reads, retries and reconnects of that shard are free - also
after a server restart and across several server processes on one ledger, because both
the hold and the capture carry idempotency keys every process derives alike, and the
ledger answers a repeated key with the stored result. Every refusal to pay is a 402
carrying the challenge of `hf_escrow.challenge` (its `reason` says why; the offer is also
at ``/.well-known/hf-escrow``), and no bytes of the file. A new shard needs a live token: a
revoked token or a closed escrow pays for nothing more, at once and in every process, but the shards the escrow paid for can be read again with the token that paid
them (a re-read moves no money; the ledger keeps the keys that prove it at least 24 h).

HEAD never charges and asks the ledger nothing: it needs a spend token and tells the
size - which the public listing shows anyway, as a catalogue does. ``POST /<path>`` pays
for a shard without reading it and answers the escrow's paid and remaining amounts (as
of that payment) as JSON: the buyer side (`hf_escrow.buyer.datasets.load_paid_dataset`) calls
it before it opens each shard, so that a short escrow stops the stream with a clear
error before the shard, never inside.

With ``price_per_shard=0`` (and no escrow) the app is a plain, free file server: the
benchmark's baseline.

Note for plain `datasets.load_dataset(data_files=[urls])` clients: fsspec resolves every
URL with an unranged GET (its `exists` check) before reading anything. The server cannot
tell that probe from a download, so such a client pays for every listed shard when it
loads; `load_paid_dataset` passes resolved data files and pays only for shards it reads.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime,
# and `Request` is imported inside `create_shard_app` (the module stays light for buyers).

import base64
import hashlib
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import __version__, challenge
from .._exceptions import EscrowError, InsufficientFunds, NotFound, ValidationError
from ..money import format_usdc, parse_usdc, usdc_number
from ..challenge import TOKEN_HEADER, check_token, spend_token_from
from ..shardformats import MEDIA_TYPES, shard_format
from .till import Till, once_hold_key

SHARD_HOLD_TTL_S = 60        # a shard's hold is captured at once; one value, so every process's hold key matches
MAX_CACHED = 100_000         # cache entries kept before the caches start over
MAX_LISTED = 100_000         # files listed at most (the walk is bounded)
SHARD_SCOPE = "shard"        # names the shard payments' idempotency keys


def _visible(part: str) -> bool:
    return bool(part) and not part.startswith(".")


class ShardFolder:
    """The shard files under one folder: safe lookup of a request path, listing, schemas."""

    def __init__(self, folder: str | Path):
        self.root = Path(folder).expanduser().resolve()
        if not self.root.is_dir():
            raise ValidationError(f"shard folder {folder} does not exist or is not a folder")
        self._schemas: dict[tuple[str, int, int], str | None] = {}

    def resolve(self, path: str) -> tuple[Path, os.stat_result] | None:
        """The file a request path names, if it is a visible shard file inside the folder."""
        parts = path.split("/")
        if not path or not all(_visible(p) for p in parts) or shard_format(path) is None:
            return None
        target = (self.root / path).resolve()
        if not target.is_relative_to(self.root):
            return None
        try:
            stat = target.stat()
        except OSError:
            return None
        return (target, stat) if target.is_file() else None

    def is_folder(self, path: str) -> bool:
        """True when a request path names a visible folder inside the root (its listing is served)."""
        parts = path.rstrip("/").split("/")
        if not all(_visible(p) for p in parts):
            return False
        target = (self.root / path).resolve()
        return target.is_relative_to(self.root) and target.is_dir()

    def files(self, under: str = "") -> list[tuple[str, Path, os.stat_result]]:
        """Shard files (relative path, file, stat), sorted by path; hidden names skipped."""
        start = (self.root / under).resolve() if under else self.root
        if not start.is_relative_to(self.root) or not start.is_dir():
            return []
        found: list[tuple[str, Path, os.stat_result]] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            for name in sorted(filenames):
                if not _visible(name) or shard_format(name) is None:
                    continue
                file = Path(dirpath) / name
                try:
                    stat = file.stat()
                    inside = file.resolve().is_relative_to(self.root)  # a link out of the folder is not sold
                except OSError:
                    continue
                if not inside:
                    continue
                found.append((file.relative_to(self.root).as_posix(), file, stat))
                if len(found) >= MAX_LISTED:
                    return sorted(found, key=lambda f: f[0])
        return sorted(found, key=lambda f: f[0])

    def schema(self, rel: str, file: Path, stat: os.stat_result) -> str | None:
        """The Arrow schema of a parquet or arrow file (base64 IPC), cached per version of the file."""
        fmt = shard_format(rel)
        if fmt not in ("parquet", "arrow"):
            return None
        cache_key = (rel, stat.st_mtime_ns, stat.st_size)
        if cache_key not in self._schemas:
            if len(self._schemas) > MAX_CACHED:
                self._schemas.clear()
            self._schemas[cache_key] = _read_schema(file, fmt)
        return self._schemas[cache_key]


def _read_schema(file: Path, fmt: str) -> str | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        if fmt == "parquet":
            schema = pq.read_schema(file)
        else:
            with pa.memory_map(str(file)) as source:
                try:
                    schema = pa.ipc.open_stream(source).schema
                except pa.ArrowInvalid:
                    schema = pa.ipc.open_file(source).schema
        return base64.b64encode(schema.serialize().to_pybytes()).decode()
    except Exception:  # an unreadable file is still served; the buyer's loader will say what is wrong
        return None


def etag(stat: os.stat_result) -> str:
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"


class ShardGate:
    """The once-per-(escrow, shard) payment: the till's `pay_once` with the shard's path.

    The ledger, not this process, remembers what was paid (see `Till.pay_once`): a ranged
    GET, a retry, another replica, a restart, a close or a revoke asking again for a shard
    the escrow paid gets the stored answer; a shard the escrow has not paid for needs a
    live token, so a revoke, a close or too little left stops it at once, in every process.
    The only memory kept here is which (token, shard) pairs are paid, so that the many
    ranged reads of one shard do not ask the ledger.
    """

    def __init__(self, escrow: Any, price_micro: int):
        self.till = Till(escrow, hold_ttl_s=SHARD_HOLD_TTL_S)
        self.escrow = escrow
        self.price_micro = price_micro
        self._paid: dict[tuple[str, str], str] = {}   # (token digest, path) -> escrow id
        self._lock = threading.Lock()
        self._seller: str | None = getattr(escrow, "agent", None)

    @property
    def seller(self) -> str | None:
        if self._seller is None:
            self._seller = self.escrow.me().agent_id
        return self._seller

    def paid_escrow(self, token: str, path: str) -> str | None:
        """The escrow that paid this shard with this token, if this process saw it paid."""
        return self._paid.get((_digest(token), path))

    def pay(self, token: str, path: str) -> tuple[str, Any]:
        """Pay the shard once for the token's escrow: (escrow id, the escrow as that payment left it).

        Raises PaymentRequired (no token, or an API key), Forbidden (token unknown, revoked,
        another seller's), StateConflict (escrow closed), InsufficientFunds (too little left).
        """
        try:
            escrow_id, receipt = self.till.pay_once(token, self.price_micro, path, scope=SHARD_SCOPE,
                                                    what=f"shard {path}")
        except InsufficientFunds as error:
            raise InsufficientFunds(f"{error.message}; no bytes were sent. Open a new escrow with seller "
                                    f"{self.seller} to read it.", details={"path": path, **error.details}) from None
        with self._lock:
            if len(self._paid) > MAX_CACHED:
                self._paid.clear()
            self._paid[(_digest(token), path)] = escrow_id
        return escrow_id, receipt.escrow if receipt is not None else None


def hold_key(token: str, path: str, price_micro: int) -> str:
    """The idempotency key of the hold that pays one shard with one token (no secret in it)."""
    return once_hold_key(SHARD_SCOPE, token, path, price_micro)


def _digest(token: str) -> str:
    return hashlib.sha256(f"hf-escrow shard cache:{token}".encode()).hexdigest()[:32]


def create_shard_app(folder: str | Path, *, escrow: Any = None, price_per_shard: Any = "0",
                     escrow_url: str | None = None) -> Any:
    """The shard server app (FastAPI). `escrow` is the seller's `EscrowClient`.

    Args:
        folder: the folder whose parquet/jsonl/json/csv/arrow files are sold, one shard per file.
        escrow: an `EscrowClient` acting as the seller (embedded or over HTTP).
        price_per_shard: USDC per shard (str, Decimal, int, float, or a `Pricing` with
            `per_shard`). ``0`` without an escrow serves the files free.
        escrow_url: the escrow server its 402 challenges name (see `hf_escrow.challenge`),
            when buyers reach it under another URL than the seller's client.

    Example:
        >>> import uvicorn, hf_escrow
        >>> app = create_shard_app("shards/", escrow=hf_escrow.connect(agent="data-seller"),
        ...                        price_per_shard="0.002")
        >>> uvicorn.run(app, host="127.0.0.1", port=8790)  # doctest: +SKIP
    """
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response

    from ..pricing import Pricing
    from ..ops.metrics import install_ops
    from ..ops.operator import admin_key
    if isinstance(price_per_shard, (Pricing, dict)):
        sheet = Pricing.coerce(price_per_shard)
        if sheet.per_shard is None:
            raise ValidationError("the price sheet sets no per_shard price")
        price_per_shard = sheet.per_shard
    price_micro = parse_usdc(price_per_shard, what="price_per_shard", allow_zero=True)
    if price_micro and escrow is None:
        raise ValidationError("a priced shard server needs the seller's escrow client: escrow=connect(agent=...)")
    shards = ShardFolder(folder)
    gate = ShardGate(escrow, price_micro) if price_micro else None
    app = FastAPI(title="hf-escrow shard server", version=__version__,
                  description="Dataset shards over HTTP, paid once per shard from the buyer's escrow.")
    app.state.shards, app.state.gate = shards, gate
    # Before the catch-all shard route: /readyz and /metrics are not files.
    install_ops(app, ready=escrow.me if escrow is not None else (lambda: None), admin_key=admin_key())

    def offer() -> challenge.Offer:
        return gate.till.offer({"per_shard": format_usdc(price_micro)}, price_micro, escrow_server=escrow_url)

    @app.exception_handler(EscrowError)
    async def escrow_error(request: Request, error: EscrowError) -> JSONResponse:
        if gate is not None and challenge.reason_of(error):
            status, body, headers = (await anyio.to_thread.run_sync(offer)).refusal(error)
            return JSONResponse(body, status_code=status, headers=headers)
        return JSONResponse(error.to_dict(), status_code=error.status_code)

    @app.get(challenge.WELL_KNOWN_PATH)
    async def discovery() -> dict:
        if gate is None:
            raise NotFound("these shards are free: nothing to pay")
        return (await anyio.to_thread.run_sync(offer)).document()

    def listing(request: Request, under: str) -> dict:
        base = str(request.base_url)
        files = []
        for rel, file, stat in shards.files(under):
            entry = {"path": rel, "url": base + quote(rel), "size": stat.st_size, "format": shard_format(rel),
                     "price": usdc_number(price_micro), "price_micro": price_micro, "etag": etag(stat)}
            schema = shards.schema(rel, file, stat)
            if schema:
                entry["schema"] = schema
            files.append(entry)
        seller = gate.seller if gate else None
        return {"seller": seller, "currency": "USDC", "price_per_shard": usdc_number(price_micro),
                "price_per_shard_micro": price_micro, "files": files,
                "headers": {TOKEN_HEADER: "<the escrow's spend token, est_...>"} if gate else None}

    @app.get("/")
    async def index(request: Request) -> dict:
        return await anyio.to_thread.run_sync(listing, request, "")

    async def pay(token: str, rel: str) -> tuple[str, Any]:
        return await anyio.to_thread.run_sync(gate.pay, token, rel)

    @app.api_route("/{path:path}", methods=["GET", "HEAD", "POST"])
    async def shard(path: str, request: Request) -> Response:
        found = shards.resolve(path)
        if found is None:
            if request.method == "GET" and shards.is_folder(path):
                return JSONResponse(await anyio.to_thread.run_sync(listing, request, path.rstrip("/")))
            raise NotFound(f"no shard {path!r} here; GET / lists the shards")
        file, stat = found
        rel = file.relative_to(shards.root).as_posix()
        if gate is not None:
            token = check_token(spend_token_from(request.headers))
            if request.method == "POST":
                escrow_id, state = await pay(token, rel)
                return JSONResponse(await anyio.to_thread.run_sync(payment_answer, rel, escrow_id, state))
            if request.method == "GET" and gate.paid_escrow(token, rel) is None:
                await pay(token, rel)
        elif request.method == "POST":
            return JSONResponse({"path": rel, "price": 0, "paid": 0, "remaining": None})
        return FileResponse(file, stat_result=stat, media_type=MEDIA_TYPES[shard_format(rel)],
                            headers={"Cache-Control": "private, no-store"})

    def payment_answer(rel: str, escrow_id: str, state: Any) -> dict:
        state = state or gate.escrow.get(escrow_id)
        return {"path": rel, "escrow_id": escrow_id, "price": usdc_number(price_micro),
                "paid": usdc_number(state.paid_micro), "remaining": usdc_number(state.remaining_micro),
                "paid_micro": state.paid_micro, "remaining_micro": state.remaining_micro,
                "status": state.status}

    return app
