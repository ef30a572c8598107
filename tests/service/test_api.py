"""The HTTP API: answers, request ids, and every error status with its problem+json body."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service import media, routes
from service.errors import PROBLEM_BASE, PROBLEM_CONTENT_TYPE
from service.imaging import DecodedImage, decode_image
from tests.service.conftest import SIZE, FakeModel, jpeg_bytes, png_bytes

ClientFactory = Callable[..., TestClient]


def classify(client: TestClient, data: bytes, content_type: str = "image/jpeg", **headers: str) -> httpx.Response:
    return client.post("/v1/classify", content=data, headers={"content-type": content_type, **headers})


def assert_problem(resp: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    body = resp.json()
    assert body["type"] == PROBLEM_BASE + slug
    assert body["status"] == status
    assert body["title"] and body["detail"]
    assert body["request_id"] == resp.headers["x-request-id"]
    return body  # type: ignore[no-any-return]


# --- answers ------------------------------------------------------------------------------------


def test_classify_answer_matches_the_model(
    client_factory: ClientFactory, tiny_onnx: Path, isic_images: list[Path]
) -> None:
    client = client_factory()
    data = isic_images[0].read_bytes()
    resp = classify(client, data)
    assert resp.status_code == 200
    body = resp.json()
    # the same pixels through ONNX Runtime directly give the same probabilities
    pixels = decode_image(data, SIZE, 10**8).pixels
    direct = ort.InferenceSession(str(tiny_onnx)).run(None, {"image": pixels[None]})[0][0]
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    got = {p["code"]: p["probability"] for p in body["predictions"]}
    np.testing.assert_allclose([got[c] for c in classes], direct, rtol=1e-5)
    probs = [p["probability"] for p in body["predictions"]]
    assert probs == sorted(probs, reverse=True) and len(probs) == 7
    assert body["top"] == body["predictions"][0]
    mal = body["malignancy"]
    assert mal["classes"] == ["mel", "bcc", "akiec"]
    assert mal["score"] == pytest.approx(got["mel"] + got["bcc"] + got["akiec"], rel=1e-5)
    assert mal["above_threshold"] == (mal["score"] >= mal["threshold"])
    assert body["model"]["name"] == "tiny-test-model" and len(body["model"]["sha256"]) == 64
    assert body["image"] == {"width": 640, "height": 480, "format": "jpeg"}
    assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["decode"]
    assert body["request_id"] == resp.headers["x-request-id"]


def test_multipart_and_png_bodies(client_factory: ClientFactory) -> None:
    client = client_factory()
    raw = classify(client, png_bytes(), "image/png").json()
    multi = client.post("/v1/classify", files={"image": ("x.png", png_bytes(), "image/png")}).json()
    generic = client.post("/v1/classify", files={"image": ("x", png_bytes(), "application/octet-stream")}).json()
    assert raw["predictions"] == multi["predictions"] == generic["predictions"]
    assert multi["image"]["format"] == "png"


def test_request_id_is_honoured_echoed_or_made(client_factory: ClientFactory) -> None:
    client = client_factory()
    mine = classify(client, jpeg_bytes(), **{"x-request-id": "ris-42.a"})
    assert mine.headers["x-request-id"] == "ris-42.a" and mine.json()["request_id"] == "ris-42.a"
    made = classify(client, jpeg_bytes())
    assert len(made.headers["x-request-id"]) == 32
    unsafe = client.get("/healthz", headers={"x-request-id": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"


def test_models_health_and_openapi(client_factory: ClientFactory) -> None:
    client = client_factory(max_batch_size=4)
    info = client.get("/v1/models").json()["models"][0]
    assert info["provider"] == "CPUExecutionProvider"
    assert info["input_size"] == SIZE and info["classes"][0] == "akiec"
    assert info["batch_sizes"] == [1, 2, 3, 4]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    spec = client.get("/openapi.json").json()
    assert "image/jpeg" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_malignancy_threshold_override(client_factory: ClientFactory) -> None:
    client = client_factory(malignancy_threshold=0.0)
    body = classify(client, jpeg_bytes()).json()
    assert body["malignancy"]["threshold"] == 0.0 and body["malignancy"]["above_threshold"] is True


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "content_type"),
    [(b"not an image at all", "image/jpeg"), (b"", "image/png"), (jpeg_bytes()[:300], "image/jpeg")],
)
def test_400_undecodable(client_factory: ClientFactory, data: bytes, content_type: str) -> None:
    assert_problem(classify(client_factory(), data, content_type), 400, "invalid-image")


def test_400_multipart_without_image_field(client_factory: ClientFactory) -> None:
    resp = client_factory().post("/v1/classify", files={"photo": ("x.jpg", jpeg_bytes(), "image/jpeg")})
    assert "'image'" in str(assert_problem(resp, 400, "bad-request")["detail"])


def test_404_and_405_are_problems(client_factory: ClientFactory) -> None:
    client = client_factory()
    assert_problem(client.get("/v9/nothing"), 404, "not-found")
    # under /v2 (the Open Inference Protocol) the same 404 has the protocol's {"error"} body: tests/service/test_oip.py
    assert_problem(client.get("/v1/classify"), 405, "method-not-allowed")


@pytest.mark.parametrize("accept", ["text/html", "image/png", "application/json;q=0"])
def test_406_unacceptable_answer_format(client_factory: ClientFactory, accept: str) -> None:
    assert_problem(classify(client_factory(), jpeg_bytes(), accept=accept), 406, "not-acceptable")


def test_accept_json_or_any(client_factory: ClientFactory) -> None:
    client = client_factory()
    for accept in ("application/json", "*/*", "text/html, application/*;q=0.5"):
        assert classify(client, jpeg_bytes(), accept=accept).status_code == 200


def test_413_too_many_bytes_declared_and_streamed(client_factory: ClientFactory) -> None:
    client = client_factory(max_upload_bytes=4096)
    big = jpeg_bytes(400, 300) + b"\x00" * 5000
    assert_problem(classify(client, big), 413, "payload-too-large")

    def chunks() -> object:  # no Content-Length: the limit must hold while the body streams in
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    resp = client.post("/v1/classify", content=chunks(), headers={"content-type": "image/jpeg"})  # type: ignore[arg-type]
    assert "limit" in str(assert_problem(resp, 413, "payload-too-large")["detail"])


def test_413_too_many_pixels(client_factory: ClientFactory) -> None:
    resp = classify(client_factory(max_pixels=1000), jpeg_bytes(64, 48))
    assert "3072 pixels" in str(assert_problem(resp, 413, "payload-too-large")["detail"])


@pytest.mark.parametrize("content_type", ["text/plain", "application/pdf", "image/gif", ""])
def test_415_unsupported_types(client_factory: ClientFactory, content_type: str) -> None:
    assert_problem(classify(client_factory(), jpeg_bytes(), content_type), 415, "unsupported-media-type")


def test_415_multipart_part_of_unsupported_type(client_factory: ClientFactory) -> None:
    resp = client_factory().post("/v1/classify", files={"image": ("x.txt", b"hello", "text/plain")})
    assert_problem(resp, 415, "unsupported-media-type")


def test_503_not_ready_until_warm_up_ends(client_factory: ClientFactory) -> None:
    model = FakeModel()
    model.gate.clear()  # warm-up blocks in run()
    client = client_factory(model=model, ready=False)
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    resp = classify(client, jpeg_bytes())
    assert_problem(resp, 503, "not-ready")
    assert resp.headers["retry-after"] == "1"
    model.gate.set()
    deadline = time.monotonic() + 5
    while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert classify(client, jpeg_bytes()).status_code == 200
    assert model.batches[: len(range(1, 9))] == list(range(1, 9))  # warm-up ran every batch size first


def test_503_overloaded_when_the_queue_is_full(client_factory: ClientFactory) -> None:
    model = FakeModel()
    client = client_factory(model=model, queue_size=1, max_batch_size=1)
    model.gate.clear()
    results: list[int] = []
    runtime = client.app.state.runtime  # type: ignore[attr-defined]

    def send() -> None:
        results.append(classify(client, jpeg_bytes()).status_code)

    threads = [threading.Thread(target=send) for _ in range(2)]
    model.entered.clear()  # warm-up already ran the model
    threads[0].start()
    assert model.entered.wait(5)  # first: inside run()
    threads[1].start()
    until = time.monotonic() + 5
    while runtime.batcher.depth() < 1:  # second: waiting in the now full queue
        assert time.monotonic() < until
        time.sleep(0.01)
    resp = classify(client, jpeg_bytes())
    assert_problem(resp, 503, "overloaded")
    assert resp.headers["retry-after"] == "1"
    model.gate.set()
    for t in threads:
        t.join(10)
    assert results == [200, 200]


def test_504_when_the_deadline_passes(client_factory: ClientFactory) -> None:
    model = FakeModel()
    client = client_factory(model=model, request_timeout_s=0.3)
    model.gate.clear()
    assert_problem(classify(client, jpeg_bytes()), 504, "deadline-exceeded")
    model.gate.set()
    assert classify(client, jpeg_bytes()).status_code == 200


def test_500_inference_failure_fails_the_request_not_the_service(client_factory: ClientFactory) -> None:
    model = FakeModel()
    client = client_factory(model=model)
    model.fail_all = True
    body = assert_problem(classify(client, jpeg_bytes()), 500, "inference-failed")
    assert "secret" not in str(body) and "ORT" not in str(body)
    model.fail_all = False
    assert classify(client, jpeg_bytes()).status_code == 200


def test_500_unexpected_fault_leaks_nothing(client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_factory()

    def broken(*args: object) -> None:
        raise KeyError("/opt/internal/table secret")

    monkeypatch.setattr(routes, "build_answer", broken)
    resp = classify(client, jpeg_bytes())
    body = assert_problem(resp, 500, "internal")
    assert "secret" not in resp.text and "KeyError" not in resp.text
    assert body["instance"] == "/v1/classify"


def test_503_while_draining(client_factory: ClientFactory) -> None:
    client = client_factory()
    client.app.state.runtime.begin_drain()  # type: ignore[attr-defined]
    assert client.get("/readyz").status_code == 503
    resp = classify(client, jpeg_bytes())
    assert_problem(resp, 503, "shutting-down")
    assert resp.headers["retry-after"] == "1"


# --- deadlines, batching and the threshold, through the route ---------------------------------------


def test_504_when_decoding_used_up_the_deadline_and_the_image_is_never_queued(client_factory: ClientFactory) -> None:
    model = FakeModel()
    # 1 ms: reading and decoding a 1000x1000 PNG alone takes longer, so the deadline is gone
    # before the image could be queued
    client = client_factory(model=model, request_timeout_s=0.001)
    warmed = len(model.batches)
    body = assert_problem(classify(client, png_bytes(1000, 1000), "image/png"), 504, "deadline-exceeded")
    assert "before inference" in str(body["detail"])
    assert client.app.state.runtime.batcher.depth() == 0  # type: ignore[attr-defined]
    time.sleep(0.1)
    assert model.batches[warmed:] == []


def test_request_expired_in_the_queue_is_not_run_even_when_the_event_loop_is_late(
    client_factory: ClientFactory,
) -> None:
    # Under load the event loop can be busy when a request's deadline passes, so its own timeout
    # fires late. The batcher must still see the deadline and drop the request instead of
    # spending inference on an answer nobody waits for.
    model = FakeModel()
    client = client_factory(model=model, request_timeout_s=0.5, max_batch_size=1)
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    warmed = len(model.batches)
    model.gate.clear()
    model.entered.clear()
    answers: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: answers.update(first=classify(client, jpeg_bytes())))
    first.start()
    assert model.entered.wait(5)  # the worker is busy on the first request
    second = threading.Thread(target=lambda: answers.update(second=classify(client, jpeg_bytes())))
    second.start()
    until = time.monotonic() + 5
    while runtime.batcher.depth() < 1:
        assert time.monotonic() < until
        time.sleep(0.005)
    queued_at = time.monotonic()  # the second request's deadline is at most 0.5 s after this
    loop_blocked, loop_free = threading.Event(), threading.Event()

    async def busy_loop() -> None:  # a synchronous sleep: nothing else on the loop runs meanwhile
        loop_blocked.set()
        time.sleep(queued_at + 1.5 - time.monotonic())
        loop_free.set()

    client.portal.start_task_soon(busy_loop)  # type: ignore[union-attr]
    assert loop_blocked.wait(5)
    time.sleep(max(0.0, queued_at + 0.7 - time.monotonic()))  # past the deadline, loop still blocked
    model.gate.set()  # the worker takes the second request now, its deadline passed
    assert loop_free.wait(5)
    first.join(10)
    second.join(10)
    assert_problem(answers["second"], 504, "deadline-exceeded")
    assert model.batches[warmed:] == [1]  # the first request only


def test_uploads_still_decoding_join_the_batch_of_the_first(
    client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four uploads decode at once, then finish 50 ms apart. The first one decoded must wait
    # for the three still decoding (the batcher is told they are coming) rather than run alone.
    client = client_factory(max_batch_size=4, max_wait_ms=1000, decode_threads=4)
    all_decoding = threading.Barrier(4)

    def staggered(data: bytes, size: int, max_pixels: int) -> DecodedImage:
        turn = all_decoding.wait(5)
        time.sleep(0.05 * turn)
        return decode_image(data, size, max_pixels)

    monkeypatch.setitem(media.DECODERS, "image/jpeg", staggered)
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(classify(client, jpeg_bytes()))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.json()["batch_size"] for a in answers] == [4] * 4


def test_score_exactly_at_the_threshold_is_flagged_in_json_fhir_and_metrics(client_factory: ClientFactory) -> None:
    image = jpeg_bytes(color=(90, 120, 30))
    score = classify(client_factory(), image).json()["malignancy"]["score"]
    client = client_factory(malignancy_threshold=score)  # "at or above": equal counts
    flagged_before = REGISTRY.get_sample_value("lesionserve_malignancy_flagged_total")
    mal = classify(client, image).json()["malignancy"]
    assert (mal["score"], mal["threshold"], mal["above_threshold"]) == (score, score, True)
    report = classify(client, image, accept="application/fhir+json").json()
    malignancy_obs = next(r for r in report["contained"] if r.get("id") == "malignancy")
    assert malignancy_obs["interpretation"][0]["coding"][0]["code"] == "H"
    assert "at or above the threshold" in report["conclusion"]
    assert REGISTRY.get_sample_value("lesionserve_malignancy_flagged_total") - flagged_before == 2
