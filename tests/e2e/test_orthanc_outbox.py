"""The SR outbox against a real PACS (Debian's Orthanc) and a real service process (``python -m service``).

- the PACS down while 20 images arrive by C-STORE: every C-STORE accepted; the service restarted; the PACS
  started: all 20 SRs in Orthanc, one per image;
- kill -9 of the service at the worst moment of a delivery (Orthanc has stored an SR, its C-STORE response is
  held back by a proxy): after a restart, no SR lost and none filed twice;
- a PACS that takes no SR (Orthanc accepting only JPEG Baseline): a dead letter with the reason, once;
- the outbox full: Orthanc, sending, is told Out of Resources (A700) for the image that did not fit.

Without Orthanc they skip with the reason (fail under CI), as tests/e2e/test_orthanc.py.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    DermoscopicPhotographyImageStorage,
    VLPhotographicImageStorage,
)

from service.bench.load import Server
from tests.deploy.conftest import stop_process
from tests.e2e.test_orthanc import DICOMS, DICOMWEB_PLUGIN, ORTHANC, need_orthanc
from tests.service.test_dimse import wait_for
from tests.service.test_lifecycle import free_port

pytestmark = pytest.mark.slow
SCP_AET = "LESIONSERVE"
IMAGES = 20


def images(n: int) -> list[pydicom.Dataset]:
    """``n`` distinct instances: the committed files with new SOP Instance UIDs (a PACS sends distinct images)."""
    out = []
    for i in range(n):
        ds = pydicom.dcmread(DICOMS[i % len(DICOMS)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


def send(port: int, datasets: list[pydicom.Dataset]) -> list[int]:
    ae = AE(ae_title="ORTHANC")  # as the PACS would: lesionserve allows this calling AE title
    for sop in (DermoscopicPhotographyImageStorage, VLPhotographicImageStorage):
        ae.add_requested_context(sop, [pydicom.uid.JPEGBaseline8Bit])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


class OrthancProcess:
    """Orthanc on fixed ports (so that it can be started after lesionserve, which was told where it is)."""

    def __init__(self, folder: Path, http_port: int, dicom_port: int, scp_port: int, **extra: Any) -> None:
        need_orthanc()
        storage = folder / "orthanc-storage"
        storage.mkdir(exist_ok=True)
        config = {
            "Name": "outbox-test-pacs", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)], "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "DicomCheckCalledAet": False, "DicomScuTimeout": 60,
            "DicomModalities": {"lesionserve": {"AET": SCP_AET, "Host": "127.0.0.1", "Port": scp_port}},
            **extra,
        }  # fmt: skip
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log_path = folder / "orthanc.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [str(ORTHANC), str(folder / "orthanc.json")], stdout=self._log, stderr=subprocess.STDOUT
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc did not start: {self.log_path.read_text()[-2000:]}")
            try:
                return self.http.get("/system").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 60.0, "Orthanc answering")

    def srs(self) -> list[pydicom.Dataset]:
        out = []
        for instance in self.http.post("/tools/find", json={"Level": "Instance", "Query": {"Modality": "SR"}}).json():
            out.append(pydicom.dcmread(io.BytesIO(self.http.get(f"/instances/{instance}/file").content)))
        return out

    def count(self) -> int:
        return int(self.http.get("/statistics").json()["CountInstances"])

    def close(self) -> None:
        self.http.close()
        stop_process(self.proc, 30)
        self._log.close()


class HoldingProxy:
    """A TCP proxy in front of Orthanc's DICOM port that passes ``allow`` C-STORE responses, then holds the rest.

    DICOM Upper Layer PDUs are framed (type, reserved, 4-byte length): the proxy forwards whole PDUs from
    Orthanc and counts the P-DATA-TF ones (type 4, here each a C-STORE response). After ``allow`` of them it
    stops forwarding: Orthanc has stored the next SR but lesionserve never hears so, the moment a crash
    is worst for an outbox (delivered, not recorded).
    """

    def __init__(self, target_port: int, allow: int) -> None:
        self.target, self.allow, self.passed = target_port, allow, 0
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, server]
            threading.Thread(target=self._raw, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pdus, args=(server, client), daemon=True).start()

    @staticmethod
    def _raw(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def _pdus(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while head := _read(src, 6):
                pdu = head + _read(src, struct.unpack(">I", head[2:6])[0])
                with self._lock:
                    if head[0] == 0x04:
                        if self.passed >= self.allow:
                            continue  # held back: read and dropped
                        self.passed += 1
                dst.sendall(pdu)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for s in self._sockets:
            s.close()


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


@pytest.fixture
def ports() -> dict[str, int]:
    return {"http": free_port(), "dicom": free_port(), "scp": free_port()}


@pytest.fixture
def run_service(tmp_path: Path, tiny_onnx: Path, ports: dict[str, int]) -> Iterator[Callable[..., Server]]:
    """``start(destination_port, **settings)`` -> a ready ``python -m service`` with its SCP and an outbox in tmp."""
    started: list[Server] = []

    def start(destination_port: int, **settings: str) -> Server:
        n = len(started)
        server = Server.service(
            tiny_onnx, tmp_path / f"service-{n}.log", providers="CPUExecutionProvider", dimse_enabled="true",
            dimse_host="127.0.0.1", dimse_port=str(ports["scp"]), dimse_allowed_aets="ORTHANC",
            dimse_destination=f"ORTHANC@127.0.0.1:{destination_port}", outbox_path=str(tmp_path / "outbox.sqlite"),
            outbox_retry_base_s="0.2", outbox_retry_max_s="1", audit_log=str(tmp_path / "audit.jsonl"),
            log_format="text", **settings,
        )  # fmt: skip
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def metric(server: Server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def one_sr_per_image(srs: list[pydicom.Dataset], sent: list[pydicom.Dataset]) -> None:
    refs = [
        sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        for sr in srs
    ]
    assert sorted(r.ReferencedSOPInstanceUID for r in refs) == sorted(ds.SOPInstanceUID for ds in sent)
    assert len({sr.SOPInstanceUID for sr in srs}) == len(sent)


def test_pacs_down_while_images_arrive_service_restarted_every_sr_arrives_once(
    tmp_path: Path, ports: dict[str, int], run_service: Callable[..., Server]
) -> None:
    need_orthanc()
    service = run_service(ports["dicom"])  # Orthanc is not running: the SR destination is down
    sent = images(IMAGES)
    assert send(ports["scp"], sent) == [0x0000] * IMAGES  # every C-STORE accepted: the SRs are in the outbox
    wait_for(
        lambda: metric(service, 'lesionserve_outbox_retries_total{destination="dimse"}') >= 1, 180.0, "a failed try"
    )
    service.stop()  # SIGTERM: a restart of the service with 20 SRs pending
    service = run_service(ports["dicom"])
    assert metric(service, "lesionserve_outbox_pending") == IMAGES
    pacs = OrthancProcess(tmp_path, ports["http"], ports["dicom"], ports["scp"])  # patch night over
    try:
        wait_for(lambda: metric(service, "lesionserve_outbox_pending") == 0, 180.0, "the outbox drained")
        srs = pacs.srs()
        assert len(srs) == IMAGES and pacs.count() == IMAGES
        one_sr_per_image(srs, sent)
    finally:
        pacs.close()
    assert metric(service, "lesionserve_outbox_dead_letters") == 0


def test_kill_9_between_the_pacs_storing_an_sr_and_the_outbox_recording_it_loses_and_duplicates_nothing(
    tmp_path: Path, ports: dict[str, int], run_service: Callable[..., Server]
) -> None:
    need_orthanc()
    pacs = OrthancProcess(tmp_path, ports["http"], ports["dicom"], ports["scp"])
    allow = 5
    proxy = HoldingProxy(ports["dicom"], allow)
    try:
        service = run_service(proxy.port, dimse_timeout_s="300")  # waits on the held response, never times out
        sent = images(IMAGES)
        assert send(ports["scp"], sent) == [0x0000] * IMAGES
        # 5 responses passed; Orthanc stored the 6th SR and its response is held: the sender is mid-delivery
        wait_for(lambda: pacs.count() == allow + 1, 180.0, "Orthanc storing the held SR")
        assert metric(service, 'lesionserve_outbox_delivered_total{destination="dimse"}') == allow
        service.proc.kill()  # kill -9
        service.proc.wait()
        proxy.close()
        service = run_service(ports["dicom"])  # restarted, straight to Orthanc
        wait_for(lambda: metric(service, "lesionserve_outbox_pending") == 0, 180.0, "the outbox drained")
        # the held SR was sent again (at least once), with the same SOP Instance UID: Orthanc keeps one
        assert metric(service, 'lesionserve_outbox_delivered_total{destination="dimse"}') == IMAGES - allow
        srs = pacs.srs()
        assert len(srs) == IMAGES and pacs.count() == IMAGES
        one_sr_per_image(srs, sent)
    finally:
        proxy.close()
        pacs.close()


def test_a_pacs_that_takes_no_sr_gives_a_dead_letter_with_the_reason(
    tmp_path: Path, ports: dict[str, int], run_service: Callable[..., Server]
) -> None:
    need_orthanc()
    # Orthanc 1.10 has no per-SOP-class switch; accepting only JPEG Baseline refuses every SR context we offer
    pacs = OrthancProcess(
        tmp_path, ports["http"], ports["dicom"], ports["scp"], AcceptedTransferSyntaxes=["1.2.840.10008.1.2.4.50"]
    )
    try:
        service = run_service(ports["dicom"], api_keys="ops:ops-key-0123456789", admin_key_ids="ops")
        auth = {"authorization": "Bearer ops-key-0123456789"}
        assert send(ports["scp"], images(1)) == [0x0000]
        wait_for(
            lambda: httpx.get(service.url + "/v1/admin/outbox", headers=auth).json()["dead"] == 1,
            180.0,
            "a dead letter",
        )
        (dead,) = httpx.get(service.url + "/v1/admin/outbox/letters", headers=auth).json()
        assert dead["reason"] == "refused" and dead["attempts"] == 1  # once: retrying cannot help
        assert dead["last_error"] == "the PACS accepted no presentation context for Comprehensive SR Storage"
        assert pacs.count() == 0
    finally:
        pacs.close()
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    (line,) = [x for x in lines if x.get("channel", {}).get("entry") == "outbox"]
    assert line["channel"]["result"] == "dead" and line["channel"]["reason"].startswith("refused: the PACS accepted")


def test_outbox_full_orthanc_sending_is_told_out_of_resources(
    tmp_path: Path, ports: dict[str, int], run_service: Callable[..., Server]
) -> None:
    need_orthanc()
    pacs = OrthancProcess(tmp_path, ports["http"], ports["dicom"], ports["scp"])
    try:
        run_service(free_port(), outbox_max_items="2")  # SRs go to a PACS that is down: nothing drains
        ids = []
        for ds in images(3):
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            ids.append(pacs.http.post("/instances", content=buf.getvalue()).json()["ID"])
        body = {"Resources": ids[:2], "Synchronous": True}
        assert pacs.http.post("/modalities/lesionserve/store", json=body, timeout=120).status_code == 200
        r = pacs.http.post(
            "/modalities/lesionserve/store", json={"Resources": ids[2:], "Synchronous": True}, timeout=120
        )
        assert r.status_code != 200 and "0xa700" in r.text.lower()  # Orthanc's job: Out of Resources, retry later
    finally:
        pacs.close()
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    statuses = [x["channel"]["dimse_status"] for x in lines if "dimse_status" in x.get("channel", {})]
    assert statuses == ["0x0000", "0x0000", "0xA700"]
