"""Media types in and out: the one place that picks a decoder by ``Content-Type`` and a
renderer by ``Accept``.

New formats plug in with :func:`register_decoder` (e.g. ``application/dicom``) and
:func:`register_renderer` (e.g. ``application/fhir+json``); the routes do not change.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.clients import Uploads
from service.errors import BadRequest, NotAcceptable, UnsupportedMediaType
from service.hospital.dicom import decode_dicom, is_dicom
from service.hospital.fhir import REFERENCE_TYPES, References, diagnostic_report
from service.hospital.sr import make_sr, sr_bytes
from service.imaging import DecodedImage, decode_image
from service.schemas import ClassifyResponse

# bytes, model input side S, max pixels -> model-ready image. Runs in the decode thread pool.
Decoder = Callable[[bytes, int, int], DecodedImage]
Renderer = Callable[[ClassifyResponse], Response]

MULTIPART = "multipart/form-data"
IMAGE_FIELD = "image"
# Multipart parts often come labelled generically; their bytes are sniffed by the image decoder.
_GENERIC = ("application/octet-stream", "")

DICOM = "application/dicom"
FHIR_JSON = "application/fhir+json"


def render_json(answer: ClassifyResponse) -> Response:
    return JSONResponse(answer.model_dump(mode="json", exclude_none=True))


def render_fhir(answer: ClassifyResponse, references: References | None = None) -> Response:
    """A FHIR R4 DiagnosticReport; DICOM uploads link it to their study and accession, ``references`` to the
    caller's patient, order and encounter."""
    identifiers = answer.dicom.identifiers if answer.dicom is not None else None
    report = diagnostic_report(answer, identifiers=identifiers, issued=datetime.now(UTC), references=references)
    return JSONResponse(report, media_type=FHIR_JSON)


def render_dicom_sr(answer: ClassifyResponse, source: bytes | None = None) -> Response:
    """A DICOM Comprehensive SR in the source object's study (:mod:`service.hospital.sr`).

    It needs the source object (Patient/Study to copy, the instance to reference), which the route
    passes; called without one, or for a non-DICOM answer, it is a 406.
    """
    if source is None or answer.dicom is None:
        raise NotAcceptable("a DICOM SR (Accept: application/dicom) answers a DICOM input only")
    return Response(sr_bytes(make_sr(answer, source)), media_type=DICOM)


DECODERS: dict[str, Decoder] = {"image/jpeg": decode_image, "image/png": decode_image, DICOM: decode_dicom}
RENDERERS: dict[str, Renderer] = {"application/json": render_json, FHIR_JSON: render_fhir, DICOM: render_dicom_sr}
DEFAULT_RENDERER = "application/json"


def register_decoder(media_type: str, decoder: Decoder) -> None:
    DECODERS[media_type.lower()] = decoder


def register_renderer(media_type: str, renderer: Renderer) -> None:
    RENDERERS[media_type.lower()] = renderer


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body under the process's upload rules (:class:`service.clients.Uploads`).

    Raises 413 past ``limit`` bytes, 408 when too slow or too long, 503 when too many uploads are being
    read, 499 (:class:`~service.errors.ClientClosed`) when the client hangs up. ``/v1/classify`` reads
    through :class:`service.clients.ClientWatch`, which also listens for a hang-up after the body.
    """
    uploads: Uploads = request.app.state.runtime.uploads
    return await uploads.read(request.receive, limit, request.headers.get("content-length"))


@dataclass(frozen=True)
class Upload:
    """What a classify body holds: the decoder, the bytes it decodes, and any multipart text fields."""

    decoder: Decoder
    data: bytes
    fields: dict[str, str]


async def _multipart_image(headers: Headers, body: bytes) -> tuple[str, bytes, dict[str, str]]:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=10).parse()
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart body: {exc.message}") from None
    part = form.get(IMAGE_FIELD)
    if not isinstance(part, UploadFile):
        raise BadRequest(f"multipart body has no file field {IMAGE_FIELD!r}")
    data = await part.read()
    part_type = _media_type(part.content_type)
    if part_type in _GENERIC:  # sniff: DICOM has "DICM" at byte 128; else the image decoder sniffs
        part_type = DICOM if is_dicom(data) else "image/jpeg"
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    return part_type, data, fields


async def read_upload(headers: Headers, body: bytes) -> Upload:
    """The decoder for this request, the bytes it decodes (multipart unwrapped) and the multipart text fields.

    Raises:
        UnsupportedMediaType: no decoder for the (part's) content type (415).
        BadRequest: a multipart body without an ``image`` file (400).
    """
    fields: dict[str, str] = {}
    media_type = _media_type(headers.get("content-type"))
    if media_type == MULTIPART:
        media_type, body, fields = await _multipart_image(headers, body)
    decoder = DECODERS.get(media_type)
    if decoder is None:
        accepted = ", ".join(sorted([*DECODERS, MULTIPART]))
        raise UnsupportedMediaType(f"content type {media_type or '(none)'!r} is not supported; send one of {accepted}")
    return Upload(decoder, body, fields)


async def pick_decoder(headers: Headers, body: bytes) -> tuple[Decoder, bytes]:
    """:func:`read_upload` without the form fields."""
    upload = await read_upload(headers, body)
    return upload.decoder, upload.data


def fhir_references(query: Mapping[str, str | None], fields: Mapping[str, str]) -> References:
    """The report's references from the query string and the multipart fields (either place; not both differing).

    Raises:
        InvalidFhirReference: a value is not a reference of an allowed type (400; the value is never echoed).
        BadRequest: the same name given differently in the query and the form.
    """
    merged: dict[str, str | None] = {}
    for name in REFERENCE_TYPES:
        in_query, in_form = query.get(name), fields.get(name)
        if in_query and in_form and in_query != in_form:
            raise BadRequest(f"{name!r} is given twice, differently: in the query string and as a form field")
        merged[name] = in_query or in_form
    return References.parse(merged)


@dataclass(frozen=True)
class _Offer:
    media_type: str
    q: float


def _offers(accept: str) -> list[_Offer]:
    offers = []
    for part in accept.split(","):
        media_type, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media_type:
            offers.append(_Offer(media_type.lower(), q))
    return sorted(offers, key=lambda o: -o.q)


def pick_renderer(accept: str | None) -> Renderer:
    """The renderer for an ``Accept`` header (none or ``*/*``: JSON).

    Raises:
        NotAcceptable: nothing the client accepts can be produced (406).
    """
    if not accept or not accept.strip():
        return RENDERERS[DEFAULT_RENDERER]
    for offer in _offers(accept):
        if offer.q <= 0:
            continue
        if offer.media_type in RENDERERS:
            return RENDERERS[offer.media_type]
        if offer.media_type in ("*/*", "application/*"):
            return RENDERERS[DEFAULT_RENDERER]
    raise NotAcceptable(f"cannot answer in {accept!r}; available: {', '.join(sorted(RENDERERS))}")
