"""One pure-ASGI middleware: admission, request id, body size limit (413), latency metrics and the access log."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio.to_thread
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.api import metrics
from engine.api.logs import log, request_id_var

_GOOD_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# answered without taking a slot: a saturated process still says it is alive
_UNGATED = ("/health", "/ready", "/metrics")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _GOOD_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        t0 = time.perf_counter()
        status = 500
        started = False
        limit = self.max_body_bytes

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                await _send_413(send_wrapper, limit)
                return
            try:  # Starlette would decode bytes that are not UTF-8 to U+FFFD: two ids would become one
                unquote_to_bytes(scope.get("raw_path") or b"").decode("utf-8")
            except UnicodeDecodeError:
                await _send_json(send_wrapper, 422, {"detail": "the URL path is not valid UTF-8"})
                metrics.ERRORS.labels("validation").inc()
                return
            received = 0

            async def receive_limited() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge(limit)
                return message

            if scope.get("path", "").startswith(_UNGATED):
                await self.app(scope, receive_limited, send_wrapper)
            else:
                async with self._admission():
                    await self.app(scope, receive_limited, send_wrapper)
        except Exception:
            # answered here (not by Starlette's error middleware) so the answer and the log carry the request id
            metrics.ERRORS.labels("internal").inc()
            log.exception("internal error", extra={"path": scope.get("path")})
            if not started:
                body = json.dumps({"detail": "internal error", "request_id": rid}).encode()
                await send_wrapper({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
                await send_wrapper({"type": "http.response.body", "body": body})
            status = 500
        finally:
            elapsed = time.perf_counter() - t0
            route: Any = scope.get("route")
            # the route's template (never the caller's values), without its converters: /v1/items/{item_id}
            endpoint = (getattr(route, "path", None) or "unmatched").replace(":path}", "}")
            method = scope.get("method", "")
            metrics.REQUEST_SECONDS.labels(endpoint, method).observe(elapsed)
            metrics.REQUESTS.labels(endpoint, method, str(status)).inc()
            log.info("request", extra={"request_id": rid, "method": method, "path": scope.get("path"), "endpoint": endpoint,
                                       "status": status, "duration_ms": round(elapsed * 1000, 2)})
            request_id_var.reset(token)


    def _admission(self) -> asyncio.Semaphore:
        """At most as many requests in the app as there are worker threads (the wait counts in the request's
        latency). A request takes a thread for each of its sync steps (key check, connection checkout, endpoint,
        response) and may hold a pooled connection between them; with more requests inside than threads, every
        thread could be waiting for a connection held by requests that wait for a thread, until the pool timeout
        (503s under load)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(int(anyio.to_thread.current_default_thread_limiter().total_tokens))
        return self._slots


async def _send_json(send: Send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_413(send: Send, limit: int) -> None:
    await _send_json(send, 413, {"detail": f"request body larger than {limit} bytes"})
    metrics.ERRORS.labels("too_large").inc()
