"""Dynamic batching: many concurrent ``submit(image)`` calls become few model runs.

One worker thread owns the model. It takes the first waiting image, then gathers more until
``max_batch`` or ``max_wait`` after the first, runs them as one batch and hands each caller
its own row. The queue is bounded (full -> :class:`~service.errors.Overloaded`), requests whose
deadline passed are dropped before inference, and a failing run is retried image by image so
that one bad input fails only its own request, never its batch neighbours.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from service import metrics, tracing
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a model run returns: probabilities [N, K], or those under "probabilities" beside optional outputs
# that have the batch axis first (ood_score [N], cam [N, K, h, w]); each image gets its own row of each.
ModelOutput = np.ndarray | Mapping[str, np.ndarray]
PROBABILITIES = "probabilities"


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # (K,) float32
    queue_s: float
    inference_s: float
    batch_size: int
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)  # this image's row of each optional output


@dataclass(frozen=True, eq=False)
class Target:
    """One model as the batcher sees it: its call and the image shape it takes.

    Each queued image carries the target it was sized for (a model swap binds a request to one model
    from its decode on), so an answer never mixes two models; compared by identity.
    """

    run: Callable[[np.ndarray], ModelOutput]
    input_shape: tuple[int, int, int]


@dataclass
class Pending:
    image: np.ndarray
    deadline: float  # time.monotonic() after which the answer is useless
    future: Future[Prediction] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    target: Target | None = None  # the model that runs it (None: the batcher's target at submit)
    trace: Any = field(default_factory=tracing.current_span_context)  # the request's span (None: tracing off)


def collect_batch(
    q: queue.Queue[T],
    max_batch: int,
    max_wait_s: float,
    first_timeout: float | None = None,
    more_coming: Callable[[], bool] = lambda: True,
) -> list[T]:
    """Take one batch from ``q``: a pure function of the queue, so it is tested with a plain one.

    Args:
        q: the queue.
        max_batch: the most items returned.
        max_wait_s: after the first item, how long to wait for more.
        first_timeout: how long to block for the first item (None: forever).
        more_coming: whether an item is on its way (e.g. being decoded); when it says no and
            the queue is empty, the batch runs at once instead of idling for ``max_wait_s``,
            so a lone request pays no batching latency.

    Returns:
        Between 1 and ``max_batch`` items, or ``[]`` if none came within ``first_timeout``.
    """
    try:
        batch = [q.get(timeout=first_timeout)]
    except queue.Empty:
        return []
    until = time.monotonic() + max_wait_s
    while len(batch) < max_batch:
        try:
            batch.append(q.get_nowait())
            continue
        except queue.Empty:
            pass
        remaining = until - time.monotonic()
        if remaining <= 0 or not more_coming():
            break
        try:
            batch.append(q.get(timeout=min(remaining, 0.001)))
        except queue.Empty:
            continue  # re-check more_coming: the image being decoded may have failed
    return batch


def by_target(batch: list[Pending]) -> list[list[Pending]]:
    """Split a batch into one run per model, in queue order: two only for the batch that spans a swap."""
    groups: dict[Target | None, list[Pending]] = {}
    for item in batch:
        groups.setdefault(item.target, []).append(item)
    return list(groups.values())


def batch_sizes(max_batch: int, pad: bool) -> list[int]:
    """Every batch shape the batcher can run: all sizes, or powers of two (+ max) when padding."""
    if not pad:
        return list(range(1, max_batch + 1))
    sizes = [2**i for i in range(int(math.log2(max_batch)) + 1)]
    return sorted({*sizes, max_batch})


class Batcher:
    """``submit(image) -> Future[Prediction]`` in front of a model's ``run(batch) -> probabilities``.

    Args:
        run: the model call, ``uint8 [N, S, S, 3] -> float32 [N, K]`` (or a :data:`ModelOutput` mapping);
            called from one thread.
        input_shape: ``(S, S, 3)``; other arrays are refused at submit.
        max_batch: images per run at most.
        max_wait_s: how long a batch waits to fill.
        queue_size: images waiting at most; more -> Overloaded (503).
        pad: pad batches with zeros to the next size of :func:`batch_sizes` (fixed shapes on CUDA).

    The limits have no defaults here: :class:`service.config.Settings` is their one source.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], ModelOutput],
        input_shape: tuple[int, int, int],
        *,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        pad: bool = False,
    ) -> None:
        self.target = Target(run, input_shape)  # replaced by a model swap (service.swap); one assignment
        self._running: Target | None = None  # the target of the run in progress (worker thread only)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.sizes = batch_sizes(max_batch, pad)
        self.pad = pad
        self._queue: queue.Queue[Pending] = queue.Queue(maxsize=queue_size)
        self._incoming = 0  # requests admitted and still decoding: worth waiting for
        self._between: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._between_s = 0.0  # how long the last such call took
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lesionserve-batcher", daemon=True)
        metrics.QUEUE_CAPACITY.set(queue_size)

    def start(self) -> None:
        self._thread.start()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.target.input_shape

    def warm_up(self, target: Target | None = None) -> list[int]:
        """Run every batch shape once (first runs allocate and tune); returns the sizes run."""
        target = target or self.target
        for n in self.sizes:
            target.run(np.zeros((n, *target.input_shape), dtype=np.uint8))
        return self.sizes

    def run_between(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the worker thread between two batches, one such call per batch.

        A model swap warms up its new session this way: one model run at a time, so a waiting request
        is delayed by at most one run of the new model instead of sharing the cores with it for the
        whole warm-up. A call waits while the oldest queued request has less time left than two such
        calls (it would miss its deadline behind one): serving first. The worker must be running (:meth:`start`).
        """
        future: Future[T] = Future()
        self._between.put((fn, future))
        return future

    def expect(self, delta: int) -> None:
        """Announce (+1) or retract (-1) an image that is being decoded."""
        with self._lock:
            self._incoming += delta

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, image: np.ndarray, deadline: float, target: Target | None = None) -> Future[Prediction]:
        """Queue one image for ``target`` (default: the current one); the future resolves to its
        :class:`Prediction` or a ServiceError.

        Raises:
            ValueError: the array is not ``uint8`` of the target's input shape (fails this request only).
            Overloaded: the queue is full.
        """
        target = target or self.target
        if image.dtype != np.uint8 or image.shape != target.input_shape:
            raise ValueError(f"expected uint8 {target.input_shape}, got {image.dtype} {image.shape}")
        item = Pending(image, deadline, target=target)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise Overloaded("the inference queue is full; retry shortly", headers={"Retry-After": "1"}) from None
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        return item.future

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the worker."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _more_coming(self) -> bool:
        return self._incoming > 0

    def _loop(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            self._one_between()
            idle_wait = 0.0 if not self._between.empty() else 0.05  # a pending call need not wait for traffic
            batch = collect_batch(self._queue, self.max_batch, self.max_wait_s, idle_wait, self._more_coming)
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
            self._process_groups(batch)
        while not self._between.empty():  # stopped: nobody will run them
            self._between.get_nowait()[1].cancel()

    def _one_between(self) -> None:
        if self._between.empty() or self._oldest_slack() < 2 * self._between_s:
            return  # the oldest waiting request could miss its deadline behind the call: serve it first
        fn, future = self._between.get_nowait()
        if future.set_running_or_notify_cancel():
            start = time.perf_counter()
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, who names the failed check
                future.set_exception(exc)
            self._between_s = time.perf_counter() - start

    def _oldest_slack(self) -> float:
        """Seconds left before the oldest queued request's deadline (inf: none queued)."""
        with self._queue.mutex:
            oldest = self._queue.queue[0] if self._queue.queue else None
        return math.inf if oldest is None else oldest.deadline - time.monotonic()

    def _process_groups(self, batch: list[Pending]) -> None:
        # A method, not inline in the loop: no variable outlives the batch, so an idle worker keeps no
        # swapped-out model alive.
        for group in by_target(batch):
            self._running = group[0].target
            self._process(group)
        self._running = None

    def _process(self, batch: list[Pending]) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                # The caller gave up: its client closed the connection, or its deadline passed (504 answered).
                reason = metrics.SkipReason.DEADLINE if now > item.deadline else metrics.SkipReason.CLIENT_CLOSED
                metrics.INFERENCE_SKIPPED_TOTAL.labels(reason=reason).inc()
                continue
            if now > item.deadline:
                metrics.INFERENCE_SKIPPED_TOTAL.labels(reason=metrics.SkipReason.DEADLINE).inc()
                item.future.set_exception(DeadlineExceeded("the request deadline passed while it was queued"))
                continue
            live.append(item)
        if not live:
            return
        for item in live:
            metrics.QUEUE_WAIT_SECONDS.observe(now - item.enqueued)
        tracing.queue_waits([(item.trace, item.enqueued) for item in live], now)
        try:
            with tracing.inference([item.trace for item in live], len(live)):
                outs, took = self._timed_run([item.image for item in live])
        except Exception:
            if len(live) == 1:
                log.exception("inference failed")
                live[0].future.set_exception(InferenceFailed("inference failed for this image"))
                return
            log.warning("batch of %d failed; retrying image by image", len(live))
            for item in live:
                self._process_one(item, now)
            return
        for i, item in enumerate(live):
            probs, extras = _row(outs, i)
            item.future.set_result(Prediction(probs, now - item.enqueued, took, len(live), extras))

    def _process_one(self, item: Pending, started: float) -> None:
        try:
            outs, took = self._timed_run([item.image])
        except Exception:
            log.exception("inference failed")
            item.future.set_exception(InferenceFailed("inference failed for this image"))
            return
        probs, extras = _row(outs, 0)
        item.future.set_result(Prediction(probs, started - item.enqueued, took, 1, extras))

    def _timed_run(self, images: list[np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        target = self._running or self.target
        n = len(images)
        size = next(s for s in self.sizes if s >= n) if self.pad else n
        batch = np.zeros((size, *target.input_shape), dtype=np.uint8)
        batch[:n] = np.stack(images)
        start = time.perf_counter()
        try:
            out = target.run(batch)
        except Exception:
            metrics.INFERENCE_ERRORS_TOTAL.inc()
            raise
        took = time.perf_counter() - start
        outs = {PROBABILITIES: out} if isinstance(out, np.ndarray) else dict(out)
        probs = outs.get(PROBABILITIES)
        if probs is None or probs.ndim != 2 or any(v.shape[:1] != (size,) for v in outs.values()):
            metrics.INFERENCE_ERRORS_TOTAL.inc()
            shapes = {k: v.shape for k, v in outs.items()}
            raise RuntimeError(f"model returned shape {shapes} for a batch of {size}")
        metrics.INFERENCE_DURATION_SECONDS.observe(took)
        metrics.BATCH_SIZE.observe(n)
        return {k: v[:n] for k, v in outs.items()}, took


def _row(outs: Mapping[str, np.ndarray], i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image ``i``'s probabilities and its row of every optional output."""
    return outs[PROBABILITIES][i], {k: v[i] for k, v in outs.items() if k != PROBABILITIES}
