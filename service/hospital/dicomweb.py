"""DICOMweb entries: STOW-RS in (``POST /dicomweb/studies``), WADO-RS from the PACS (``POST /v1/classify/dicomweb``).

- ``POST /dicomweb/studies`` takes ``multipart/related; type="application/dicom"`` (PS3.18 10.5), classifies
  every part through the service's one batcher (parts run concurrently, so they share batches), and answers
  the STOW-RS response dataset (``application/dicom+json``): Referenced SOP Sequence for the classified
  instances, Failed SOP Sequence with a Failure Reason for the others; 200 all, 202 some, 409 none. With
  ``LESIONSERVE_DICOMWEB_PUSH_SR`` each SR is stored at the origin by STOW-RS (``dicomweb-client``), and an
  instance counts as done only once its SR is there.
- ``POST /v1/classify/dicomweb`` (JSON: Study/Series/SOP Instance UIDs, ``store_sr``) fetches the instance
  from the origin by WADO-RS in its stored transfer syntax, classifies it, and answers like ``/v1/classify``
  (JSON, FHIR or the SR by ``Accept``); with ``store_sr`` the SR is stored back at the origin first.

Mounted only when ``LESIONSERVE_DICOMWEB_ENABLED``; the WADO-RS route also needs ``LESIONSERVE_DICOMWEB_ORIGIN``.
Both need an API key when keys are on. One audit line per instance (:mod:`service.hospital.pacs`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Sequence
from email.message import Message
from typing import Annotated, Any

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pydicom.dataset import Dataset

from service import metrics
from service.config import Settings
from service.errors import (
    BadRequest,
    InstanceNotFound,
    NotConfigured,
    OriginFailed,
    PayloadTooLarge,
    ResultNotDelivered,
    ServiceError,
    UnsupportedMediaType,
)
from service.hospital.pacs import (
    audit_instance,
    classify_instance,
    count_refusal,
    failure_status,
    new_request_id,
    valid_uid,
)
from service.hospital.sr import make_sr, sr_bytes
from service.media import DICOM, pick_renderer, read_body, render_dicom_sr, render_json
from service.routes import RuntimeDep, require_key
from service.runtime import Runtime
from service.schemas import ClassifyResponse

DICOM_JSON = "application/dicom+json"
STOW_ROUTE = "/dicomweb/studies"
WADO_CLASSIFY_ROUTE = "/v1/classify/dicomweb"
UID_PATTERN = r"^[0-2](\.(0|[1-9][0-9]*))+$"

router = APIRouter()
log = logging.getLogger(__name__)


# --- the origin (the PACS's DICOMweb service) ------------------------------------------------------
class Origin:
    """WADO-RS and STOW-RS against ``LESIONSERVE_DICOMWEB_ORIGIN`` (blocking: call in a thread)."""

    def __init__(self, settings: Settings) -> None:
        session = requests.Session()
        if settings.dicomweb_origin_auth is not None:
            user, _, password = settings.dicomweb_origin_auth.get_secret_value().partition(":")
            session = create_session_from_user_pass(user, password)
        self.client = DICOMwebClient(
            url=settings.dicomweb_origin.rstrip("/"), session=session, timeout=settings.dimse_timeout_s
        )
        self.max_bytes = settings.max_upload_bytes

    def fetch(self, study: str, series: str, instance: str) -> bytes:
        """The instance as a Part-10 object in its stored transfer syntax (no transcoding at the origin).

        Raises:
            InstanceNotFound: the origin answers 404.
            OriginFailed: unreachable, another error, or an object other than the one asked for.
            PayloadTooLarge: over ``LESIONSERVE_MAX_UPLOAD_BYTES``.
        """
        try:
            ds = self.client.retrieve_instance(study, series, instance, media_types=(("application/dicom", "*"),))
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code == 404:
                raise InstanceNotFound("the DICOMweb origin has no instance with these UIDs") from None
            raise OriginFailed(f"the DICOMweb origin answered HTTP {code} to WADO-RS") from None
        except requests.RequestException as exc:
            raise OriginFailed(f"the DICOMweb origin could not be reached ({type(exc).__name__})") from None
        except Exception as exc:  # an answer dicomweb-client or pydicom cannot parse
            raise OriginFailed(f"the DICOMweb origin's answer could not be read ({type(exc).__name__})") from None
        if str(ds.get("SOPInstanceUID", "")) != instance:
            raise OriginFailed("the DICOMweb origin returned another instance than the one asked for")
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        if buf.tell() > self.max_bytes:
            raise PayloadTooLarge(f"the instance is {buf.tell()} bytes; the limit is {self.max_bytes}")
        return buf.getvalue()

    def store(self, srs: Sequence[Dataset]) -> None:
        """STOW-RS the SRs.

        Raises:
            ResultNotDelivered: unreachable, an HTTP error, or a response that lists failures.
        """
        try:
            answer = self.client.store_instances(list(srs))
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            raise ResultNotDelivered(f"the DICOMweb origin answered HTTP {code} to the SR's STOW-RS") from None
        except requests.RequestException as exc:
            raise ResultNotDelivered(f"the DICOMweb origin could not be reached ({type(exc).__name__})") from None
        if answer is not None and len(answer.get("FailedSOPSequence", [])):
            raise ResultNotDelivered("the DICOMweb origin refused the SR (Failed SOP Sequence)")


def get_origin(request: Request) -> Origin | None:
    origin: Origin | None = getattr(request.app.state, "dicomweb_origin", None)
    if origin is None and request.app.state.runtime.settings.dicomweb_origin.strip():
        origin = request.app.state.dicomweb_origin = Origin(request.app.state.runtime.settings)
    return origin


OriginDep = Annotated[Origin | None, Depends(get_origin)]


# --- STOW-RS in --------------------------------------------------------------------------------------
def split_related(content_type: str | None, body: bytes) -> list[tuple[str, bytes]]:
    """The parts of a ``multipart/related`` body: (media type, bytes) each.

    Raises:
        UnsupportedMediaType: not ``multipart/related``, or a ``type`` other than ``application/dicom``.
        BadRequest: no boundary, no part, or a body without its closing delimiter.
    """
    header = Message()
    header["content-type"] = content_type or ""
    if header.get_content_type() != "multipart/related":
        raise UnsupportedMediaType('STOW-RS takes multipart/related; type="application/dicom"')
    kind = str(header.get_param("type") or "application/dicom").lower()
    if kind != "application/dicom":
        raise UnsupportedMediaType(f"STOW-RS parts of type {kind[:64]!r} are not accepted: send application/dicom")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise BadRequest("the multipart/related body has no boundary parameter")
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise BadRequest("the multipart/related body has no part or no closing delimiter (truncated?)")
    parts = []
    for chunk in chunks[1:-1]:
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise BadRequest("a multipart/related part has no header/body separator")
        part = Message()
        for line in head.decode("latin-1").split("\r\n")[1:]:  # [0]: the rest of the delimiter line
            name, colon, value = line.partition(":")
            if colon:
                part[name.strip()] = value.strip()
        parts.append((part.get_content_type() if part.get("content-type") else "application/dicom", data))
    return parts


def _peek(data: bytes) -> tuple[str | None, str | None]:
    """(SOP Class UID, SOP Instance UID) of a part, well-formed ones only, for the response; never raises."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return valid_uid(ds.get("SOPClassUID")), valid_uid(ds.get("SOPInstanceUID"))
    except Exception:  # a part that is not DICOM at all: its failure carries no UIDs
        return None, None


