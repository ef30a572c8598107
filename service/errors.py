"""Domain errors and their one mapping to HTTP (RFC 9457 ``application/problem+json``).

Errors are raised where they happen (decoder, batcher, auth) as the classes below; this
module alone turns them into responses. Each class has a stable ``type`` URI that clients
may switch on; ``detail`` is written for the caller and never carries internals.
"""

from __future__ import annotations

from typing import ClassVar

PROBLEM_BASE = "https://lesionserve.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class ServiceError(Exception):
    """Base of every error the service answers on purpose."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal server error"
    reason: ClassVar[str | None] = None  # metrics.RejectReason value, where one applies

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}

    @classmethod
    def type_uri(cls) -> str:
        return PROBLEM_BASE + cls.slug

    def problem(self, instance: str | None = None, request_id: str | None = None) -> dict[str, object]:
        body: dict[str, object] = {
            "type": self.type_uri(),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if request_id:
            body["request_id"] = request_id
        return body


class InvalidImage(ServiceError):
    status, slug, title, reason = 400, "invalid-image", "Image could not be decoded", "undecodable"


class ImageTooSmall(InvalidImage):
    """The image decodes but its shorter side is under ``LESIONSERVE_MIN_IMAGE_SIDE``: the model's input would be
    mostly upsampling, so its answer would be about interpolation, not the lesion. 422: the bytes are fine, the
    content is not usable; an InvalidImage so that the PACS entries refuse it as the sender's object (C000)."""

    status, slug, title, reason = 422, "image-too-small", "Image too small to classify", "too_small"


class BadRequest(ServiceError):
    status, slug, title = 400, "bad-request", "Malformed request"


class InvalidFhirReference(BadRequest):
    """``subject``, ``based_on`` or ``encounter`` is not a FHIR reference of an allowed type; the detail names the
    field, never the value (a patient reference is an identifier)."""

    slug, title = "invalid-fhir-reference", "Not a FHIR reference"


class Unauthorized(ServiceError):
    status, slug, title, reason = 401, "unauthorized", "Missing or invalid API key", "unauthorized"


class Forbidden(ServiceError):
    status, slug, title, reason = 403, "forbidden", "API key not allowed here", "unauthorized"


class NotAcceptable(ServiceError):
    status, slug, title = 406, "not-acceptable", "No acceptable response format"


class PayloadTooLarge(ServiceError):
    status, slug, title, reason = 413, "payload-too-large", "Upload too large", "too_large"


class UnsupportedMediaType(ServiceError):
    status, slug, title, reason = 415, "unsupported-media-type", "Unsupported media type", "unsupported_type"


class UploadTimeout(ServiceError):
    """The body did not arrive within ``LESIONSERVE_BODY_TIMEOUT_S``; the connection is closed after the answer."""

    status, slug, title, reason = 408, "upload-timeout", "Upload took too long", "upload_timeout"


class UploadTooSlow(ServiceError):
    """The body arrived slower than ``LESIONSERVE_BODY_MIN_RATE_BYTES_S`` after the grace period."""

    status, slug, title, reason = 408, "upload-too-slow", "Upload too slow", "upload_too_slow"


class UnsupportedSopClass(UnsupportedMediaType):
    """A DICOM SOP class other than the accepted ones (415; DICOM status 0122 on the PACS entries)."""


class OutOfDistribution(ServiceError):
    """The image looks unlike the training data and ``LESIONSERVE_OOD_POLICY=reject``."""

    status, slug, title, reason = 422, "out-of-distribution", "Image unlike the training data", "out_of_distribution"


class ModelNotFound(ServiceError):
    """An Open Inference Protocol path names a model (or version) that is not the one loaded."""

    status, slug, title = 404, "model-not-found", "No such model"


class InstanceNotFound(ServiceError):
    """The DICOMweb origin has no such Study/Series/SOP Instance (WADO-RS 404)."""

    status, slug, title = 404, "instance-not-found", "DICOM instance not found at the origin"


class OriginFailed(ServiceError):
    """The configured DICOMweb origin could not be reached or answered an error (WADO-RS / STOW-RS)."""

    status, slug, title = 502, "dicomweb-origin-failed", "The DICOMweb origin failed"


class ResultNotDelivered(ServiceError):
    """The SR was made but the PACS destination (C-STORE) or origin (STOW-RS) did not store it."""

    status, slug, title = 502, "result-not-delivered", "The result could not be delivered to the PACS"


class OutboxFull(ServiceError):
    """The result outbox holds ``OUTBOX_MAX_ITEMS`` SRs or ``OUTBOX_MAX_BYTES``: nothing more is accepted until the
    PACS takes some (C-STORE: A700 Out of Resources; STOW-RS: 503). Never a silent loss: the sender keeps the image."""

    status, slug, title, reason = 503, "outbox-full", "The result outbox is full, retry later", "outbox_full"


class OutboxUnavailable(ServiceError):
    """The outbox file could not be written (disk full, folder read-only, I/O error): the SR is not accepted."""

    status, slug, title, reason = 503, "outbox-unavailable", "The result outbox cannot be written", "outbox_unavailable"


