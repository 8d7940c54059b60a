"""What the server refuses before the ledger sees a request: bodies over a size. (Rates per
client: `hf_escrow.limits`.)"""

from __future__ import annotations

from starlette.exceptions import HTTPException

DEFAULT_MAX_BODY_BYTES = 1 << 20


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes the cap: FastAPI re-raises HTTPExceptions met
    while reading a body, so the route never runs on a cut-off body."""

    def __init__(self, max_bytes: int):
        # Closed after the answer: the rest of the body is not worth reading to keep the connection.
        super().__init__(413, f"the request body is over the limit of {max_bytes} bytes; send less",
                         headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413: a declared Content-Length at once,
    a chunked body as soon as its chunks add up past the cap (it is never read whole)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _content_length(scope) > self.max_bytes:
            return await _send_413(send, self.max_bytes)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            # An app that let the refusal through (a mounted one): answer for it if it has not.
            if not started:
                await _send_413(send, self.max_bytes)


def _content_length(scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the HTTP server refuses a malformed length before the app
    return 0


async def _send_413(send, max_bytes: int) -> None:
    body = (b'{"error":"payload_too_large","message":"the request body is over the limit of %d bytes; '
            b'send less"}' % max_bytes)
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
