"""The minimum input size (LESIONSERVE_MIN_IMAGE_SIDE): a tiny image is refused with 422, through the real entries."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.errors import PROBLEM_BASE
from tests.service.conftest import SIZE, jpeg_bytes, png_bytes
from tests.service.test_api import assert_problem, classify
from tests.service.test_dicom import make_dicom

ClientFactory = Callable[..., TestClient]
TOO_SMALL = "image-too-small"
DEFAULT_MIN = SIZE // 2  # unset: half the model's input side


def rgb(rows: int, cols: int) -> np.ndarray:
    return np.full((rows, cols, 3), (180, 90, 60), np.uint8)


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (jpeg_bytes(3, 3), "image/jpeg"),
        (png_bytes(200, DEFAULT_MIN - 1), "image/png"),  # the shorter side decides, whatever the longer one
        (make_dicom(rgb(3, 3)), "application/dicom"),  # the review's 3x3 DICOM that answered "nevus 88.6%"
    ],
    ids=["jpeg-3x3", "png-wide-strip", "dicom-3x3"],
)
def test_an_image_under_the_minimum_side_is_422_with_its_own_problem_type(
    client_factory: ClientFactory, data: bytes, content_type: str
) -> None:
    client = client_factory()
    body = assert_problem(classify(client, data, content_type), 422, TOO_SMALL)
    assert "LESIONSERVE_MIN_IMAGE_SIDE" in str(body["detail"]) and f"at least {DEFAULT_MIN}" in str(body["detail"])
    # nothing is lost: the service answers the next image as before
    assert classify(client, jpeg_bytes(64, 48)).status_code == 200


def test_an_image_exactly_at_the_minimum_is_classified(client_factory: ClientFactory) -> None:
    client = client_factory()
    assert classify(client, jpeg_bytes(DEFAULT_MIN, DEFAULT_MIN)).status_code == 200
    assert classify(client, make_dicom(rgb(DEFAULT_MIN, 100)), "application/dicom").status_code == 200


def test_the_setting_overrides_the_default_and_multipart_is_refused_too(client_factory: ClientFactory) -> None:
    client = client_factory(min_image_side=100)
    resp = client.post("/v1/classify", files={"image": ("x.jpg", jpeg_bytes(120, 99), "image/jpeg")})
    assert_problem(resp, 422, TOO_SMALL)
    assert classify(client, jpeg_bytes(100, 100)).status_code == 200
    assert 'lesionserve_rejections_total{reason="too_small"}' in client.get("/metrics").text


def test_the_problem_type_is_documented_in_openapi(client_factory: ClientFactory) -> None:
    spec = client_factory().get("/openapi.json").json()
    assert "LESIONSERVE_MIN_IMAGE_SIDE" in spec["paths"]["/v1/classify"]["post"]["responses"]["422"]["description"]
    assert PROBLEM_BASE.startswith("https://")
