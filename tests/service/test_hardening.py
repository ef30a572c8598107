"""Secure defaults and bounds from the security review (issue 19), through the HTTP API: /metrics behind
the API keys, Swagger UI without a CDN, a bounded method label, a bounded decode queue under the request
deadline, and the pixel limit honoured for DICOM uploads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import media
from service.apidocs import CSP
from service.bench import streams
from service.bench.streams import pattern
from service.imaging import DecodedImage, decode_image
from tests.conftest import REPO
from tests.service.conftest import jpeg_bytes

ClientFactory = Callable[..., TestClient]
APP_KEY, SCRAPER_KEY = "a" * 24, "s" * 24
KEYS = f"ris:{APP_KEY},prometheus:{SCRAPER_KEY}"


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# ---- /metrics: closed whenever API keys are on -------------------------------------------------------


def test_metrics_need_a_key_by_default_when_api_keys_are_on(client_factory: ClientFactory) -> None:
    client = client_factory(api_keys=KEYS, metrics_only_key_ids="prometheus")
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(SCRAPER_KEY)).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_metrics_stay_open_without_keys_and_when_explicitly_opened(client_factory: ClientFactory) -> None:
    assert client_factory().get("/metrics").status_code == 200  # auth off altogether
    assert client_factory(api_keys=KEYS, metrics_auth=False).get("/metrics").status_code == 200


def test_metrics_auth_without_keys_refuses_to_start_in_one_line(tiny_onnx: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    env.update(LESIONSERVE_MODEL_PATH=str(tiny_onnx), LESIONSERVE_METRICS_AUTH="true")
    proc = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LESIONSERVE_METRICS_AUTH" in lines[0] and "API keys" in lines[0], proc.stderr


# ---- /docs without a CDN -----------------------------------------------------------------------------


def test_swagger_ui_is_served_locally_under_a_csp(client_factory: ClientFactory) -> None:
    client = client_factory()
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP.split("script-src")[1].split(";")[0]
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text), "the page loads something from elsewhere"
    assert "<script>" not in page.text  # no inline script: the CSP would block it
    for src in re.findall(r"(?:src|href)=\"([^\"]+)\"", page.text):
        asset = client.get("/" + src)
        assert asset.status_code == 200 and len(asset.content) > 0, src
    assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").text
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/redoc").status_code == 404  # ReDoc would load from a CDN


# ---- the method label ---------------------------------------------------------------------------------


def test_made_up_methods_share_one_metrics_series(client_factory: ClientFactory) -> None:
    client = client_factory()
    for n in range(20):
        client.request(f"MADEUP{n}", "/healthz")
    text = client.get("/metrics").text
    assert "MADEUP" not in text
    methods = set(re.findall(r'lesionserve_requests_total\{[^}]*method="([^"]+)"', text))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"} and "other" in methods


# ---- decoding: bounded queue, under the deadline ----------------------------------------------------------


def blocking_decoder(release: threading.Event, started: threading.Event) -> Callable[..., DecodedImage]:
    def decode(data: bytes, size: int, max_pixels: int) -> DecodedImage:
        started.set()
        release.wait(10)
        return decode_image(data, size, max_pixels)

    return decode


def test_full_decode_queue_is_503_with_retry_after(
    client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, started = threading.Event(), threading.Event()
    monkeypatch.setitem(media.DECODERS, "image/jpeg", blocking_decoder(release, started))
    client = client_factory(decode_threads=1, decode_queue_size=1, request_timeout_s=20)
    answers: list[int] = []
    first = [threading.Thread(target=lambda: answers.append(client.post(
        "/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"}).status_code)) for _ in range(2)]  # fmt: skip
    for t in first:
        t.start()
    assert started.wait(5)
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    until = time.monotonic() + 5
    while runtime._pool.held < 2:  # one decoding, one waiting: the pool is full
        assert time.monotonic() < until
        time.sleep(0.01)
    refused = client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
    release.set()
    for t in first:
        t.join(10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["type"].endswith("/overloaded")
    assert answers == [200, 200]


def test_deadline_covers_decoding(client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    release, started = threading.Event(), threading.Event()
    monkeypatch.setitem(media.DECODERS, "image/jpeg", blocking_decoder(release, started))
    client = client_factory(request_timeout_s=0.3)
    start = time.monotonic()
    try:
        r = client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
    finally:
        release.set()
    assert r.status_code == 504 and r.json()["type"].endswith("/deadline-exceeded")
    assert time.monotonic() - start < 2.0  # answered at the deadline, not when the decode finished (10 s)


# ---- the pixel limit reaches the DICOM decoder (issue 20, finding 3) ----------------------------------------


def test_lowered_max_pixels_refuses_a_dicom_upload(client_factory: ClientFactory) -> None:
    data = streams.dicom(pattern(40, 48).tobytes(), 40, 48)  # 1,920 pixels
    ok = client_factory().post("/v1/classify", content=data, headers={"content-type": "application/dicom"})
    assert ok.status_code == 200, ok.text
    low = client_factory(max_pixels=1000)
    refused = low.post("/v1/classify", content=data, headers={"content-type": "application/dicom"})
    assert refused.status_code == 413 and "1920 pixels" in refused.json()["detail"]
