"""Patient data never reaches a log (issue 19): mutated DICOMs carrying canary patient values go through
the real HTTP route while every log stream is captured (the app log in the service's own JSON format at
DEBUG, the audit trail, stderr at the file-descriptor level). No canary may appear, and no mutation may
turn into a 500.

The short form runs in ``make test`` (about a minute on the 2-core machine); set
``LESIONSERVE_CANARY_CASES`` for a longer run, e.g. ``LESIONSERVE_CANARY_CASES=20000``.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

import service.hospital.dicom
from service.bench import streams
from service.bench.streams import CANARY_BIRTH_DATE, CANARY_MRN, CANARY_NAME, TS, pattern
from service.logs import JsonFormatter
from tests.conftest import TEST_DATA

ClientFactory = Callable[..., TestClient]
CANARIES = (CANARY_NAME, CANARY_BIRTH_DATE, CANARY_MRN, "CANARY", "QX", "7Q3Z")
CASES = int(os.environ.get("LESIONSERVE_CANARY_CASES", "4000"))
_VRS = [b"AE", b"AS", b"CS", b"DA", b"DS", b"IS", b"LO", b"OB", b"PN", b"SH", b"SQ", b"UI", b"UL", b"UN", b"US", b"UT"]


@pytest.fixture
def app_log() -> Iterator[io.StringIO]:
    """The app log as production writes it: the root logger, the service's JSON formatter, DEBUG."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def canary_bases() -> list[bytes]:
    """Valid objects of every codec, plus the committed real files with the canaries put in."""
    img = pattern(40, 48)
    bases = [
        streams.dicom([streams.jpeg(img)], 40, 48, TS.JPEGBaseline8Bit, "YBR_FULL_422"),
        streams.dicom([streams.jpeg_lossless(img)], 40, 48, TS.JPEGLosslessSV1),
        streams.dicom([streams.jpeg_ls(img)], 40, 48, TS.JPEGLSLossless),
        streams.dicom([streams.j2k(img)], 40, 48, TS.JPEG2000Lossless),
        streams.dicom([streams.rle(img)], 40, 48, TS.RLELossless),
        streams.dicom(img.tobytes(), 40, 48),
    ]
    for path in sorted((TEST_DATA / "dicom").glob("*.dcm"))[:1]:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientBirthDate, ds.PatientID = CANARY_NAME, CANARY_BIRTH_DATE, CANARY_MRN
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        bases.append(buf.getvalue())
    return bases


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Random 1-4 byte changes in the header (before Pixel Data), or an element re-encoded with another
    VR and an odd length that swallows its neighbours (the review's 500), or a cut."""
    out = bytearray(data)
    header_end = data.find(b"\xe0\x7f\x10\x00", 132)
    header_end = header_end if header_end > 0 else len(data)
    kind = rng.random()
    if kind < 0.55:
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(132, header_end)] = rng.randrange(256)
    elif kind < 0.9:  # explicit VR element: tag(4) VR(2) len(2); pick one and re-encode it
        starts = [
            m.start() for m in re.finditer(rb"[\x02\x08\x10\x18\x20\x28]\x00..(?:[A-Z]{2})", data[132:header_end])
        ]
        pos = 132 + rng.choice(starts) if starts else 132
        out[pos + 4 : pos + 6] = rng.choice(_VRS)
        if rng.random() < 0.7:
            struct.pack_into("<H", out, pos + 6, rng.choice([1, 3, 5, 17, 33, 65, 129, 255, 0xFFFF]))
    else:
        out = out[: rng.randrange(132, len(out))]
    return bytes(out)


def assert_no_canary(text: str, where: str) -> None:
    for canary in CANARIES:
        assert canary not in text, f"canary {canary!r} reached {where}"


def test_mutated_dicoms_never_leak_patient_data_nor_500(
    client_factory: ClientFactory, tmp_path: Path, app_log: io.StringIO, capfd: pytest.CaptureFixture[str]
) -> None:
    audit = tmp_path / "audit.jsonl"
    client = client_factory(audit_log=str(audit), log_level="DEBUG")
    rng = random.Random(19)
    bases = canary_bases()
    statuses: dict[int, int] = {}
    for n in range(CASES):
        body = mutate(bases[n % len(bases)], rng)
        r = client.post("/v1/classify", content=body, headers={"content-type": "application/dicom"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code != 500, f"case {n}: 500 {r.text}"
        if r.status_code != 200:  # a problem detail is text the client may log: no header values either
            assert_no_canary(r.text, f"the problem detail of case {n}")
    out, err = capfd.readouterr()
    assert_no_canary(app_log.getvalue(), "the app log")
    assert_no_canary(audit.read_text(), "the audit trail")
    assert_no_canary(out + err, "stdout/stderr")
    assert len(audit.read_text().splitlines()) == CASES  # every answered request was audited
    assert statuses.get(400, 0) > CASES // 10 and statuses.get(200, 0) > CASES // 10, statuses  # both paths ran


def test_unmutated_canary_files_are_answered_and_leak_nothing(
    client_factory: ClientFactory, app_log: io.StringIO, capfd: pytest.CaptureFixture[str]
) -> None:
    client = client_factory(log_level="DEBUG")
    for body in canary_bases():
        r = client.post("/v1/classify", content=body, headers={"content-type": "application/dicom"})
        assert r.status_code == 200, r.text
        assert_no_canary(r.text, "the JSON answer")
    out, err = capfd.readouterr()
    assert_no_canary(app_log.getvalue() + out + err, "a log")


def test_a_500_is_logged_as_types_and_locations_without_the_message(
    client_factory: ClientFactory,
    app_log: io.StringIO,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real fault inside the DICOM path whose message quotes header bytes (as pydicom's do).
    def fault(*args: object, **kwargs: object) -> None:
        raise ValueError(f"bad value {CANARY_NAME!r} in element (0010,0010)")

    monkeypatch.setattr(service.hospital.dicom, "center_crop_resize", fault)
    client = client_factory()
    r = client.post("/v1/classify", content=canary_bases()[0], headers={"content-type": "application/dicom"})
    assert r.status_code == 500 and CANARY_NAME not in r.text
    out, err = capfd.readouterr()
    log = app_log.getvalue()
    assert "ValueError" in log and "service/hospital/dicom.py" in log  # type and location are kept
    assert_no_canary(log + out + err, "the 500's log line")


def test_pydicom_warnings_and_log_records_carry_no_header_values(
    client_factory: ClientFactory, app_log: io.StringIO, capfd: pytest.CaptureFixture[str]
) -> None:
    # A real-world UID with a leading-zero component: pydicom warns quoting it (3 times a request, before).
    odd_uid = "1.2.0826.0.1.3680043.2.19230607"
    data = streams.dicom([streams.jpeg(pattern(40, 48))], 40, 48, TS.JPEGBaseline8Bit, "YBR_FULL_422",
                         StudyInstanceUID=odd_uid)  # fmt: skip
    client = client_factory(log_level="DEBUG")
    r = client.post("/v1/classify", content=data, headers={"content-type": "application/dicom"})
    assert r.status_code == 200
    logging.getLogger("pydicom").warning("value %s", CANARY_NAME)  # pydicom's own logger, as warn_and_log does
    out, err = capfd.readouterr()
    text = app_log.getvalue() + out + err
    assert odd_uid not in text and CANARY_NAME not in text
    assert "withheld" in text  # summarised, not silently dropped
