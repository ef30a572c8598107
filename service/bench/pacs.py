"""``python -m service.bench.pacs``: DICOM instance throughput through C-STORE next to ``/v1/classify``.

One service process (``python -m service``, Storage SCP on) and, in this process, a receiving Storage SCP
for the SRs (the PACS side). In one run, on the same model and the same DICOM files:

- REST: ``POST /v1/classify`` with the DICOM bytes, JSON answer, and with ``Accept: application/dicom``
  (the SR built and returned: the same work as the DIMSE path minus the network round trip to the PACS);
- DIMSE: C-STORE to the service's SCP; each instance is answered once its SR is committed to the outbox
  (service/hospital/outbox.py), and the outbox's sender stores it at the receiving SCP. Each C-STORE carries
  a new SOP Instance UID (a PACS sends distinct images), so each gives its own SR; the sink notes when each
  arrives, and the row reports the delivery latency (C-STORE sent -> SR stored at the sink) next to the
  C-STORE's own.

Each at concurrency 1 (one association or client, as a PACS sends one study by default) and ``-c`` (as
many concurrent associations or clients). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    DermoscopicPhotographyImageStorage,
    VLPhotographicImageStorage,
)

from service.bench.load import Server, free_port

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DICOMS = REPO / "tests" / "data" / "dicom"


class Sink:
    """The PACS side: a Storage SCP that counts the SRs it receives and notes when each source's SR came."""

    def __init__(self) -> None:
        self.count = 0
        self.arrived: dict[str, float] = {}  # source SOP Instance UID -> perf_counter()
        self.port = free_port()
        self._lock = threading.Lock()
        ae = AE(ae_title="SINK")
        ae.add_supported_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian])
        ae.maximum_associations = 64
        self.server: Any = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on)]
        )

    def _on(self, event: Any) -> int:
        now = time.perf_counter()
        ds = event.dataset
        ref = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        with self._lock:
            self.count += 1
            self.arrived.setdefault(str(ref.ReferencedSOPInstanceUID), now)
        return 0x0000

    def wait_for(self, uids: Sequence[str], timeout_s: float = 600.0) -> None:
        """Until an SR for each of ``uids`` has come (the outbox delivers after the C-STORE is answered)."""
        until = time.monotonic() + timeout_s
        while any(u not in self.arrived for u in uids) and time.monotonic() < until:
            time.sleep(0.005)

    def close(self) -> None:
        self.server.shutdown()


def _scu() -> AE:
    ae = AE(ae_title="BENCH")
    for sop in (DermoscopicPhotographyImageStorage, VLPhotographicImageStorage):
        ae.add_requested_context(sop, [JPEGBaseline8Bit])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    return ae


def _run(workers: int, total: int, one: Callable[[int], float]) -> dict[str, Any]:
    """``total`` calls of ``one(i)`` (returns seconds) from ``workers`` threads, closed loop."""
    counter = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                latencies.append(one(i))
            except Exception as exc:  # a bench reports failures, it does not stop at the first
                failures.append(type(exc).__name__ + ": " + str(exc)[:80])

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    return {
        "concurrency": workers, "instances": total, "ok": len(latencies), "failures": failures[:5],
        "seconds": round(seconds, 3), "per_s": round(len(latencies) / seconds, 2),
        "p50_ms": round(statistics.median(ms), 1) if ms else None,
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1) if ms else None,
    }  # fmt: skip


