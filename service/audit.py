"""The audit trail: one JSON line per request saying which model answered which input, and how.

PHI policy (docs/integration.md): a line holds ids, hashes and numbers only. No patient name, ID or
birth date, no pixels, no image bytes, no problem ``detail`` text. DICOM Study/Series/SOP Instance
UIDs are written as hashes: they are unique identifiers that a PACS links to a patient (DICOM PS3.15
replaces them when de-identifying), and audit logs travel further than answers (shippers, SIEM,
support tickets). An auditor who holds a UID can still find its line by hashing it. The Accession
Number is not written at all: it is short and enumerable, so a hash would not hide it. With a
``uid_key`` the hashes are HMAC-SHA256, unlinkable without the key.

Destination: ``None`` or ``"-"`` writes to stderr (the container log), a path appends to that file,
reopened when logrotate moves or deletes it (:class:`logging.handlers.WatchedFileHandler`: lines no longer go
to a deleted file). A line that cannot be written (disk full) is counted (``on_failure``; the metric
``lesionserve_audit_write_failures_total`` and its alert), logged in one line without a traceback, and kept
in memory (up to :data:`MAX_PENDING` lines) to be written again; while any wait, :attr:`AuditLog.healthy`
is False. What the service does then is ``AUDIT_ON_FAILURE`` (open: keep answering; closed: refuse new
work with 503 until the kept lines are written; docs/security.md).
The lines go through the ``lesionserve.audit`` logger with ``propagate=False``, so the app's own
log format never rewrites or duplicates them; one AuditLog per process owns that logger.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.tracing import current_trace_id
from service.version import SERVICE_VERSION

AUDIT_LOGGER = "lesionserve.audit"
AUDIT_SCHEMA = 1
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")  # AccessionNumber: never
_MAX_FIELD = 128
MAX_PENDING = 10_000  # lines kept in memory while the file cannot be written (about 5 MB)
log = logging.getLogger(__name__)


class AuditUnavailable(OSError):
    """The audit log cannot be opened at start (the service prints one line and exits 2)."""


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (uvicorn, pytest and tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


class _AuditFileHandler(logging.handlers.WatchedFileHandler):
    """Hands a failed write to its AuditLog instead of printing logging's 45-line "Logging error" traceback."""

    def __init__(self, path: Path, owner: AuditLog) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.owner = owner

    def handleError(self, record: logging.LogRecord) -> None:
        # The failed line sits in the stream's buffer: dropped with the stream, or it would be written twice
        # (once by the next flush, once from the kept lines).
        stream, self.stream = self.stream, None
        _drop(stream)
        self.owner._failed(record.getMessage())


def _drop(stream: object) -> None:
    with contextlib.suppress(Exception):  # a close that flushes into a full disk: the buffer goes with it
        stream.close()  # type: ignore[attr-defined]


