"""OpenTelemetry traces: W3C ``traceparent`` in, spans out, configured by the standard ``OTEL_*`` variables.

Spans: the request (``POST /v1/classify``, kind server, child of the caller's ``traceparent``) and under it
``upload read``, ``decode`` and ``queue wait``; ``inference``, one per model run, with the batch size as an
attribute and a link to every request in the batch (a batch has many parents, so it is a root of its own);
``C-STORE`` for a DICOM instance received; ``SR send``, one per delivery attempt of an SR, linked to the
request that made it while this process still remembers it.

No exporter configured (``OTEL_TRACES_EXPORTER`` unset or ``none`` and no OTLP endpoint, or
``OTEL_SDK_DISABLED=true``): the SDK is never imported, the module's tracer stays None and every helper
returns at its first line. A caller's ``traceparent`` is still read, so its trace id reaches the access
and audit lines and the ingress's trace can be followed into this service's logs.

What a span may carry: route templates, status codes, sizes, counts, the request id, the destination kind.
Never a header value, an image byte, a DICOM attribute or an exception message (a parser's message can
quote patient data): a failed span gets the exception's type name only (``error.type``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import wraps
from inspect import iscoroutinefunction
from typing import Any, ParamSpec, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.config import Settings

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_tracer: Tracer | None = None  # None: tracing off (no SDK loaded); set by configure() or install()
_provider: Any = None  # the SDK's TracerProvider, flushed by shutdown()
_PROPAGATOR = TraceContextTextMapPropagator()
_NOTHING: AbstractContextManager[None] = nullcontext()
_REMEMBERED = 10_000  # request id -> span context kept for the SR send's link (a bounded, recent window)
_recent: OrderedDict[str, SpanContext] = OrderedDict()
_recent_lock = threading.Lock()


def exporters_wanted(settings: Settings) -> list[str]:
    """The span exporters the ``OTEL_*`` settings ask for (empty: tracing off)."""
    if settings.otel_sdk_disabled:
        return []
    names = [n.strip() for n in settings.otel_traces_exporter.split(",") if n.strip()]
    if not names:  # unset: OTLP when an endpoint is given, else nothing (no collector to send to)
        endpoint = settings.otel_exporter_otlp_traces_endpoint or settings.otel_exporter_otlp_endpoint
        return ["otlp"] if endpoint else []
    return [] if names == ["none"] else names


def configure(settings: Settings) -> bool:
    """Install the SDK with the exporters of ``OTEL_*`` (BatchSpanProcessor, sampler, resource: the SDK reads
    their ``OTEL_*`` variables itself); returns whether tracing is on."""
    wanted = exporters_wanted(settings)
    if not wanted:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.otel_service_name or "lesionserve"}))
    for name in wanted:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_* (read by the exporter)
        else:
            exporter = ConsoleSpanExporter()  # one JSON object per span on stdout (logs stay on stderr)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    log.info("tracing on", extra={"exporters": ",".join(wanted)})
    return True


def install(provider: Any) -> None:
    """Use ``provider`` (an SDK TracerProvider; tests pass one with an in-memory exporter), or None: tracing off."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("lesionserve") if provider is not None else None


def shutdown() -> None:
    """Flush and stop the exporters (spans still queued are sent); tracing is off afterwards."""
    provider = _provider
    install(None)
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


# --- the request (ASGI middleware) -------------------------------------------------------------------------------------


@dataclass
class RequestTrace:
    token: object
    span: Span | None  # None: tracing off, only the caller's trace id is carried
    trace_id: str
    method: str = ""


def start_request(method: str, scheme: str, headers: Sequence[tuple[bytes, bytes]]) -> RequestTrace | None:
    """The request's span (child of the caller's ``traceparent``), made current; None: nothing to do."""
    traceparent = next((v for k, v in headers if k == b"traceparent"), None)
    parent = _PROPAGATOR.extract({"traceparent": traceparent.decode("latin-1")}) if traceparent else None
    if _tracer is None:
        if parent is None:
            return None
        caller = trace.get_current_span(parent).get_span_context()
        if not caller.is_valid:  # a malformed header is ignored, as the W3C recommendation says
            return None
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(caller)))
        return RequestTrace(token, None, format(caller.trace_id, "032x"))
    span = _tracer.start_span(
        method, context=parent, kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "url.scheme": scheme},
    )  # fmt: skip
    token = otel_context.attach(trace.set_span_in_context(span))
    return RequestTrace(token, span, format(span.get_span_context().trace_id, "032x"), method)


