"""``python -m service.bench.entries``: what hostile inputs cost a running service at its hospital entries.

The successor of :mod:`service.bench.memory` for the entries (issue 28): a ``python -m service`` process with
the DIMSE node and the DICOMweb routes on, fed by this process, and its ``/proc`` figures read before and after:

- ``cstore``: one C-STORE of a ``--cstore-mb`` dataset (native RGB) from a pynetdicom peer: peak RSS added;
- ``deflate``: ``POST /v1/classify/dicomweb`` of a Deflated object that inflates to ``--bomb-mb``, served by a
  local HTTP origin: peak RSS added;
- ``wado-large``: the same route for a ``--wado-mb`` object (over MAX_UPLOAD_BYTES): peak RSS added;
- ``silent``: ``--silent`` TCP connections to the DICOM port that never send an A-ASSOCIATE-RQ: threads and
  RSS added, and whether an allowed peer still gets an association meanwhile.

``--service-root`` runs another checkout's service (e.g. an export of main) with the same inputs, for before /
after figures. Peak RSS is VmHWM after ``/proc/<pid>/clear_refs`` (Linux). Prints one JSON line per scenario.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, VLPhotographicImageStorage  # type: ignore[attr-defined]

MB = 1 << 20
SCU, SCP = "BENCH", "LESIONSERVE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def image_dataset(rows: int, cols: int) -> Dataset:
    """A VL Photographic instance with native RGB pixels, Part-10 ready."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = VLPhotographicImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = VLPhotographicImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "XC"
    ds.PatientName, ds.PatientID = "Bench^Patient", "BENCH"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 3, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration = 8, 8, 7, 0, 0
    ds.PixelData = np.full((rows, cols, 3), 90, np.uint8).tobytes()
    return ds


def deflate_bomb(inflated_mb: int) -> tuple[str, bytes]:
    """A Deflated Part-10 object whose dataset inflates to about ``inflated_mb`` (written without holding it)."""
    ds = image_dataset(8, 8)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    del ds.PixelData
    head = pydicom.filebase.DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta)
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(body, ds)
    size = inflated_mb * MB
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [squeeze.compress(body.getvalue() + b"\xe0\x7f\x10\x00OB\0\0" + size.to_bytes(4, "little"))]
    zeros = bytes(MB)
    for _ in range(inflated_mb):
        out.append(squeeze.compress(zeros))
    out.append(squeeze.flush())
    return str(ds.SOPInstanceUID), head.getvalue() + b"".join(out)


