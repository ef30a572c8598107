"""Per-request bookkeeping as plain ASGI middleware: request id, metrics, access log, last-resort 500.

Pure ASGI (not ``BaseHTTPMiddleware``) so that it adds no task per request and streams bodies
through untouched.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics, tracing
from service.errors import PROBLEM_BASE, PROBLEM_CONTENT_TYPE, ClientClosed, problem_body
from service.logs import describe_exception

log = logging.getLogger("service.access")

REQUEST_ID_HEADER = "x-request-id"
# A caller's id is echoed and logged, so only a short, plain token is accepted.
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNMATCHED = "unmatched"


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _VALID_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def head_bytes(scope: Scope) -> int:
    """The size of the request line and headers as sent (near enough: the separators are counted per line)."""
    line = len(scope["method"]) + len(scope.get("raw_path") or scope["path"].encode()) + 12  # " ", " HTTP/1.1\r\n"
    return line + len(scope.get("query_string", b"")) + sum(len(k) + len(v) + 4 for k, v in scope["headers"])


class RequestContextMiddleware:
    """Sets ``request.state.request_id``, echoes ``X-Request-ID``, records metrics and one log line.

    Args:
        app: the wrapped ASGI app.
        draining: says whether the process is draining; then every response carries
            ``Connection: close`` so that no client sends its next request down a connection
            that the shutdown is about to close.
        max_head_bytes: request line + headers, at most (``MAX_HEADER_BYTES``). h11's limit only applies
            to a head still incomplete in its buffer: one that arrives whole in a read (65 KB) passed it.
    """

    def __init__(
        self,
        app: ASGIApp,
        draining: Callable[[], bool] = lambda: False,
        on_complete: Callable[[str, Scope, int, float], None] | None = None,
        max_head_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.draining = draining
        self.max_head_bytes = max_head_bytes
        self.on_complete = on_complete  # (route, scope, status, seconds): the audit trail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = request_id_from(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False
        size = head_bytes(scope)
        if self.max_head_bytes is not None and size > self.max_head_bytes:
            await self._head_too_large(scope, send, request_id, size)
            return

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
                if self.draining() and not any(k.lower() == b"connection" for k, _ in message["headers"]):
                    message["headers"].append((b"connection", b"close"))
            await send(message)

        metrics.IN_FLIGHT_REQUESTS.inc()
        method = metrics.Method.of(scope["method"])
        # The request's span, child of the caller's traceparent; current until the access and audit lines are out.
        traced = tracing.start_request(method.value, scope.get("scheme", "http"), scope["headers"])
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            # A real fault: logged once, as exception types and code locations; the message is left out
            # (a parser's message can quote the request's bytes: patient data). The caller sees no internals.
            log.error("unhandled error", extra={"request_id": request_id, "exception": describe_exception(exc)})
            if not started:
                await self._internal_error(scope, send_wrapper, request_id)
        finally:
            metrics.IN_FLIGHT_REQUESTS.dec()
            route = getattr(scope.get("route"), "path", UNMATCHED)
            elapsed = time.perf_counter() - start
            metrics.REQUESTS_TOTAL.labels(route=route, method=method, status=str(status)).inc()
            metrics.REQUEST_DURATION_SECONDS.labels(route=route).observe(elapsed)
            state = scope.get("state", {})
            if status == 500 and "problem_type" not in state:
                state["problem_type"] = PROBLEM_BASE + "internal"
            if self.on_complete is not None:
                try:
                    self.on_complete(route, scope, status, elapsed)
                except Exception as exc:  # the audit must never turn an answered request into a failure
                    log.error(
                        "completion hook failed", extra={"request_id": request_id, "exception": describe_exception(exc)}
                    )
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": method.value,
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "key_id": state.get("key_id"),
                    "trace_id": traced.trace_id if traced is not None else None,
                    # 499: the client hung up before its answer; an ordinary event, logged like any answer
                    **({"outcome": "client_closed"} if status == ClientClosed.status else {}),
                },
            )
            tracing.end_request(traced, route, status, request_id)

    async def _head_too_large(self, scope: Scope, send: Send, request_id: str, size: int) -> None:
        """400 and the connection closed, as h11 answers an incomplete head over the limit; counted, logged."""
        metrics.REQUESTS_TOTAL.labels(route=UNMATCHED, method=metrics.Method.of(scope["method"]), status="400").inc()
        log.info("request head too large", extra={"request_id": request_id, "head_bytes": size})
        detail = f"the request line and headers are {size} bytes; the limit is {self.max_head_bytes}"
        payload = json.dumps(problem_body(400, "bad-request", "Malformed request", detail, None, request_id)).encode()
        headers = [(b"content-type", PROBLEM_CONTENT_TYPE.encode()), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close"), (b"x-request-id", request_id.encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    async def _internal_error(scope: Scope, send: Send, request_id: str) -> None:
        body = problem_body(500, "internal", "Internal server error", "an internal error occurred; it has been logged",
                            scope.get("path"), request_id)  # fmt: skip
        payload = json.dumps(body).encode()
        headers = [(b"content-type", PROBLEM_CONTENT_TYPE.encode()), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
