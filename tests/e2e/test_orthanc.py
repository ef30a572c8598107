"""The PACS round trip against a real PACS: Debian's Orthanc with its DICOMweb plugin.

Each test starts Orthanc on free ports with a temporary storage folder and a config that knows
lesionserve's Storage SCP as a modality, and a lesionserve app (the tiny test model) whose SR destination
and DICOMweb origin are that Orthanc. Orthanc sends by C-STORE (its REST ``/modalities/{id}/store``) or is
read by WADO-RS; the SRs are looked up in Orthanc afterwards. Without Orthanc the tests skip with the
reason on a developer's machine and fail under CI, which installs it (.ci/run).
"""

from __future__ import annotations

import io
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from fastapi.testclient import TestClient

from service.hospital.dicom import SECONDARY_CAPTURE
from service.hospital.sr import TOP_CLASS, class_concept
from tests.conftest import TEST_DATA, in_ci
from tests.deploy.conftest import stop_process
from tests.service.conftest import client_factory, settings_factory  # noqa: F401  (fixtures)
from tests.service.test_dicom import make_dicom
from tests.service.test_dimse import wait_for
from tests.service.test_lifecycle import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
ROUTING_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "orthanc" / "route-to-lesionserve.lua"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMS = sorted((TEST_DATA / "dicom").glob("*.dcm"))
SCP_AET = "LESIONSERVE"
pytestmark = pytest.mark.slow


def need_orthanc() -> None:
    missing = [str(p) for p in (ORTHANC, DICOMWEB_PLUGIN) if not p.exists()]
    if missing:
        if in_ci():
            pytest.fail(f"{', '.join(missing)} missing under CI, where .ci/run installs orthanc and orthanc-dicomweb")
        pytest.skip(
            f"Orthanc not installed ({', '.join(missing)}): apt-get install orthanc orthanc-dicomweb (CI has it)"
        )


@dataclass
class Orthanc:
    http: httpx.Client
    dicom_port: int
    dicomweb_url: str
    scp_port: int  # lesionserve's Storage SCP, registered in Orthanc as modality "lesionserve"

    def upload(self, data: bytes) -> dict[str, Any]:
        r = self.http.post("/instances", content=data)
        r.raise_for_status()
        return dict(r.json())

    def store_to_lesionserve(self, orthanc_ids: list[str], local_aet: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"Resources": orthanc_ids, "Synchronous": True}
        if local_aet:
            body["LocalAet"] = local_aet
        return self.http.post("/modalities/lesionserve/store", json=body, timeout=120)

    def srs_in_study(self, study_uid: str) -> list[pydicom.Dataset]:
        found = self.http.post(
            "/tools/find", json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
        ).json()
        out = []
        for series in found:
            for instance in self.http.get(f"/series/{series}/instances").json():
                out.append(pydicom.dcmread(io.BytesIO(self.http.get(f"/instances/{instance['ID']}/file").content)))
        return out

    def instance_count(self) -> int:
        return int(self.http.get("/statistics").json()["CountInstances"])

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.http.get("/jobs", params={"expand": ""}).json())


