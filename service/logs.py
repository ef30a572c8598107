"""Logging set-up, done once at the entry point: JSON lines in production, text for humans.

Records carry ``extra`` fields (request_id, route, status, key_id, ...) as JSON keys. Nothing
here ever logs image bytes, API keys or patient identifiers: callers pass ids and numbers only.

Patient data could still arrive through text the service does not write itself, so three doors
are closed here for every log stream:
- exception messages: a traceback is written as exception types and code locations only
  (:func:`describe_exception`); pydicom's messages quote the raw bytes of the element they failed
  on, which may be a patient's name;
- pydicom's own logger: its records are replaced by one line without the message;
- Python warnings (pydicom warns with header values, e.g. an invalid UID): shown as category and
  location only, through logging, never raw on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
import warnings
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

# Attributes every LogRecord has; anything else on a record came from ``extra=``. uvicorn adds ``color_message``
# (its message with ANSI colour codes) to its records: never written, a log line carries no terminal codes.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message",
}  # fmt: skip
# ANSI/VT escape sequences (CSI ... final byte, OSC ... BEL/ST, or ESC + one character): stripped from every text written.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def plain(text: str) -> str:
    """``text`` without terminal escape sequences (a colour code from a library never reaches a log line)."""
    return _ANSI.sub("", text) if "\x1b" in text else text


def message_of(record: logging.LogRecord) -> str:
    """The record's message as written: no escape codes, and a formatted traceback (Starlette hands uvicorn
    one as the text of a failed start-up) cut to its exception type, like every traceback here."""
    text = plain(record.getMessage())
    if text.startswith("Traceback (most recent call last):"):
        last = text.rstrip().rsplit("\n", 1)[-1]
        return f"traceback withheld: {last.split(':', 1)[0].strip()}"
    return text


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: plain(v) if isinstance(v, str) else v for k, v in vars(record).items() if k not in _STANDARD}


_MAX_FRAMES = 12
WITHHELD = "message withheld: third-party text can quote patient data"

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def _where(frame: traceback.FrameSummary) -> str:
    """``package/module.py:line in function``: where, never what (no source line, no locals)."""
    path = frame.filename.replace(os.sep, "/")
    if "site-packages/" in path:
        path = path.rsplit("site-packages/", 1)[1]
    elif "/service/" in path:
        path = "service/" + path.rsplit("/service/", 1)[1]
    else:
        path = os.path.basename(path)
    return f"{path}:{frame.lineno} in {frame.name}"


def describe_exception(exc: BaseException) -> str:
    """Exception types and code locations, innermost frame last; never a message or a value.

    E.g. ``KeyError at service/hospital/dicom.py:201 in _read_header <- pydicom/dataset.py:880 in get``, and
    ``(cause: ValueError at ...)`` for a chained exception.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)[-_MAX_FRAMES:]
        where = " <- ".join(_where(f) for f in frames)
        parts.append(f"{type(current).__module__}.{type(current).__qualname__}" + (f" at {where}" if where else ""))
        current = current.__cause__ or current.__context__
    return parts[0] + "".join(f" (cause: {p})" for p in parts[1:])


class _ScrubbedExceptions(logging.Formatter):
    def formatException(self, ei: ExcInfo) -> str:  # logging's name
        return describe_exception(ei[1]) if ei[1] is not None else ""

    def formatStack(self, stack_info: str) -> str:
        return ""  # stack_info is source text; not needed in a service log


class JsonFormatter(_ScrubbedExceptions):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message_of(record),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(_ScrubbedExceptions):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        record.exc_text = None  # logging caches the text; ours is computed by formatException
        record.message = message_of(record)  # what logging.Formatter.format does, with our message
        record.asctime = self.formatTime(record, self.datefmt)
        line = plain(self.formatMessage(record))
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return f"{line} {extras}" if extras else line


class _Withheld(logging.Handler):
    """Re-emits a third-party record as one line without its message (which may quote header values)."""

    def emit(self, record: logging.LogRecord) -> None:
        source = f"{os.path.basename(record.pathname)}:{record.lineno}"
        logging.getLogger("service.thirdparty").log(
            logging.DEBUG, "%s logged a %s (%s)", record.name, record.levelname.lower(), WITHHELD,
            extra={"source": source},
        )  # fmt: skip


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    logging.getLogger("service.warnings").debug(
        "%s at %s:%d (%s)", category.__name__, os.path.basename(filename), lineno, WITHHELD
    )


def guard_third_party_output() -> None:
    """Route the DICOM libraries' loggers and every Python warning through value-free summaries (idempotent).

    Called by :func:`configure_logging` and by :func:`service.app.create_app`, so an app built in a
    test is guarded like the served one.
    """
    import pydicom.config  # local: only this function needs pydicom

    # Value checks on read only produce warnings that quote the value; the service validates what it uses.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # pynetdicom (PDU and dataset dumps), highdicom and dicomweb-client (UIDs in INFO lines) likewise: the
    # PACS entries log what an operator needs themselves (service.hospital.dimse, .dicomweb).
    for name in ("pydicom", "pynetdicom", "highdicom", "dicomweb_client"):
        third_party = logging.getLogger(name)
        if not any(isinstance(h, _Withheld) for h in third_party.handlers):
            third_party.handlers[:] = [_Withheld()]
            third_party.propagate = False
    warnings.showwarning = _show_warning


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Send every logger (uvicorn's too) to stderr in one format.

    Args:
        fmt: ``"json"`` or ``"text"``.
        level: a logging level name.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    guard_third_party_output()