class AuditNotWritable(ServiceError):
    """AUDIT_ON_FAILURE=closed and audit lines wait to be written (disk full): no new work until they are."""

    status, slug, title, reason = 503, "audit-not-writable", "The audit trail cannot be written", "audit_not_writable"


class NotConfigured(ServiceError):
    """A route whose counterpart is not configured (e.g. WADO-RS without LESIONSERVE_DICOMWEB_ORIGIN)."""

    status, slug, title = 501, "not-configured", "Not configured on this server"


class InternalError(ServiceError):
    status, slug, title = 500, "internal", "Internal server error"


class Overloaded(ServiceError):
    status, slug, title, reason = 503, "overloaded", "Service overloaded, retry later", "queue_full"


class TooManyUploads(ServiceError):
    status, slug, title, reason = 503, "too-many-uploads", "Too many uploads in progress", "too_many_uploads"


class ModelNotReady(ServiceError):
    status, slug, title, reason = 503, "not-ready", "Model not ready", "not_ready"


class ShuttingDown(ServiceError):
    status, slug, title, reason = 503, "shutting-down", "Service is shutting down", "shutting_down"


class DeadlineExceeded(ServiceError):
    status, slug, title, reason = 504, "deadline-exceeded", "Request deadline passed", "deadline"


class ClientClosed(ServiceError):
    """The client closed the connection before its answer was sent: an ordinary event, not a server fault.

    Status 499 as nginx records it ("client closed request"); nobody receives the answer, but the metrics,
    the access log and the audit trail see the 499 and the ``client-closed`` type. Not a rejection.
    """

    status, slug, title = 499, "client-closed", "Client closed the connection"


class InferenceFailed(ServiceError):
    """The model run for this request's batch failed; the service itself keeps serving."""

    status, slug, title = 500, "inference-failed", "Inference failed"


class ModelRejected(ServiceError):
    """A model reload refused the new file; the old model keeps serving. ``check`` names the step that failed."""

    status, slug, title = 422, "model-rejected", "The new model was refused; the old one keeps serving"

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(detail)
        self.check = check

    def problem(self, instance: str | None = None, request_id: str | None = None) -> dict[str, object]:
        return {**super().problem(instance, request_id), "check": self.check}  # an RFC 9457 extension member


class ModelPathRefused(ModelRejected):
    """The reload's path is not a ``.onnx`` file inside the allowed models folder."""

    status, slug, title = 400, "model-path-refused", "Model path refused"

    def __init__(self, detail: str) -> None:
        super().__init__("path", detail)


class ReloadInProgress(ServiceError):
    status, slug, title = 409, "reload-in-progress", "Another model reload is in progress"


# --- the one mapping to HTTP ------------------------------------------------------------------
# Imported late so that the error classes above stay usable without a web framework.
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

# The Open Inference Protocol v2 defines its own error body, {"error": "<message>"}, which its clients
# (tritonclient, KServe's SDK) read; every answer under this prefix has that shape, with the same status.
OIP_PREFIX = "/v2"


def is_oip(request: Request) -> bool:
    path = request.url.path
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def oip_error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


# Framework-raised statuses (unknown route, wrong method) get problem bodies too.
_HTTP_PROBLEMS = {404: ("not-found", "Not found"), 405: ("method-not-allowed", "Method not allowed")}


def problem_body(
    status: int, slug: str, title: str, detail: str, instance: str | None = None, request_id: str | None = None
) -> dict[str, object]:
    body: dict[str, object] = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    if request_id:
        body["request_id"] = request_id
    return body


def problem_response(err: ServiceError, request: Request) -> JSONResponse:
    """The RFC 9457 response for ``err``; counts a rejection when the error has a reason."""
    from service.metrics import REJECTIONS_TOTAL  # local: metrics registers collectors on import

    if err.reason is not None:
        REJECTIONS_TOTAL.labels(reason=err.reason).inc()
    request_id = getattr(request.state, "request_id", None)
    request.state.problem_type = err.type_uri()
    if is_oip(request):
        return oip_error(err.status, err.detail, err.headers)
    return JSONResponse(
        err.problem(instance=request.url.path, request_id=request_id),
        status_code=err.status,
        headers=err.headers,
        media_type=PROBLEM_CONTENT_TYPE,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every error raised inside a route through :func:`problem_response`.

    Unexpected exceptions are turned into a 500 by the request middleware
    (:mod:`service.middleware`), which logs them once.
    """

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return problem_response(exc, request)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(BadRequest("the request is malformed: check the field names and types"), request)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        slug, title = _HTTP_PROBLEMS.get(exc.status_code, ("http-error", "HTTP error"))
        request.state.problem_type = PROBLEM_BASE + slug
        if is_oip(request):
            return oip_error(exc.status_code, str(exc.detail), dict(exc.headers or {}))
        body = problem_body(
            exc.status_code, slug, title, str(exc.detail), request.url.path, getattr(request.state, "request_id", None)
        )
        return JSONResponse(body, exc.status_code, headers=dict(exc.headers or {}), media_type=PROBLEM_CONTENT_TYPE)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
