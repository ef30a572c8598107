"""The Open Inference Protocol v2 routes, driven by the real Triton client (``tritonclient[http]``), binary and JSON,
against a real ``lesionserve serve`` process with an ONNX model that has the ``ood_score`` output."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.service.cli_server import cli_server
from tests.service.test_dimse import wait_for
from tests.tiny_model import make_tiny_onnx

http = pytest.importorskip("tritonclient.http")
utils = pytest.importorskip("tritonclient.utils")

KEY = "reader:0123456789abcdef"


def auth() -> dict[str, str]:
    # A new dict each call: tritonclient adds Inference-Header-Content-Length (an int) to the one it is given.
    return {"Authorization": "Bearer 0123456789abcdef"}


MODEL, VERSION = "tiny-test-model", "0.0.1"
ClientFactory = Callable[..., TestClient]


@pytest.fixture(scope="module")
def audit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oip-audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, audit_file: Path) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("oip")
    model = make_tiny_onnx(tmp / "tiny-ood.onnx", ood=True)
    flags = ["--api-keys", KEY, "--max-batch-size", "4", "--audit-log", str(audit_file)]
    with cli_server(model, tmp / "server.log", *flags) as base:
        yield base


@pytest.fixture
def client(server: str) -> Iterator[http.InferenceServerClient]:
    c = http.InferenceServerClient(server.removeprefix("http://"))
    yield c
    c.close()


def images_input(images: list[bytes], binary: bool) -> http.InferInput:
    tensor = http.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:  # JSON strings cannot carry raw bytes: each image as base64 text
        tensor.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=np.object_), binary_data=False)
    return tensor


def v1_probabilities(server: str, data: bytes, classes: list[str]) -> np.ndarray:
    answer = httpx.post(f"{server}/v1/classify", content=data, headers={"content-type": "image/jpeg", **auth()}).json()
    by_code = {p["code"]: p["probability"] for p in answer["predictions"]}
    return np.array([by_code[c] for c in classes], dtype=np.float32)


def test_server_and_model_metadata(client: http.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, VERSION)
    assert not client.is_model_ready(MODEL, "9.9.9")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(MODEL, headers=auth())
    assert meta["versions"] == [VERSION]
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("image", "BYTES")]
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "malignancy_score", "ood_score", "error"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_v1_classify(
    client: http.InferenceServerClient, server: str, isic_images: list[Path], binary: bool
) -> None:
    images = [p.read_bytes() for p in isic_images[:3]]
    outputs = [http.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "malignancy_score", "error")]
    result = client.infer(MODEL, [images_input(images, binary)], outputs=outputs, headers=auth(), request_id="r-1")
    probs = result.as_numpy("probabilities")
    classes = client.get_model_metadata(MODEL, headers=auth())["parameters"]["classes"]
    assert probs.shape == (3, len(classes)) and probs.dtype == np.float32
    for row, data in zip(probs, images, strict=True):
        np.testing.assert_allclose(row, v1_probabilities(server, data, classes), rtol=1e-6, atol=1e-7)
    assert result.get_response()["id"] == "r-1"
    assert result.as_numpy("malignancy_score").shape == (3,)
    assert [e.decode() if isinstance(e, bytes) else e for e in result.as_numpy("error")] == ["", "", ""]


def test_versioned_path_and_all_outputs_by_default(client: http.InferenceServerClient, isic_images: list[Path]) -> None:
    result = client.infer(MODEL, [images_input([isic_images[0].read_bytes()], True)], model_version=VERSION,
                          headers=auth())  # fmt: skip
    assert result.as_numpy("ood_score").shape == (1,)
    assert np.isfinite(result.as_numpy("probabilities")).all()


def test_bad_image_alone_is_400_with_an_error(client: http.InferenceServerClient) -> None:
    with pytest.raises(utils.InferenceServerException) as caught:
        client.infer(MODEL, [images_input([b"not an image at all"], True)], headers=auth())
    assert caught.value.status() == "400"
    assert caught.value.message().startswith("image 0: ")  # the {"error"} text, as the client reads it


def test_bad_image_beside_good_ones_fails_alone(client: http.InferenceServerClient, isic_images: list[Path]) -> None:
    good = isic_images[0].read_bytes()
    result = client.infer(MODEL, [images_input([good, b"\xff\xd8 truncated", good], True)], headers=auth())
    probs = result.as_numpy("probabilities")
    errors = [e.decode() for e in result.as_numpy("error")]
    assert np.isfinite(probs[[0, 2]]).all() and np.isnan(probs[1]).all()
    assert errors[0] == errors[2] == "" and errors[1]  # the bad image's own reason
    np.testing.assert_array_equal(probs[0], probs[2])


def test_unknown_model_is_404(client: http.InferenceServerClient, isic_images: list[Path]) -> None:
    with pytest.raises(utils.InferenceServerException) as caught:
        client.infer("no-such-model", [images_input([isic_images[0].read_bytes()], True)], headers=auth())
    assert caught.value.status() == "404"
    assert MODEL in caught.value.message()  # says what is loaded instead


def test_errors_have_the_protocol_shape(server: str) -> None:
    unauthorized = httpx.post(f"{server}/v2/models/{MODEL}/infer", json={"inputs": []})
    assert unauthorized.status_code == 401 and set(unauthorized.json()) == {"error"}
    malformed = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b"{not json", headers=auth())
    assert malformed.status_code == 400 and "not JSON" in malformed.json()["error"]
    lying = httpx.post(
        f"{server}/v2/models/{MODEL}/infer",
        content=b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[2],"parameters":{"binary_data_size":4}}]}'
        + b"\x09\x00\x00\x00",
        headers={**auth(), "Inference-Header-Content-Length": "96"},
    )
    assert lying.status_code == 400 and "error" in lying.json()
    assert httpx.get(f"{server}/v2/nowhere").json().keys() == {"error"}


def test_v2_requests_are_counted_and_audited(server: str, audit_file: Path, isic_images: list[Path]) -> None:
    body = isic_images[0].read_bytes()
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(body) + 4}}]}).encode()  # fmt: skip
    answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=header + struct.pack("<I", len(body)) + body,
                        headers={**auth(), "Inference-Header-Content-Length": str(len(header))})  # fmt: skip
    assert answer.status_code == 200, answer.text
    text = httpx.get(f"{server}/metrics", headers=auth()).text
    assert 'route="/v2/models/{model_name}/infer"' in text
    line = audit_line(audit_file, answer.headers["x-request-id"])
    assert line["outcome"]["status"] == 200 and line["key_id"] == "reader"


def audit_line(path: Path, request_id: str | None, match: Callable[[dict[str, Any]], bool] = bool) -> dict[str, Any]:
    """The audit line of a request: written once its answer is out, so the client may read the file first."""
    found: list[dict[str, Any]] = []

    def written() -> bool:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        found[:] = [x for x in lines if (request_id is None or x["request_id"] == request_id) and match(x)]
        return bool(found)

    wait_for(written, what="the audit line")
    return found[-1]


def test_dicom_goes_through_v2_too(client: http.InferenceServerClient, audit_file: Path) -> None:
    dicom = (Path(__file__).parents[1] / "data" / "dicom" / "ISIC_0000000_vlphoto.dcm").read_bytes()
    result = client.infer(MODEL, [images_input([dicom], True)], headers=auth(), request_id="dicom-1")
    assert np.isfinite(result.as_numpy("probabilities")).all()
    # its UIDs reach the audit trail, hashed, as for /v1/classify
    line = audit_line(audit_file, None, lambda x: "dicom" in x)
    assert "SOPInstanceUID" in line["dicom"], line


def test_served_model_name_renames_the_paths(client_factory: ClientFactory) -> None:
    # KServe calls /v2/models/<InferenceService name>/...: deploy/kserve passes it as --served-model-name
    client = client_factory(served_model_name="lesionserve-reference")
    assert client.get("/v2/models/lesionserve-reference/ready").json()["name"] == "lesionserve-reference"
    assert client.get("/v2/models/lesionserve-reference").json()["name"] == "lesionserve-reference"
    gone = client.get("/v2/models/tiny-test-model/ready")
    assert gone.status_code == 404 and "lesionserve-reference" in gone.json()["error"]


def binary_request(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    raw = b"".join(struct.pack("<I", len(i)) + i for i in images)
    tensor = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [len(images)],
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def test_the_same_limits_apply(client_factory: ClientFactory, isic_images: list[Path]) -> None:
    client = client_factory(max_upload_bytes=4096, queue_size=2)
    image = isic_images[0].read_bytes()
    body, headers = binary_request([image])  # the ISIC JPEGs are larger than 4 KiB
    too_big = client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert too_big.status_code == 413 and set(too_big.json()) == {"error"}
    body, headers = binary_request([b"x"] * 3)
    too_many = client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert too_many.status_code == 400 and "at most 2" in too_many.json()["error"]
