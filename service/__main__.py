"""``python -m service``: validate settings, load the model, serve with uvicorn (one worker).

SIGTERM (or SIGINT, Ctrl-C) drains: ``/readyz`` turns 503 and new work is refused at once, queued
and in-flight requests finish (up to ``SHUTDOWN_GRACE_S``), then the server stops. A second signal
stops at once. SIGHUP reloads the model file (a model swap while serving: service.swap); the
outcome is logged. Start-up errors print one line and exit 2.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.clients import protocol_for, raise_fd_limit
from service.config import Settings, describe_validation_error
from service.inference import ModelLoadError
from service.logs import configure_logging
from service.runtime import Runtime

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM or SIGINT drains the runtime before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT) and self._drain is None:
            self.runtime.begin_drain()
            self._drain = threading.Thread(target=self._drain_then_exit, name="lesionserve-drain", daemon=True)
            self._drain.start()
            return
        if self._drain is not None:
            # A second signal means "now": uvicorn's own graceful shutdown would otherwise wait
            # up to another grace period for the very requests the operator gave up on.
            self.force_exit = True
        super().handle_exit(sig, frame)

    def _drain_then_exit(self) -> None:
        grace = self.runtime.settings.shutdown_grace_s
        if self.runtime.wait_idle(grace):
            log.info("drained: every admitted request was answered")
        else:
            log.warning("grace period over with requests still in flight", extra={"in_flight": self.runtime.in_flight})
        self.should_exit = True


def main() -> int:
    try:
        settings = Settings()  # model_path comes from the env
    except ValidationError as exc:
        print(f"lesionserve: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    try:
        app = create_app(settings)
    except ModelLoadError as exc:
        print(f"lesionserve: cannot serve {settings.model_path}: {exc}", file=sys.stderr)
        return 2
    raise_fd_limit(settings.max_connections)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_config=None,
        access_log=False,  # service.access logs each request once, with its request id
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        lifespan="on",
        # h11, not httptools: httptools has no limit on the request head (three 200 MB headers took
        # 810 MB); h11 refuses one over max_incomplete_event_size with 400 and closes the connection.
        # Our subclass adds the header-read timeout and the connection cap (service.clients).
        http=protocol_for(settings),
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    reloader = app.state.reloader
    # Never the reload itself in the handler: it runs between two bytecodes of the event loop's thread.
    signal.signal(signal.SIGHUP, lambda sig, frame: reloader.reload_in_background("sighup"))
    DrainingServer(config, app.state.runtime).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