def end_request(started: RequestTrace | None, route: str, status: int, request_id: str) -> None:
    if started is None:
        return
    if started.span is not None:
        started.span.update_name(f"{started.method} {route}")  # the route template, never the raw path
        started.span.set_attributes(
            {"http.route": route, "http.response.status_code": status, "lesionserve.request_id": request_id}
        )
        if status >= 500:
            started.span.set_status(Status(StatusCode.ERROR))
        started.span.end()
    otel_context.detach(started.token)  # type: ignore[arg-type]


def current_trace_id() -> str | None:
    """The current trace's id (32 hex digits) for log and audit lines, or None outside any trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


# --- spans inside a request --------------------------------------------------------------------------------------------


def span(name: str, **attributes: str | int | float | bool) -> AbstractContextManager[Span | None]:
    """A child span of the current one (a no-op context manager when tracing is off)."""
    if _tracer is None:
        return _NOTHING
    return _recording(name, SpanKind.INTERNAL, attributes)


@contextmanager
def _recording(name: str, kind: SpanKind, attributes: dict[str, Any], links: Sequence[Link] = ()) -> Iterator[Span]:
    assert _tracer is not None
    with _tracer.start_as_current_span(
        name, kind=kind, attributes=attributes, links=links, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            failed(current, exc)
            raise


def failed(current: Span, exc: BaseException) -> None:
    """Mark a span failed with the exception's type only: its message may quote patient data."""
    current.set_attribute("error.type", type(exc).__qualname__)
    current.set_status(Status(StatusCode.ERROR))


def traced(name: str, kind: SpanKind = SpanKind.INTERNAL) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: the function (sync or async) runs inside a span named ``name``; nothing more when tracing is off."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        if iscoroutinefunction(fn):
            coroutine: Callable[P, Awaitable[Any]] = fn

            @wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                if _tracer is None:
                    return await coroutine(*args, **kwargs)
                with _recording(name, kind, {}):
                    return await coroutine(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            if _tracer is None:
                return fn(*args, **kwargs)
            with _recording(name, kind, {}):
                return fn(*args, **kwargs)

        return run

    return wrap


# --- the batcher (its worker thread) -----------------------------------------------------------------------------------


def current_span_context() -> SpanContext | None:
    """The current span's context, for a request handed to another thread (None when tracing is off)."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def _epoch_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` reading as the wall-clock nanoseconds that spans use."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def queue_waits(waits: Sequence[tuple[SpanContext | None, float]], taken: float) -> None:
    """One ``queue wait`` span per request, from its enqueue to ``taken`` (``time.monotonic()`` readings)."""
    if _tracer is None:
        return
    end = _epoch_ns(taken)
    for parent, enqueued in waits:
        if parent is not None:
            wait = _tracer.start_span("queue wait", context=trace.set_span_in_context(NonRecordingSpan(parent)),
                                      start_time=_epoch_ns(enqueued))  # fmt: skip
            wait.end(end_time=end)


def inference(parents: Sequence[SpanContext | None], batch_size: int) -> AbstractContextManager[Span | None]:
    """The ``inference`` span of one model run: a root linked to each request in the batch."""
    if _tracer is None:
        return _NOTHING
    links = [Link(p) for p in parents if p is not None]
    return _root("inference", SpanKind.INTERNAL, {"lesionserve.batch_size": batch_size}, links)


@contextmanager
def _root(name: str, kind: SpanKind, attributes: dict[str, Any], links: Sequence[Link]) -> Iterator[Span]:
    assert _tracer is not None
    token = otel_context.attach(otel_context.Context())  # a root: not a child of whatever this thread has current
    try:
        with _recording(name, kind, attributes, links) as current:
            yield current
    finally:
        otel_context.detach(token)


# --- the SR outbox -----------------------------------------------------------------------------------------------------


def remember(request_id: str) -> None:
    """Keep the current span's context under ``request_id``, for the SR send's link (bounded, most recent)."""
    current = current_span_context()
    if current is None:
        return
    with _recent_lock:
        _recent[request_id] = current
        _recent.move_to_end(request_id)
        while len(_recent) > _REMEMBERED:
            _recent.popitem(last=False)


def sr_send(destination_kind: str, request_id: str) -> AbstractContextManager[Span | None]:
    """The ``SR send`` span of one delivery attempt, linked to the request that made the SR (if remembered)."""
    if _tracer is None:
        return _NOTHING
    with _recent_lock:
        made_by = _recent.get(request_id)
    attributes = {"lesionserve.sr.destination_kind": destination_kind, "lesionserve.request_id": request_id}
    return _root("SR send", SpanKind.CLIENT, attributes, [Link(made_by)] if made_by is not None else [])
