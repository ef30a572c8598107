"""The outbox's sender: one thread that delivers due SRs to the PACS, retries with backoff, dead-letters.

A failure is either **permanent** (the PACS refused this SR: no presentation context for Comprehensive SR,
a C-STORE status of the Refused/Error classes, an HTTP 4xx or a Failed SOP Sequence): a dead letter at
once, with the reason; or **transient** (refused or dropped association, timeout, Out of Resources, HTTP
5xx, connection refused): retried after an exponential delay with jitter, until ``OUTBOX_MAX_ATTEMPTS``
attempts or ``OUTBOX_MAX_AGE_S``, then a dead letter. Each attempt writes one audit line (the request id,
the hashed SR UID, the destination kind, the result, a PHI-free reason) and moves the metrics.

Delivery is at least once: a kill between the PACS storing an SR and the outbox recording it sends it again
after the restart. The SR's SOP Instance UID is the same (a function of the source image and the model), so
the PACS keeps one instance (tests/e2e/test_orthanc_outbox.py kills the service at exactly that point).
"""

from __future__ import annotations

import io
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import pydicom
import requests
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage  # type: ignore[attr-defined]

from service import metrics, tracing
from service.audit import AuditLog
from service.config import Settings, parse_destination
from service.errors import ResultNotDelivered
from service.hospital.outbox import Letter, Outbox, Row, SqliteOutbox
from service.tls import TlsError, sr_sender_tls

log = logging.getLogger(__name__)

DIMSE = metrics.PacsEntry.DIMSE.value
STOW_RS = metrics.PacsEntry.STOW_RS.value
_BATCH = 32  # letters taken per pass: one association carries them
_IDLE_POLL_S = 5.0  # the gauges' refresh when nothing is due (the oldest-age gauge reads the clock itself)
# Storage statuses that mean "stored" (PS3.4 B.2.3): success, and the three warnings (coercion, elements
# discarded, SOP class mismatch) under which the object was still stored.
_STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_NO_CONTEXT = "the PACS accepted no presentation context for Comprehensive SR Storage"
# Transfer syntaxes offered for the SR: uncompressed, explicit first (every PACS takes it).
_SR_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def no_tls() -> ssl.SSLContext | None:
    return None


