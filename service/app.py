"""The application factory: settings and model in, a FastAPI app out (nothing happens at import)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI
from starlette.types import Scope

from service.apidocs import install_docs
from service.config import Settings
from service.errors import install_error_handlers
from service.hospital.delivery import open_outbox
from service.hospital.dicomweb import STOW_ROUTE, WADO_CLASSIFY_ROUTE
from service.hospital.dicomweb import router as dicomweb_router
from service.hospital.dimse import start_dicom_node
from service.hospital.outbox_admin import router as outbox_admin_router
from service.hospital.sr import warm_up_in_background as sr_warm_up_in_background
from service.inference import InferenceModel, OnnxModel
from service.logs import guard_third_party_output
from service.middleware import RequestContextMiddleware
from service.oip.routes import INFER_ROUTE, INFER_VERSION_ROUTE
from service.oip.routes import router as oip_router
from service.routes import CLASSIFY_ROUTE, router
from service.runtime import Runtime
from service.swap.admin import router as admin_router
from service.swap.reloader import Reloader
from service.swap.watch import ModelWatcher
from service.tls import dimse_tls
from service.ui.card import router as card_router
from service.ui.static import install_ui
from service.version import SERVICE_VERSION

log = logging.getLogger(__name__)


def load_model(settings: Settings) -> OnnxModel:
    """Open the model with the settings' providers and thread counts (raises ModelLoadError)."""
    return open_model(settings, settings.model_path)


def open_model(settings: Settings, path: Path) -> OnnxModel:
    """Open ``path`` as :func:`load_model` does (a model swap opens the new file with it)."""
    # The provider decides the thread default; ask ORT which provider wins before choosing.
    import onnxruntime as ort

    from service.inference import choose_providers

    first = choose_providers(settings.provider_list, ort.get_available_providers())[0]
    return OnnxModel.load(
        path,
        settings.provider_list,
        intra_op_threads=settings.resolved_intra_op_threads(first),
        cuda_mem_limit_mb=settings.cuda_mem_limit_mb,
    )


def create_app(settings: Settings | None = None, model: InferenceModel | None = None) -> FastAPI:
    """Build the service.

    Args:
        settings: validated settings (default: read from ``LESIONSERVE_*`` now).
        model: a loaded model (default: load ``settings.model_path``); tests pass a fake.

    Raises:
        pydantic.ValidationError: bad settings.
        service.inference.ModelLoadError: the model cannot be served.
        service.errors.OutboxUnavailable: the SR outbox file cannot be created or opened.
        service.tls.TlsError: a DICOM TLS file cannot be used.
    """
    settings = settings or Settings()  # model_path comes from the env
    guard_third_party_output()  # pydicom's logger and Python warnings can quote header values
    scp_tls = dimse_tls(settings)  # before the model: a bad certificate is refused in a millisecond
    outbox = open_outbox(settings)  # first: a C-STORE is acknowledged only once its SR is kept, so no outbox, no start
    runtime = Runtime(settings, model or load_model(settings), settings.model_path)
    if outbox is not None:
        outbox.audit = runtime.audit
    reloader = Reloader(runtime, partial(open_model, settings), settings.model_path)
    watcher = ModelWatcher(reloader, settings.model_watch_interval_s) if settings.model_watch else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if outbox is not None:
            outbox.start()  # what the last run left pending goes out first
        # The DICOM node lives in this process: one batcher and one session whatever the entry (docs/service.md).
        loop = asyncio.get_running_loop()
        try:
            node = (
                start_dicom_node(settings, runtime, loop, outbox, scp_tls)
                if settings.dimse_enabled and outbox
                else None
            )
        except OSError as exc:  # taken since the entry point checked it: its one line (service.cli.serve)
            app.state.start_error = (f"cannot listen on {settings.dimse_host}:{settings.dimse_port} "
                                     f"(LESIONSERVE_DIMSE_PORT): {exc.strerror or type(exc).__name__}")  # fmt: skip
            raise
        app.state.dicom_node = node
        # The warm-up last: a start that fails above leaves no thread inside ONNX Runtime, whose exit from a
        # running session aborts the process (`terminate called without an active exception`, exit 134).
        runtime.start()
        if watcher is not None:
            watcher.start()
        if settings.dimse_enabled or settings.dicomweb_enabled:
            sr_warm_up_in_background()  # highdicom's tables: 1-2 s once, at start rather than in the first SR
        yield
        if node is not None:
            node.stop()  # after the drain, before the batcher stops
        if outbox is not None:  # after the entries: what is not delivered now stays in the file for the next start
            outbox.stop(min(5.0, settings.shutdown_grace_s))  # then a hung C-STORE is aborted: exit within the grace
        if watcher is not None:
            watcher.stop()
        runtime.close()

    app = FastAPI(
        title="lesionserve",
        summary="Dermoscopic skin-lesion classification (decision support; not a diagnosis).",
        # The API's version is the service's; the model's is in /v1/models (a swap changes it while serving).
        version=SERVICE_VERSION,
        lifespan=lifespan,
        docs_url=None,  # served from the installed package instead of a CDN: service.apidocs
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.outbox = outbox  # the STOW-RS route and the admin API reach it here
    app.state.reloader = reloader  # SIGHUP (service.__main__) and the admin route reach it here
    app.state.dimse_tls = scp_tls  # SIGHUP reloads its certificate files too
    app.include_router(router)
    app.include_router(oip_router)  # the Open Inference Protocol v2 on the same runtime (service/oip/)
    if settings.dicomweb_enabled:
        app.include_router(dicomweb_router)
    app.include_router(admin_router)
    app.include_router(outbox_admin_router)
    app.include_router(card_router)
    if settings.ui:
        install_ui(app)
    install_error_handlers(app)
    install_docs(app, "lesionserve")

    audited = {CLASSIFY_ROUTE, INFER_ROUTE, INFER_VERSION_ROUTE}  # every route that classifies images
    # These audit each instance themselves; a request refused before any instance (a bad key, a body too
    # large, too many parts, a full outbox) gets its line here. Admin calls are audited whatever they answer.
    per_instance = {STOW_ROUTE, WADO_CLASSIFY_ROUTE}
    admin_prefix = "/v1/admin/"  # the reload and outbox admin routes

    def audit(route: str, scope: Scope, status: int, elapsed_s: float) -> None:
        state = scope.get("state", {})
        refused_early = route in per_instance and status >= 400 and not state.get("instances_audited")
        if route in audited or refused_early or route.startswith(admin_prefix):
            runtime.audit_request(state, scope["headers"], status, elapsed_s)

    app.add_middleware(
        RequestContextMiddleware, draining=lambda: runtime.draining, on_complete=audit,
        max_head_bytes=settings.max_header_bytes,
    )  # fmt: skip
    return app
