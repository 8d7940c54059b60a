"""The seller's shard server: the files of a folder over HTTP, each shard paid once per escrow.

`create_shard_app(folder, escrow=seller_client, price_per_shard="0.002")` serves every
parquet, jsonl/json, csv and arrow file under `folder` at ``/<path relative to folder>``,
with HEAD and Range (206, Content-Range) as `datasets` streaming needs, and lists them
at ``GET /`` as JSON (path, size, price, url, format, etag; for parquet and arrow also
the Arrow schema, so that a buyer learns the columns without paying for a shard).

Who may read: a request carries the buyer's escrow (``X-Escrow-Id``) and the buyer's key
(``Authorization: Bearer``). The key must own the escrow (``escrow.identify(key) ==
escrow.get(id).buyer``), and the escrow must be one with this seller. Checks are cached
for `IDENTITY_TTL_S`, so the many ranged GETs of one shard stay cheap.

What is charged: the first GET (or POST, see below) of a shard by an escrow deducts the
shard's price, once, under the idempotency key ``shard:<escrow id>:<path>``. Further
ranged reads, retries and reconnects of that shard by the same escrow are free - also
after a server restart and across several server processes on one ledger, because the
ledger answers a repeated key with the stored receipt. Not enough left in the escrow:
402 with a JSON message, and no bytes of the file. A closed escrow cannot pay for a new
shard (409) but may read again the shards it paid for.

HEAD never charges and does not look at funds: it needs a valid key and an escrow of
that buyer with this seller (401/403 otherwise), and then tells the size - which the
public listing shows anyway, as a catalogue does. ``POST /<path>`` pays for a shard
without reading it and answers the escrow's paid and remaining amounts (as of that
payment) as JSON: the buyer
side (`hf_escrow.datasets.load_paid_dataset`) calls it before it opens each shard, so
that a short escrow stops the stream with a clear error before the shard, never inside.

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
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ._exceptions import EscrowError, Forbidden, IdempotencyConflict, InsufficientFunds, NotFound, ValidationError
from .money import format_usdc, parse_usdc, to_usdc, usdc_number

# extension -> the `datasets` packaged builder that reads it
SHARD_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
MEDIA_TYPES = {"parquet": "application/vnd.apache.parquet", "arrow": "application/vnd.apache.arrow.file",
               "json": "application/x-ndjson", "csv": "text/csv"}
IDENTITY_TTL_S = 30.0       # how long a checked (key, escrow) pair is trusted
MAX_CACHED = 100_000         # cache entries kept before the caches start over
MAX_LISTED = 100_000         # files listed at most (the walk is bounded)
MAX_KEY_CHARS = 255          # the ledger's idempotency key limit


def shard_format(path: str | Path) -> str | None:
    """The `datasets` builder for a shard file name (parquet, json, csv, arrow), or None."""
    return SHARD_FORMATS.get(Path(str(path)).suffix.lower())


def shard_key(escrow_id: str, path: str) -> str:
    """The idempotency key of one shard's payment by one escrow: the same in every process."""
    key = f"shard:{escrow_id}:{path}"
    if len(key) > MAX_KEY_CHARS:
        key = f"shard:{escrow_id}:sha256:{hashlib.sha256(path.encode()).hexdigest()}"
    return key


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
    """Who may read which escrow's shards, and the once-per-(escrow, shard) charge (seller side)."""

    def __init__(self, escrow: Any, price_micro: int):
        self.escrow = escrow
        self.price_micro = price_micro
        self._checked: dict[tuple[str, str], float] = {}
        self._paid: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._seller: str | None = getattr(escrow, "agent", None) if escrow is not None else None

    @property
    def seller(self) -> str | None:
        if self._seller is None and self.escrow is not None:
            self._seller = self.escrow.me().agent_id
        return self._seller

    @staticmethod
    def _credentials(escrow_id: str | None, key: str | None) -> tuple[str, str]:
        if not key:
            from ._exceptions import Unauthorized
            raise Unauthorized("send the buyer's API key as 'Authorization: Bearer <key>'")
        if not escrow_id:
            raise ValidationError("send the buyer's escrow id in the X-Escrow-Id header")
        return escrow_id, hashlib.sha256(key.encode()).hexdigest()

    def admitted(self, escrow_id: str | None, key: str | None) -> bool:
        """True when this (key, escrow) pair was checked recently (no ledger call)."""
        if not key or not escrow_id:
            return False
        checked = self._checked.get((hashlib.sha256(key.encode()).hexdigest(), escrow_id))
        return checked is not None and time.monotonic() - checked < IDENTITY_TTL_S

    def admit(self, escrow_id: str | None, key: str | None) -> None:
        """Raise unless `key` belongs to the buyer of `escrow_id`, an escrow with this seller."""
        escrow_id, key_hash = self._credentials(escrow_id, key)
        checked = self._checked.get((key_hash, escrow_id))
        if checked is not None and time.monotonic() - checked < IDENTITY_TTL_S:
            return
        buyer = self.escrow.identify(key)
        try:
            found = self.escrow.get(escrow_id)
        except NotFound:
            raise Forbidden(f"escrow {escrow_id} is unknown or is not an escrow with seller {self.seller}; "
                            f"open one for {self.seller} and send its id") from None
        if found.buyer != buyer:
            raise Forbidden(f"escrow {escrow_id} belongs to another buyer; pay with your own escrow")
        with self._lock:
            if len(self._checked) > MAX_CACHED:
                self._checked.clear()
            self._checked[(key_hash, escrow_id)] = time.monotonic()

    def is_paid(self, escrow_id: str, path: str) -> bool:
        return (escrow_id, path) in self._paid

    def pay(self, escrow_id: str, path: str) -> Any:
        """Deduct the shard's price once for this escrow; a repeat is answered by the ledger, free."""
        if (escrow_id, path) in self._paid:
            return None
        price = to_usdc(self.price_micro)
        try:
            receipt = self.escrow.deduct(escrow_id, price, reason=f"shard {path}",
                                         idempotency_key=shard_key(escrow_id, path))
        except IdempotencyConflict:
            receipt = None  # paid before under another price sheet: paid is paid
        except InsufficientFunds as error:
            left = (error.details or {}).get("remaining_micro")
            left_text = f" but escrow {escrow_id} has {format_usdc(int(left))} USDC left" if left is not None else ""
            raise InsufficientFunds(
                f"shard {path} costs {price} USDC{left_text}; no bytes were sent. Open a new escrow with "
                f"seller {self.seller} to read it.", details={"path": path, "price_micro": self.price_micro,
                                                              **(error.details or {})}) from None
        with self._lock:
            if len(self._paid) > MAX_CACHED:
                self._paid.clear()
            self._paid.add((escrow_id, path))
        return receipt


