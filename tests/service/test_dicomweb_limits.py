"""DICOMweb entries against a real HTTP origin under attack and outage (issue 28, findings 2, 3 and 7)."""

from __future__ import annotations

import asyncio
import http.server
import io
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.service.test_dicom import make_dicom
from tests.service.test_dicomweb import DICOMS, stow

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
CAP = 64 * 1024
BOMB_BYTES = 32 * 1024 * 1024  # what the Deflated object inflates to


def deflate_bomb() -> tuple[str, bytes]:
    """A Deflated Part-10 object of about 33 KB holding 32 MB of zeros."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.zeros((8, 8, 3), np.uint8))))
    ds.PixelData = bytes(BOMB_BYTES)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return str(ds.SOPInstanceUID), buf.getvalue()


class WadoOrigin:
    """A WADO-RS origin over real HTTP: ``objects`` maps SOP Instance UID -> Part-10 bytes; ``hang`` holds answers."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[str, memoryview]] = {}
        self.hang, self.arrived, self.requests = threading.Event(), threading.Event(), 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner.requests += 1
                owner.arrived.set()
                if owner.hang.is_set():
                    owner.release.wait(30)
                    self.close_connection = True  # no answer at all: the service sees the connection end
                    return
                framed = owner.objects.get(self.path.rsplit("/", 1)[-1])
                if framed is None:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                boundary, body = framed
                self.send_response(200)
                self.send_header("content-type", f'multipart/related; type="application/dicom"; boundary={boundary}')
                self.send_header("connection", "close")  # no content-length: the size is known only by reading
                self.end_headers()
                try:
                    for n in range(0, len(body), 1 << 16):  # slices of a memoryview: no copy of the whole
                        self.wfile.write(body[n : n + (1 << 16)])
                except OSError:  # the service stopped reading (its cap): expected
                    pass
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.release = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, sop: str, data: bytes) -> None:
        """Serve ``data`` for ``sop``, framed now (outside any measured window)."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
                + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
        self.objects[sop] = (boundary, memoryview(body))

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin() -> Iterator[WadoOrigin]:
    o = WadoOrigin()
    yield o
    o.close()


def uids(sop: str) -> dict[str, str]:
    return {"study_instance_uid": STUDY, "series_instance_uid": SERIES, "sop_instance_uid": sop}


def peak_during(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the peak of Python allocations (every thread) while it ran."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_wado_fetch_classifies_an_instance(client_factory: Callable[..., TestClient], origin: WadoOrigin) -> None:
    data = DICOMS[0].read_bytes()
    sop = str(pydicom.dcmread(DICOMS[0], stop_before_pixels=True).SOPInstanceUID)
    origin.put(sop, data)
    client = client_factory(dicomweb_enabled=True, dicomweb_origin=origin.url)
    r = client.post("/v1/classify/dicomweb", json=uids(sop))
    assert r.status_code == 200, r.text
    assert r.json()["dicom"]["identifiers"]["SOPInstanceUID"] == sop


def test_wado_deflated_object_is_refused_from_its_transfer_syntax_before_inflating(
    client_factory: Callable[..., TestClient], origin: WadoOrigin
) -> None:
    sop, bomb = deflate_bomb()
    assert len(bomb) < CAP
    origin.put(sop, bomb)
    client = client_factory(dicomweb_enabled=True, dicomweb_origin=origin.url, max_upload_bytes=CAP)
    r, peak = peak_during(lambda: client.post("/v1/classify/dicomweb", json=uids(sop)))
    assert r.status_code == 415 and "Deflated" in r.json()["detail"]
    assert peak < BOMB_BYTES // 4  # old code: the 32 MB were inflated (then re-deflated) before any check


def test_wado_object_over_the_cap_is_refused_while_streaming(
    client_factory: Callable[..., TestClient], origin: WadoOrigin
) -> None:
    big = make_dicom(np.full((2048, 2048, 3), 7, np.uint8))  # 12 MB
    sop = str(pydicom.dcmread(io.BytesIO(big), stop_before_pixels=True).SOPInstanceUID)
    origin.put(sop, big)
    size = len(big)
    del big
    client = client_factory(dicomweb_enabled=True, dicomweb_origin=origin.url, max_upload_bytes=CAP)
    r, peak = peak_during(lambda: client.post("/v1/classify/dicomweb", json=uids(sop)))
    assert r.status_code == 413 and r.json()["type"].endswith("/payload-too-large")
    assert peak < size // 4  # old code: the whole 12 MB (and its parse) before the 413


def test_a_hung_origin_is_503_when_its_slots_are_taken(
    client_factory: Callable[..., TestClient], origin: WadoOrigin
) -> None:
    origin.hang.set()
    client = client_factory(
        dicomweb_enabled=True, dicomweb_origin=origin.url, dicomweb_fetch_slots=1, dimse_timeout_s=3,
        request_timeout_s=60,
    )  # fmt: skip
    first: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: first.update(r=client.post("/v1/classify/dicomweb", json=uids("1.2.3"))))
    waiting.start()
    assert origin.arrived.wait(20)
    second = client.post("/v1/classify/dicomweb", json=uids("1.2.4"))  # old code: 3 s later, 502 (origin timeout)
    assert second.status_code == 503 and second.json()["type"].endswith("/overloaded") and origin.requests == 1
    origin.release.set()
    waiting.join(60)


def test_probes_and_dependency_only_routes_need_no_worker_thread(client_factory: Callable[..., TestClient]) -> None:
    """Every anyio worker thread busy (here: its one token held), as with 40 fetches from a PACS that is down."""
    client = client_factory(dicomweb_enabled=True)
    release, finished = threading.Event(), threading.Event()

    def block() -> None:
        release.wait(20)
        finished.set()

    async def occupy() -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1
        asyncio.get_running_loop().create_task(anyio.to_thread.run_sync(block))

    client.portal.call(occupy)  # type: ignore[union-attr]
    try:
        ready = client.get("/readyz")  # old code: waits for a thread (its sync dependency) until the release
        models = client.get("/v1/models")
        held = not finished.is_set()  # answered while the only worker thread was still taken
    finally:
        release.set()
        client.portal.call(lambda: setattr(anyio.to_thread.current_default_thread_limiter(), "total_tokens", 40))  # type: ignore[union-attr]
    assert held and ready.status_code == 200 and models.status_code == 200


def test_stow_with_too_many_parts_is_413_before_any_work(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(dicomweb_enabled=True, stow_max_parts=2)
    r = stow(client, [("application/dicom", p.read_bytes()) for p in DICOMS])  # 3 parts
    assert r.status_code == 413 and "3 parts" in r.json()["detail"] and "limit is 2" in r.json()["detail"]
    assert stow(client, [("application/dicom", p.read_bytes()) for p in DICOMS[:2]]).status_code == 200
