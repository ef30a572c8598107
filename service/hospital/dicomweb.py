"""DICOMweb entries: STOW-RS in (``POST /dicomweb/studies``), WADO-RS from the PACS (``POST /v1/classify/dicomweb``).

- ``POST /dicomweb/studies`` takes ``multipart/related; type="application/dicom"`` (PS3.18 10.5), classifies
  every part through the service's one batcher (parts run concurrently, so they share batches), and answers
  the STOW-RS response dataset (``application/dicom+json``): Referenced SOP Sequence for the classified
  instances, Failed SOP Sequence with a Failure Reason for the others; 200 all, 202 some, 409 none. With
  ``LESIONSERVE_DICOMWEB_PUSH_SR`` each SR is committed to the outbox (:mod:`service.hospital.outbox`) before the
  answer, and delivered to the origin by STOW-RS with retries; an outbox full or not writable answers 503.
- ``POST /v1/classify/dicomweb`` (JSON: Study/Series/SOP Instance UIDs, ``store_sr``) fetches the instance
  from the origin by WADO-RS in its stored transfer syntax, classifies it, and answers like ``/v1/classify``
  (JSON, FHIR or the SR by ``Accept``); with ``store_sr`` the SR is stored back at the origin first.

Mounted only when ``LESIONSERVE_DICOMWEB_ENABLED``; the WADO-RS route also needs ``LESIONSERVE_DICOMWEB_ORIGIN``.
Both need an API key when keys are on. One audit line per instance (:mod:`service.hospital.pacs`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from email.message import Message
from typing import Annotated, Any, TypeVar

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
    DeadlineExceeded,
    InstanceNotFound,
    NotConfigured,
    OriginFailed,
    OutboxFull,
    OutboxUnavailable,
    Overloaded,
    PayloadTooLarge,
    ResultNotDelivered,
    ServiceError,
    UnsupportedMediaType,
)
from service.hospital.dicom import check_meta
from service.hospital.outbox import Letter
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
T = TypeVar("T")
_READ = 64 * 1024  # read1's most per call: a trickling origin is checked against the deadline per arrival


# --- the origin (the PACS's DICOMweb service) ------------------------------------------------------
class Origin:
    """WADO-RS and STOW-RS against ``LESIONSERVE_DICOMWEB_ORIGIN``, in the origin's own bounded pool.

    Why its own pool (issue 28, finding 3): a fetch blocks a thread for as long as the PACS takes. In anyio's
    shared worker pool, 40 fetches from a PACS that was down held every thread, and everything else that
    needed one (the routes' dependencies, file reads) waited behind them. Here at most
    ``DICOMWEB_FETCH_SLOTS`` calls run at once; one more is 503 at once; each ends by the request deadline.
    """

    def __init__(self, settings: Settings) -> None:
        session = requests.Session()
        if settings.dicomweb_origin_auth is not None:
            user, _, password = settings.dicomweb_origin_auth.get_secret_value().partition(":")
            session = create_session_from_user_pass(user, password)
        self.session, self.base = session, settings.dicomweb_origin.rstrip("/")
        self.client = DICOMwebClient(url=self.base, session=session, timeout=settings.dimse_timeout_s)
        self.max_bytes = settings.max_upload_bytes
        self.request_timeout_s = settings.request_timeout_s
        self._slots = threading.BoundedSemaphore(settings.dicomweb_fetch_slots)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            settings.dicomweb_fetch_slots, thread_name_prefix="lesionserve-origin"
        )

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args, deadline)`` in the origin's pool, within the request deadline.

        Raises:
            Overloaded: every slot is taken (a slow or dead PACS): 503, the caller retries.
            DeadlineExceeded: no answer by the deadline (the thread ends at it too: ``fn`` checks it).
        """
        if not self._slots.acquire(blocking=False):
            raise Overloaded("every DICOMweb origin slot is busy (the PACS is slow or down); retry later")
        deadline = time.monotonic() + self.request_timeout_s

        def run() -> T:
            try:
                return fn(*args, deadline)
            finally:
                self._slots.release()  # when the thread is free, not when the request gave up

        future = self._pool.submit(run)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.request_timeout_s)
        except TimeoutError:
            raise DeadlineExceeded("the DICOMweb origin did not answer within the request deadline") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def fetch(self, study: str, series: str, instance: str, deadline: float) -> bytes:
        """The instance as a Part-10 object in its stored transfer syntax (no transcoding at the origin).

        Streamed with a byte cap and checked from its file meta before anything parses it: a Deflated object
        (522 KB that inflate to 2 GB) is refused by its transfer syntax, a large one after
        ``MAX_UPLOAD_BYTES``, not after the whole download (issue 28, finding 2).

        Raises:
            InstanceNotFound: the origin answers 404.
            OriginFailed: unreachable, another error, or an object other than the one asked for.
            PayloadTooLarge: over ``LESIONSERVE_MAX_UPLOAD_BYTES``.
            UnsupportedMediaType: a transfer syntax the reader does not take (Deflated, ...).
            DeadlineExceeded: the origin is still sending at the deadline.
        """
        url = f"{self.base}/studies/{study}/series/{series}/instances/{instance}"
        headers = {
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
            "Accept-Encoding": "identity",  # an HTTP-compressed answer would be a bomb of its own
        }
        remaining = max(0.01, deadline - time.monotonic())
        try:
            with self.session.get(url, headers=headers, stream=True, timeout=(min(5.0, remaining), remaining)) as r:
                if r.status_code == 404:
                    raise InstanceNotFound("the DICOMweb origin has no instance with these UIDs")
                if r.status_code >= 400:
                    raise OriginFailed(f"the DICOMweb origin answered HTTP {r.status_code} to WADO-RS")
                if r.headers.get("content-encoding", "identity").lower() != "identity":
                    raise OriginFailed("the DICOMweb origin answered WADO-RS with a content encoding")
                declared = r.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes + 4096:  # 4 KiB: multipart framing
                    raise PayloadTooLarge(f"the instance is {declared} bytes; the limit is {self.max_bytes}")
                body = self._read_capped(r, deadline)
                content_type = r.headers.get("content-type")
        except ServiceError:
            raise
        except requests.RequestException as exc:
            raise OriginFailed(f"the DICOMweb origin could not be reached ({type(exc).__name__})") from None
        try:
            parts = split_related(content_type, body)
        except ServiceError:
            raise OriginFailed("the DICOMweb origin's WADO-RS answer is not multipart/related DICOM") from None
        if len(parts) != 1:
            raise OriginFailed(f"the DICOMweb origin returned {len(parts)} instances for one")
        data = parts[0][1]
        meta = check_meta(data)  # file meta only: refuses Deflated before pydicom would inflate it
        if str(meta.get("MediaStorageSOPInstanceUID", "")).strip() != instance:
            raise OriginFailed("the DICOMweb origin returned another instance than the one asked for")
        return data

    def _read_capped(self, response: requests.Response, deadline: float) -> bytes:
        buf, raw = bytearray(), response.raw
        while True:
            if time.monotonic() > deadline:
                raise DeadlineExceeded("the DICOMweb origin was still sending at the request deadline")
            chunk = raw.read1(_READ, decode_content=False)
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > self.max_bytes + 4096:
                raise PayloadTooLarge(f"the instance is over the limit of {self.max_bytes} bytes")

    def store(self, srs: Sequence[Dataset], deadline: float | None = None) -> None:
        """STOW-RS the SRs (``deadline``: unused, the client's timeout bounds it; :meth:`call` passes one).

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


async def get_origin(request: Request) -> Origin | None:
    origin: Origin | None = getattr(request.app.state, "dicomweb_origin", None)
    if origin is None and request.app.state.runtime.settings.dicomweb_origin.strip():
        origin = request.app.state.dicomweb_origin = Origin(request.app.state.runtime.settings)
    return origin


OriginDep = Annotated[Origin | None, Depends(get_origin)]


# --- STOW-RS in --------------------------------------------------------------------------------------
def split_related(content_type: str | None, body: bytes, max_parts: int | None = None) -> list[tuple[str, bytes]]:
    """The parts of a ``multipart/related`` body: (media type, bytes) each.

    Raises:
        UnsupportedMediaType: not ``multipart/related``, or a ``type`` other than ``application/dicom``.
        BadRequest: no boundary, no part, or a body without its closing delimiter.
        PayloadTooLarge: more than ``max_parts`` parts (counted before any part is parsed).
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
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    count = (b"\r\n" + body).count(delimiter) - 1  # the closing delimiter is not a part
    if max_parts is not None and count > max_parts:  # 100,000 one-byte parts stalled the loop 16 s (issue 28)
        raise PayloadTooLarge(f"the STOW-RS request has {count} parts; the limit is {max_parts} per request")
    chunks = (b"\r\n" + body).split(delimiter)
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
        503: {"description": "Overloaded, or the SR outbox full or not writable (Retry-After)"},
    },
)
async def stow(request: Request, rt: RuntimeDep) -> Response:
    """STOW-RS: classify every ``application/dicom`` part; with DICOMWEB_PUSH_SR, its SR goes to the outbox.

    Answers the STOW-RS response dataset: 200 all classified, 202 some, 409 none; 503 when the outbox is full
    or cannot be written (nothing of the request kept).
    """
    with rt.hold():  # the drain waits for the outbox commit and the audit lines, not the classifications only
        return await _stow(request, rt)