def dimse(port: int, datasets: Sequence[Dataset], workers: int, total: int, sink: Sink) -> dict[str, Any]:
    """C-STOREs over ``workers`` associations (one per thread, kept open), each a new SOP Instance UID."""
    local = threading.local()
    opened: list[Any] = []
    sent: dict[str, float] = {}

    def one(i: int) -> float:
        if getattr(local, "assoc", None) is None:
            local.assoc = _scu().associate("127.0.0.1", port, ae_title="LESIONSERVE")
            opened.append(local.assoc)
            if not local.assoc.is_established:
                raise RuntimeError("association not established")
        ds = copy.copy(datasets[i % len(datasets)])  # shallow: the pixel data is shared, the UID is its own
        ds.SOPInstanceUID = generate_uid()
        start = sent[ds.SOPInstanceUID] = time.perf_counter()
        status = local.assoc.send_c_store(ds)
        if int(status.Status) != 0:
            raise RuntimeError(f"C-STORE status 0x{int(status.Status):04X}")
        return time.perf_counter() - start

    try:
        result = _run(workers, total, one)
    finally:
        for assoc in opened:
            assoc.release()
    sink.wait_for(list(sent))
    ms = sorted((sink.arrived[u] - t) * 1000 for u, t in sent.items() if u in sink.arrived)
    result["srs_delivered"] = len(ms)
    result["delivery_p50_ms"] = round(statistics.median(ms), 1) if ms else None
    result["delivery_p99_ms"] = round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1) if ms else None
    return result


def rest(url: str, blobs: list[bytes], workers: int, total: int, accept: str) -> dict[str, Any]:
    clients = threading.local()

    def one(i: int) -> float:
        if getattr(clients, "c", None) is None:
            clients.c = httpx.Client(base_url=url, timeout=120)
        start = time.perf_counter()
        r = clients.c.post(
            "/v1/classify",
            content=blobs[i % len(blobs)],
            headers={"content-type": "application/dicom", "accept": accept},
        )
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        return time.perf_counter() - start

    return _run(workers, total, one)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.bench.pacs", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "reference.onnx")
    parser.add_argument("--dicoms", type=Path, default=DEFAULT_DICOMS, help="folder of .dcm files to send")
    parser.add_argument("-n", "--instances", type=int, default=60, help="instances per measurement")
    parser.add_argument("-c", "--concurrency", type=int, default=4, help="associations / clients at once")
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench_pacs.json")
    args = parser.parse_args(argv)
    paths = sorted(args.dicoms.glob("*.dcm"))
    if not paths or not args.model.is_file():
        print(f"bench: need {args.model} and .dcm files in {args.dicoms}", file=sys.stderr)
        return 2
    blobs = [p.read_bytes() for p in paths]
    datasets = [pydicom.dcmread(p) for p in paths]
    sink, scp_port = Sink(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server.service(
            args.model, Path(tmp) / "service.log", dimse_enabled="true", dimse_host="127.0.0.1",
            dimse_port=str(scp_port), dimse_allowed_aets="BENCH", dimse_destination=f"SINK@127.0.0.1:{sink.port}",
            audit_log="off", log_format="text", outbox_path=str(Path(tmp) / "outbox.sqlite"),
        )  # fmt: skip
        try:
            server.wait_ready()
            dimse(scp_port, datasets, 1, 6, sink)  # warm-up: both paths, the SR tables, the associations
            rest(server.url, blobs, 1, 6, "application/dicom")
            results = []
            for workers in sorted({1, args.concurrency}):
                for name, run in (
                    (
                        "REST /v1/classify, JSON",
                        lambda w: rest(server.url, blobs, w, args.instances, "application/json"),
                    ),
                    (
                        "REST /v1/classify, SR",
                        lambda w: rest(server.url, blobs, w, args.instances, "application/dicom"),
                    ),
                    ("DIMSE C-STORE, SR back", lambda w: dimse(scp_port, datasets, w, args.instances, sink)),
                ):
                    results.append({"path": name, **run(workers)})
        finally:
            server.stop()
            sink.close()
    print(f"{'path':<26} {'conc':>4} {'inst/s':>7} {'p50 ms':>7} {'p99 ms':>7}  failures  SR delivered p50/p99 ms")
    for r in results:
        delivered = f"{r['delivery_p50_ms']}/{r['delivery_p99_ms']}" if "srs_delivered" in r else ""
        print(
            f"{r['path']:<26} {r['concurrency']:>4} {r['per_s']:>7} {r['p50_ms']:>7} {r['p99_ms']:>7}"
            f"  {len(r['failures']):>8}  {delivered}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"model": str(args.model), "files": [p.name for p in paths], "results": results}, indent=1)
    )
    print(f"SRs received by the sink: {sink.count}; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
