"""One model reload at a time: load beside the serving model, check, warm up, canary, then switch.

Every step that fails raises :class:`~service.errors.ModelRejected` naming its check (``path``, ``load``,
``contract``, ``warm_up``, ``canary``), is logged and counted in ``lesionserve_model_reloads_total``;
the serving model is never touched before the switch, which is one assignment
(:meth:`service.runtime.Runtime.switch`). A second reload while one runs gets
:class:`~service.errors.ReloadInProgress` (409) at once instead of queueing behind it.
"""

from __future__ import annotations

import concurrent.futures
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
        shown = repr(requested[:80])  # the caller's text, bounded; never the server's own folder (issue 28: 13)
        try:
            candidate = Path(requested)
            resolved = (candidate if candidate.is_absolute() else self.models_dir / candidate).resolve()
            inside = resolved.is_relative_to(self.models_dir)
            is_file = inside and resolved.is_file()
        except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a name too long, a symlink loop
            raise ModelPathRefused(f"{shown} is not a usable path ({type(exc).__name__})") from None
        if not inside:
            raise ModelPathRefused(f"{shown} is outside the models folder")
        if resolved.suffix != ".onnx":
            raise ModelPathRefused(f"{shown} is not an .onnx file")
        if not is_file:
            raise ModelPathRefused(f"{shown} does not exist in the models folder")
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
        slowest = 0.0
        bound = runtime.settings.request_timeout_s

        def between(fn: Callable[[], ModelOutput]) -> ModelOutput:
            nonlocal slowest
            t0 = time.perf_counter()
            try:  # every check run bounded: a model that hangs is refused, not waited for
                out = runtime.batcher.run_between(fn).result(timeout=bound + 60.0)
            except concurrent.futures.TimeoutError:
                raise ModelRejected(ReloadResult.WARM_UP, f"a check run took over {bound + 60.0:g} s") from None
            slowest = max(slowest, time.perf_counter() - t0)
            return out

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
        refusals, check = [], ReloadResult.WARM_UP
        was_right = checks.canary_right(serving.canary_top, serving.meta.classes)
        now_right = checks.canary_right(new.canary_top, new.meta.classes)
        if was_right is not None and now_right is not None and now_right < was_right:
            check = ReloadResult.CANARY
            refusals.append(
                f"it gets {now_right} of {len(new.canary_top)} canary images right (known diagnoses), the serving "
                f"model {was_right}"
            )
        if slowest > checks.SLOW_RUN_FRACTION * bound:
            refusals.append(
                f"its slowest check run took {slowest:.2f} s, over {checks.SLOW_RUN_FRACTION:g} of the request "
                f"timeout ({bound:g} s)"
            )
        if refusals and not force:
            raise ModelRejected(check, "; ".join(refusals) + " (send force=true to accept it anyway)")
        changes = changes + refusals
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
