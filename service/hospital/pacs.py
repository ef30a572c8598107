"""What every PACS entry (DIMSE C-STORE, STOW-RS, WADO-RS) does with one DICOM instance.

One path for all of them, and the same one as ``POST /v1/classify``: admission (:meth:`Runtime.work`),
the decode pool, the batcher, the OOD policy, the JSON answer; then the SR (:func:`service.hospital.sr.make_sr`).
This module is also the one place where a refusal becomes a DICOM status: the same codes serve the
C-STORE response (PS3.4 B.2.3) and the STOW-RS Failure Reason (PS3.18 table 10.5.3-1).

Every instance gets one audit line (:class:`service.audit.AuditLog`): hashed UIDs, the entry, the
calling AE title, the status, whether the SR went back. No patient attribute is logged anywhere here.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping

from pydicom.uid import UID

from service import metrics
from service.errors import (
    DeadlineExceeded,
    InvalidImage,
    ModelNotReady,
    OutboxFull,
    OutboxUnavailable,
    OutOfDistribution,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    ShuttingDown,
    UnsupportedMediaType,
    UnsupportedSopClass,
)
from service.explain import enforce, ood_check
from service.hospital.dicom import decode_dicom
from service.routes import answer_summary, build_answer, count_answer
from service.runtime import Runtime
from service.schemas import ClassifyResponse

DICOM_CONTENT_TYPE = "application/dicom"

# DICOM statuses (PS3.4 annex C and B.2.3; PS3.18 STOW-RS Failure Reason uses the same values).
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

_RETRY_LATER = (Overloaded, ModelNotReady, ShuttingDown, DeadlineExceeded, OutboxFull, OutboxUnavailable)
_SENDERS_OBJECT = (InvalidImage, UnsupportedMediaType, PayloadTooLarge, OutOfDistribution)


def failure_status(exc: BaseException) -> int:
    """The DICOM status for a failed instance.

    Out of Resources (A700) tells the sender to retry later (queue full, warming up, draining, deadline, the SR
    outbox full or not writable);
    SOP Class not supported (0122) a SOP class other than the three accepted ones (a CT, an SR, ...);
    Cannot Understand (C000) the object's fault otherwise (undecodable, not colour, too large, unlike the
    training data under ``OOD_POLICY=reject``); Processing Failure (0110) is ours (inference, or the SR).
    """
    if isinstance(exc, _RETRY_LATER):
        return OUT_OF_RESOURCES
    if isinstance(exc, UnsupportedSopClass):
        return SOP_CLASS_NOT_SUPPORTED
    if isinstance(exc, _SENDERS_OBJECT):
        return CANNOT_UNDERSTAND
    return PROCESSING_FAILURE


def failure_comment(exc: BaseException) -> str:
    """A short, PHI-free reason (DIMSE Error Comment is LO: 64 characters at most).

    The detail texts of the DICOM reader start with the SOP class name ("DICOM VL Photographic Image
    Storage with ..."), which the sender knows: it is dropped so that the reason fits.
    """
    text = exc.detail if isinstance(exc, ServiceError) else "internal error"
    text = re.sub(r"^DICOM [A-Za-z ]*? Storage (with )?", "", text)
    return text[:64]


def outcome_of(exc: BaseException | None) -> metrics.InstanceOutcome:
    if exc is None:
        return metrics.InstanceOutcome.CLASSIFIED
    return metrics.InstanceOutcome.REFUSED if isinstance(exc, _SENDERS_OBJECT) else metrics.InstanceOutcome.FAILED


def new_request_id() -> str:
    return str(uuid.uuid4())


async def classify_instance(rt: Runtime, data: bytes, request_id: str) -> ClassifyResponse:
    """Classify one Part-10 DICOM object through the service's one batcher; the JSON answer.

    Raises:
        ServiceError: refused or failed (see :func:`failure_status`).
    """
    start = time.perf_counter()
    async with rt.work() as deadline:
        decoded = await rt.decode(decode_dicom, data, deadline)
        prediction = await rt.predict(decoded, deadline)
        ood = ood_check(rt.bound(prediction).meta, prediction.extras)  # the model that made it (hot swap)
        enforce(ood, rt.settings.ood_policy)
    answer = build_answer(rt, request_id, decoded, prediction, time.perf_counter() - start, ood)
    count_answer(answer)
    return answer


def count_refusal(exc: BaseException) -> None:
    reason = getattr(exc, "reason", None)
    if reason is not None:
        metrics.REJECTIONS_TOTAL.labels(reason=reason).inc()


def audit_instance(
    rt: Runtime,
    *,
    entry: metrics.PacsEntry,
    request_id: str,
    data: bytes | None,
    error: BaseException | None,
    latency_s: float,
    identifiers: Mapping[str, str] | None,
    channel: Mapping[str, str],
    answer: ClassifyResponse | None = None,
    key_id: str | None = None,
) -> None:
    """One audit line and the instance counter for one received instance.

    The model named is the answer's (the one that made it, across a hot swap); ``key_id`` is the API key
    id of an HTTP entry (DIMSE has none: the calling AE title is in ``channel``).
    """
    metrics.DICOM_INSTANCES_TOTAL.labels(entry=entry.value, outcome=outcome_of(error).value).inc()
    if rt.audit is None:
        return
    status = 200 if error is None else (error.status if isinstance(error, ServiceError) else 500)
    problem = error.type_uri() if isinstance(error, ServiceError) else ("internal" if error else None)
    model = answer.model.model_dump() if answer is not None and error is None else None
    rt.audit.record(
        request_id=request_id, key_id=key_id, model=model, body=data,
        content_type=DICOM_CONTENT_TYPE, status=status, problem_type=problem, latency_ms=latency_s * 1000,
        identifiers=identifiers, channel={"entry": entry.value, **channel},
        answer=answer_summary(answer) if answer is not None and error is None else None,
    )  # fmt: skip


def valid_uid(value: object) -> str | None:
    """``value`` as a UID string when well-formed (a UID from the wire may be anything)."""
    text = str(value or "").strip()
    return text if text and UID(text).is_valid else None
