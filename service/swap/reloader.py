"""One model reload at a time: load beside the serving model, check, warm up, canary, then switch.

Every step that fails raises :class:`~service.errors.ModelRejected` naming its check (``path``, ``load``,
``contract``, ``warm_up``, ``canary``), is logged and counted in ``lesionserve_model_reloads_total``;
the serving model is never touched before the switch, which is one assignment
(:meth:`service.runtime.Runtime.switch`). A second reload while one runs gets
:class:`~service.errors.ReloadInProgress` (409) at once instead of queueing behind it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service import metrics
from service.batcher import ModelOutput
from service.errors import ModelNotReady, ModelPathRefused, ModelRejected, ReloadInProgress, ServiceError
from service.inference import InferenceModel, ModelLoadError
from service.metrics import ReloadResult
from service.runtime import Runtime, Served
from service.swap import checks

log = logging.getLogger(__name__)

Loader = Callable[[Path], InferenceModel]


class Reloader:
    """Swaps the runtime's model.

    Args:
        runtime: the serving runtime.
        load: opens a model file with the service's settings (``service.app.load_model``); raises
            :class:`~service.inference.ModelLoadError` for a file that cannot be served.
        path: the file the serving model came from (what a reload without a path re-reads).
    """

    def __init__(self, runtime: Runtime, load: Loader, path: Path) -> None:
        self.runtime = runtime
        self.load = load
        self.path = path
        self.models_dir = runtime.settings.allowed_models_dir
        self._busy = threading.Lock()

    def resolve(self, requested: str | None) -> Path:
        """The file a reload reads: ``requested`` (absolute, or relative to the models folder) or the current one.

        Raises:
            ModelPathRefused: not a ``.onnx`` file inside the models folder (symlinks resolved first).
        """
        if requested is None:
            return self.path
        candidate = Path(requested)
        resolved = (candidate if candidate.is_absolute() else self.models_dir / candidate).resolve()
        if not resolved.is_relative_to(self.models_dir):
            raise ModelPathRefused(f"{requested!r} is outside the models folder {self.models_dir}")
        if resolved.suffix != ".onnx":
            raise ModelPathRefused(f"{requested!r} is not an .onnx file")
        if not resolved.is_file():
            raise ModelPathRefused(f"{requested!r} does not exist in the models folder")
        return resolved

    def reload(self, requested: str | None = None, *, force: bool = False, trigger: str = "api") -> dict[str, Any]:
        """Load, check, warm up and switch to a model file; returns what happened (for the API's answer).

        Blocks for the load, warm-up and canary (seconds; call it from a worker thread).

        Raises:
            ReloadInProgress: another reload is running.
            ModelNotReady: the service is warming up or draining.
            ModelRejected: a check failed; the serving model is unchanged.
        """
        if not self._busy.acquire(blocking=False):
            raise ReloadInProgress("another model reload is running; retry when it has finished")
        start = time.perf_counter()
        try:
            if self.runtime.draining or not self.runtime.ready.is_set():
                raise ModelNotReady(
                    "the service is warming up or draining; no reload now", headers={"Retry-After": "1"}
                )
            path = self.resolve(requested)
            result = self._swap(path, force)
        except ModelRejected as exc:
            metrics.MODEL_RELOADS_TOTAL.labels(result=exc.check).inc()
            log.error(
                "model reload refused; the serving model is unchanged",
                extra={
                    "trigger": trigger,
                    "check": exc.check,
                    "detail": exc.detail,
                    "model": self.runtime.served.ref(),
                },
            )
            raise
        finally:
            self._busy.release()
        result.update(trigger=trigger, seconds=round(time.perf_counter() - start, 3))
        metrics.MODEL_RELOADS_TOTAL.labels(result=result["result"]).inc()
        log.info("model reload " + result["result"], extra=result)
        return result

    def reload_in_background(self, trigger: str) -> threading.Thread:
        """:meth:`reload` of the current file in a thread (SIGHUP, the watcher); the outcome is logged."""

        def run() -> None:
            try:
                self.reload(trigger=trigger)
            except ServiceError as exc:  # refused or busy: already logged and counted where it applies
                if not isinstance(exc, ModelRejected):
                    log.warning("model reload not started", extra={"trigger": trigger, "detail": exc.detail})
            except Exception:
                log.exception("model reload failed")

        thread = threading.Thread(target=run, name=f"lesionserve-reload-{trigger}", daemon=True)
        thread.start()
        return thread

    def _swap(self, path: Path, force: bool) -> dict[str, Any]:
        runtime, serving = self.runtime, self.runtime.served
        steps: dict[str, float] = {}  # seconds per step, for the answer and the log
        started = time.perf_counter()
        try:
            model = self.load(path)
        except ModelLoadError as exc:
            raise ModelRejected(ReloadResult.LOAD, f"{path.name}: {exc}") from None
        if model.sha256 == serving.model.sha256:
            self.path = path
            return {"result": ReloadResult.UNCHANGED.value, "model": serving.ref(), "path": str(path)}
        changes = checks.contract_changes(serving, model)
        if changes and not force:
            raise ModelRejected(
                ReloadResult.CONTRACT, "; ".join(changes) + " (send force=true if callers are ready for it)"
            )
        try:
            new = runtime.serve(model, path)
        except ModelLoadError as exc:  # the settings need something the file lacks (e.g. OOD_POLICY=reject)
            raise ModelRejected(ReloadResult.CONTRACT, str(exc)) from None

        # Each check run is done by the batcher's worker between two batches: serving never shares the cores
        # with the checks, and a waiting request is delayed by at most one run.
        def between(fn: Callable[[], ModelOutput]) -> ModelOutput:
            return runtime.batcher.run_between(fn).result()

        steps["load"] = time.perf_counter() - started
        checks.warm_up(new.target, runtime.batcher.sizes, len(new.meta.classes), between)
        steps["warm_up"] = time.perf_counter() - started - steps["load"]
        new.canary_top = checks.canary(new.target, new.meta.classes, between)
        steps["canary"] = time.perf_counter() - started - steps["load"] - steps["warm_up"]
        changed = (  # the serving model's canary ran when it started serving (never re-run beside live traffic)
            sum(a != b for a, b in zip(serving.canary_top, new.canary_top, strict=True))
            if serving.canary_top is not None
            else None
        )
        previous = runtime.switch(new)
        self.path = path
        _log_release(previous)
        return {
            "result": ReloadResult.SUCCESS.value,
            "model": new.ref(),
            "previous": previous.ref(),
            "path": str(path),
            "forced_changes": changes,
            "canary": {"images": len(new.canary_top), "top_class_changed": changed},
            "step_seconds": {k: round(v, 3) for k, v in steps.items()},
        }


def _log_release(previous: Served) -> None:
    """Log when the swapped-out model is freed: after the last request bound to it has been answered."""
    ref = previous.ref()
    weakref.finalize(previous.model, log.info, "previous model released", extra={"model": ref})