class AuditLog:
    """Writes audit lines to stderr or appends them to a file.

    Args:
        destination: ``None`` or ``"-"`` for stderr, else a file path (its folder must exist).
        uid_key: secret for HMAC-SHA256 of the DICOM UIDs; None = plain SHA-256.
        logger_name: the logger that carries the lines (tests use their own).
        on_failure: called once per line that could not be written (the service counts it).

    Raises:
        AuditUnavailable: the file cannot be opened for appending.
    """

    def __init__(
        self,
        destination: str | os.PathLike[str] | None = None,
        *,
        uid_key: bytes | None = None,
        logger_name: str = AUDIT_LOGGER,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.on_failure = on_failure
        self._pending: list[str] = []
        self._lock = threading.Lock()
        if destination is None or str(destination) == "-":
            handler: logging.Handler = _StderrHandler()
            self.destination = "stderr"
        else:
            path = Path(destination)
            if not path.parent.is_dir():
                raise ValueError(f"audit log folder {path.parent} does not exist")
            try:
                handler = _AuditFileHandler(path, self)
            except OSError as exc:
                raise AuditUnavailable(
                    f"cannot open the audit log {path}: {exc.strerror or type(exc).__name__}"
                ) from None
            self.destination = str(path)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._lesionserve_audit = True  # type: ignore[attr-defined]  # marks handlers this class owns
        self._logger = logging.getLogger(logger_name)
        for old in [h for h in self._logger.handlers if getattr(h, "_lesionserve_audit", False)]:
            self._logger.removeHandler(old)  # a new AuditLog replaces the previous destination
            old.close()
        self._logger.addHandler(handler)
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        self._handler = handler
        self._uid_key = uid_key

    def record(
        self,
        *,
        request_id: str,
        key_id: str | None,
        model: Mapping[str, Any] | None,
        body: bytes | None,
        content_type: str | None,
        status: int,
        problem_type: str | None,
        latency_ms: float,
        identifiers: Mapping[str, str] | None = None,
        channel: Mapping[str, str] | None = None,
        answer: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write one audit line and return what was written.

        Args:
            request_id: the request's id (as echoed in ``X-Request-ID``).
            key_id: the id of the caller's API key (never the key), None when auth is off.
            model: ``{"name", "version", "sha256"}`` of the model that answered, None if none did.
            body: the uploaded image bytes; only their sha256 and length are written.
            content_type: the request's media type; parameters (multipart boundary) are dropped.
            status: the HTTP status answered.
            problem_type: the problem ``type`` URI for an error answer, None on success.
            latency_ms: wall time of the request.
            identifiers: DICOM identifiers from :func:`service.hospital.dicom.read_dicom`; UIDs are hashed,
                the Accession Number is left out.
            channel: how a PACS entry received the object (``entry``: ``dimse``, ``stow-rs``, ``wado-rs``;
                ``calling_ae``, ``dimse_status``, ``sr``: the outcome of returning the SR); short
                printable values only, no identifiers.
            answer: what was answered, from :func:`service.routes.answer_summary`: ``top`` (class code),
                ``malignant`` (malignancy score at or above the threshold), ``ood`` (out of distribution;
                None when the model has no check). None when nothing was answered.
        """
        entry: dict[str, Any] = {
            "audit": AUDIT_SCHEMA,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": _clean(request_id),
            "key_id": _clean(key_id) if key_id else None,
            "model": _model(model),
            "input": {
                "sha256": hashlib.sha256(body).hexdigest() if body is not None else None,
                "bytes": len(body) if body is not None else None,
                "content_type": _media_type(content_type),
            },
            "outcome": {"status": int(status), "problem": _clean(problem_type, 200) if problem_type else None},
            "latency_ms": round(float(latency_ms), 2),
            "service_version": _clean(SERVICE_VERSION, 64),
        }
        if answer is not None:
            entry["answer"] = _answer(answer)
        trace_id = current_trace_id()  # the request's trace (OpenTelemetry, or the caller's traceparent)
        if trace_id is not None:
            entry["trace_id"] = trace_id
        if channel:
            entry["channel"] = {_clean(k, 32): _clean(v, 64) for k, v in channel.items()}
        dicom = self._dicom(identifiers or {})
        if dicom:
            entry["dicom"] = dicom
        if self._pending:  # lines kept from a failed write go first, if they can now
            _ = self.healthy
        # json.dumps escapes control characters: a hostile request id cannot forge a second line.
        self._logger.info(json.dumps(entry, separators=(",", ":"), ensure_ascii=True))
        return entry

    @property
    def healthy(self) -> bool:
        """True when no line waits to be written; else tries to write the kept lines now (in order)."""
        if not self._pending:
            return True
        handler = self._handler
        if not isinstance(handler, logging.FileHandler):
            return True
        with self._lock:
            try:
                stream = handler._open()  # a fresh stream: the failed one is dropped, with its buffer
                try:
                    stream.write("".join(line + "\n" for line in self._pending))
                    stream.flush()
                except OSError:
                    _drop(stream)
                    return False
            except OSError:
                return False
            _drop(handler.stream)
            handler.stream = stream
            self._pending.clear()
        return True

    def _failed(self, line: str) -> None:
        with self._lock:
            if len(self._pending) < MAX_PENDING:
                self._pending.append(line)
        if self.on_failure is not None:
            self.on_failure()
        log.error("audit line not written", extra={"pending": len(self._pending)})  # one line, no traceback

    def hash_identifier(self, value: str) -> str:
        """The hex digest written for a DICOM UID (auditors use it to find lines for a study)."""
        if self._uid_key is not None:
            return hmac.new(self._uid_key, value.encode(), hashlib.sha256).hexdigest()
        return hashlib.sha256(value.encode()).hexdigest()

    def close(self) -> None:
        """Detach and close this log's handler (flushes the file)."""
        self._logger.removeHandler(self._handler)
        self._handler.close()

    def _dicom(self, identifiers: Mapping[str, str]) -> dict[str, str]:
        hashed = {k: self.hash_identifier(identifiers[k]) for k in _UID_KEYWORDS if identifiers.get(k)}
        if hashed:
            hashed["hash"] = "hmac-sha256" if self._uid_key is not None else "sha256"
        return hashed


def _clean(value: str | None, limit: int = _MAX_FIELD) -> str:
    """Printable ASCII only, bounded: caller-supplied strings must not bloat or garble the trail."""
    text = "".join(ch for ch in str(value or "") if 32 <= ord(ch) < 127)
    return text[:limit]


def _media_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return _clean(content_type.split(";", 1)[0].strip().lower(), 100) or None


def _answer(answer: Mapping[str, Any]) -> dict[str, Any]:
    ood = answer.get("ood")
    return {
        "top": _clean(str(answer.get("top", "")), 64),
        "malignant": bool(answer.get("malignant")),
        "ood": None if ood is None else bool(ood),
    }


def _model(model: Mapping[str, Any] | None) -> dict[str, str] | None:
    if model is None:
        return None
    return {k: _clean(str(model.get(k, "")), 100) for k in ("name", "version", "sha256")}
