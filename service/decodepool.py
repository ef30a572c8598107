"""The decode thread pool behind a bounded admission count and the request's deadline.

A plain ``run_in_executor`` queues without limit and waits without end: under a burst, uploads pile up
in memory behind the busy threads and a request can wait far past its deadline. Here at most
``threads + queue_size`` decodes are admitted (running or waiting); one more is 503 with
``Retry-After``. A caller waits no later than its deadline (504); a decode that has not started by
then is cancelled, one already running finishes in its thread (it cannot be interrupted) and keeps
its slot until it does, so the count always matches the work really held.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from service.errors import DeadlineExceeded, Overloaded

T = TypeVar("T")


class DecodePool:
    """Args:
    threads: decode threads.
    queue_size: decodes that may wait for a thread; more -> :class:`Overloaded`.
    """

    def __init__(self, threads: int, queue_size: int) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="lesionserve-decode")
        self.capacity = threads + queue_size
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Decodes admitted and not finished (running or waiting)."""
        return self._held

    def _release(self, _: Future[Any]) -> None:
        with self._lock:
            self._held -= 1

    async def run(self, fn: Callable[..., T], *args: object, deadline: float) -> T:
        """``fn(*args)`` in a decode thread, answered by ``deadline`` (``time.monotonic()`` based).

        Raises:
            Overloaded: ``threads + queue_size`` decodes are already held (503).
            DeadlineExceeded: the deadline passed first (504).
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the request deadline passed before decoding, before inference")
        with self._lock:
            if self._held >= self.capacity:
                raise Overloaded("the decode queue is full; retry shortly", headers={"Retry-After": "1"})
            self._held += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release(Future())
            raise
        future.add_done_callback(self._release)  # also runs when the future is cancelled
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), remaining)
        except TimeoutError:
            future.cancel()  # frees the slot now if the decode had not started
            raise DeadlineExceeded(
                "the request deadline passed while the image was decoding, before inference"
            ) from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