@pytest.fixture
def orthanc(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Orthanc]:
    """Orthanc on free ports; parametrized indirectly with a Lua script's path, it runs that script."""
    need_orthanc()
    lua: Path | None = getattr(request, "param", None)
    if isinstance(lua, tuple):  # (script, {text: replacement}): the script with a setting changed for the test
        script, edits = lua
        text = script.read_text()
        for old, new in edits.items():
            text = text.replace(old, new)
        lua = tmp_path / script.name
        lua.write_text(text)
    http_port, dicom_port, scp_port = free_port(), free_port(), free_port()
    storage = tmp_path / "orthanc-storage"
    storage.mkdir()
    config = {
        "Name": "lesionserve-test-pacs", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True, "DicomCheckCalledAet": False, "DicomScuTimeout": 60,
        "DicomModalities": {"lesionserve": {"AET": SCP_AET, "Host": "127.0.0.1", "Port": scp_port}},
        "LuaScripts": [str(lua)] if lua else [],
    }  # fmt: skip
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("w")
    proc = subprocess.Popen([str(ORTHANC), str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30)
    try:
        until = time.monotonic() + 60
        while True:
            try:
                if http.get("/system").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > until:
                raise AssertionError(f"Orthanc did not start: {(tmp_path / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield Orthanc(http, dicom_port, f"http://127.0.0.1:{http_port}/dicom-web", scp_port)
    finally:
        http.close()
        stop_process(proc, 30)
        log.close()


@pytest.fixture
def lesionserve(client_factory: Callable[..., TestClient], orthanc: Orthanc, tmp_path: Path) -> tuple[TestClient, Path]:  # noqa: F811
    """The service with its Storage SCP and DICOMweb entries pointed at this Orthanc; (client, audit file)."""
    audit = tmp_path / "audit.jsonl"
    client = client_factory(
        dimse_enabled=True, dimse_host="127.0.0.1", dimse_port=orthanc.scp_port, dimse_allowed_aets="ORTHANC",
        dimse_destination=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", dicomweb_enabled=True,
        dicomweb_origin=orthanc.dicomweb_url, dicomweb_push_sr=True, audit_log=str(audit), dimse_timeout_s=30,
    )  # fmt: skip
    return client, audit


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rest_top(client: TestClient, data: bytes) -> dict[str, Any]:
    r = client.post("/v1/classify", content=data, headers={"content-type": "application/dicom"})
    assert r.status_code == 200, r.text
    return dict(r.json()["top"])


def check_sr(sr: pydicom.Dataset, source: pydicom.Dataset, top: dict[str, Any]) -> None:
    """The SR is in the source's study, references the source instance, and names the REST answer's top class."""
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    group = hd.sr.srread(io.BytesIO(_file(sr))).content.get_image_measurement_groups()[0]
    (top_item,) = [q for q in group.get_qualitative_evaluations() if q.name == TOP_CLASS]
    assert top_item.value == class_concept(top["code"], top["name"])


def _file(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_orthanc_routes_the_images_by_c_store_and_gets_srs_back(
    orthanc: Orthanc, lesionserve: tuple[TestClient, Path]
) -> None:
    client, audit = lesionserve
    ids = [orthanc.upload(p.read_bytes())["ID"] for p in DICOMS]
    r = orthanc.store_to_lesionserve(ids)
    assert r.status_code == 200, r.text
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in DICOMS]
    # answered once the SRs were in the outbox (service/hospital/outbox.py); its sender delivers them next
    wait_for(lambda: all(orthanc.srs_in_study(s.StudyInstanceUID) for s in sources))
    for path in DICOMS:
        source = pydicom.dcmread(path, stop_before_pixels=True)
        (sr,) = orthanc.srs_in_study(source.StudyInstanceUID)
        check_sr(sr, source, rest_top(client, path.read_bytes()))
    stores = [x for x in audit_lines(audit) if x.get("channel", {}).get("dimse_status") == "0x0000"]
    assert len(stores) == len(DICOMS) and all(x["channel"]["calling_ae"] == "ORTHANC" for x in stores)


def test_stow_rs_in_srs_pushed_to_orthanc_and_read_back_by_wado_rs(
    orthanc: Orthanc, lesionserve: tuple[TestClient, Path]
) -> None:
    client, _ = lesionserve
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p.read_bytes() + b"\r\n"
            for p in DICOMS
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    r = client.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    referenced = r.json()["00081199"]["Value"]
    assert len(referenced) == len(DICOMS) and "00081198" not in r.json()
    wait_for(lambda: orthanc.instance_count() == len(DICOMS))  # the outbox's sender stores the 3 SRs
    wado = DICOMwebClient(url=orthanc.dicomweb_url)
    for path in DICOMS:
        source = pydicom.dcmread(path, stop_before_pixels=True)
        found = wado.search_for_instances(study_instance_uid=source.StudyInstanceUID, search_filters={"Modality": "SR"})
        assert len(found) == 1
        meta = pydicom.Dataset.from_json(found[0])
        sr = wado.retrieve_instance(source.StudyInstanceUID, meta.SeriesInstanceUID, meta.SOPInstanceUID)
        check_sr(sr, source, rest_top(client, path.read_bytes()))


def test_classify_by_uids_fetches_by_wado_rs_and_stores_the_sr_back(
    orthanc: Orthanc, lesionserve: tuple[TestClient, Path]
) -> None:
    client, audit = lesionserve
    path = DICOMS[2]
    source = pydicom.dcmread(path, stop_before_pixels=True)
    orthanc.upload(path.read_bytes())
    uids = {
        "study_instance_uid": source.StudyInstanceUID,
        "series_instance_uid": source.SeriesInstanceUID,
        "sop_instance_uid": source.SOPInstanceUID,
    }
    r = client.post("/v1/classify/dicomweb", json={**uids, "store_sr": True})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["top"] == rest_top(client, path.read_bytes())
    assert answer["sr"]["stored"] is True
    (sr,) = orthanc.srs_in_study(source.StudyInstanceUID)
    assert sr.SOPInstanceUID == answer["sr"]["sop_instance_uid"]
    check_sr(sr, source, answer["top"])
    (line,) = [x for x in audit_lines(audit) if x.get("channel", {}).get("entry") == "wado-rs"]
    assert line["channel"]["sr"] == "stored" and line["outcome"]["status"] == 200
    # an instance the PACS does not have: 404, and nothing stored
    missing = client.post("/v1/classify/dicomweb", json={**uids, "sop_instance_uid": "1.2.3.4"})
    assert missing.status_code == 404 and missing.json()["type"].endswith("/instance-not-found")


def test_refused_by_the_scp_nothing_stored_clear_status_audit_line(
    orthanc: Orthanc, lesionserve: tuple[TestClient, Path]
) -> None:
    _, audit = lesionserve
    good = orthanc.upload(DICOMS[0].read_bytes())["ID"]
    ct = orthanc.upload(Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes())["ID"]  # type: ignore[arg-type]
    grey = make_dicom(np.full((16, 16, 1), 90, np.uint8), sop=SECONDARY_CAPTURE, photometric="MONOCHROME2")
    grey_id = orthanc.upload(grey)["ID"]
    before = orthanc.instance_count()

    # 1. an AE title lesionserve does not know: the association is rejected
    r = orthanc.store_to_lesionserve([good], local_aet="STRANGER")
    assert r.status_code != 200
    # 2. a CT: Refused, SOP Class not supported
    r = orthanc.store_to_lesionserve([ct])
    assert r.status_code != 200 and "0x0122" in r.text.lower()
    # 3. a greyscale Secondary Capture: accepted SOP class, refused instance (C000, with the reason)
    r = orthanc.store_to_lesionserve([grey_id])
    assert r.status_code != 200 and "0xc000" in r.text.lower()

    assert orthanc.instance_count() == before  # no SR came back for any of them
    lines = audit_lines(audit)
    rejected = [x for x in lines if x.get("channel", {}).get("reason") == "calling AE title not recognised"]
    assert rejected and rejected[0]["channel"]["calling_ae"] == "STRANGER"
    assert not [x for x in lines if "refused_sop_class" in x.get("channel", {})]  # Orthanc proposes all classes
    (ct_line,) = [x for x in lines if x.get("channel", {}).get("dimse_status") == "0x0122"]
    assert ct_line["dicom"]["SOPInstanceUID"] and ct_line["outcome"]["status"] == 415
    (refused,) = [x for x in lines if x.get("channel", {}).get("dimse_status") == "0xC000"]
    assert refused["outcome"]["status"] == 415 and refused["dicom"]["SOPInstanceUID"]


@pytest.mark.parametrize("orthanc", [ROUTING_SCRIPT], indirect=True, ids=["routing-script"])
def test_the_documented_routing_script_sends_new_images_and_gets_srs_without_a_loop(
    orthanc: Orthanc, lesionserve: tuple[TestClient, Path]
) -> None:
    client, audit = lesionserve
    for path in DICOMS:  # stored in Orthanc as a modality would store them; the script does the rest
        orthanc.upload(path.read_bytes())
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in DICOMS]
    until = time.monotonic() + 120  # a wait for the routing jobs to finish, not a timing claim
    while not all(orthanc.srs_in_study(s.StudyInstanceUID) for s in sources) and time.monotonic() < until:
        time.sleep(0.5)
    for path, source in zip(DICOMS, sources, strict=True):
        (sr,) = orthanc.srs_in_study(source.StudyInstanceUID)
        check_sr(sr, source, rest_top(client, path.read_bytes()))
    stores = [x for x in audit_lines(audit) if x.get("channel", {}).get("entry") == "dimse"]
    assert len(stores) == len(DICOMS)  # one C-STORE per image: the SRs were not routed back
    assert orthanc.instance_count() == 2 * len(DICOMS)


@pytest.mark.parametrize(
    "orthanc", [(ROUTING_SCRIPT, {"RETRY_AFTER_S = 30": "RETRY_AFTER_S = 0"})], indirect=True, ids=["routing-script"]
)
def test_an_image_stored_while_lesionserve_is_down_is_sent_again_by_the_routing_script(
    orthanc: Orthanc,
    client_factory: Callable[..., TestClient],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Issue 28, finding 11: the send fails (nothing listens), the script resubmits the failed job once lesionserve
    is back and the next image arrives; both images get their SR."""
    first, second = (pydicom.dcmread(p, stop_before_pixels=True) for p in DICOMS[:2])
    orthanc.upload(DICOMS[0].read_bytes())  # lesionserve is down: Orthanc's send job fails
    until = time.monotonic() + 120  # a bound on waiting for Orthanc's job, not a timing claim
    while not any(j.get("State") == "Failure" for j in orthanc.jobs()) and time.monotonic() < until:
        time.sleep(0.2)
    assert any(j.get("State") == "Failure" for j in orthanc.jobs())
    client_factory(
        dimse_enabled=True, dimse_port=orthanc.scp_port, dimse_host="127.0.0.1", dimse_allowed_aets="ORTHANC",
        dimse_destination=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", audit_log=str(tmp_path / "a.jsonl"),
    )  # fmt: skip
    orthanc.upload(DICOMS[1].read_bytes())  # lesionserve is up: this image, and the failed one again
    until = time.monotonic() + 120
    while not (orthanc.srs_in_study(first.StudyInstanceUID) and orthanc.srs_in_study(second.StudyInstanceUID)):
        assert time.monotonic() < until, "the failed send was not retried"
        time.sleep(0.5)
