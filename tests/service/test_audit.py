"""service.audit: one JSON line per request, to stderr or a file, with hashes and ids only (no PHI, no pixels)."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient

from service.audit import AUDIT_LOGGER, AuditLog
from service.errors import UnsupportedMediaType
from service.hospital.dicom import read_dicom
from service.logs import JsonFormatter
from tests.conftest import TEST_DATA, shared_data

COMMITTED = sorted((TEST_DATA / "dicom").glob("*.dcm"))
MODEL = {"name": "resnet18-ham10000", "version": "1.2.0", "sha256": "cd" * 32}


@pytest.fixture
def logger_name() -> Iterator[str]:
    """A fresh logger per test, so tests never share handlers."""
    name = f"test.audit.{uuid.uuid4().hex}"
    yield name
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def record(log: AuditLog, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "key_id": "hospital-a",
        "model": MODEL,
        "body": b"image bytes",
        "content_type": "image/jpeg",
        "status": 200,
        "problem_type": None,
        "latency_ms": 12.3456,
    }
    fields.update(overrides)
    return log.record(**fields)


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_stderr_destination_writes_one_json_line(capsys: pytest.CaptureFixture[str], logger_name: str) -> None:
    for destination in (None, "-"):
        log = AuditLog(destination, logger_name=logger_name)
        written = record(log)
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert lines(err) == [written]
        assert log.destination == "stderr"
    assert written["input"] == {
        "sha256": hashlib.sha256(b"image bytes").hexdigest(),
        "bytes": len(b"image bytes"),
        "content_type": "image/jpeg",
    }
    assert written["model"] == MODEL and written["key_id"] == "hospital-a" and written["request_id"] == "req-1"
    assert written["outcome"] == {"status": 200, "problem": None}
    assert written["latency_ms"] == 12.35
    assert datetime.fromisoformat(written["time"]).tzinfo is not None
    assert "dicom" not in written


def test_file_destination_appends(tmp_path: Path, logger_name: str) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, logger_name=logger_name)
    record(log, request_id="a")
    log.close()
    log = AuditLog(str(path), logger_name=logger_name)  # a restart must not truncate the trail
    record(log, request_id="b", status=415, problem_type=UnsupportedMediaType.type_uri())
    log.close()
    entries = lines(path.read_text())
    assert [e["request_id"] for e in entries] == ["a", "b"]
    assert entries[1]["outcome"] == {
        "status": 415,
        "problem": "https://lesionserve.dev/problems/unsupported-media-type",
    }


def test_new_audit_log_replaces_the_destination(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], logger_name: str
) -> None:
    AuditLog(None, logger_name=logger_name)
    log = AuditLog(tmp_path / "a.jsonl", logger_name=logger_name)
    record(log)
    log.close()
    assert capsys.readouterr().err == ""
    assert len(lines((tmp_path / "a.jsonl").read_text())) == 1


def test_missing_folder_is_refused(tmp_path: Path, logger_name: str) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        AuditLog(tmp_path / "nope" / "audit.jsonl", logger_name=logger_name)


def test_audit_lines_do_not_reach_the_app_log(capsys: pytest.CaptureFixture[str]) -> None:
    # A handler on the root logger stands for the app's JSON log. (caplog cannot be used here:
    # pytest also attaches it to every non-propagating logger that already exists.)
    seen: list[logging.LogRecord] = []
    app_log = logging.Handler(logging.DEBUG)
    app_log.emit = seen.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(app_log)
    log = AuditLog(None)  # the default logger name, as the app uses it
    try:
        record(log, request_id="only-once")
        assert logging.getLogger(AUDIT_LOGGER).propagate is False
        assert not [r for r in seen if "only-once" in r.getMessage()]  # the app's log never sees it
        assert capsys.readouterr().err.count("only-once") == 1
    finally:
        root.removeHandler(app_log)
        log.close()


def test_caller_strings_are_sanitised(capsys: pytest.CaptureFixture[str], logger_name: str) -> None:
    log = AuditLog(None, logger_name=logger_name)
    written = record(
        log,
        request_id='evil\n{"forged": true}' + "x" * 500,
        content_type="multipart/form-data; boundary=----PatientDOE",
        key_id=None,
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # no forged second line
    assert "\n" not in written["request_id"] and len(written["request_id"]) <= 128
    assert written["input"]["content_type"] == "multipart/form-data"
    assert "PatientDOE" not in err and written["key_id"] is None


def test_dicom_uids_are_hashed_and_accession_left_out(capsys: pytest.CaptureFixture[str], logger_name: str) -> None:
    data = COMMITTED[0].read_bytes()
    image = read_dicom(data, max_pixels=40_000_000)
    ids = {**image.identifiers, "AccessionNumber": "ACC-777"}
    written = record(
        AuditLog(None, logger_name=logger_name), body=data, content_type="application/dicom", identifiers=ids
    )
    line = capsys.readouterr().err
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert written["dicom"][keyword] == hashlib.sha256(ids[keyword].encode()).hexdigest()
        assert ids[keyword] not in line
    assert written["dicom"]["hash"] == "sha256"
    assert "ACC-777" not in line and "AccessionNumber" not in line
    assert len(line) < 1000 < len(data)  # ids and hashes only: no pixels, no bytes


def test_uid_key_gives_hmac(logger_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    log = AuditLog(None, uid_key=b"secret", logger_name=logger_name)
    written = record(log, identifiers={"StudyInstanceUID": uid})
    assert written["dicom"] == {
        "StudyInstanceUID": hmac.new(b"secret", uid.encode(), hashlib.sha256).hexdigest(),
        "hash": "hmac-sha256",
    }
    assert written["dicom"]["StudyInstanceUID"] != hashlib.sha256(uid.encode()).hexdigest()


# ---- no patient name or ID in anything logged while the real route handles the DICOM files ---------


def patient_fields(data: bytes) -> set[str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    values = {str(ds.get(k, "") or "").strip() for k in ("PatientName", "PatientID", "PatientBirthDate")}
    return {v for v in values if v}


def assert_absent(phi: set[str], text: str) -> None:
    for value in phi:
        # Short values ("204", "ID1") are matched as whole tokens so that hex digests and timestamps
        # that happen to contain the digits do not count; longer ones as plain substrings.
        pattern = re.escape(value) if len(value) >= 6 else rf"(?<![0-9A-Za-z.]){re.escape(value)}(?![0-9A-Za-z.])"
        assert not re.search(pattern, text), f"patient field {value!r} leaked into a log"


def run_files(
    paths: list[Path], tmp_path: Path, client_factory: Callable[..., TestClient], capfd: pytest.CaptureFixture[str]
) -> None:
    """Each file, whole and damaged, through POST /v1/classify (DICOM body and FHIR answer), with the
    app log in the service's JSON format at DEBUG, the audit file and stderr (fd level) captured."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    audit = tmp_path / "audit.jsonl"
    try:
        client = client_factory(audit_log=str(audit), log_level="DEBUG")
        phi: set[str] = set()
        for path in paths:
            data = path.read_bytes()
            phi |= patient_fields(data)
            # whole, cut in half (refused at the Pixel Data framing), and with Rows renamed to a private
            # tag (refused inside the header read): the refusal paths must not log the dataset either
            no_rows = data.replace(b"\x28\x00\x10\x00", b"\x29\x00\x10\x00", 1)
            for body in (data, data[: len(data) // 2], no_rows):
                for accept in ("application/json", "application/fhir+json"):
                    r = client.post(
                        "/v1/classify", content=body, headers={"content-type": "application/dicom", "accept": accept}
                    )
                    assert r.status_code in (200, 400, 415, 422), r.text
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert phi, "the files should carry (synthetic) patient fields for this test to mean anything"
    out, err = capfd.readouterr()
    audit_text = audit.read_text()
    assert len(lines(audit_text)) == 6 * len(paths)
    assert_absent(phi, stream.getvalue() + out + err + audit_text)


def test_no_patient_fields_in_logs_committed_files(
    tmp_path: Path, client_factory: Callable[..., TestClient], capfd: pytest.CaptureFixture[str]
) -> None:
    run_files(COMMITTED, tmp_path, client_factory, capfd)


def test_no_patient_fields_in_logs_shared_files(
    tmp_path: Path, client_factory: Callable[..., TestClient], capfd: pytest.CaptureFixture[str]
) -> None:
    paths = sorted(shared_data("dicom").glob("*/*.dcm"))
    run_files(paths, tmp_path, client_factory, capfd)
