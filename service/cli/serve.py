"""``lesionserve serve`` (and ``python -m service``): validate settings, load the model, serve with uvicorn.

SIGTERM (or SIGINT, Ctrl-C) drains: ``/readyz`` turns 503 and new work is refused at once, queued
and in-flight requests finish (up to ``SHUTDOWN_GRACE_S``), then the server stops. A second signal
stops at once. SIGHUP reloads the model file (a model swap while serving: service.swap) and the TLS
certificate files (service.tls: the listener stays open); each outcome is logged.

Start-up errors print one line on stderr and exit 2, never a traceback or an abort: bad settings, a
certificate or key that cannot be used, a model that cannot be served, a port already in use. The HTTP
port is bound here, before the model is loaded, and the socket is handed to uvicorn: a port in use is
found in a millisecond, not after the model has loaded and its threads have started (uvicorn's own
``sys.exit`` at that point, with ONNX Runtime's threads alive, ended in ``terminate called without an
active exception``, exit 134).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import signal
import socket
import sys
import threading
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service import tracing
from service.app import create_app
from service.audit import AuditUnavailable
from service.cli.options import add_settings_flags, settings_from
from service.clients import protocol_for, raise_fd_limit
from service.config import Settings, describe_validation_error
from service.errors import OutboxUnavailable
from service.inference import ModelLoadError
from service.logs import configure_logging
from service.runtime import Runtime
from service.tls import TlsError, https_tls

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


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_settings_flags(parser)


def run(args: argparse.Namespace) -> int:
    """Serve until stopped; 2 with one line on stderr when the settings or the model are refused."""
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        print(f"lesionserve: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    return serve(settings)


def serve(settings: Settings) -> int:
    """Load the model and serve until stopped (0), or print one line and return 2 when it cannot."""
    configure_logging(settings.log_format, settings.log_level)
    try:
        tls = https_tls(settings)
        sock = bind(settings.host, settings.port)
        if settings.dimse_enabled:
            # pynetdicom binds the SCP's port itself, later: bound and released here so that a port in use
            # is refused now, with one line, rather than as a failed start-up after the model has loaded.
            bind(settings.dimse_host, settings.dimse_port, "LESIONSERVE_DIMSE_PORT").close()
    except (TlsError, PortUnavailable) as exc:
        return refuse(str(exc))
    try:
        app = create_app(settings)
    except ModelLoadError as exc:
        sock.close()
        return refuse(f"cannot serve {settings.model_path}: {exc}")
    except OutboxUnavailable as exc:  # no C-STORE may be acknowledged without somewhere durable to keep its SR
        sock.close()
        return refuse(exc.detail)
    except TlsError as exc:  # DICOM TLS files (service.tls.dimse_tls, sr_sender_tls)
        sock.close()
        return refuse(str(exc))
    except AuditUnavailable as exc:  # an unwritable audit folder: one line, exit 2 (it was a 26-line traceback)
        sock.close()
        return refuse(str(exc))
    raise_fd_limit(settings.max_connections)
    tracing.configure(settings)  # OTEL_*: nothing at all when no exporter is configured
    config = uvicorn.Config(
        app,
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
        # Our context, not uvicorn's: TLS 1.2+, client certificates, and the SIGHUP reload (service.tls).
        ssl_context_factory=(lambda _config, _default: tls.context) if tls is not None else None,
    )
    reloader = app.state.reloader
    reloadable = [t for t in (tls, app.state.dimse_tls) if t is not None]

    def on_sighup(sig: int, frame: FrameType | None) -> None:
        # Never the reloads themselves in the handler: it runs between two bytecodes of the event loop's thread.
        reloader.reload_in_background("sighup")
        for t in reloadable:
            threading.Thread(target=t.reload, name=f"lesionserve-tls-{t.name}", daemon=True).start()

    signal.signal(signal.SIGHUP, on_sighup)
    scheme = "https" if tls is not None else "http"
    log.info("listening", extra={"url": f"{scheme}://{_url_host(settings.host)}:{settings.port}",
                                 "client_cert": settings.tls_client_cert if tls else None})  # fmt: skip
    warn_if_open(settings)
    server = DrainingServer(config, app.state.runtime)
    with contextlib.suppress(SystemExit):  # uvicorn's way out when the application's start-up failed (logged)
        server.run(sockets=[sock])
    tracing.shutdown()  # the spans still queued go out before the process ends
    if not server.started:
        return refuse(getattr(app.state, "start_error", "the application did not start (see the log line above)"))
    return 0


class PortUnavailable(Exception):
    """The address cannot be listened on; the message is the one line printed."""


def refuse(message: str) -> int:
    print(f"lesionserve: {message}", file=sys.stderr)
    return 2


def bind(host: str, port: int, setting: str = "LESIONSERVE_PORT") -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host is an IPv6 address), as uvicorn would bind it.

    Raises:
        PortUnavailable: in use, not permitted, or an address this machine does not have.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise PortUnavailable(f"cannot listen on {host}:{port} ({setting}): {_why(exc)}") from None
    sock.set_inheritable(True)
    return sock


def _why(exc: OSError) -> str:
    import errno

    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another process listens there)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address"
    return exc.strerror or type(exc).__name__


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def warn_if_open(settings: Settings) -> None:
    """One warning line when anyone who reaches a non-loopback address could classify images without a key."""
    if settings.key_table():
        return
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if not loopback:
        log.warning(
            "authentication is off on a non-loopback address: anyone who reaches this port can use the API; "
            "set LESIONSERVE_API_KEYS or LESIONSERVE_API_KEYS_FILE, or listen on 127.0.0.1 behind a proxy",
            extra={"host": settings.host, "port": settings.port},
        )