async def _stow(request: Request, rt: Runtime) -> Response:
    body = await read_body(request, rt.settings.max_upload_bytes)  # the service's upload rules
    # Parsed off the event loop: per-part work is bounded by STOW_MAX_PARTS, but still not the loop's to do.
    parts = await run_in_threadpool(
        split_related, request.headers.get("content-type"), body, rt.settings.stow_max_parts
    )
    outbox = request.app.state.outbox if rt.settings.dicomweb_push_sr else None
    if outbox is not None:  # a full outbox answers 503 before any work, not after classifying every part
        await run_in_threadpool(outbox.check_room, len(parts))
    # Enough at once to fill batches, never more than the decode pool admits (the rest would be A700).
    gate = asyncio.Semaphore(max(1, min(2 * rt.settings.max_batch_size, rt.settings.decode_queue_size + 1)))
    results = await asyncio.gather(*(_stow_one(rt, kind, data, gate) for kind, data in parts))
    letters = [
        Letter(str(sr.SOPInstanceUID), metrics.PacsEntry.STOW_RS.value, rt.settings.dicomweb_origin, sr_bytes(sr), rid)
        for _, sr, _, rid, _ in results
        if sr is not None
    ]
    push_error: OutboxFull | OutboxUnavailable | None = None
    if letters and outbox is not None:
        try:  # all of the request's SRs in one transaction: each instance is either answered with its SR kept or 503
            await run_in_threadpool(outbox.enqueue, letters)
        except (OutboxFull, OutboxUnavailable) as exc:
            push_error = exc
    referenced, failed = [], []
    for (_, data), (answer, sr, error, request_id, seconds) in zip(parts, results, strict=True):
        if error is None and sr is not None and push_error is not None:
            error = push_error
        sr_state = "none" if sr is None else ("failed" if push_error else "queued")
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
    request.state.instances_audited = True
    if push_error is not None:  # nothing of this request was kept: 503 (Retry-After), the sender resends it all
        raise push_error
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
    with rt.hold():  # the drain waits for the SR's STOW-RS and the audit line too
        return await _classify_from_origin(request, rt, origin, body)


async def _classify_from_origin(
    request: Request, rt: Runtime, origin: Origin | None, body: DicomwebClassifyRequest
) -> Response:
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
        data = await origin.call(origin.fetch, body.study_instance_uid, body.series_instance_uid, body.sop_instance_uid)
        answer = await classify_instance(rt, data, request_id)
        if answer.dicom is not None:
            identifiers = dict(answer.dicom.identifiers)
        if body.store_sr:
            sr_state = "failed"
            sr = await run_in_threadpool(make_sr, answer, data)
            await origin.call(origin.store, [sr])
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
        request.state.instances_audited = True
    if render is render_dicom_sr:
        content = sr_bytes(sr) if sr is not None else await run_in_threadpool(_sr_file, answer, data)
        return Response(content, media_type=DICOM)
    if render is render_json:
        full = DicomwebClassifyResponse(**answer.model_dump(), sr=sr_ref)
        return JSONResponse(full.model_dump(mode="json", exclude_none=True))
    return render(answer)  # FHIR, or any other registered renderer


def _sr_file(answer: ClassifyResponse, data: bytes) -> bytes:
    return sr_bytes(make_sr(answer, data))
