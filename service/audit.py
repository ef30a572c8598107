"""The audit trail: one JSON line per request saying which model answered which input, and how.

PHI policy (docs/integration.md): a line holds ids, hashes and numbers only. No patient name, ID or
birth date, no pixels, no image bytes, no problem ``detail`` text. DICOM Study/Series/SOP Instance
UIDs are written as hashes: they are unique identifiers that a PACS links to a patient (DICOM PS3.15
replaces them when de-identifying), and audit logs travel further than answers (shippers, SIEM,
support tickets). An auditor who holds a UID can still find its line by hashing it. The Accession
Number is not written at all: it is short and enumerable, so a hash would not hide it. With a
``uid_key`` the hashes are HMAC-SHA256, unlinkable without the key.

Destination: ``None`` or ``"-"`` writes to stderr (the container log), a path appends to that file.
The lines go through the ``lesionserve.audit`` logger with ``propagate=False``, so the app's own
log format never rewrites or duplicates them; one AuditLog per process owns that logger.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

AUDIT_LOGGER = "lesionserve.audit"
AUDIT_SCHEMA = 1
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")  # AccessionNumber: never
_MAX_FIELD = 128


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (uvicorn, pytest and tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


class AuditLog:
    """Writes audit lines to stderr or appends them to a file.

    Args:
        destination: ``None`` or ``"-"`` for stderr, else a file path (its folder must exist).
        uid_key: secret for HMAC-SHA256 of the DICOM UIDs; None = plain SHA-256.
        logger_name: the logger that carries the lines (tests use their own).
    """

    def __init__(
        self,
        destination: str | os.PathLike[str] | None = None,
        *,
        uid_key: bytes | None = None,
        logger_name: str = AUDIT_LOGGER,
    ) -> None:
        if destination is None or str(destination) == "-":
            handler: logging.Handler = _StderrHandler()
            self.destination = "stderr"
        else:
            path = Path(destination)
            if not path.parent.is_dir():
                raise ValueError(f"audit log folder {path.parent} does not exist")
            handler = logging.FileHandler(path, mode="a", encoding="utf-8")
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
        }
        if channel:
            entry["channel"] = {_clean(k, 32): _clean(v, 64) for k, v in channel.items()}
        dicom = self._dicom(identifiers or {})
        if dicom:
            entry["dicom"] = dicom
        # json.dumps escapes control characters: a hostile request id cannot forge a second line.
        self._logger.info(json.dumps(entry, separators=(",", ":"), ensure_ascii=True))
        return entry

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


def _model(model: Mapping[str, Any] | None) -> dict[str, str] | None:
    if model is None:
        return None
    return {k: _clean(str(model.get(k, "")), 100) for k in ("name", "version", "sha256")}
