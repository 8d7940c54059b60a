"""Operations for every HTTP face: `/readyz`, `/metrics` (Prometheus) and JSON access logs.

`install_ops(app, ready=..., totals=..., admin_key=...)` adds them to a FastAPI app (the
escrow server, the gateway, the shard server). Labels are bounded: the route's template
(`/api/holds/{hold_id:path}/capture`, never the id in it), the method, the status and the
error code; never an agent, escrow or hold id, a key or a token. Ledger totals are
gauges read from the database at scrape time, so every worker reports the same truth.

Under several server processes (`hf-escrow serve --workers N`) set
`PROMETHEUS_MULTIPROC_DIR` before they start (`serve` does): counters and histograms are
then summed over the processes by prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Callable

from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, Response

from .operator import check_operator

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOG_JSON_ENV = "HF_ESCROW_LOG_JSON"
# Error bodies are read for their code only; a bigger one is not an API error answer.
MAX_ERROR_BODY_BYTES = 16_384
MAX_LOGGED_BODY_BYTES = 65_536
LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
# Fields of a JSON answer that name what a request touched: logged, and nothing else of the body.
LOGGED_ID_FIELDS = ("escrow_id", "hold_id", "id", "agent_id")
UNMATCHED = "unmatched"
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")
_ID_PREFIXES = (("esc_", "escrow_id"), ("hold_", "hold_id"))

access_log = logging.getLogger("hf_escrow.access")
log = logging.getLogger(__name__)


class Metrics:
    """The counters and histograms of one app (one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # Multiprocess metrics live in files shared by the workers, not in a registry.
        self.registry = None if self.multiprocess else CollectorRegistry(auto_describe=False)
        labels = ("method", "route", "status")
        self.requests = Counter("hf_escrow_http_requests", "HTTP requests answered, by route and status",
                                labels, registry=self.registry)
        self.errors = Counter("hf_escrow_http_errors", "Error answers by route and error code",
                              ("method", "route", "error"), registry=self.registry)
        self.payment_required = Counter("hf_escrow_payment_required", "402 answers by route and reason",
                                        ("route", "reason"), registry=self.registry)
        self.latency = Histogram("hf_escrow_http_request_duration_seconds", "Time to answer, by route",
                                 ("method", "route"), buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float, error: str | None) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
        if status >= 400:
            self.errors.labels(method, route, error or f"http_{status}").inc()
        if status == 402:
            self.payment_required.labels(route, error or "payment_required").inc()

    def exposition(self, totals: Callable[[], dict] | None) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        registry = CollectorRegistry(auto_describe=False)
        if self.multiprocess:
            from prometheus_client import multiprocess
            multiprocess.MultiProcessCollector(registry)
        else:
            registry.register(self.registry)
        if totals is not None:
            registry.register(_LedgerCollector(totals))
        return generate_latest(registry)


class _LedgerCollector:
    """Ledger totals as gauges, queried when scraped."""

    def __init__(self, totals: Callable[[], dict]):
        self.totals = totals

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        t = self.totals()
        for name, what in (("paid_micro", "micro-USDC paid to sellers, gross (deductions, captures, releases)"),
                           ("captured_micro", "micro-USDC captured from holds"),
                           ("refunded_micro", "micro-USDC refunded to buyers"),
                           ("fees_micro", "micro-USDC taken as fees"),
                           ("held_micro", "micro-USDC reserved by open holds now"),
                           ("holds_open", "holds open now")):
            yield GaugeMetricFamily(f"hf_escrow_ledger_{name}", what, value=t[name])
        escrows = GaugeMetricFamily("hf_escrow_ledger_escrows", "escrows by status", labels=["status"])
        for status, count in sorted(t["escrows"].items()):
            escrows.add_metric([status], count)
        yield escrows


class OpsMiddleware:
    """Count, time and (with JSON logs on) log every HTTP request. Pure ASGI: it sees the
    answer's status and, for errors, its code, without buffering successful bodies."""

    def __init__(self, app, metrics: Metrics, log_bodies: bool):
        self.app, self.metrics, self.log_bodies = app, metrics, log_bodies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        seen: dict[str, Any] = {"status": 500, "body": b"", "json": False}
        keep_body = self.log_bodies and access_log.isEnabledFor(logging.INFO)

        async def recording_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                seen["json"] = any(k == b"content-type" and b"json" in v for k, v in message.get("headers", ()))
            elif message["type"] == "http.response.body" and seen["json"]:
                limit = MAX_LOGGED_BODY_BYTES if keep_body else (MAX_ERROR_BODY_BYTES if seen["status"] >= 400 else 0)
                if len(seen["body"]) < limit:
                    seen["body"] += message.get("body", b"")[:limit]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            answer = _json(seen["body"])
            error = answer.get("error") if seen["status"] >= 400 else None
            if isinstance(error, dict):    # the gateway's OpenAI shape names our code in `type`
                error = error.get("type")
            # Only codes of the API's own shape become labels: a relayed upstream text would not be bounded.
            code = error if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else None
            self.metrics.observe(scope["method"], route, seen["status"], seconds, code)
            if keep_body:
                _log_access(scope, route, seen["status"], seconds, answer)


def _json(body: bytes) -> dict:
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _log_access(scope, route: str, status: int, seconds: float, answer: dict) -> None:
    fields: dict[str, Any] = {"method": scope["method"], "route": route, "status": status,
                              "duration_ms": round(seconds * 1000, 3)}
    for name, value in (scope.get("path_params") or {}).items():
        if name in ("escrow_id", "hold_id"):
            fields[name] = value
    for name in LOGGED_ID_FIELDS:
        value = answer.get(name)
        if isinstance(value, str):
            if name == "id":
                name = next((field for prefix, field in _ID_PREFIXES if value.startswith(prefix)), "id")
            fields.setdefault(name, value)
    if status >= 400 and isinstance(answer.get("error"), str):
        fields["error"] = answer["error"]
    access_log.info("http %s %s %s", scope["method"], route, status, extra={"fields": fields})


def install_ops(app: FastAPI, *, ready: Callable[[], None], totals: Callable[[], dict] | None = None,
                admin_key: str | None = None, authenticate: Callable[[str | None], str] | None = None,
                log_bodies: bool | None = None) -> Metrics:
    """Add `/readyz`, `/metrics` and the counting middleware to `app`; call it before other
    middleware, so that it sees the route the router matched. `ready` raises when the face
    cannot serve (its database or escrow server does not answer)."""
    metrics = Metrics()
    if log_bodies is None:
        log_bodies = os.environ.get(LOG_JSON_ENV) == "1"
    if log_bodies:
        from .logjson import configure_json_logging
        configure_json_logging()
    app.add_middleware(OpsMiddleware, metrics=metrics, log_bodies=log_bodies)

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """200 when the face can serve (its ledger answers), else 503."""
        try:
            ready()
        except Exception as error:  # any failure of the backend is "not ready"
            # The answer names the failure's kind only: a driver's message may carry hosts or SQL.
            log.warning("not ready: %s: %s", type(error).__name__, error)
            return JSONResponse({"ok": False, "error": "not_ready",
                                 "message": f"the ledger does not answer ({type(error).__name__})"}, status_code=503)
        return JSONResponse({"ok": True})

    @app.get("/metrics", tags=["ops"])
    def prometheus(authorization: str | None = Header(None)) -> Response:
        """Prometheus metrics (text format); the operator's key only."""
        check_operator(authorization, admin_key, authenticate)
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.exposition(totals), media_type=CONTENT_TYPE_LATEST)

    return metrics


def prepare_workers(workers: int, *, log_json: bool) -> str | None:
    """Before a server starts its processes: the environment they read their settings from
    (JSON logs; with several workers, a fresh multiprocess metrics folder, returned so that
    the caller removes it when the server stops)."""
    if log_json:
        os.environ[LOG_JSON_ENV] = "1"
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        import tempfile
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="hf-escrow-metrics-")
        return os.environ[MULTIPROC_ENV]
    return None
