"""Prometheus metrics: present from the start, moving after requests, labelled by route template."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import jpeg_bytes

ClientFactory = Callable[..., TestClient]


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_after_requests(client_factory: ClientFactory) -> None:
    client = client_factory()
    before = scrape(client)
    for _ in range(3):
        assert (
            client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"}).status_code == 200
        )
    client.post("/v1/classify", content=b"x", headers={"content-type": "text/plain"})
    client.get("/v1/models/some-raw-path-123")
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("lesionserve_requests_total", route="/v1/classify", method="POST", status="200") == 3
    assert moved("lesionserve_requests_total", route="/v1/classify", method="POST", status="415") == 1
    assert moved("lesionserve_rejections_total", reason="unsupported_type") == 1
    assert moved("lesionserve_request_duration_seconds_count", route="/v1/classify") == 4
    assert moved("lesionserve_decode_duration_seconds_count") == 3
    assert moved("lesionserve_queue_wait_seconds_count") == 3
    assert moved("lesionserve_inference_duration_seconds_count") >= 1
    assert moved("lesionserve_batch_size_sum") == 3
    assert (
        sum(
            moved("lesionserve_predictions_total", class_code=c)
            for c in ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
        )
        == 3
    )
    # raw paths never become labels
    assert not any("some-raw-path" in str(labels) for _, labels in after)
    assert moved("lesionserve_requests_total", route="unmatched", method="GET", status="404") == 1


def test_metrics_present_up_front(client_factory: ClientFactory) -> None:
    samples = scrape(client_factory(queue_size=17))
    assert value(samples, "lesionserve_ready") == 1
    assert value(samples, "lesionserve_queue_capacity") == 17
    info = [labels for name, labels in samples if name == "lesionserve_model_info"]
    assert info and ("provider", "CPUExecutionProvider") in info[-1]
    for reason in ("queue_full", "deadline", "too_large", "unauthorized", "not_ready", "shutting_down"):
        assert ("lesionserve_rejections_total", (("reason", reason),)) in samples
    assert ("lesionserve_in_flight_requests", ()) in samples
    assert ("lesionserve_queue_depth", ()) in samples
    assert ("lesionserve_malignancy_flagged_total", ()) in samples


def test_malignancy_flags_are_counted(client_factory: ClientFactory) -> None:
    client = client_factory(malignancy_threshold=0.0)  # every score reaches a zero threshold
    before = value(scrape(client), "lesionserve_malignancy_flagged_total")
    for _ in range(2):
        client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
    assert value(scrape(client), "lesionserve_malignancy_flagged_total") - before == 2
