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


class BadRequest(ServiceError):
    status, slug, title = 400, "bad-request", "Malformed request"


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


class InternalError(ServiceError):
    status, slug, title = 500, "internal", "Internal server error"


class Overloaded(ServiceError):
    status, slug, title, reason = 503, "overloaded", "Service overloaded, retry later", "queue_full"


class ModelNotReady(ServiceError):
    status, slug, title, reason = 503, "not-ready", "Model not ready", "not_ready"


class ShuttingDown(ServiceError):
    status, slug, title, reason = 503, "shutting-down", "Service is shutting down", "shutting_down"


class DeadlineExceeded(ServiceError):
    status, slug, title, reason = 504, "deadline-exceeded", "Request deadline passed", "deadline"


class InferenceFailed(ServiceError):
    """The model run for this request's batch failed; the service itself keeps serving."""

    status, slug, title = 500, "inference-failed", "Inference failed"