class Origin:
    """A WADO-RS origin on a free port serving ``objects`` (SOP Instance UID -> Part-10 bytes)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = owner.objects.get(self.path.rsplit("/", 1)[-1], b"")
                boundary = uuid.uuid4().hex
                self.send_response(200 if data else 404)
                self.send_header("content-type", f'multipart/related; type="application/dicom"; boundary={boundary}')
                self.send_header("connection", "close")
                self.end_headers()
                if not data:
                    return
                view = memoryview(data)
                try:
                    self.wfile.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                    for n in range(0, len(view), MB):
                        self.wfile.write(view[n : n + MB])
                    self.wfile.write(f"\r\n--{boundary}--\r\n".encode())
                except OSError:  # the service stopped reading at its cap
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@contextmanager
def service(root: Path, model: Path, dimse_port: int, http_port: int, origin: str, sink_port: int) -> Iterator[int]:
    """``python -m service`` from ``root``; yields its pid once /readyz answers 200."""
    folder = Path(tempfile.mkdtemp(prefix="bench-entries-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    env.update(PYTHONPATH=str(root), LESIONSERVE_MODEL_PATH=str(model), LESIONSERVE_HOST="127.0.0.1",
               LESIONSERVE_PORT=str(http_port), LESIONSERVE_PROVIDERS="CPUExecutionProvider",
               LESIONSERVE_AUDIT_LOG="off", LESIONSERVE_LOG_LEVEL="WARNING", LESIONSERVE_DIMSE_ENABLED="true",
               LESIONSERVE_DIMSE_HOST="127.0.0.1", LESIONSERVE_DIMSE_PORT=str(dimse_port),
               LESIONSERVE_DIMSE_ALLOWED_AETS=SCU, LESIONSERVE_DIMSE_DESTINATION=f"SINK@127.0.0.1:{sink_port}",
               LESIONSERVE_OUTBOX_PATH=str(folder / "outbox.sqlite"), LESIONSERVE_DICOMWEB_ENABLED="true",
               LESIONSERVE_DICOMWEB_ORIGIN=origin, LESIONSERVE_REQUEST_TIMEOUT_S="120",
               LESIONSERVE_DIMSE_TIMEOUT_S="120")  # fmt: skip
    log = (folder / "service.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        until = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > until:
                raise SystemExit(f"the service did not start: {(folder / 'service.log').read_text()[-2000:]}")
            time.sleep(0.2)
        time.sleep(1.0)  # the SR warm-up thread's tables, so they are not counted in the first scenario
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def measure(pid: int, fn: Any) -> dict[str, Any]:
    before = proc_status(pid)
    reset_peak(pid)
    start = time.perf_counter()
    outcome = fn()
    after = proc_status(pid)
    return {"outcome": outcome, "seconds": round(time.perf_counter() - start, 2),
            "rss_before_mb": round(before["VmRSS"] / MB, 1),
            "peak_added_mb": round((after["VmHWM"] - before["VmRSS"]) / MB, 1)}  # fmt: skip


def c_store(port: int, ds: Dataset) -> str:
    ae = AE(ae_title=SCU)
    ae.add_requested_context(VLPhotographicImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP)
    if not assoc.is_established:
        return "association refused"
    try:
        status = assoc.send_c_store(ds)
        return f"0x{int(status.Status):04X}" if "Status" in status else "no status"
    finally:
        assoc.release()


def wado(http_port: int, sop: str) -> str:
    body = json.dumps({"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.4", "sop_instance_uid": sop})
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/classify/dicomweb", data=body.encode(),
                                 headers={"content-type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"


def silent(pid: int, port: int, count: int) -> dict[str, Any]:
    before = proc_status(pid)
    socks = []
    for _ in range(count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    time.sleep(1.0)  # let the server's threads start for them
    after = proc_status(pid)
    ae = AE(ae_title=SCU)
    ae.add_requested_context(VLPhotographicImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP)
    allowed = "established" if assoc.is_established else "refused"
    if assoc.is_established:
        assoc.release()
    for s in socks:
        s.close()
    return {"connections": len(socks), "threads_added": after["Threads"] - before["Threads"],
            "rss_added_mb": round((after["VmRSS"] - before["VmRSS"]) / MB, 1), "allowed_peer": allowed}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, required=True, help="an .onnx file with lesionserve metadata")
    parser.add_argument("--service-root", type=Path, default=Path.cwd(), help="checkout whose service runs")
    parser.add_argument("--cstore-mb", type=int, default=315)
    parser.add_argument("--bomb-mb", type=int, default=512)
    parser.add_argument("--wado-mb", type=int, default=200)
    parser.add_argument("--silent", type=int, default=400)
    parser.add_argument("--only", nargs="*", default=["cstore", "deflate", "wado-large", "silent"])
    args = parser.parse_args()
    sink = AE(ae_title="SINK")
    sink.add_supported_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian])
    sink_port = free_port()
    sink_server = sink.start_server(
        ("127.0.0.1", sink_port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)]
    )
    origin = Origin()
    dimse_port, http_port = free_port(), free_port()
    with service(
        args.service_root.resolve(), args.model.resolve(), dimse_port, http_port, origin.url, sink_port
    ) as pid:
        if "cstore" in args.only:
            side = int((args.cstore_mb * MB / 3) ** 0.5)
            ds = image_dataset(side, side)
            print(json.dumps({"scenario": "cstore", "dataset_mb": round(len(ds.PixelData) / MB, 1),
                              **measure(pid, lambda: c_store(dimse_port, ds))}), flush=True)  # fmt: skip
            del ds
        if "deflate" in args.only:
            sop, bomb = deflate_bomb(args.bomb_mb)
            origin.objects[sop] = bomb
            print(json.dumps({"scenario": "deflate", "object_kb": len(bomb) // 1024, "inflates_to_mb": args.bomb_mb,
                              **measure(pid, lambda: wado(http_port, sop))}), flush=True)  # fmt: skip
        if "wado-large" in args.only:
            side = int((args.wado_mb * MB / 3) ** 0.5)
            ds = image_dataset(side, side)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            origin.objects[str(ds.SOPInstanceUID)] = buf.getvalue()
            del ds, buf
            sop = next(reversed(origin.objects))
            print(json.dumps({"scenario": "wado-large", "object_mb": round(len(origin.objects[sop]) / MB, 1),
                              **measure(pid, lambda: wado(http_port, sop))}), flush=True)  # fmt: skip
        if "silent" in args.only:
            print(json.dumps({"scenario": "silent", **silent(pid, dimse_port, args.silent)}), flush=True)
    if sink_server is not None:
        sink_server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