class DeliveryFailed(Exception):
    """One letter not delivered; ``permanent`` when retrying cannot help. The message is PHI-free."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


class Deliverer(Protocol):
    """Delivers letters to one destination, yielding per letter, in order, None (stored) or the failure.

    A generator, so that each outcome is recorded as soon as it is known: a crash mid-pass re-sends at most
    the letter in flight, not the pass.
    """

    def deliver(self, letters: Sequence[Row]) -> Iterator[DeliveryFailed | None]: ...

    def abort(self) -> None:
        """End the attempt in flight now (shutdown): it is recorded as a transient failure, retried at the next start."""


def permanent_status(code: int) -> bool:
    """C-STORE statuses after which the same SR will be refused again (PS3.4 B.2.3, PS3.7 C).

    0122 SOP Class not supported, 0124 Not authorized, A9xx Data Set does not match SOP Class, Cxxx Cannot
    understand. A7xx Out of Resources, 0110 Processing failure and everything else may pass later.
    """
    return code in (0x0122, 0x0124) or code & 0xFF00 == 0xA900 or code & 0xF000 == 0xC000


class DimseDeliverer:
    """C-STORE to ``AE@host:port``: one association per pass, reopened once if it breaks mid-pass.

    ``tls`` makes the TLS context of each association (service.tls.sr_sender_tls), or None for plain DICOM.
    """

    def __init__(
        self, own_ae_title: str, destination: str, timeout_s: float, tls: Callable[[], ssl.SSLContext | None] = no_tls
    ) -> None:
        self.ae_title, self.host, self.port = parse_destination(destination)
        self.tls = tls
        self._ae = AE(ae_title=own_ae_title)
        self._ae.add_requested_context(ComprehensiveSRStorage, _SR_SYNTAXES)
        self._ae.acse_timeout = self._ae.dimse_timeout = self._ae.network_timeout = timeout_s
        self._assoc: Any = None  # the association in use, for abort()
        self._aborted = threading.Event()

    def abort(self) -> None:
        self._aborted.set()
        assoc = self._assoc
        if assoc is not None and assoc.is_established:
            # What pynetdicom's own DIMSE timeout does: send_c_store wakes with no response, aborts the association in
            # the delivering thread and returns no status (an abort() from here would not wake it before the timeout).
            assoc.dimse.msg_queue.put((None, None))

    def connect(self) -> Any:
        """An established association with the destination.

        Raises:
            DeliveryFailed: refused or no answer (transient); accepted without a context for the SR (permanent).
        """
        try:
            context = self.tls()  # files rotated on disk are read from the next association on
        except TlsError as exc:
            raise DeliveryFailed(f"the SR sender's TLS files cannot be used: {exc}", permanent=False) from None
        tls_args = (context, self.host) if context is not None else None  # the PACS's name is checked too
        assoc = self._ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=tls_args)
        if assoc.is_established:
            return assoc
        if assoc.rejected_contexts and not assoc.accepted_contexts:  # it answered, but takes no SR of ours
            raise DeliveryFailed(_NO_CONTEXT, permanent=True)
        raise DeliveryFailed(
            f"the SR destination {self.ae_title} refused or did not answer the association", permanent=False
        )

    def deliver(self, letters: Sequence[Row]) -> Iterator[DeliveryFailed | None]:
        assoc: Any = None
        try:
            for n, letter in enumerate(letters):
                if assoc is None or not assoc.is_established:
                    try:
                        assoc = self._assoc = self.connect()
                    except DeliveryFailed as failed:
                        yield from [failed] * (len(letters) - n)
                        return
                yield self._one(assoc, letter)
        finally:
            self._assoc = None
            if assoc is not None and assoc.is_established:
                assoc.release()

    def _one(self, assoc: Any, letter: Row) -> DeliveryFailed | None:
        sr = pydicom.dcmread(io.BytesIO(letter.payload or b""))
        try:
            status = assoc.send_c_store(sr)
        except ValueError:  # pynetdicom: no accepted context for the SR's SOP class and syntax
            return DeliveryFailed(_NO_CONTEXT, permanent=True)
        code = int(status.Status) if status is not None and "Status" in status else None
        if code in _STORED:
            return None
        if code is None and self._aborted.is_set():
            return DeliveryFailed("C-STORE aborted at shutdown before the PACS answered", permanent=False)
        if code is None:
            return DeliveryFailed("no answer to the SR's C-STORE (association lost)", permanent=False)
        return DeliveryFailed(f"the PACS answered 0x{code:04X} to the SR's C-STORE", permanent=permanent_status(code))


class StowDeliverer:
    """STOW-RS of one SR per request to the DICOMweb origin (a Failed SOP Sequence names it alone)."""

    def __init__(self, settings: Settings) -> None:
        from service.hospital.dicomweb import Origin  # the entry's client: its session, auth and timeout

        self.origin = Origin(settings)

    def deliver(self, letters: Sequence[Row]) -> Iterator[DeliveryFailed | None]:
        return (self._one(letter) for letter in letters)

    def abort(self) -> None:
        """Nothing to abort: a STOW-RS in flight ends by its timeout (DIMSE_TIMEOUT_S); the thread is a daemon."""

    def _one(self, letter: Row) -> DeliveryFailed | None:
        sr = pydicom.dcmread(io.BytesIO(letter.payload or b""))
        try:
            answer = self.origin.client.store_instances([sr])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            permanent = 400 <= code < 500 and code not in (408, 425, 429)
            return DeliveryFailed(f"the DICOMweb origin answered HTTP {code} to the SR's STOW-RS", permanent=permanent)
        except requests.RequestException as exc:
            return DeliveryFailed(f"the DICOMweb origin could not be reached ({type(exc).__name__})", permanent=False)
        if answer is not None and len(answer.get("FailedSOPSequence", [])):
            return DeliveryFailed("the DICOMweb origin refused the SR (Failed SOP Sequence)", permanent=True)
        return None


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float
    max_delay_s: float
    max_attempts: int
    max_age_s: float

    @classmethod
    def from_settings(cls, s: Settings) -> RetryPolicy:
        return cls(s.outbox_retry_base_s, s.outbox_retry_max_s, s.outbox_max_attempts, s.outbox_max_age_s)

    def delay(self, attempts: int, rng: random.Random) -> float:
        """Seconds before attempt ``attempts + 1``: ``base * 2**(attempts - 1)`` capped, times a jitter in [0.5, 1].

        The jitter spreads the retries of SRs that failed together (a PACS back from a restart is not hit
        by every sender at the same second); half the delay is kept so the backoff still grows.
        """
        ceiling = min(self.max_delay_s, self.base_s * 2.0 ** min(attempts - 1, 60))
        return ceiling * (0.5 + 0.5 * rng.random())


class OutboxSender:
    """Delivers the outbox's due letters in a background thread; the entries call :meth:`enqueue`.

    Args:
        outbox: the store.
        deliverers: destination kind (``dimse``, ``stow-rs``) -> deliverer.
        policy: backoff and limits.
        retention_s: how long delivered rows stay.
        audit: the audit trail, or None.
        clock: wall-clock seconds; rng: the jitter's source (tests pass seeded ones).
    """

    def __init__(
        self,
        outbox: Outbox,
        deliverers: Mapping[str, Deliverer],
        policy: RetryPolicy,
        *,
        retention_s: float = 0.0,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.outbox, self.deliverers, self.policy = outbox, dict(deliverers), policy
        self.retention_s, self.audit, self.clock = retention_s, audit, clock
        self.rng = rng or random.Random()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._oldest: float | None = None
        metrics.OUTBOX_OLDEST_PENDING_AGE_SECONDS.set_function(self._oldest_age)

    # --- the entries' side -------------------------------------------------------------------------
    def enqueue(self, letters: Sequence[Letter]) -> None:
        """Write ``letters`` durably (raises OutboxFull / OutboxUnavailable, counted by the entry), then wake the thread."""
        self.outbox.put(letters)
        for letter in letters:  # the SR send's span links back to the request that made the letter
            tracing.remember(letter.request_id)
        self.refresh_gauges()
        self.wake()

    def check_room(self, count: int) -> None:
        self.outbox.check_room(count)

    def wake(self) -> None:
        """Run a pass now (after an operator's retry)."""
        self._wake.set()

    # --- the thread --------------------------------------------------------------------------------
    def start(self) -> None:
        self.refresh_gauges()
        self._thread = threading.Thread(target=self._run, name="lesionserve-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop after the letter in hand (those not tried stay pending for the next start), then close the file.

        A letter still in flight after ``timeout_s`` (a PACS that does not answer) has its attempt aborted: it is
        recorded as a retry with its reason and audited, and goes out again after the next start. Its SR UID is
        the same, so a PACS that did store it keeps one instance.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                for deliverer in self.deliverers.values():
                    deliverer.abort()
                self._thread.join(5.0)  # the abort's record and audit line
            if self._thread.is_alive():  # stuck in a delivery past its timeouts: the file stays open for it
                log.warning("outbox sender still delivering at shutdown; pending SRs stay in the outbox")
                return
            self._thread = None
        self.outbox.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                next_at = self.outbox.next_due()
            except Exception as exc:  # the outbox unreadable for a moment: keep the thread, try again later
                log.error("outbox pass failed", extra={"error": type(exc).__name__})
                next_at = None
            wait = _IDLE_POLL_S if next_at is None else max(0.0, min(_IDLE_POLL_S, next_at - self.clock()))
            if wait > 0:
                self._wake.wait(wait)
            self._wake.clear()

    def run_once(self) -> int:
        """One pass: purge delivered rows past retention, deliver what is due; returns the letters tried."""
        now = self.clock()
        self.outbox.purge(now, self.retention_s)
        letters = self.outbox.due(now, _BATCH)
        groups: dict[tuple[str, str], list[Row]] = {}
        for letter in letters:
            groups.setdefault((letter.kind, letter.destination), []).append(letter)
        for (kind, _), group in groups.items():
            if self._stop.is_set():
                break
            deliverer = self.deliverers.get(kind)
            if deliverer is None:  # written by a configuration that had this destination; this one has none
                outcomes: Iterable[DeliveryFailed | None] = [
                    DeliveryFailed(f"no {kind} destination is configured now", permanent=False)
                ] * len(group)
            else:
                outcomes = deliverer.deliver(group)
            it = iter(outcomes)
            for letter in group:
                if self._stop.is_set():  # the rest stay pending, untouched, for the next start
                    break
                try:
                    with tracing.sr_send(kind, letter.request_id) as span:
                        outcome = next(it)  # the deliverer sends this letter now
                        if span is not None:
                            span.set_attribute("lesionserve.sr.stored", outcome is None)
                except Exception as exc:  # a fault in the deliverer (an unparsable answer...): this letter waits
                    log.error("SR delivery failed", extra={"error": type(exc).__name__, "letter": letter.id})
                    self._record(letter, DeliveryFailed(f"delivery failed ({type(exc).__name__})", permanent=False))
                    break  # the others of the group stay due: tried again at the next pass
                self._record(letter, outcome)  # committed before the next letter is sent
            close = getattr(it, "close", None)
            if close is not None:  # a generator left early: release its association now, not at collection
                close()
        self.refresh_gauges()
        return len(letters)

    def _record(self, letter: Row, failure: DeliveryFailed | None) -> None:
        now, attempt = self.clock(), letter.attempts + 1
        if failure is None:
            self.outbox.delivered(letter.id, now)
            metrics.OUTBOX_DELIVERED_TOTAL.labels(destination=letter.kind).inc()
            metrics.SR_DELIVERIES_TOTAL.labels(entry=letter.kind, outcome=metrics.SrOutcome.STORED.value).inc()
            metrics.OUTBOX_DELIVERY_LATENCY_SECONDS.observe(max(0.0, now - letter.created_at))
            self._audit(letter, attempt, "delivered", None)
            return
        dead: metrics.DeadReason | None = None
        if failure.permanent:
            dead = metrics.DeadReason.REFUSED
        elif attempt >= self.policy.max_attempts:
            dead = metrics.DeadReason.ATTEMPTS
        elif now - letter.created_at >= self.policy.max_age_s:
            dead = metrics.DeadReason.AGE
        if dead is None:
            self.outbox.retry(letter.id, now + self.policy.delay(attempt, self.rng), failure.reason)
            metrics.OUTBOX_RETRIES_TOTAL.labels(destination=letter.kind).inc()
            self._audit(letter, attempt, "retry", failure.reason)
            return
        self.outbox.dead(letter.id, now, dead.value, failure.reason)
        metrics.OUTBOX_DEAD_LETTERED_TOTAL.labels(reason=dead.value).inc()
        metrics.SR_DELIVERIES_TOTAL.labels(entry=letter.kind, outcome=metrics.SrOutcome.FAILED.value).inc()
        log.warning("SR moved to the dead letters", extra={"reason": dead.value, "letter": letter.id})
        self._audit(letter, attempt, "dead", f"{dead.value}: {failure.reason}")

    def _audit(self, letter: Row, attempt: int, result: str, reason: str | None) -> None:
        if self.audit is None:
            return
        channel = {"entry": "outbox", "destination": letter.kind, "letter": str(letter.id), "attempt": str(attempt),
                   "result": result}  # fmt: skip
        if reason:
            channel["reason"] = reason
        self.audit.record(
            request_id=letter.request_id, key_id=None, model=None, body=None, content_type=None,
            status=200 if result == "delivered" else 502,
            problem_type=None if result == "delivered" else ResultNotDelivered.type_uri(),
            latency_ms=(self.clock() - letter.created_at) * 1000, identifiers={"SOPInstanceUID": letter.sr_uid},
            channel=channel,
        )  # fmt: skip

    # --- gauges ------------------------------------------------------------------------------------
    def refresh_gauges(self) -> None:
        try:
            s = self.outbox.stats()
        except Exception:  # counted by the next pass's error; the gauges keep their last values
            return
        metrics.OUTBOX_PENDING.set(s.pending)
        metrics.OUTBOX_DEAD_LETTERS.set(s.dead)
        metrics.OUTBOX_BYTES.set(s.bytes)
        self._oldest = s.oldest_pending_at

    def _oldest_age(self) -> float:
        oldest = self._oldest
        return 0.0 if oldest is None else max(0.0, self.clock() - oldest)


def deliverers_for(settings: Settings) -> dict[str, Deliverer]:
    """The deliverers this configuration has: C-STORE to DIMSE_DESTINATION, STOW-RS to DICOMWEB_ORIGIN."""
    found: dict[str, Deliverer] = {}
    if settings.dimse_destination.strip():
        sr_sender_tls(settings)  # a bad file refuses the start (TlsError), rather than every delivery later
        found[DIMSE] = DimseDeliverer(
            settings.dimse_ae_title,
            settings.dimse_destination,
            settings.dimse_timeout_s,
            partial(sr_sender_tls, settings),
        )
    if settings.dicomweb_push_sr:
        found[STOW_RS] = StowDeliverer(settings)
    return found


def open_outbox(settings: Settings, audit: AuditLog | None = None) -> OutboxSender | None:
    """The outbox and its sender for this configuration (None when no SR goes to a PACS); not started.

    Raises:
        OutboxUnavailable: the file cannot be created or opened (the service does not start).
    """
    if not settings.outbox_enabled or settings.outbox_path is None:
        return None
    store = SqliteOutbox(settings.outbox_path, max_items=settings.outbox_max_items, max_bytes=settings.outbox_max_bytes)
    return OutboxSender(
        store, deliverers_for(settings), RetryPolicy.from_settings(settings),
        retention_s=settings.outbox_retention_s, audit=audit,
    )  # fmt: skip