def _ref(sop_class: str | None, sop_instance: str | None, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


async def _stow_one(rt: Runtime, media_type: str, data: bytes, gate: asyncio.Semaphore) -> tuple[Any, ...]:
    """Classify one part: (answer or None, its SR or None, error or None, request id, seconds)."""
    start, request_id = time.perf_counter(), new_request_id()
    try:
        if media_type != "application/dicom":
            raise UnsupportedMediaType(f"a STOW-RS part of type {media_type[:64]!r}: send application/dicom")
        async with gate:
            answer = await classify_instance(rt, data, request_id)
        sr = await run_in_threadpool(make_sr, answer, data) if rt.settings.dicomweb_push_sr else None
        return answer, sr, None, request_id, time.perf_counter() - start
    except Exception as exc:
        count_refusal(exc)
        if not isinstance(exc, ServiceError):  # a fault of ours, answered 0110: logged once, by type only
            log.error("STOW-RS instance failed", extra={"error": type(exc).__name__})
        return None, None, exc, request_id, time.perf_counter() - start


@router.post(
    STOW_ROUTE,
    dependencies=[Depends(require_key)],
    responses={
        200: {"content": {DICOM_JSON: {}}},
        202: {"content": {DICOM_JSON: {}}},
        409: {"content": {DICOM_JSON: {}}},
    },
)
async def stow(request: Request, rt: RuntimeDep, origin: OriginDep) -> Response:
    """STOW-RS: classify every ``application/dicom`` part; with DICOMWEB_PUSH_SR, store the SRs at the origin.

    Answers the STOW-RS response dataset: 200 all classified, 202 some, 409 none.
    """
    body = await read_body(request, rt.settings.max_upload_bytes)  # the service's upload rules
    parts = split_related(request.headers.get("content-type"), body)
    # Enough at once to fill batches, never more than the decode pool admits (the rest would be A700).
    gate = asyncio.Semaphore(max(1, min(2 * rt.settings.max_batch_size, rt.settings.decode_queue_size + 1)))
    results = await asyncio.gather(*(_stow_one(rt, kind, data, gate) for kind, data in parts))
    srs = [r[1] for r in results if r[1] is not None]
    push_error: Exception | None = None
    if srs and origin is not None:
        try:
            await run_in_threadpool(origin.store, srs)
        except ResultNotDelivered as exc:
            push_error = exc
        outcome = metrics.SrOutcome.FAILED if push_error else metrics.SrOutcome.STORED
        metrics.SR_DELIVERIES_TOTAL.labels(entry=metrics.PacsEntry.STOW_RS.value, outcome=outcome.value).inc(len(srs))
    referenced, failed = [], []
    for (_, data), (answer, sr, error, request_id, seconds) in zip(parts, results, strict=True):
        if error is None and sr is not None and push_error is not None:
            error = push_error
        sr_state = "none" if sr is None else ("failed" if push_error else "stored")
        if error is None:
            referenced.append(_ref(answer.dicom.sop_class_uid, answer.dicom.identifiers.get("SOPInstanceUID")))
            identifiers = answer.dicom.identifiers
        else:
            sop_class, sop_instance = _peek(data)
            failed.append(_ref(sop_class, sop_instance, failure_status(error)))
            identifiers = {"SOPInstanceUID": sop_instance} if sop_instance else {}
        dicom_status = "0x0000" if error is None else f"0x{failure_status(error):04X}"
        audit_instance(
            rt, entry=metrics.PacsEntry.STOW_RS, request_id=request_id, data=data, error=error, latency_s=seconds,
            identifiers=identifiers, channel={"status": dicom_status, "sr": sr_state, "request": request.state.request_id},
            answer=answer, key_id=getattr(request.state, "key_id", None),
        )  # fmt: skip
    dataset: dict[str, Any] = {}
    if referenced:
        dataset["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        dataset["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if referenced else 409)
    return JSONResponse(dataset, status_code=status, media_type=DICOM_JSON)


# --- WADO-RS from the origin -------------------------------------------------------------------------
class DicomwebClassifyRequest(BaseModel):
    study_instance_uid: str = Field(max_length=64, pattern=UID_PATTERN)
    series_instance_uid: str = Field(max_length=64, pattern=UID_PATTERN)
    sop_instance_uid: str = Field(max_length=64, pattern=UID_PATTERN)
    store_sr: bool = Field(False, description="Store the result as a DICOM SR at the origin (STOW-RS) first")


class SrRef(BaseModel):
    sop_instance_uid: str
    series_instance_uid: str
    stored: bool


class DicomwebClassifyResponse(ClassifyResponse):
    sr: SrRef | None = Field(None, description="The SR stored at the origin (store_sr)")


@router.post(
    WADO_CLASSIFY_ROUTE,
    response_model=DicomwebClassifyResponse,
    dependencies=[Depends(require_key)],
    responses={404: {"description": "Not at the origin"}, 502: {"description": "The origin failed"}},
)
async def classify_from_origin(
    request: Request, rt: RuntimeDep, origin: OriginDep, body: DicomwebClassifyRequest
) -> Response:
    """Fetch one instance from the PACS by WADO-RS, classify it, optionally store the SR back by STOW-RS.

    Answers JSON like ``/v1/classify`` (with ``sr`` when stored), or by ``Accept`` FHIR or the SR itself.
    """
    if origin is None:
        raise NotConfigured("this server has no DICOMweb origin to fetch from (LESIONSERVE_DICOMWEB_ORIGIN)")
    render = pick_renderer(request.headers.get("accept"))
    start, request_id = time.perf_counter(), request.state.request_id
    data: bytes | None = None
    error: BaseException | None = None
    sr_state, identifiers = "none", {"SOPInstanceUID": body.sop_instance_uid}
    sr: Dataset | None = None
    sr_ref: SrRef | None = None
    answer: ClassifyResponse | None = None
    try:
        data = await run_in_threadpool(
            origin.fetch, body.study_instance_uid, body.series_instance_uid, body.sop_instance_uid
        )
        answer = await classify_instance(rt, data, request_id)
        if answer.dicom is not None:
            identifiers = dict(answer.dicom.identifiers)
        if body.store_sr:
            sr_state = "failed"
            sr = await run_in_threadpool(make_sr, answer, data)
            await run_in_threadpool(origin.store, [sr])
            sr_state = "stored"
            sr_ref = SrRef(sop_instance_uid=sr.SOPInstanceUID, series_instance_uid=sr.SeriesInstanceUID, stored=True)
    except Exception as exc:
        error = exc
        raise
    finally:
        if sr_state != "none":
            outcome = metrics.SrOutcome.STORED if sr_state == "stored" else metrics.SrOutcome.FAILED
            metrics.SR_DELIVERIES_TOTAL.labels(entry=metrics.PacsEntry.WADO_RS.value, outcome=outcome.value).inc()
        status = "ok" if error is None else f"0x{failure_status(error):04X}"
        audit_instance(
            rt, entry=metrics.PacsEntry.WADO_RS, request_id=request_id, data=data, error=error,
            latency_s=time.perf_counter() - start, identifiers=identifiers, channel={"status": status, "sr": sr_state},
            answer=answer, key_id=getattr(request.state, "key_id", None),
        )  # fmt: skip
    if render is render_dicom_sr:
        content = sr_bytes(sr) if sr is not None else await run_in_threadpool(_sr_file, answer, data)
        return Response(content, media_type=DICOM)
    if render is render_json:
        full = DicomwebClassifyResponse(**answer.model_dump(), sr=sr_ref)
        return JSONResponse(full.model_dump(mode="json", exclude_none=True))
    return render(answer)  # FHIR, or any other registered renderer


def _sr_file(answer: ClassifyResponse, data: bytes) -> bytes:
    return sr_bytes(make_sr(answer, data))
