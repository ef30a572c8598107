"""What one serving process holds: settings, model, batcher, decode pool, readiness and drain.

Routes get it through a dependency and call three things: :meth:`Runtime.work` (admission and
in-flight accounting), :meth:`Runtime.decode` and :meth:`Runtime.predict`.

The model can be swapped while serving (:mod:`service.swap`): :attr:`Runtime.served` is replaced
by one assignment. A request is bound to the model serving when its decode starts, and keeps it
to the end: its input size, its batch run, its class list and the sha256 in its answer all come
from one model, whatever swap happens meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2

from service import metrics, tracing
from service.audit import AuditLog
from service.auth import ApiKeys
from service.batcher import Batcher, Prediction, Target
from service.clients import Uploads
from service.config import Settings
from service.contract import ModelMetadata
from service.decodepool import DecodePool
from service.errors import AuditNotWritable, DeadlineExceeded, ModelNotReady, ShuttingDown
from service.explain import explanation
from service.imaging import DecodedImage, check_min_side
from service.inference import InferenceModel, ModelLoadError, MultiOutputModel
from service.media import Decoder
from service.schemas import Explanation

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Served:
    """One model as it serves: the model, the batcher's target for it and what answers quote.

    Args:
        model: the loaded model.
        threshold: the malignancy operating point in use (the settings' override or the model's).
        path: the file it came from (None for a model passed in by a test).
    """

    model: InferenceModel
    threshold: float
    path: Path | None = None
    target: Target = field(init=False)
    loaded_at: float = field(default_factory=time.time)  # Unix time it started taking traffic
    canary_top: list[str] | None = None  # top class of each canary image (service.swap), once computed

    def __post_init__(self) -> None:
        model = self.model
        size = model.metadata.input_size
        run = model.run_outputs if isinstance(model, MultiOutputModel) else model.run
        self.target = Target(run, (size, size, 3))

    @property
    def meta(self) -> ModelMetadata:
        return self.model.metadata

    def ref(self) -> dict[str, str]:
        """The model's identity as answers, audit lines and metrics quote it."""
        return {"name": self.meta.name, "version": self.meta.version, "sha256": self.model.sha256,
                "precision": self.meta.precision}  # fmt: skip


@dataclass(frozen=True)
class BoundImage(DecodedImage):
    """A decoded image and the model it was sized for (:meth:`Runtime.decode`)."""

    served: Served | None = None


@dataclass(frozen=True)
class BoundPrediction(Prediction):
    """A prediction and the model that made it (:meth:`Runtime.predict`)."""

    served: Served | None = None