def _bearer(request: Any) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None


def create_shard_app(folder: str | Path, *, escrow: Any = None, price_per_shard: Any = "0") -> Any:
    """The shard server app (FastAPI). `escrow` is the seller's `EscrowClient`.

    Args:
        folder: the folder whose parquet/jsonl/json/csv/arrow files are sold, one shard per file.
        escrow: an `EscrowClient` acting as the seller (embedded or over HTTP).
        price_per_shard: USDC per shard (str, Decimal, int, float, or a `Pricing` with
            `per_shard`). ``0`` without an escrow serves the files free.

    Example:
        >>> import uvicorn, hf_escrow
        >>> app = create_shard_app("shards/", escrow=hf_escrow.connect(agent="data-seller"),
        ...                        price_per_shard="0.002")
        >>> uvicorn.run(app, host="127.0.0.1", port=8790)  # doctest: +SKIP
    """
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response

    from .pricing import Pricing
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
    app = FastAPI(title="hf-escrow shard server", version="0.1.0",
                  description="Dataset shards over HTTP, paid once per shard from the buyer's escrow.")
    app.state.shards, app.state.gate = shards, gate

    @app.exception_handler(EscrowError)
    async def escrow_error(request: Request, error: EscrowError) -> JSONResponse:
        return JSONResponse(error.to_dict(), status_code=error.status_code)

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
                "headers": {"X-Escrow-Id": "<escrow id>", "Authorization": "Bearer <buyer key>"} if gate else None}

    @app.get("/")
    async def index(request: Request) -> dict:
        return await anyio.to_thread.run_sync(listing, request, "")

    async def admit(request: Request) -> tuple[str, str]:
        escrow_id, key = request.headers.get("x-escrow-id"), _bearer(request)
        if not gate.admitted(escrow_id, key):
            await anyio.to_thread.run_sync(gate.admit, escrow_id, key)
        return escrow_id, key

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
            escrow_id, _ = await admit(request)
            receipt = None
            if request.method != "HEAD" and not gate.is_paid(escrow_id, rel):
                receipt = await anyio.to_thread.run_sync(gate.pay, escrow_id, rel)
            if request.method == "POST":
                # the escrow as of this payment (a repeat answers the first payment's receipt)
                state = receipt.escrow if receipt is not None else await anyio.to_thread.run_sync(
                    gate.escrow.get, escrow_id)
                return JSONResponse({"path": rel, "escrow_id": escrow_id, "price": usdc_number(price_micro),
                                     "paid": float(state.paid), "remaining": float(state.remaining),
                                     "paid_micro": _micro(state.paid), "remaining_micro": _micro(state.remaining),
                                     "status": state.status})
        elif request.method == "POST":
            return JSONResponse({"path": rel, "price": 0, "paid": 0, "remaining": None})
        return FileResponse(file, stat_result=stat, media_type=MEDIA_TYPES[shard_format(rel)],
                            headers={"Cache-Control": "private, no-store"})

    return app


def _micro(amount: Decimal) -> int:
    return int(amount * 1_000_000)
