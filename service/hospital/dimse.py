"""DICOM DIMSE entry: a Storage SCP (pynetdicom) in the service process, and the SR sent back by C-STORE.

Why in-process (started from the app's lifespan when ``LESIONSERVE_DIMSE_ENABLED``), not a separate
``python -m service.dicom_node``: DESIGN.md keeps one batcher and one model session per process
whatever the entry. A second process would load a second session (its memory, its warm-up) and batch
apart from the REST traffic; here a C-STORE waits in the same queue as an HTTP upload, under the same
admission, deadline, drain and metrics. pynetdicom runs each association in its own thread; the
handler hands the instance to the event loop (:func:`asyncio.run_coroutine_threadsafe`) and blocks
that association's thread only, so concurrent associations share batches.

Negotiation: Dermoscopic Photography, VL Photographic and Secondary Capture Image Storage with the
transfer syntaxes the reader decodes, Verification (C-ECHO), and every other storage SOP class only so
that it can be refused per instance. Refusals:

- a calling AE title not in ``DIMSE_ALLOWED_AETS``: A-ASSOCIATE-RJ, rejected-permanent, service user,
  "calling AE title not recognised" (a wrong called AE title: "called AE title not recognised");
- another SOP class (CT, MR, ...): C-STORE status 0122 "Refused: SOP Class not supported", with an
  Error Comment naming it, and an audit line (see the comment in :class:`StorageScp`);
- an accepted SOP class in a transfer syntax the reader cannot decode: that presentation context is
  refused at negotiation ("transfer syntaxes not supported");
- an instance that fails inside an accepted context: a C-STORE failure status with an Error Comment
  (:func:`service.hospital.pacs.failure_status`).

The C-STORE response is sent after the SR has been stored at ``DIMSE_DESTINATION`` (over one association
per incoming association): success means
the result is in the PACS; if it could not be delivered the sender gets Processing Failure (0110) and
still holds the image to resend. Each instance and each refused association or context gets an audit
line; metrics count associations, refused contexts, instances and SR deliveries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, Verification  # type: ignore[attr-defined]

from service import metrics
from service.config import Settings, parse_destination
from service.errors import DeadlineExceeded, ResultNotDelivered, UnsupportedSopClass
from service.hospital.dicom import ACCEPTED_SOP_CLASSES, SUPPORTED_TRANSFER_SYNTAXES
from service.hospital.pacs import (
    PROCESSING_FAILURE,
    SUCCESS,
    audit_instance,
    classify_instance,
    count_refusal,
    failure_comment,
    failure_status,
    new_request_id,
    valid_uid,
)
from service.hospital.sr import make_sr
from service.runtime import Runtime
from service.schemas import ClassifyResponse

log = logging.getLogger(__name__)

ENTRY = metrics.PacsEntry.DIMSE
# Storage statuses that mean "stored" (PS3.4 B.2.3): success, and the three warnings (coercion, elements
# discarded, SOP class mismatch) under which the object was still stored.
_STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_REJECTED = "https://lesionserve.dev/problems/dimse-association-rejected"
_CONTEXT_REFUSED = "https://lesionserve.dev/problems/dimse-context-refused"
# Transfer syntaxes offered for the SR back: uncompressed, explicit first (every PACS takes it).
_SR_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class SrSender:
    """Sends SRs to one destination AE over associations it opens (C-STORE, status checked)."""

    def __init__(self, own_ae_title: str, destination: str, timeout_s: float) -> None:
        self.ae_title, self.host, self.port = parse_destination(destination)
        self._ae = AE(ae_title=own_ae_title)
        self._ae.add_requested_context(ComprehensiveSRStorage, _SR_SYNTAXES)
        self._ae.acse_timeout = self._ae.dimse_timeout = self._ae.network_timeout = timeout_s

    def connect(self) -> Any:
        """An established association with the destination.

        Raises:
            ResultNotDelivered: refused, or no answer.
        """
        assoc = self._ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise ResultNotDelivered(f"the SR destination {self.ae_title} refused or did not answer the association")
        return assoc

    def send_over(self, assoc: Any, sr: Dataset) -> None:
        """C-STORE ``sr`` over ``assoc``.

        Raises:
            ResultNotDelivered: the status is not a stored one, or none came (the association broke).
        """
        status = assoc.send_c_store(sr)
        code = int(status.Status) if status is not None and "Status" in status else None
        if code not in _STORED:
            shown = f"0x{code:04X}" if code is not None else "no answer"
            raise ResultNotDelivered(f"the SR destination {self.ae_title} answered {shown} to the SR's C-STORE")


class StorageScp:
    """The Storage SCP of one service process.

    Args:
        settings: the service settings (``dimse_*``).
        runtime: the process's runtime (batcher, decode pool, audit).
        loop: the event loop that owns the runtime; C-STORE handlers submit work to it.
    """

    def __init__(self, settings: Settings, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
        self.settings, self.runtime, self.loop = settings, runtime, loop
        self.allowed = frozenset(settings.dimse_allowed_ae_list)
        self.sender = SrSender(settings.dimse_ae_title, settings.dimse_destination, settings.dimse_timeout_s)
        ae = AE(ae_title=settings.dimse_ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = sorted(self.allowed)
        ae.maximum_associations = settings.dimse_max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dimse_timeout_s
        # pynetdicom takes, per proposed context, the first of these the sender also proposed: the
        # compressed ones first, so an image arrives as stored (no transcoding by the sender).
        syntaxes = sorted(SUPPORTED_TRANSFER_SYNTAXES, key=lambda ts: (not UID(ts).is_compressed, str(ts)))
        for sop_class in sorted(ACCEPTED_SOP_CLASSES):
            ae.add_supported_context(sop_class, syntaxes)
        # Every other storage SOP class is accepted at negotiation, in any syntax, only to be answered per
        # instance with Refused: SOP Class not supported (0122) and an audit line. PACS such as Orthanc
        # propose all their storage classes on every association: refusing them at negotiation would say
        # nothing when a routing rule sends a CT here (the sender logs "no presentation context"), and
        # nothing would reach the audit trail.
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax not in ACCEPTED_SOP_CLASSES:
                ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self._ae = ae
        self._server: Any = None
        self._open: set[int] = set()
        # One association to the destination per incoming association, opened at its first SR and released
        # when the incoming one closes: a study sent over one association gets its SRs over one too (an
        # association per SR cost more than the C-STORE itself). Used only by the incoming one's thread.
        self._outgoing: dict[int, Any] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Listen on ``dimse_host:dimse_port`` (raises OSError when the port is taken)."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        address = (self.settings.dimse_host, self.settings.dimse_port)
        self._server = self._ae.start_server(address, block=False, evt_handlers=handlers)
        log.info(
            "DICOM Storage SCP listening",
            extra={"ae_title": self.settings.dimse_ae_title, "port": self.settings.dimse_port},
        )

    @property
    def port(self) -> int:
        """The port listened on."""
        return int(self._server.server_address[1]) if self._server is not None else self.settings.dimse_port

    def stop(self) -> None:
        """Stop listening and abort associations still open (after the drain: no work is left in them)."""
        if self._server is None:
            return
        for assoc in list(self._server.active_associations):
            assoc.abort()
        for out in list(self._outgoing.values()):
            if out.is_established:
                out.release()
        self._outgoing.clear()
        self._server.shutdown()
        self._server = None

    # --- association events ------------------------------------------------------------------------
    def _on_accepted(self, event: Any) -> None:
        metrics.DIMSE_ASSOCIATIONS_TOTAL.labels(outcome=metrics.AssociationOutcome.ACCEPTED.value).inc()
        with self._lock:
            self._open.add(id(event.assoc))
        metrics.DIMSE_ACTIVE_ASSOCIATIONS.inc()
        calling = _ae_text(event.assoc.requestor.ae_title)
        accepted = {str(c.abstract_syntax) for c in event.assoc.accepted_contexts}
        refused: set[str] = set()
        for context in event.assoc.rejected_contexts:  # a sender proposes one context per transfer syntax
            metrics.DIMSE_CONTEXTS_REFUSED_TOTAL.inc()
            if str(context.abstract_syntax) not in accepted:  # no syntax at all for this SOP class
                sop = UID(str(context.abstract_syntax))
                refused.add(sop.name if sop.is_valid else "a malformed UID")
        for name in sorted(refused):  # one line per SOP class left without a context, not per context
            log.warning("presentation context refused", extra={"calling_ae": calling, "sop_class": name})
            self._audit_refusal(_CONTEXT_REFUSED, 415, calling, {"refused_sop_class": name[:64]})

    def _on_rejected(self, event: Any) -> None:
        metrics.DIMSE_ASSOCIATIONS_TOTAL.labels(outcome=metrics.AssociationOutcome.REJECTED.value).inc()
        calling = _ae_text(event.assoc.requestor.ae_title)
        called = _ae_text(event.assoc.acceptor.ae_title)
        if calling not in self.allowed:
            reason = "calling AE title not recognised"
        elif called != self.settings.dimse_ae_title:
            reason = "called AE title not recognised"
        else:
            reason = "too many associations or no acceptable context"
        log.warning("association rejected", extra={"calling_ae": calling, "reason": reason})
        self._audit_refusal(_REJECTED, 403, calling, {"reason": reason})

    def _on_closed(self, event: Any) -> None:
        self._release_outgoing(event.assoc)
        with self._lock:
            was_open = id(event.assoc) in self._open
            self._open.discard(id(event.assoc))
        if was_open:
            metrics.DIMSE_ACTIVE_ASSOCIATIONS.dec()
            if event.assoc.is_aborted:
                metrics.DIMSE_ASSOCIATIONS_TOTAL.labels(outcome=metrics.AssociationOutcome.ABORTED.value).inc()

    def _audit_refusal(self, problem: str, status: int, calling: str, extra: dict[str, str]) -> None:
        if self.runtime.audit is None:
            return
        self.runtime.audit.record(
            request_id=new_request_id(), key_id=None, model=None, body=None, content_type=None, status=status,
            problem_type=problem, latency_ms=0.0, channel={"entry": ENTRY.value, "calling_ae": calling, **extra},
        )  # fmt: skip

    # --- C-STORE -----------------------------------------------------------------------------------
    def _on_store(self, event: Any) -> int | Dataset:
        """Classify the instance, store its SR at the destination, then answer the C-STORE."""
        start, request_id = time.perf_counter(), new_request_id()
        calling = _ae_text(event.assoc.requestor.ae_title)
        sop_uid = valid_uid(event.request.AffectedSOPInstanceUID)
        identifiers: dict[str, str] = {"SOPInstanceUID": sop_uid} if sop_uid else {}
        data: bytes | None = None
        error: BaseException | None = None
        answer: ClassifyResponse | None = None
        status, sr_state = SUCCESS, "none"
        try:
            data = event.encoded_dataset(include_meta=True)
            sop_class = UID(str(event.request.AffectedSOPClassUID))
            if sop_class not in ACCEPTED_SOP_CLASSES:  # answered before any parsing
                raise UnsupportedSopClass(
                    f"{sop_class.name if sop_class.is_valid else 'this SOP class'} is not accepted"
                )
            answer = self._classify(data, request_id)
            if answer.dicom is not None:
                identifiers = dict(answer.dicom.identifiers)
            sr_state = "failed"
            self._send_sr(event.assoc, make_sr(answer, data))
            sr_state = "stored"
            metrics.SR_DELIVERIES_TOTAL.labels(entry=ENTRY.value, outcome=metrics.SrOutcome.STORED.value).inc()
            return SUCCESS
        except Exception as exc:
            error = exc
            if sr_state == "failed":
                metrics.SR_DELIVERIES_TOTAL.labels(entry=ENTRY.value, outcome=metrics.SrOutcome.FAILED.value).inc()
            status = failure_status(exc)
            return self._failure(exc, status)
        finally:
            audit_instance(
                self.runtime, entry=ENTRY, request_id=request_id, data=data, error=error,
                latency_s=time.perf_counter() - start, identifiers=identifiers, answer=answer,
                channel={"calling_ae": calling, "dimse_status": f"0x{status:04X}", "sr": sr_state},
            )  # fmt: skip

    def _send_sr(self, incoming: Any, sr: Dataset) -> None:
        """The SR over this incoming association's outgoing one (reopened once if the destination closed it)."""
        out = self._outgoing.get(id(incoming))
        if out is None or not out.is_established:  # first SR, or the destination released/aborted it meanwhile
            out = self._outgoing[id(incoming)] = self.sender.connect()
        try:
            self.sender.send_over(out, sr)
        except ResultNotDelivered:
            if out.is_established:  # the destination answered: its status stands
                raise
            # the association broke under the C-STORE (idle timeout at the PACS): once more on a new one
            out = self._outgoing[id(incoming)] = self.sender.connect()
            self.sender.send_over(out, sr)

    def _release_outgoing(self, incoming: Any) -> None:
        out = self._outgoing.pop(id(incoming), None)
        if out is not None and out.is_established:
            out.release()

    def _classify(self, data: bytes, request_id: str) -> ClassifyResponse:
        future = asyncio.run_coroutine_threadsafe(classify_instance(self.runtime, data, request_id), self.loop)
        try:
            # The coroutine keeps its own deadline (REQUEST_TIMEOUT_S); this bound only guards a stopped loop.
            answer: ClassifyResponse = future.result(timeout=self.settings.request_timeout_s + 5.0)
            return answer
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded("no answer within the request deadline") from None

    @staticmethod
    def _failure(exc: BaseException, status: int) -> Dataset:
        count_refusal(exc)
        if status == PROCESSING_FAILURE and not isinstance(exc, ResultNotDelivered):
            log.error("C-STORE failed", extra={"error": type(exc).__name__})  # type only: messages may quote headers
        ds = Dataset()
        ds.Status = status
        ds.ErrorComment = failure_comment(exc)
        return ds


def _ae_text(value: object) -> str:
    """An AE title from the wire as printable text (pynetdicom gives str; older versions bytes)."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return "".join(c for c in text if 32 <= ord(c) < 127).strip()[:16]


def start_dicom_node(settings: Settings, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> StorageScp:
    """Build and start the Storage SCP (raises OSError when the port is taken: the service does not start)."""
    scp = StorageScp(settings, runtime, loop)
    scp.start()
    return scp
