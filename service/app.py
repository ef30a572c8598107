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
from service.hospital.dicomweb import router as dicomweb_router
from service.hospital.dimse import start_dicom_node
from service.hospital.sr import warm_up_in_background as sr_warm_up_in_background
from service.inference import InferenceModel, OnnxModel
from service.logs import guard_third_party_output
from service.middleware import RequestContextMiddleware
from service.routes import CLASSIFY_ROUTE, router
from service.runtime import Runtime
from service.swap.admin import router as admin_router
from service.swap.reloader import Reloader
from service.swap.watch import ModelWatcher
from service.ui.card import router as card_router
from service.ui.static import install_ui

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
    """
    settings = settings or Settings()  # model_path comes from the env
    guard_third_party_output()  # pydicom's logger and Python warnings can quote header values
    runtime = Runtime(settings, model or load_model(settings), settings.model_path)
    reloader = Reloader(runtime, partial(open_model, settings), settings.model_path)
    watcher = ModelWatcher(reloader, settings.model_watch_interval_s) if settings.model_watch else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        if watcher is not None:
            watcher.start()
        # The DICOM node lives in this process: one batcher and one session whatever the entry (DESIGN.md).
        node = start_dicom_node(settings, runtime, asyncio.get_running_loop()) if settings.dimse_enabled else None
        app.state.dicom_node = node
        if settings.dimse_enabled or settings.dicomweb_enabled:
            sr_warm_up_in_background()  # highdicom's tables: 1-2 s once, at start rather than in the first SR
        yield
        if node is not None:
            node.stop()  # after the drain, before the batcher stops
        if watcher is not None:
            watcher.stop()
        runtime.close()

    app = FastAPI(
        title="lesionserve",
        summary="Dermoscopic skin-lesion classification (decision support; not a diagnosis).",
        version=runtime.meta.version,
        lifespan=lifespan,
        docs_url=None,  # served from the installed package instead of a CDN: service.apidocs
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.reloader = reloader  # SIGHUP (service.__main__) and the admin route reach it here
    app.include_router(router)
    if settings.dicomweb_enabled:
        app.include_router(dicomweb_router)
    app.include_router(admin_router)
    app.include_router(card_router)
    if settings.ui:
        install_ui(app)
    install_error_handlers(app)
    install_docs(app, "lesionserve")

    def audit(route: str, scope: Scope, status: int, elapsed_s: float) -> None:
        if route == CLASSIFY_ROUTE:
            runtime.audit_request(scope.get("state", {}), scope["headers"], status, elapsed_s)

    app.add_middleware(RequestContextMiddleware, draining=lambda: runtime.draining, on_complete=audit)
    return app
