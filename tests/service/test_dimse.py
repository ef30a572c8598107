"""The Storage SCP in the service process, against pynetdicom peers: a sending SCU and a receiving SCP for the SRs.

The real-PACS round trip (Orthanc) is in tests/e2e/test_orthanc.py; these run everywhere.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    CTImageStorage,
    DermoscopicPhotographyImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
    VLPhotographicImageStorage,
)

from service.hospital.dicom import SECONDARY_CAPTURE
from service.hospital.sr import TOP_CLASS, class_concept
from tests.conftest import TEST_DATA
from tests.service.test_dicom import PATIENT_ID, PATIENT_NAME, make_dicom
from tests.service.test_lifecycle import free_port

DICOMS = sorted((TEST_DATA / "dicom").glob("*.dcm"))
SCU_AET, SCP_AET, DEST_AET = "TESTSCU", "LESIONSERVE", "SRSINK"


class SrSink:
    """A Storage SCP that keeps every SR it receives (the PACS side of the return path)."""

    def __init__(self, status: int = 0x0000) -> None:
        self.received: list[Dataset] = []
        self.status = status
        self.port = free_port()
        ae = AE(ae_title=DEST_AET)
        ae.add_supported_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian])
        self.associations = 0
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def _accepted(self, event: Any) -> None:
        self.associations += 1

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return self.status

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def sink() -> Iterator[SrSink]:
    s = SrSink()
    yield s
    s.close()


@pytest.fixture
def node(client_factory: Callable[..., TestClient], sink: SrSink, tmp_path: Path) -> tuple[TestClient, int, Path]:
    """A started service with its Storage SCP; (client, SCP port, audit file)."""
    port, audit = free_port(), tmp_path / "audit.jsonl"
    client = client_factory(
        dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=f"{SCU_AET}, OTHER",
        dimse_destination=f"{DEST_AET}@127.0.0.1:{sink.port}", audit_log=str(audit), dimse_timeout_s=10,
    )  # fmt: skip
    return client, port, audit


def scu(aet: str = SCU_AET) -> AE:
    ae = AE(ae_title=aet)
    # one context per transfer syntax, as PACS do: each object goes in its own syntax, without transcoding
    for sop in (DermoscopicPhotographyImageStorage, VLPhotographicImageStorage, SecondaryCaptureImageStorage):
        for ts in (pydicom.uid.JPEGBaseline8Bit, ExplicitVRLittleEndian):
            ae.add_requested_context(sop, [ts])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def send(port: int, datasets: list[Dataset], aet: str = SCU_AET) -> list[Dataset]:
    assoc = scu(aet).associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll until ``condition()`` holds (the outbox delivers after the C-STORE is answered); the bound only ends a hang."""
    until = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > until:
            raise AssertionError(f"not reached: {what}")
        time.sleep(0.02)