class Runtime:
    """The serving state of one process.

    Args:
        settings: validated settings.
        model: the loaded model (an :class:`~service.inference.OnnxModel`, or a fake in tests).
    """

    def __init__(self, settings: Settings, model: InferenceModel, path: Path | None = None) -> None:
        self.settings = settings
        self.served = self.serve(model, path)
        self.keys = ApiKeys(settings.key_table(), settings.metrics_only_ids)
        self.metrics_auth = settings.metrics_key_required(self.keys.enabled)
        self.batcher = Batcher(
            self.served.target.run,
            self.served.target.input_shape,
            max_batch=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            queue_size=settings.queue_size,
            pad=settings.pad_enabled(model.provider),
        )
        self._pool = DecodePool(settings.resolved_decode_threads(), settings.decode_queue_size)
        self.uploads = Uploads(settings)  # bodies read under a cap, a deadline and a minimum rate
        self.ready = threading.Event()
        self.draining = False
        self.in_flight = 0
        self._held = 0  # hospital entries between receipt and their last step (SR committed, audited)
        self._held_lock = threading.Lock()
        self.warm_up_error: str | None = None
        key = settings.audit_uid_key.get_secret_value().encode() if settings.audit_uid_key else None
        self.audit = (
            None
            if settings.audit_log == "off"
            else AuditLog(settings.audit_log, uid_key=key, on_failure=metrics.AUDIT_WRITE_FAILURES_TOTAL.inc)
        )
        self.switch(self.served)

    def serve(self, model: InferenceModel, path: Path | None = None) -> Served:
        """``model`` wrapped for serving under these settings (not yet serving: see :meth:`switch`).

        Raises:
            ModelLoadError: the settings need something the model lacks.
        """
        if self.settings.ood_policy == "reject" and model.metadata.ood is None:
            raise ModelLoadError(
                "LESIONSERVE_OOD_POLICY=reject needs a model with an ood_score output"
                " (export it with --ood-data and --ood-split), or set LESIONSERVE_OOD_POLICY=flag"
            )
        override = self.settings.malignancy_threshold
        return Served(model, model.metadata.malignancy_threshold if override is None else override, path)

    def switch(self, served: Served) -> Served:
        """Make ``served`` the model of every request whose decode starts from now on; returns the previous one.

        Requests already bound to the previous model finish on it (the batch that spans the switch
        runs as two model calls); it is freed when the last of them has been answered.
        """
        previous = getattr(self, "served", served)
        served.loaded_at = time.time()
        self.served = served  # the switch: one assignment, read once per request by decode()
        self.batcher.target = served.target
        metrics.MODEL_INFO.info({**served.ref(), "provider": served.model.provider})
        metrics.MODEL_LOADED_TIMESTAMP_SECONDS.set(served.loaded_at)
        return previous

    # What the routes quote for the current model; an answer quotes its own (bound) model instead.
    @property
    def model(self) -> InferenceModel:
        return self.served.model

    @property
    def meta(self) -> ModelMetadata:
        return self.served.meta

    @property
    def threshold(self) -> float:
        return self.served.threshold

    @property
    def size(self) -> int:
        return self.served.meta.input_size

    def bound(self, item: DecodedImage | Prediction) -> Served:
        """The model a request's image or prediction is bound to (the current one if unbound)."""
        served = getattr(item, "served", None)
        return served if isinstance(served, Served) else self.served

    def start(self) -> threading.Thread:
        """Warm up in the background (``/readyz`` stays 503 meanwhile), then start the batcher."""
        # Each decode thread does one image; OpenCV's own pool would oversubscribe the cores.
        cv2.setNumThreads(1)
        thread = threading.Thread(target=self._warm_up, name="lesionserve-warmup", daemon=True)
        thread.start()
        return thread

    def _warm_up(self) -> None:
        from service.swap.checks import canary  # the checks every later model passes too (service.swap)

        start = time.perf_counter()
        try:
            sizes = self.batcher.warm_up()
            served = self.served
            served.canary_top = canary(served.target, served.meta.classes)
        except Exception as exc:
            self.warm_up_error = f"{type(exc).__name__}"
            # A failed canary check says which image and why (no patient data: bundled images, numbers).
            log.exception("warm-up failed; the service stays not ready", extra={"detail": getattr(exc, "detail", None)})
            return
        self.batcher.start()
        self.ready.set()
        metrics.READY.set(1)
        log.info("warmed up", extra={"batch_sizes": sizes, "seconds": round(time.perf_counter() - start, 3)})

    def begin_drain(self) -> None:
        """Stop taking new work: ``/readyz`` and new classify requests answer 503."""
        self.draining = True
        metrics.READY.set(0)
        log.info("draining: refusing new work", extra={"in_flight": self.in_flight, "queued": self.batcher.depth()})

    def idle(self) -> bool:
        return self.in_flight == 0 and self._held == 0 and self.batcher.depth() == 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the drain waiting for a hospital entry's whole handling, not just its classification.

        A C-STORE or STOW-RS is done when its SR is committed to the outbox and its audit line written; the
        classification (:meth:`work`) is only the middle of it. Any thread may hold; refusal while draining is
        still :meth:`work`'s (ShuttingDown: A700 / 503), so a sender always gets a status.
        """
        with self._held_lock:
            self._held += 1
        try:
            yield
        finally:
            with self._held_lock:
                self._held -= 1

    def wait_idle(self, timeout: float) -> bool:
        """Block (in a non-loop thread) until no request is in flight, or ``timeout`` passes."""
        until = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() > until:
                return False
            time.sleep(0.02)
        return True

    def audit_request(
        self, state: dict[str, Any], headers: list[tuple[bytes, bytes]], status: int, elapsed_s: float
    ) -> None:
        """One audit line for a finished classify request (called by the request middleware).

        The route leaves what it learnt in ``request.state`` (``upload``, ``identifiers``), the
        error mapping leaves ``problem_type``; a request refused before the route (auth) has
        neither and is audited all the same.
        """
        if self.audit is None:
            return
        content_type = next((v.decode("latin-1") for k, v in headers if k == b"content-type"), None)
        # Set by the route: the model that answered, even if swapped since. Its identity only, never the Served:
        # uvicorn's request scope (which holds this state) sits in reference cycles that only the cyclic garbage
        # collector frees, and a swapped-out session (hundreds of MB) must be freed when its last answer is out.
        answered_by = state.get("model_ref")
        model = answered_by if isinstance(answered_by, dict) else self.served.ref()
        self.audit.record(
            request_id=state.get("request_id", ""), key_id=state.get("key_id"), model=model if status < 400 else None,
            body=state.get("upload"), content_type=content_type, status=status,
            problem_type=state.get("problem_type"), latency_ms=elapsed_s * 1000, identifiers=state.get("identifiers"),
            answer=state.get("answer") if status < 400 else None,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the batcher and the decode pool, then close the audit trail.

        Called after the server has stopped answering (the lifespan's end, after the drain), so every
        request answered during shutdown has had its audit line written first.
        """
        self.batcher.close(timeout=self.settings.shutdown_grace_s)
        self._pool.shutdown()
        metrics.READY.set(0)
        if self.audit is not None:
            self.audit.close()

    def audit_writable(self) -> bool:
        """False only under AUDIT_ON_FAILURE=closed while audit lines wait to be written (each call retries them)."""
        return self.settings.audit_on_failure == "open" or self.audit is None or self.audit.healthy

    @asynccontextmanager
    async def work(self) -> AsyncIterator[float]:
        """Admit one classify request; yields its deadline (``time.monotonic()`` based).

        Raises:
            ShuttingDown: draining (503, the client retries on another replica).
            ModelNotReady: still warming up (503).
        """
        if self.draining:
            raise ShuttingDown(
                "this replica is shutting down; retry", headers={"Retry-After": "1", "Connection": "close"}
            )
        if not self.ready.is_set():
            raise ModelNotReady("the model is warming up; retry shortly", headers={"Retry-After": "1"})
        if not self.audit_writable():
            raise AuditNotWritable(
                "audit lines cannot be written (disk full?); no new work until they are", headers={"Retry-After": "5"}
            )
        self.in_flight += 1
        try:
            yield time.monotonic() + self.settings.request_timeout_s
        finally:
            self.in_flight -= 1

    @tracing.traced("decode")
    async def decode(self, decoder: Decoder, data: bytes, deadline: float | None = None) -> DecodedImage:
        """Decode in the pool; the batcher is told an image is coming so it may wait for it.

        The image stays announced until :meth:`predict` has queued it (or the decode fails):
        retracting it before the queue holds it would let the batcher see "nothing coming,
        queue empty" in between and run a batch without it. Call :meth:`predict` next.
        """
        served = self.served  # the request's model from here on (a swap may replace self.served meanwhile)
        self.batcher.expect(+1)
        try:
            # The request's deadline covers decoding too; the pool's queue is bounded (503 when full).
            until = time.monotonic() + self.settings.request_timeout_s if deadline is None else deadline
            size = served.meta.input_size
            decoded = await self._pool.run(decoder, data, size, self.settings.max_pixels, deadline=until)
            check_min_side(decoded, self.settings.min_image_side or max(1, size // 2))  # every entry decodes here
        except BaseException:
            self.batcher.expect(-1)
            raise
        metrics.DECODE_DURATION_SECONDS.observe(decoded.decode_s)
        return BoundImage(**{f.name: getattr(decoded, f.name) for f in fields(DecodedImage)}, served=served)

    async def explain(
        self, decoded: DecodedImage, prediction: Prediction, deadline: float, class_code: str | None = None
    ) -> Explanation:
        """The heatmap of ``class_code`` (None: the top class) over the model's input, drawn in the decode pool."""
        meta = self.bound(prediction).meta
        return await self._pool.run(
            explanation, meta, decoded.pixels, prediction.probabilities, prediction.extras, class_code,
            deadline=deadline,
        )  # fmt: skip

    async def predict(self, decoded: DecodedImage, deadline: float) -> Prediction:
        """Queue a :meth:`decode` result for batched inference and wait, at most until ``deadline``."""
        served = self.bound(decoded)
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the request deadline passed before inference")
            future = self.batcher.submit(decoded.pixels, deadline, served.target)
        finally:
            self.batcher.expect(-1)  # after the put (see decode)
        try:
            prediction = await asyncio.wait_for(asyncio.wrap_future(future), remaining)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within {self.settings.request_timeout_s:g} s") from None
        return BoundPrediction(**{f.name: getattr(prediction, f.name) for f in fields(Prediction)}, served=served)
