"""Tracing (issue 31): W3C traceparent in, OpenTelemetry spans out, read back with the SDK's in-memory exporter
in-process and its console exporter from a real ``lesionserve serve``; trace ids in the access and audit lines;
no patient data in any span."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import media, tracing
from service.batcher import Batcher
from service.config import Settings
from tests.conftest import REPO
from tests.service.conftest import jpeg_bytes
from tests.service.test_dicom import PATIENT_ID, PATIENT_NAME, make_dicom
from tests.service.test_dimse import SCP_AET, audit_lines, node, scu, sink, wait_for  # noqa: F401 (fixtures)
from tests.service.test_lifecycle import free_port
from tests.service.test_tls import clean_env, serve_args

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_a_request_is_a_child_of_the_callers_traceparent_with_its_stages(
    spans: InMemorySpanExporter,
    client_factory: Callable[..., TestClient],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit = tmp_path / "audit.jsonl"
    client = client_factory(audit_log=str(audit))
    with caplog.at_level(logging.INFO, logger="service.access"):
        r = client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg",
                                                                       "traceparent": TRACEPARENT})  # fmt: skip
    assert r.status_code == 200, r.text
    (request,) = named(spans, "POST /v1/classify")
    context = request.context
    assert context is not None and format(context.trace_id, "032x") == TRACE_ID
    assert request.parent is not None and format(request.parent.span_id, "016x") == PARENT_ID
    assert request.attributes is not None and request.attributes["http.response.status_code"] == 200
    for stage in ("upload read", "decode", "queue wait"):
        (child,) = named(spans, stage)
        assert child.parent is not None and child.parent.span_id == context.span_id, stage
        assert child.start_time is not None and child.end_time is not None and child.start_time <= child.end_time
    (inference,) = named(spans, "inference")
    assert inference.parent is None  # a root of its own, linked to the request(s) it ran
    assert [link.context.span_id for link in inference.links] == [context.span_id]
    assert inference.attributes is not None and inference.attributes["lesionserve.batch_size"] == 1
    access = [
        rec for rec in caplog.records if rec.getMessage() == "request" and rec.__dict__.get("route") == "/v1/classify"
    ]
    assert access and access[0].__dict__["trace_id"] == TRACE_ID
    (line,) = [x for x in audit_lines(audit) if x["outcome"]["status"] == 200]
    assert line["trace_id"] == TRACE_ID


def test_without_an_exporter_the_callers_trace_id_still_reaches_the_logs(
    client_factory: Callable[..., TestClient], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not tracing.enabled()
    audit = tmp_path / "audit.jsonl"
    client = client_factory(audit_log=str(audit))
    with caplog.at_level(logging.INFO, logger="service.access"):
        client.post(
            "/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg", "traceparent": TRACEPARENT}
        )
        client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg",
                                                                   "traceparent": "00-zz-not-a-traceparent-01"})  # fmt: skip
    lines = [x for x in audit_lines(audit) if x["outcome"]["status"] == 200]
    assert [x.get("trace_id") for x in lines] == [TRACE_ID, None]  # a malformed header is ignored
    access = [rec.__dict__["trace_id"] for rec in caplog.records if rec.__dict__.get("route") == "/v1/classify"]
    assert access == [TRACE_ID, None]


def test_one_inference_span_per_batch_linked_to_every_request(spans: InMemorySpanExporter) -> None:
    calls: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return np.full((len(batch), 2), 0.5, dtype=np.float32)

    batcher = Batcher(run, (4, 4, 3), max_batch=8, max_wait_s=0.0, queue_size=8)
    assert tracing._tracer is not None
    parents = []
    futures = []
    for n in range(3):  # queued before the worker starts: one batch of three
        with tracing._tracer.start_as_current_span(f"request {n}") as request:
            parents.append(request.get_span_context().span_id)
            futures.append(batcher.submit(np.zeros((4, 4, 3), np.uint8), time.monotonic() + 60))
    batcher.start()
    for f in futures:
        f.result(30)
    batcher.close()
    assert calls == [3]
    (inference,) = named(spans, "inference")
    assert inference.attributes is not None and inference.attributes["lesionserve.batch_size"] == 3
    assert sorted(link.context.span_id for link in inference.links) == sorted(parents)
    waits = named(spans, "queue wait")
    assert sorted(w.parent.span_id for w in waits if w.parent is not None) == sorted(parents)


def _strings(span: ReadableSpan) -> Iterator[str]:
    """Every text a span carries: name, attributes, events and their attributes, links' attributes, status."""
    yield span.name
    for attributes in [span.attributes, *(e.attributes for e in span.events), *(lk.attributes for lk in span.links)]:
        for key, value in (attributes or {}).items():
            yield key
            yield from (str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    yield from (e.name for e in span.events)
    yield span.status.description or ""


def test_no_patient_data_in_any_span(
    spans: InMemorySpanExporter,
    node: tuple[TestClient, int, Path],  # noqa: F811 (the fixture)
    sink: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, port, _ = node

    def quoting_parser(data: bytes, size: int, max_pixels: int) -> Any:  # as pydicom's messages do
        raise ValueError(f"invalid value in (0010,0010) PatientName {PATIENT_NAME!r}")

    monkeypatch.setitem(media.DECODERS, "image/x-quoting", quoting_parser)
    r = client.post("/v1/classify", content=b"x" * 64, headers={"content-type": "image/x-quoting"})
    assert r.status_code >= 400
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    good = make_dicom(pixels)
    broken = make_dicom(pixels, pixel_bytes=b"\x00" * 17)  # refused by the decoder: a failed span
    uids = set()
    for data in (good, broken):
        ds = pydicom.dcmread(io.BytesIO(data))
        uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
        r = client.post("/v1/classify", content=data, headers={"content-type": "application/dicom"})
        assert r.status_code in (200, 400, 422), r.text
    assoc = scu().associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_established
    for data in (good, broken):
        assoc.send_c_store(pydicom.dcmread(io.BytesIO(data)))
    assoc.release()
    wait_for(lambda: len(named(spans, "SR send")) >= 1, what="the SR sent")
    (store, _) = named(spans, "C-STORE")
    (sr_send,) = named(spans, "SR send")
    assert [link.context.span_id for link in sr_send.links] == [store.context.span_id]  # type: ignore[union-attr]
    assert store.context is not None
    assert any(s.parent is not None and s.parent.span_id == store.context.span_id for s in named(spans, "decode"))
    (failed,) = [s for s in named(spans, "decode") if s.attributes and s.attributes.get("error.type") == "ValueError"]
    assert failed.status.status_code.name == "ERROR"  # the failure is traced, its message is not
    secrets = {PATIENT_NAME, PATIENT_ID, "19700101", "ACC123", *uids}
    for s in spans.get_finished_spans():
        for text in _strings(s):
            assert not any(secret in text for secret in secrets), (s.name, text)


def test_bad_otel_settings_are_refused(tiny_onnx: Path) -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER: zipkin"):
        Settings(model_path=tiny_onnx, otel_traces_exporter="zipkin")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL: grpc"):
        Settings(model_path=tiny_onnx, otel_traces_exporter="otlp", otel_exporter_otlp_protocol="grpc")
    assert tracing.exporters_wanted(Settings(model_path=tiny_onnx)) == []
    on = Settings(model_path=tiny_onnx, otel_exporter_otlp_endpoint="http://collector:4318")
    assert tracing.exporters_wanted(on) == ["otlp"]
    assert (
        tracing.exporters_wanted(Settings(model_path=tiny_onnx, otel_traces_exporter="console", otel_sdk_disabled=True))
        == []
    )


def _console_spans(text: str) -> list[dict[str, Any]]:
    """The JSON objects the console exporter printed (each span over several lines)."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (start := text.find("{", i)) != -1:
        obj, i = decoder.raw_decode(text, start)
        found.append(obj)
    return found


@pytest.mark.slow
def test_a_real_server_prints_spans_with_the_console_exporter(tiny_onnx: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    out = tmp_path / "stdout.txt"
    env = clean_env(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="lesionserve-test")
    args = serve_args(tiny_onnx, port, "--log-format", "json")
    with out.open("wb") as stdout:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=stdout, stderr=log.open("wb"))
    try:
        until = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < until, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", content=jpeg_bytes(),
                       headers={"content-type": "image/jpeg", "traceparent": TRACEPARENT}, timeout=30)  # fmt: skip
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()  # a clean exit flushes the queued spans
    found = {s["name"]: s for s in _console_spans(out.read_text())}
    request = found["POST /v1/classify"]
    assert request["context"]["trace_id"] == "0x" + TRACE_ID and request["parent_id"] == "0x" + PARENT_ID
    assert request["resource"]["attributes"]["service.name"] == "lesionserve-test"
    assert {"upload read", "decode", "queue wait", "inference"} <= set(found)
    access = [json.loads(line) for line in log.read_text().splitlines() if '"service.access"' in line]
    assert any(a.get("trace_id") == TRACE_ID and a["route"] == "/v1/classify" for a in access)
