"""The Storage SCP under hostile peers (issue 28, findings 1, 5 and 17), through a real socket and pynetdicom peers."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from tests.service.test_dicom import make_dicom
from tests.service.test_dimse import DEST_AET, DICOMS, SCP_AET, SCU_AET, SrSink, audit_lines, metric, scu, send
from tests.service.test_lifecycle import free_port

CAP = 64 * 1024


@pytest.fixture
def sink() -> Iterator[SrSink]:
    s = SrSink()
    yield s
    s.close()


def start(
    client_factory: Callable[..., TestClient], sink: SrSink, tmp_path: Path, **settings: object
) -> tuple[TestClient, int, Path]:
    port, audit = free_port(), tmp_path / "audit.jsonl"
    values: dict[str, object] = {
        "dimse_enabled": True, "dimse_port": port, "dimse_host": "127.0.0.1", "dimse_allowed_aets": SCU_AET,
        "dimse_destination": f"{DEST_AET}@127.0.0.1:{sink.port}", "audit_log": str(audit), "dimse_timeout_s": 10,
    }  # fmt: skip
    values.update(settings)
    return client_factory(**values), port, audit


def silent(port: int) -> socket.socket:
    """A TCP connection that never sends an A-ASSOCIATE-RQ (the bound only ends a hang of the test)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(8)
    return s


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_dataset_over_the_upload_cap_is_refused_c000_and_the_association_goes_on(
    client_factory: Callable[..., TestClient], sink: SrSink, tmp_path: Path
) -> None:
    client, port, audit = start(client_factory, sink, tmp_path, max_upload_bytes=CAP)
    big = pydicom.dcmread(pydicom.filebase.DicomBytesIO(make_dicom(np.full((192, 192, 3), 120, np.uint8))))
    small = pydicom.dcmread(DICOMS[0])
    assert len(big.PixelData) > CAP > DICOMS[0].stat().st_size
    refused, stored = send(port, [big, small])  # one association: the refusal does not end it
    assert int(refused.Status) == 0xC000
    assert str(refused.ErrorComment).startswith("the dataset is") and f"limit is {CAP}" in str(refused.ErrorComment)
    assert int(stored.Status) == 0x0000
    line = next(x for x in audit_lines(audit) if x.get("channel", {}).get("dimse_status") == "0xC000")
    assert line["outcome"]["problem"].endswith("/payload-too-large") and line["input"]["bytes"] is None
    assert metric(client, 'lesionserve_rejections_total{reason="too_large"}') >= 1


def test_silent_connections_take_no_association_slot(
    client_factory: Callable[..., TestClient], sink: SrSink, tmp_path: Path
) -> None:
    _, port, _ = start(client_factory, sink, tmp_path, dimse_max_associations=2)
    quiet = [silent(port) for _ in range(4)]  # twice the slots, none says anything
    try:
        (status,) = send(port, [pydicom.dcmread(DICOMS[0])])  # the allowed PACS still gets in
        assert int(status.Status) == 0x0000
    finally:
        for s in quiet:
            s.close()


def test_an_allowed_peer_over_the_association_limit_is_rejected_transient(
    client_factory: Callable[..., TestClient], sink: SrSink, tmp_path: Path
) -> None:
    _, port, audit = start(client_factory, sink, tmp_path, dimse_max_associations=1)
    first = scu().associate("127.0.0.1", port, ae_title=SCP_AET)
    try:
        assert first.is_established
        second = scu().associate("127.0.0.1", port, ae_title=SCP_AET)
        assert second.is_rejected
        rj = second.acceptor.primitive  # rejected-transient, service provider (presentation), local limit exceeded
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        first.release()
    (line,) = [x for x in audit_lines(audit) if x.get("channel", {}).get("reason") == "too many associations"]
    assert line["channel"]["calling_ae"] == SCU_AET
    (status,) = send(port, [pydicom.dcmread(DICOMS[0])])  # the slot came back with the release
    assert int(status.Status) == 0x0000


def test_a_connection_that_sends_nothing_is_closed_after_the_request_timeout(
    client_factory: Callable[..., TestClient], sink: SrSink, tmp_path: Path
) -> None:
    _, port, _ = start(client_factory, sink, tmp_path, dimse_request_timeout_s=0.5)
    s = silent(port)
    try:
        assert closed_by_server(s)  # old code: open for DIMSE_TIMEOUT_S (10 s here), past this test's 8 s bound
    finally:
        s.close()


def test_at_the_connection_cap_the_oldest_silent_connection_makes_room(
    client_factory: Callable[..., TestClient], sink: SrSink, tmp_path: Path
) -> None:
    _, port, _ = start(client_factory, sink, tmp_path, dimse_max_connections=3, dimse_request_timeout_s=30)
    held = [silent(port) for _ in range(3)]
    try:
        (status,) = send(port, [pydicom.dcmread(DICOMS[0])])  # the allowed PACS gets in at once, cap or not
        assert int(status.Status) == 0x0000
        assert closed_by_server(held[0])  # the oldest silent one was closed for it
        held[1].settimeout(0.2)
        assert not closed_by_server(held[1])  # the others still wait for their request
    finally:
        for s in held:
            s.close()


def test_rejections_from_anyone_are_folded_into_one_line_per_reason(
    client_factory: Callable[..., TestClient], sink: SrSink, tmp_path: Path
) -> None:
    _, port, audit = start(client_factory, sink, tmp_path)
    for n in range(6):
        assert scu(f"STRANGER{n}").associate("127.0.0.1", port, ae_title=SCP_AET).is_rejected
    lines = [x for x in audit_lines(audit) if x.get("channel", {}).get("entry") == "dimse"]
    assert len(lines) == 1  # old code: 6 audit lines and 6 warnings
    assert lines[0]["channel"] == {
        "entry": "dimse", "calling_ae": "STRANGER0", "reason": "calling AE title not recognised",
        "folded_since_last": "0",
    }  # fmt: skip
