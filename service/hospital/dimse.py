"""DICOM DIMSE entry: a Storage SCP (pynetdicom) in the service process, and the SR sent back by C-STORE.

Why in-process (started from the app's lifespan when ``LESIONSERVE_DIMSE_ENABLED``), not a separate
``python -m service.dicom_node``: the design (docs/service.md) keeps one batcher and one model session per process
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
- an allowed peer beyond ``DIMSE_MAX_ASSOCIATIONS``: A-ASSOCIATE-RJ, rejected-transient, local limit exceeded.
  Only an A-ASSOCIATE-RQ from an allowed AE title takes one of these slots: a TCP connection that sends
  nothing holds no slot, is closed after ``DIMSE_REQUEST_TIMEOUT_S``, and at most ``DIMSE_MAX_CONNECTIONS``
  are open at once (more are closed on accept), so silent sockets cannot lock an allowed PACS out;
- a dataset over ``MAX_UPLOAD_BYTES`` (the HTTP uploads' budget): Cannot Understand (C000), decided while it
  arrives: past the cap its bytes are counted and dropped (:class:`CappedBuffer`), so one association holds
  at most that many bytes of it, whatever the sender sends;
- another SOP class (CT, MR, ...): C-STORE status 0122 "Refused: SOP Class not supported", with an
  Error Comment naming it, and an audit line (see the comment in :class:`StorageScp`);
- an accepted SOP class in a transfer syntax the reader cannot decode: that presentation context is
  refused at negotiation ("transfer syntaxes not supported");
- an instance that fails inside an accepted context: a C-STORE failure status with an Error Comment
  (:func:`service.hospital.pacs.failure_status`).

The C-STORE response is sent after the SR has been committed to the outbox (:mod:`service.hospital.outbox`):
success means the result will reach ``DIMSE_DESTINATION``, delivered by :mod:`service.hospital.delivery` with
retries, across restarts of either side. An outbox that is full or cannot be written answers Out of Resources
(A700): the sender keeps the image and sends it again later. Each instance and each refused association or
context gets an audit line; metrics count associations, refused contexts and instances.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service import metrics, tracing
from service.config import Settings
from service.errors import DeadlineExceeded, PayloadTooLarge, ResultNotDelivered, UnsupportedSopClass
from service.hospital.dicom import ACCEPTED_SOP_CLASSES, SUPPORTED_TRANSFER_SYNTAXES
from service.hospital.outbox import Letter
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
from service.hospital.sr import make_sr, sr_bytes
from service.runtime import Runtime
from service.schemas import ClassifyResponse

if TYPE_CHECKING:
    from service.hospital.delivery import OutboxSender
    from service.tls import ServerTls

log = logging.getLogger(__name__)

ENTRY = metrics.PacsEntry.DIMSE
_REJECTED = "https://lesionserve.dev/problems/dimse-association-rejected"
_CONTEXT_REFUSED = "https://lesionserve.dev/problems/dimse-context-refused"
_LISTEN_BACKLOG = 128  # socketserver's default is 5: a burst of PACS connecting at once would see refusals


class RefusalThrottle:
    """At most one log and audit line per refusal reason per ``window_s``; the next one says how many were folded.

    Anyone who can reach the port can be refused: one line per refusal let a script flood the log and the
    audit trail. The key is the reason (a handful), never the peer's AE title (unbounded, peer-chosen).
    """

    def __init__(self, window_s: float = 60.0, clock: Any = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, reason: str) -> int | None:
        """None: fold this one (counted); else write a line, saying how many were folded since the last."""
        now = self.clock()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self.window_s:
                self._folded[reason] = self._folded.get(reason, 0) + 1
                return None
            self._last[reason] = now
            return self._folded.pop(reason, 0)


class CappedBuffer(io.BytesIO):
    """Where pynetdicom writes one DIMSE message's dataset as its P-DATA fragments arrive, up to ``cap`` bytes.

    pynetdicom keeps a whole dataset in memory before any handler runs (a 315 MB C-STORE was 900 MB of RSS);
    past the cap this frees what it holds and only counts the rest, and the handler answers C000 unparsed.
    """

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap, self.received = cap, 0

    def write(self, data: Any, /) -> int:
        size = len(data)
        self.received += size
        if self.received <= self.cap:
            return super().write(data)
        if self.tell():  # the first fragment over the cap: drop the prefix too
            self.seek(0)
            self.truncate()
        return size

    @property
    def over(self) -> bool:
        return self.received > self.cap


class StorageScp:
    """The Storage SCP of one service process.

    Args:
        settings: the service settings (``dimse_*``).
        runtime: the process's runtime (batcher, decode pool, audit).
        loop: the event loop that owns the runtime; C-STORE handlers submit work to it.
        outbox: where each SR is committed before the C-STORE is answered.
        tls: DICOM TLS (service.tls); None: plain DICOM.
    """

    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        loop: asyncio.AbstractEventLoop,
        outbox: OutboxSender,
        tls: ServerTls | None = None,
    ) -> None:
        self.settings, self.runtime, self.loop, self.outbox = settings, runtime, loop, outbox
        self.tls = tls
        self.allowed = frozenset(settings.dimse_allowed_ae_list)
        ae = AE(ae_title=settings.dimse_ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = sorted(self.allowed)
        # pynetdicom's own limit counts every acceptor thread, silent ones and those still ending too: here only a
        # backstop (twice the cap); the connection cap is _verify_connection's, the slots _on_requested's.
        ae.maximum_associations = 2 * settings.dimse_max_connections
        ae.dimse_timeout = ae.network_timeout = settings.dimse_timeout_s
        ae.acse_timeout = settings.dimse_request_timeout_s  # the acceptor's wait for the A-ASSOCIATE-RQ
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
        self._slotted: set[int] = set()  # associations from allowed AE titles holding a slot
        self._throttle = RefusalThrottle()
        self._sockets: list[Any] = []  # accepted TCP connections, oldest first, for DIMSE_MAX_CONNECTIONS
        self._spoken: set[int] = set()  # those that sent an A-ASSOCIATE-RQ
        self._lock = threading.Lock()

    def start(self) -> None:
        """Listen on ``dimse_host:dimse_port`` (raises OSError when the port is taken)."""
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        address = (self.settings.dimse_host, self.settings.dimse_port)
        # With TLS, every connection is wrapped before a PDU is read: a plain-text association fails its handshake.
        ssl_context = self.tls.context if self.tls is not None else None
        self._server = self._ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=ssl_context)
        self._server.socket.listen(_LISTEN_BACKLOG)  # listen() again only resizes the queue
        self._server.verify_request = self._verify_connection  # socketserver's hook, called on each accept
        log.info(
            "DICOM Storage SCP listening",
            extra={
                "ae_title": self.settings.dimse_ae_title,
                "port": self.settings.dimse_port,
                "tls": self.tls is not None,
            },
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
        self._server.shutdown()
        self._server = None

    # --- connections and association slots ----------------------------------------------------------
    def _verify_connection(self, request: Any, client_address: Any) -> bool:
        """Accept a TCP connection under ``DIMSE_MAX_CONNECTIONS`` (each holds threads until it ends).

        At the cap, the oldest connection that has not sent its A-ASSOCIATE-RQ yet is closed to make room: a
        stream of silent sockets then delays an allowed PACS by nothing, instead of filling the cap for
        ``DIMSE_REQUEST_TIMEOUT_S`` at a time. Only when every open connection has spoken is the new one refused.
        """
        with self._lock:  # the sockets pynetdicom has not closed yet (a closed socket's fileno is -1)
            self._sockets = [s for s in self._sockets if s.fileno() != -1]
            self._spoken &= {id(s) for s in self._sockets}
            if len(self._sockets) >= self.settings.dimse_max_connections:
                silent = next((s for s in self._sockets if id(s) not in self._spoken), None)
                if silent is None:
                    metrics.DIMSE_ASSOCIATIONS_TOTAL.labels(outcome=metrics.AssociationOutcome.REJECTED.value).inc()
                    self._throttled_refusal("", "too many connections", 503)
                    return False  # socketserver closes the socket
                with contextlib.suppress(OSError):  # its acceptor thread sees the end and closes it
                    silent.shutdown(socket.SHUT_RDWR)
                self._sockets.remove(silent)
            self._sockets.append(request)
            return True

    def _on_requested(self, event: Any) -> None:
        """An A-ASSOCIATE-RQ arrived: cap its datasets; an allowed peer takes a slot, or is rejected (transient)."""
        assoc = event.assoc
        dimse, cap = assoc.dimse, self.settings.max_upload_bytes
        receive = dimse.receive_primitive

        def capped_receive(primitive: Any) -> None:
            if dimse.message is None:  # a new message: its dataset goes into a capped buffer
                dimse.message = DIMSEMessage()
                dimse.message.data_set = CappedBuffer(cap)
            receive(primitive)

        dimse.receive_primitive = capped_receive
        raw = getattr(assoc.dul.socket, "socket", None)
        with self._lock:
            self._spoken.add(id(raw))  # it spoke: never closed to make room for another connection
        rq = assoc.requestor.primitive
        calling, called = _ae_text(rq.calling_ae_title), _ae_text(rq.called_ae_title)
        if calling not in self.allowed or called != self.settings.dimse_ae_title:
            return  # pynetdicom rejects it in negotiation (_on_rejected): no slot taken
        with self._lock:
            full = len(self._slotted) >= self.settings.dimse_max_associations
            if not full:
                self._slotted.add(id(assoc))
        if full:
            metrics.DIMSE_ASSOCIATIONS_TOTAL.labels(outcome=metrics.AssociationOutcome.REJECTED.value).inc()
            self._throttled_refusal(calling, "too many associations", 403)
            assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected-transient, provider, local limit exceeded
            assoc.kill()

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
        if refused:  # one line per association (a peer may propose 128 classes), naming the first few
            names = sorted(refused)
            extra = {"refused_sop_class": ", ".join(n[:64] for n in names[:4]), "refused_count": str(len(names))}
            log.warning("presentation contexts refused", extra={"calling_ae": calling, **extra})
            self._audit_refusal(_CONTEXT_REFUSED, 415, calling, extra)

    def _on_rejected(self, event: Any) -> None:
        metrics.DIMSE_ASSOCIATIONS_TOTAL.labels(outcome=metrics.AssociationOutcome.REJECTED.value).inc()
        calling = _ae_text(event.assoc.requestor.ae_title)
        called = _ae_text(event.assoc.acceptor.ae_title)
        if calling not in self.allowed:
            reason = "calling AE title not recognised"
        elif called != self.settings.dimse_ae_title:
            reason = "called AE title not recognised"
        else:
            reason = "too many connections or no acceptable context"
        self._throttled_refusal(calling, reason, 403)

    def _throttled_refusal(self, calling: str, reason: str, status: int) -> None:
        folded = self._throttle.admit(reason)
        if folded is None:
            return
        extra = {"reason": reason, "folded_since_last": str(folded)}
        log.warning("association rejected", extra={"calling_ae": calling, **extra})
        self._audit_refusal(_REJECTED, status, calling, extra)

    def _on_closed(self, event: Any) -> None:
        with self._lock:
            was_open = id(event.assoc) in self._open
            self._open.discard(id(event.assoc))
            self._slotted.discard(id(event.assoc))
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
    @tracing.traced("C-STORE", SpanKind.SERVER)
    def _on_store(self, event: Any) -> int | Dataset:
        """Classify the instance, commit its SR to the outbox, audit, then answer: all of it inside the drain."""
        with self.runtime.hold():  # SIGTERM waits for the commit and the audit line too, not the classification only
            return self._store(event)

    def _store(self, event: Any) -> int | Dataset:
        start, request_id = time.perf_counter(), new_request_id()
        calling = _ae_text(event.assoc.requestor.ae_title)
        sop_uid = valid_uid(event.request.AffectedSOPInstanceUID)
        identifiers: dict[str, str] = {"SOPInstanceUID": sop_uid} if sop_uid else {}
        data: bytes | None = None
        error: BaseException | None = None
        answer: ClassifyResponse | None = None
        status, sr_state = SUCCESS, "none"
        try:
            received = event.request.DataSet
            if isinstance(received, CappedBuffer) and received.over:  # dropped as it arrived: nothing to parse
                raise PayloadTooLarge(f"the dataset is {received.received} bytes; the limit is {received.cap}")
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
            sr = make_sr(answer, data)
            letter = Letter(
                str(sr.SOPInstanceUID), ENTRY.value, self.settings.dimse_destination, sr_bytes(sr), request_id
            )
            self.outbox.enqueue([letter])  # committed (fsync) before Success: OutboxFull/Unavailable -> A700
            sr_state = "queued"
            return SUCCESS
        except Exception as exc:
            error = exc
            status = failure_status(exc)
            return self._failure(exc, status)
        finally:
            audit_instance(
                self.runtime, entry=ENTRY, request_id=request_id, data=data, error=error,
                latency_s=time.perf_counter() - start, identifiers=identifiers, answer=answer,
                channel={"calling_ae": calling, "dimse_status": f"0x{status:04X}", "sr": sr_state},
            )  # fmt: skip

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


def start_dicom_node(
    settings: Settings,
    runtime: Runtime,
    loop: asyncio.AbstractEventLoop,
    outbox: OutboxSender,
    tls: ServerTls | None = None,
) -> StorageScp:
    """Build and start the Storage SCP (raises OSError when the port is taken: the service does not start)."""
    scp = StorageScp(settings, runtime, loop, outbox, tls)
    scp.start()
    return scp
