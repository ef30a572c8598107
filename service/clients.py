"""Slow, silent and vanishing clients: ended by rule, never counted as server faults.

Every connection holds a socket, a task and whatever bytes it has sent. Without limits, clients that send a
request head and two bytes and then go quiet are kept for as long as they trickle, and one that hangs up
mid-upload surfaced as an unhandled error (500). Here:

- **On the connection** (:class:`GuardedH11Protocol`, uvicorn's h11 protocol with two additions; uvicorn
  itself has only the keep-alive timeout between requests and ``limit_concurrency``, whose 503 has no
  ``Retry-After`` and which counts running tasks too): the request head must arrive within
  ``header_timeout_s`` (408, closed), and beyond ``max_connections`` open connections a new one is
  answered 503 with ``Retry-After`` and closed before anything is read.
- **On the body** (:class:`Uploads`): at most ``max_uploads`` bodies are read at once (503 with
  ``Retry-After``); each must arrive within ``body_timeout_s`` and, after ``body_rate_grace_s``, at an
  average of ``body_min_rate_bytes_s`` at least (408 with ``Connection: close``).
- **Disconnects** (:class:`~service.errors.ClientClosed`, status 499 as nginx records it): during the upload
  (the ASGI ``http.disconnect``) or while the request waits for its answer (:class:`ClientWatch`,
  which cancels the waiting, so an image still queued is skipped by the batcher).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import h11
from starlette.types import Receive
from uvicorn.protocols.http.h11_impl import H11Protocol

from service import metrics
from service.config import Settings
from service.errors import (
    PROBLEM_CONTENT_TYPE,
    ClientClosed,
    PayloadTooLarge,
    TooManyUploads,
    UploadTimeout,
    UploadTooSlow,
    problem_body,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# After a refusal written on the connection, the client's request may still be on its way; closing at once
# could make its kernel answer with a reset that destroys our answer before the client reads it. So the
# rest is read and dropped for this long (nginx's lingering close), then the connection is closed.
LINGER_S = 2.0


class Uploads:
    """Reads request bodies under the upload rules; one per process (``Runtime.uploads``)."""

    def __init__(self, settings: Settings) -> None:
        self.capacity = settings.max_uploads
        self.timeout_s = settings.body_timeout_s
        self.min_rate = settings.body_min_rate_bytes_s
        self.grace_s = settings.body_rate_grace_s
        self._reading = 0
        self._lock = threading.Lock()  # the event loop is the only caller; the lock keeps the count honest anyway

    @property
    def reading(self) -> int:
        return self._reading

    @contextmanager
    def _slot(self) -> Iterator[None]:
        with self._lock:
            if self._reading >= self.capacity:
                raise TooManyUploads(
                    f"{self.capacity} uploads are being read; retry shortly",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._reading += 1
            metrics.UPLOADS_READING.inc()
        try:
            yield
        finally:
            with self._lock:
                self._reading -= 1
                metrics.UPLOADS_READING.dec()

    def give_up_at(self, size: int, started: float) -> tuple[float, type[UploadTimeout | UploadTooSlow]]:
        """When reading must stop if no more bytes come, and the error it then raises.

        The average rate ``size / elapsed`` stays at ``min_rate`` or above until ``size / min_rate`` seconds
        after the start; the rule waits for ``grace_s`` first (a connection's first seconds are slow).
        """
        total = started + self.timeout_s
        slow = started + max(self.grace_s, size / self.min_rate) if self.min_rate else float("inf")
        return (slow, UploadTooSlow) if slow < total else (total, UploadTimeout)

    async def read(self, receive: Receive, limit: int, declared: str | None = None) -> bytes:
        """The whole body, read from the ASGI ``receive`` under the upload rules.

        Args:
            receive: the request's ASGI receive callable.
            limit: most bytes accepted.
            declared: the ``Content-Length`` header, if any.

        Raises:
            PayloadTooLarge: more than ``limit`` bytes, declared or sent (413).
            TooManyUploads: ``max_uploads`` bodies are being read already (503).
            UploadTimeout, UploadTooSlow: the deadline or the rate rule ended it (408, connection closed).
            ClientClosed: the client hung up mid-upload (499).
        """
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
        with self._slot():
            chunks, size, started = [], 0, time.monotonic()
            while True:
                until, error = self.give_up_at(size, started)
                try:
                    async with asyncio.timeout_at(_loop_time(until)):
                        message = await receive()
                except TimeoutError:
                    raise self._ended(error, size, started) from None
                if message["type"] == "http.disconnect":
                    metrics.CLIENT_DISCONNECTS_TOTAL.labels(stage=metrics.DisconnectStage.UPLOAD).inc()
                    raise ClientClosed(f"the client closed the connection after {size} bytes of its upload")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body passed the limit of {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

    def _ended(self, error: type[UploadTimeout | UploadTooSlow], size: int, started: float) -> Exception:
        took = time.monotonic() - started
        close = {"Connection": "close"}  # the rest of the body is not read: the connection cannot be reused
        if error is UploadTimeout:
            return UploadTimeout(f"the body did not arrive within {self.timeout_s:g} s", headers=close)
        return UploadTooSlow(
            f"the body arrived at {size / max(took, 1e-9):.0f} bytes/s on average ({size} bytes in {took:.1f} s);"
            f" at least {self.min_rate} bytes/s are needed after the first {self.grace_s:g} s",
            headers=close,
        )


def _loop_time(monotonic_at: float) -> float:
    """``asyncio.timeout_at`` takes the loop's clock; ours is ``time.monotonic()`` (the same on CPython)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_at - time.monotonic())


class ClientWatch:
    """The client side of one request: reads its body under the upload rules, then listens for it leaving.

    ``async with ClientWatch(request.receive, uploads) as client: body = await client.read_body(limit); ...``
    Once the body is in, ``receive`` has nothing left to give but the disconnect; if it comes before the
    block ends, the block is cancelled and :class:`~service.errors.ClientClosed` (499) raised in its place.
    Cancelling the block cancels what it awaits: a decode not yet started, and an image waiting in the
    batcher queue, which the batcher then skips (``lesionserve_inference_skipped_total``). A batch already
    running finishes; that image's answer is dropped.
    """

    def __init__(self, receive: Receive, uploads: Uploads, declared_length: str | None = None) -> None:
        self._receive = receive
        self._uploads = uploads
        self._declared = declared_length
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.gone = False

    async def __aenter__(self) -> ClientWatch:
        self._task = asyncio.current_task()
        return self

    async def read_body(self, limit: int) -> bytes:
        """The body (see :meth:`Uploads.read`); from then on a disconnect cancels the block."""
        body = await self._uploads.read(self._receive, limit, self._declared)
        self._watcher = asyncio.create_task(self._watch())
        return body

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass  # nothing else comes after the body; never busy: receive() waits for an event
        self.gone = True
        assert self._task is not None
        self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.gone and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            assert self._task is not None
            self._task.uncancel()
            metrics.CLIENT_DISCONNECTS_TOTAL.labels(stage=metrics.DisconnectStage.PROCESSING).inc()
            raise ClientClosed("the client closed the connection before its answer was ready") from None


def raw_problem(status: int, phrase: str, slug: str, title: str, detail: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 problem+json response that closes the connection, for answers written below the app."""
    body = json.dumps(problem_body(status, slug, title, detail)).encode()
    head = [
        f"HTTP/1.1 {status} {phrase}",
        f"content-type: {PROBLEM_CONTENT_TYPE}",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header-read timeout and a cap on open connections.

    The limits are class attributes set by :func:`protocol_for` (uvicorn builds one instance per connection).
    """

    max_connections: ClassVar[int] = 2048
    header_timeout_s: ClassVar[float] = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        metrics.OPEN_CONNECTIONS.set(len(self.connections))
        if len(self.connections) > self.max_connections:
            metrics.REJECTIONS_TOTAL.labels(reason=metrics.RejectReason.TOO_MANY_CONNECTIONS).inc()
            log.info("connection refused: too many open", extra={"open": len(self.connections)})
            detail = f"{self.max_connections} connections are open; retry shortly"
            title = "Too many connections"
            self._refuse(raw_problem(503, "Service Unavailable", "too-many-connections", title, detail, RETRY_AFTER_S))
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)
        metrics.OPEN_CONNECTIONS.set(len(self.connections))

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped (see LINGER_S)
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            # The first bytes of the next head on a kept-alive connection (while it sat idle, uvicorn's
            # keep-alive timeout was the one running).
            self._arm_header_timer()
        super().data_received(data)
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()  # the head is in; the body has the app's own rules

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        metrics.REJECTIONS_TOTAL.labels(reason=metrics.RejectReason.HEADER_TIMEOUT).inc()
        started = bool(self.conn.trailing_data[0])  # part of a head arrived: say why; a silent one is just closed
        log.info("request head not received in time", extra={"partial": started, "seconds": self.header_timeout_s})
        if not started:
            self.transport.close()
            return
        detail = f"the request line and headers did not arrive within {self.header_timeout_s:g} s"
        self._refuse(raw_problem(408, "Request Timeout", "header-timeout", "Request head took too long", detail))

    def _refuse(self, response: bytes) -> None:
        self._refused = True
        self._disarm_header_timer()
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def protocol_for(settings: Settings) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn gets as ``http=``, with this process's limits."""
    return type(
        "LesionserveH11Protocol",
        (GuardedH11Protocol,),
        {"max_connections": settings.max_connections, "header_timeout_s": settings.header_timeout_s},
    )


def raise_fd_limit(max_connections: int) -> int:
    """Raise the soft open-files limit towards the hard one so ``max_connections`` sockets fit; the new soft limit.

    Each connection is a file descriptor; a soft limit of 1024 (a common default) would make the process
    fail on ``accept`` long before the connection cap answers 503.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 256  # the model, logs, decode threads, the audit file, sockets to the PACS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open-files limit is below max_connections; lower LESIONSERVE_MAX_CONNECTIONS or raise the limit",
            extra={"limit": soft, "max_connections": max_connections},
        )
    return int(soft)