def metric(client: TestClient, series: str) -> float:
    """One sample's value from /metrics (counters are process-wide: tests compare before and after)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not exported")


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_committed_dicoms_come_back_as_srs_in_their_study(
    node: tuple[TestClient, int, Path], sink: SrSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client, port, audit = node
    sources = [pydicom.dcmread(p) for p in DICOMS]
    counted = ('lesionserve_dicom_instances_total{entry="dimse",outcome="classified"}',
               'lesionserve_sr_deliveries_total{entry="dimse",outcome="stored"}',
               'lesionserve_dimse_associations_total{outcome="accepted"}')  # fmt: skip
    before = [metric(client, c) for c in counted]
    statuses = send(port, sources)
    assert [int(s.Status) for s in statuses] == [0x0000] * len(DICOMS)  # answered once the SRs are in the outbox
    wait_for(lambda: metric(client, counted[1]) == before[1] + len(DICOMS))  # then delivered by the outbox's sender
    assert len(sink.received) == len(DICOMS)
    by_source = {}
    for sr in sink.received:
        assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        by_source[ref.ReferencedSOPInstanceUID] = sr
    for path, src in zip(DICOMS, sources, strict=True):
        sr = by_source[src.SOPInstanceUID]
        assert (sr.StudyInstanceUID, sr.PatientID, sr.PatientName) == (
            src.StudyInstanceUID,
            src.PatientID,
            src.PatientName,
        )
        assert sr.SeriesInstanceUID != src.SeriesInstanceUID
        # the same image through the REST API gives the same top class
        top = client.post("/v1/classify", content=path.read_bytes(), headers={"content-type": "application/dicom"})
        doc = hd.sr.srread(io.BytesIO(_bytes(sr)))
        group = doc.content.get_image_measurement_groups()[0]
        (top_item,) = [q for q in group.get_qualitative_evaluations() if q.name == TOP_CLASS]
        assert top_item.value == class_concept(top.json()["top"]["code"], top.json()["top"]["name"])
    lines = audit_lines(audit)
    stores = [line for line in lines if "dimse_status" in line.get("channel", {})]
    assert len(stores) == len(DICOMS)
    for line in stores:
        assert line["channel"] == {"entry": "dimse", "calling_ae": SCU_AET, "dimse_status": "0x0000", "sr": "queued"}
        assert len(line["dicom"]["SOPInstanceUID"]) == 64  # hashed
        assert line["model"]["sha256"] == client.get("/v1/models").json()["models"][0]["sha256"]
        assert set(line["answer"]) == {"top", "malignant", "ood"} and line["service_version"]  # what was answered
    # patient attributes go into the SR only: not into the audit trail, not into any log record
    for text in (audit.read_text(), caplog.text):
        assert all(str(s.PatientName) not in text and str(s.PatientID) not in text for s in sources)
    after = [metric(client, c) for c in counted]
    assert [a - b for a, b in zip(after, before, strict=True)] == [len(DICOMS), len(DICOMS), 1]


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_unknown_calling_ae_is_rejected_with_the_reason(node: tuple[TestClient, int, Path], sink: SrSink) -> None:
    client, port, audit = node
    before = metric(client, 'lesionserve_dimse_associations_total{outcome="rejected"}')
    assoc = scu("STRANGER").associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    # rejected-permanent (1), service user (1), calling AE title not recognised (3): PS3.8 9.3.4
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    assert sink.received == []
    (line,) = [x for x in audit_lines(audit) if x.get("channel", {}).get("entry") == "dimse"]
    assert line["outcome"]["problem"].endswith("/dimse-association-rejected")
    assert line["channel"] == {
        "entry": "dimse", "calling_ae": "STRANGER", "reason": "calling AE title not recognised", "folded_since_last": "0"
    }  # fmt: skip
    assert metric(client, 'lesionserve_dimse_associations_total{outcome="rejected"}') == before + 1


def test_wrong_called_ae_is_rejected(node: tuple[TestClient, int, Path]) -> None:
    _, port, _ = node
    assoc = scu().associate("127.0.0.1", port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 0x07  # called AE title not recognised


def test_unsupported_sop_class_is_refused_per_instance_with_0122(
    node: tuple[TestClient, int, Path], sink: SrSink
) -> None:
    client, port, audit = node
    ct = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    before = metric(client, 'lesionserve_dicom_instances_total{entry="dimse",outcome="refused"}')
    (status,) = send(port, [ct])
    assert int(status.Status) == 0x0122  # Refused: SOP Class not supported
    assert str(status.ErrorComment) == "CT Image Storage is not accepted"
    assert sink.received == []
    (line,) = [x for x in audit_lines(audit) if "dimse_status" in x.get("channel", {})]
    assert line["channel"]["dimse_status"] == "0x0122" and line["outcome"]["status"] == 415
    assert line["dicom"]["SOPInstanceUID"] and line["input"]["content_type"] == "application/dicom"
    assert metric(client, 'lesionserve_dicom_instances_total{entry="dimse",outcome="refused"}') == before + 1


def test_accepted_sop_class_in_an_undecodable_syntax_is_refused_at_negotiation(
    node: tuple[TestClient, int, Path],
) -> None:
    client, port, audit = node
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(VLPhotographicImageStorage, [pydicom.uid.DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    before = metric(client, "lesionserve_dimse_contexts_refused_total")
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_established
    try:
        assert {str(c.abstract_syntax): c.result for c in assoc.rejected_contexts} == {
            VLPhotographicImageStorage: 0x04  # transfer syntaxes not supported
        }
    finally:
        assoc.release()
    (line,) = [x for x in audit_lines(audit) if x.get("channel", {}).get("refused_sop_class")]
    assert line["channel"]["refused_sop_class"] == "VL Photographic Image Storage" and line["outcome"]["status"] == 415
    assert metric(client, "lesionserve_dimse_contexts_refused_total") == before + 1


def test_greyscale_secondary_capture_gets_a_failure_status_and_no_sr(
    node: tuple[TestClient, int, Path], sink: SrSink
) -> None:
    client, port, audit = node
    grey = np.full((16, 16, 1), 90, np.uint8)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(grey, sop=SECONDARY_CAPTURE, photometric="MONOCHROME2")))
    before = metric(client, 'lesionserve_dicom_instances_total{entry="dimse",outcome="refused"}')
    (status,) = send(port, [ds])
    assert int(status.Status) == 0xC000  # Error: cannot understand
    assert "MONOCHROME2" in str(status.ErrorComment)
    assert sink.received == []
    (line,) = [x for x in audit_lines(audit) if "dimse_status" in x.get("channel", {})]
    assert line["channel"]["dimse_status"] == "0xC000" and line["outcome"]["status"] == 415
    assert line["dicom"]["SOPInstanceUID"]  # hashed UID of the refused instance
    assert PATIENT_NAME not in audit.read_text() and PATIENT_ID not in audit.read_text()
    assert metric(client, 'lesionserve_dicom_instances_total{entry="dimse",outcome="refused"}') == before + 1


def test_sr_destination_down_the_c_store_succeeds_and_the_sr_arrives_when_it_is_up(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    port, dest_port, audit = free_port(), free_port(), tmp_path / "a.jsonl"
    client = client_factory(
        dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET,
        dimse_destination=f"{DEST_AET}@127.0.0.1:{dest_port}", dimse_timeout_s=5, audit_log=str(audit),
        outbox_retry_base_s=0.05, outbox_retry_max_s=0.2,
    )  # fmt: skip
    retries = 'lesionserve_outbox_retries_total{destination="dimse"}'
    before = metric(client, retries)
    (status,) = send(port, [pydicom.dcmread(DICOMS[0])])
    assert int(status.Status) == 0x0000  # the SR is in the outbox: the sender's work is done
    wait_for(lambda: metric(client, retries) >= before + 2)  # tried, failed, tried again
    assert metric(client, "lesionserve_outbox_pending") == 1
    tries = [x for x in audit_lines(audit) if x.get("channel", {}).get("entry") == "outbox"]
    assert tries and all(x["channel"]["result"] == "retry" for x in tries)
    assert "refused or did not answer" in tries[0]["channel"]["reason"]
    late = SrSink()  # the PACS comes back, on the port it was configured at
    late.server.shutdown()
    late.port = dest_port
    late.server = AE(ae_title=DEST_AET).start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, late._store)], contexts=[_sr_context()])  # fmt: skip
    try:
        wait_for(lambda: metric(client, "lesionserve_outbox_pending") == 0)
        assert len(late.received) == 1
    finally:
        late.close()
    (done,) = [x for x in audit_lines(audit) if x.get("channel", {}).get("result") == "delivered"]
    assert done["outcome"]["status"] == 200 and done["channel"]["destination"] == "dimse"


def _sr_context() -> Any:
    from pynetdicom import build_context

    return build_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian])


def test_pacs_out_of_resources_is_retried(client_factory: Callable[..., TestClient], tmp_path: Path) -> None:
    busy = SrSink(status=0xA700)  # the PACS is out of resources: a transient refusal
    try:
        port = free_port()
        client = client_factory(
            dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET,
            dimse_destination=f"{DEST_AET}@127.0.0.1:{busy.port}", audit_log=str(tmp_path / "a.jsonl"),
            outbox_retry_base_s=0.05, outbox_retry_max_s=0.1,
        )  # fmt: skip
        (status,) = send(port, [pydicom.dcmread(DICOMS[0])])
        assert int(status.Status) == 0x0000
        wait_for(lambda: len(busy.received) >= 2)
        busy.status = 0x0000  # it recovers
        wait_for(lambda: metric(client, "lesionserve_outbox_pending") == 0)
    finally:
        busy.close()
    assert metric(client, "lesionserve_outbox_dead_letters") == 0
    lines = [x for x in audit_lines(tmp_path / "a.jsonl") if x.get("channel", {}).get("entry") == "outbox"]
    assert "answered 0xA700" in lines[0]["channel"]["reason"] and lines[-1]["channel"]["result"] == "delivered"


def test_pacs_refusing_the_sr_makes_a_dead_letter_that_an_admin_can_retry(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    refusing = SrSink(status=0x0122)  # SOP Class not supported: retrying cannot help
    admin = "admin-key-0123456789"
    try:
        port = free_port()
        client = client_factory(
            dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET,
            dimse_destination=f"{DEST_AET}@127.0.0.1:{refusing.port}", audit_log=str(tmp_path / "a.jsonl"),
            api_keys=f"ops:{admin},user:user-key-0123456789", admin_key_ids="ops",
        )  # fmt: skip
        auth = {"authorization": f"Bearer {admin}"}
        before = metric_auth(client, 'lesionserve_outbox_dead_lettered_total{reason="refused"}', auth)
        (status,) = send(port, [pydicom.dcmread(DICOMS[0])])
        assert int(status.Status) == 0x0000
        wait_for(lambda: metric_auth(client, "lesionserve_outbox_dead_letters", auth) == 1)
        assert len(refusing.received) == 1  # once: not retried
        assert metric_auth(client, 'lesionserve_outbox_dead_lettered_total{reason="refused"}', auth) == before + 1
        (dead,) = client.get("/v1/admin/outbox/letters", headers=auth).json()
        assert (dead["reason"], dead["destination"], dead["attempts"]) == ("refused", "dimse", 1)
        assert "0x0122" in dead["last_error"]
        r = client.get("/v1/admin/outbox/letters", headers={"authorization": "Bearer user-key-0123456789"})
        assert r.status_code == 403
        refusing.status = 0x0000  # the PACS administrator adds the SR class
        r = client.post("/v1/admin/outbox/retry", json={"ids": [dead["id"]]}, headers=auth)
        assert r.status_code == 200 and r.json() == {"count": 1}
        wait_for(lambda: len(refusing.received) == 2)
        wait_for(lambda: client.get("/v1/admin/outbox", headers=auth).json()["pending"] == 0)
    finally:
        refusing.close()
    summary = client.get("/v1/admin/outbox", headers=auth).json()
    assert (summary["dead"], summary["pending"]) == (0, 0)
    admin_lines = [x for x in audit_lines(tmp_path / "a.jsonl") if x.get("channel", {}).get("entry") == "outbox-admin"]
    assert admin_lines[0]["channel"] == {"entry": "outbox-admin", "action": "retry", "count": "1"}
    assert admin_lines[0]["key_id"] == "ops"


def metric_auth(client: TestClient, series: str, headers: dict[str, str]) -> float:
    for line in client.get("/metrics", headers=headers).text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not exported")


def test_outbox_full_answers_out_of_resources(client_factory: Callable[..., TestClient], tmp_path: Path) -> None:
    port = free_port()
    client = client_factory(
        dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET,
        dimse_destination=f"{DEST_AET}@127.0.0.1:{free_port()}", dimse_timeout_s=5, outbox_max_items=2,
        audit_log=str(tmp_path / "a.jsonl"),
    )  # fmt: skip
    before = metric(client, 'lesionserve_rejections_total{reason="outbox_full"}')
    statuses = send(port, [pydicom.dcmread(p) for p in DICOMS])  # 3 instances, room for 2, the PACS down
    assert [int(s.Status) for s in statuses] == [0x0000, 0x0000, 0xA700]
    assert str(statuses[2].ErrorComment) == "the result outbox is full (2 SRs wait for the PACS)"
    assert metric(client, 'lesionserve_rejections_total{reason="outbox_full"}') == before + 1
    assert metric(client, "lesionserve_outbox_pending") == 2
    lines = [x for x in audit_lines(tmp_path / "a.jsonl") if "dimse_status" in x.get("channel", {})]
    assert lines[2]["channel"]["dimse_status"] == "0xA700" and lines[2]["outcome"]["problem"].endswith("/outbox-full")


def test_concurrent_associations_share_batches(node: tuple[TestClient, int, Path], sink: SrSink) -> None:
    _, port, _ = node
    results: list[int] = []

    def one() -> None:
        results.extend(int(s.Status) for s in send(port, [pydicom.dcmread(DICOMS[0])]))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [0] * 4
    client = node[0]
    wait_for(lambda: len(sink.received) >= 1 and metric(client, "lesionserve_outbox_pending") == 0)
    # the same source gives the same SR UID every time: the outbox keeps one while it waits, and the PACS
    # replaces rather than files copies of those sent again after an earlier one was delivered
    assert len({sr.SOPInstanceUID for sr in sink.received}) == 1


def test_dimse_settings_are_checked_at_start(settings_factory: Callable[..., Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="DIMSE_ALLOWED_AETS"):
        settings_factory(dimse_enabled=True, dimse_destination="A@h:1")
    with pytest.raises(ValidationError, match="DIMSE_DESTINATION"):
        settings_factory(dimse_enabled=True, dimse_allowed_aets="A")
    with pytest.raises(ValidationError, match="AE_TITLE@host:port"):
        settings_factory(dimse_enabled=True, dimse_allowed_aets="A", dimse_destination="nohost")
    with pytest.raises(ValidationError, match="AE title"):
        settings_factory(dimse_ae_title="MUCH_TOO_LONG_AE_TITLE")
    with pytest.raises(ValidationError, match="AE title"):
        settings_factory(dimse_allowed_aets="GOOD,BAD\\AET")


def test_srs_waiting_when_the_service_stops_are_delivered_after_its_restart(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    port, dest_port, outbox = free_port(), free_port(), tmp_path / "outbox.sqlite"
    settings = dict(
        dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET, dimse_timeout_s=5,
        dimse_destination=f"{DEST_AET}@127.0.0.1:{dest_port}", outbox_path=outbox, outbox_retry_base_s=0.05,
        outbox_retry_max_s=0.1,
    )  # fmt: skip
    first = client_factory(**settings)
    assert [int(s.Status) for s in send(port, [pydicom.dcmread(p) for p in DICOMS])] == [0x0000] * len(DICOMS)
    assert metric(first, "lesionserve_outbox_pending") == len(DICOMS)  # the PACS is down
    first.__exit__(None, None, None)  # the service stops (its lifespan ends: the sender stops, the file closes)
    late = SrSink()
    late.server.shutdown()
    late.server = AE(ae_title=DEST_AET).start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, late._store)], contexts=[_sr_context()])  # fmt: skip
    try:
        second = client_factory(**settings)  # the same file: what the first left is delivered first
        wait_for(lambda: metric(second, "lesionserve_outbox_pending") == 0)
        assert len(late.received) == len(DICOMS)
    finally:
        late.close()
    refs = {
        sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID for sr in late.received
    }  # fmt: skip
    assert refs == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in DICOMS}


def test_outbox_admin_refuses_bad_selections_and_is_501_without_an_outbox(
    client_factory: Callable[..., TestClient],
) -> None:
    keys = {"api_keys": "ops:ops-key-0123456789", "admin_key_ids": "ops"}
    auth = {"authorization": "Bearer ops-key-0123456789"}
    plain = client_factory(**keys)  # no PACS entry: no outbox
    r = plain.get("/v1/admin/outbox", headers=auth)
    assert r.status_code == 501 and r.json()["type"].endswith("/not-configured")
    client = client_factory(
        dimse_enabled=True, dimse_port=free_port(), dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET,
        dimse_destination=f"{DEST_AET}@127.0.0.1:{free_port()}", **keys,
    )  # fmt: skip
    for body in ({}, {"ids": [1], "all": True}, {"ids": "1"}):
        r = client.post("/v1/admin/outbox/retry", json=body, headers=auth)
        assert r.status_code == 400 and r.json()["type"].endswith("/bad-request"), body
    assert client.post("/v1/admin/outbox/drop", json={"ids": [12345]}, headers=auth).json() == {"count": 0}
    assert client.get("/v1/admin/outbox/letters?state=lost", headers=auth).status_code == 400
    assert client.get("/v1/admin/outbox").status_code == 401


def test_a_3x3_instance_is_refused_as_cannot_understand_and_gets_no_sr(
    node: tuple[TestClient, int, Path], sink: SrSink
) -> None:
    """LESIONSERVE_MIN_IMAGE_SIDE over C-STORE: the sender's object is refused (C000), so it keeps the image."""
    _client, port, audit = node
    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.full((3, 3, 3), 120, np.uint8))))
    (status,) = send(port, [ds])
    assert int(status.Status) == 0xC000
    assert "3x3" in str(status.ErrorComment)
    assert sink.received == []
    (line,) = [x for x in audit_lines(audit) if "dimse_status" in x.get("channel", {})]
    assert line["outcome"]["status"] == 422 and line["outcome"]["problem"].endswith("/image-too-small")
