"""The out-of-distribution answer, LESIONSERVE_OOD_POLICY, ?explain=true heatmaps, and files without either.

The model is tests/tiny_model.py with its optional outputs: ``ood_score`` is 100 x the squared distance of
the mean colour from a skin tone (threshold 10), ``cam`` marks the darkest cells of a 4 x 4 grid.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import REGISTRY

from service import explain as explain_module
from service.app import create_app
from service.config import Settings
from service.explain import NO_CAM, NO_OOD, OOD_WARNING, render_heatmap
from service.inference import ModelLoadError, OnnxModel
from tests.service.conftest import SIZE, encode, jpeg_bytes, post_image
from tests.tiny_model import HAM_CLASSES, contract_metadata, extras_metadata, make_tiny_onnx

SKIN = (204, 153, 128)  # TINY_SKIN x 255: ood_score 0
OOD_TYPE = "https://lesionserve.dev/problems/out-of-distribution"

Client = Callable[..., TestClient]


@pytest.fixture(scope="module")
def extras_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("extras") / "extras.onnx", size=SIZE, ood=True, cam=True)


def lesion_png(corner: tuple[int, int] = (0, 3)) -> bytes:
    """Skin-tone square image with one dark cell of the 4 x 4 grid (row, column)."""
    img = np.full((SIZE, SIZE, 3), SKIN, dtype=np.uint8)
    cell = SIZE // 4
    r, c = corner
    img[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = (60, 30, 20)
    return encode(Image.fromarray(img), "PNG")


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_in_distribution_image_passes(client_factory: Client, extras_onnx: Path) -> None:
    answer = post_image(client_factory(model_path=extras_onnx), jpeg_bytes(color=SKIN)).json()  # type: ignore[attr-defined]
    ood = answer["ood"]
    assert ood["available"] is True and ood["out_of_distribution"] is False and ood["method"] == "mahalanobis"
    assert ood["score"] < 1.0 and ood["threshold"] == 10.0
    assert "warning" not in answer["top"] and "explanation" not in answer


def test_out_of_distribution_image_is_flagged_and_counted(client_factory: Client, extras_onnx: Path) -> None:
    client = client_factory(model_path=extras_onnx)
    checked, flagged = counter("lesionserve_ood_checked_total"), counter("lesionserve_ood_flagged_total")
    r = post_image(client, jpeg_bytes(color=(30, 60, 200)))  # blue: far from skin
    assert r.status_code == 200  # type: ignore[attr-defined]
    answer = r.json()  # type: ignore[attr-defined]
    assert answer["ood"]["out_of_distribution"] is True and answer["ood"]["score"] > 10.0
    assert answer["top"]["warning"] == OOD_WARNING
    assert answer["predictions"][0]["code"] == answer["top"]["code"] and "warning" not in answer["predictions"][0]
    assert counter("lesionserve_ood_checked_total") == checked + 1
    assert counter("lesionserve_ood_flagged_total") == flagged + 1
    assert "lesionserve_ood_flagged_total" in client.get("/metrics").text


def test_flagged_fhir_report_says_so_and_has_the_score(client_factory: Client, extras_onnx: Path) -> None:
    client = client_factory(model_path=extras_onnx)
    blue = post_image(client, jpeg_bytes(color=(30, 60, 200)), accept="application/fhir+json").json()  # type: ignore[attr-defined]
    assert blue["conclusion"].startswith("WARNING: the image looks unlike the training data")
    (obs,) = [o for o in blue["contained"] if o.get("id") == "ood"]
    assert obs["interpretation"][0]["coding"][0]["code"] == "H"
    assert obs["referenceRange"][0]["high"]["value"] == 10.0 and obs["valueQuantity"]["value"] > 10.0
    assert {"reference": "#ood"} in [{"reference": r["reference"]} for r in blue["result"]]
    skin = post_image(client, jpeg_bytes(color=SKIN), accept="application/fhir+json").json()  # type: ignore[attr-defined]
    assert "WARNING" not in skin["conclusion"]
    assert next(o for o in skin["contained"] if o.get("id") == "ood")["interpretation"][0]["coding"][0]["code"] == "N"


def test_reject_policy_answers_422_problem(client_factory: Client, extras_onnx: Path) -> None:
    client = client_factory(model_path=extras_onnx, ood_policy="reject")
    before = REGISTRY.get_sample_value("lesionserve_rejections_total", {"reason": "out_of_distribution"}) or 0.0
    r = post_image(client, jpeg_bytes(color=(30, 60, 200)))
    assert r.status_code == 422  # type: ignore[attr-defined]
    assert r.headers["content-type"] == "application/problem+json"  # type: ignore[attr-defined]
    body = r.json()  # type: ignore[attr-defined]
    assert body["type"] == OOD_TYPE and body["status"] == 422 and "above the threshold 10" in body["detail"]
    assert REGISTRY.get_sample_value("lesionserve_rejections_total", {"reason": "out_of_distribution"}) == before + 1
    assert post_image(client, jpeg_bytes(color=SKIN)).status_code == 200  # type: ignore[attr-defined]


def test_reject_policy_needs_a_model_with_ood_score(settings_factory: Callable[..., Settings]) -> None:
    with pytest.raises(ModelLoadError, match="LESIONSERVE_OOD_POLICY=reject needs a model with an ood_score"):
        create_app(settings_factory(ood_policy="reject"))  # the plain tiny model


def test_unknown_policy_is_refused_at_start(settings_factory: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="ood_policy"):
        settings_factory(ood_policy="ignore")


def test_a_file_without_the_outputs_still_serves_and_says_so(client_factory: Client) -> None:
    client = client_factory()  # tiny_onnx: probabilities only, as exported before this feature
    r = client.post("/v1/classify?explain=true", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    answer = r.json()
    assert answer["ood"] == {"available": False, "detail": NO_OOD}
    e = answer["explanation"]
    assert (e["available"], e["detail"], e["width"], e["height"]) == (False, NO_CAM, SIZE, SIZE)
    assert "png_base64" not in e and e["input_png_base64"]  # no heatmap, but the image the model saw
    assert "warning" not in answer["top"]
    info = client.get("/v1/models").json()["models"][0]
    assert "ood" not in info or info["ood"] is None


def test_models_endpoint_reports_the_check(client_factory: Client, extras_onnx: Path) -> None:
    info = client_factory(model_path=extras_onnx).get("/v1/models").json()["models"][0]
    assert info["ood"]["method"] == "mahalanobis" and info["ood"]["threshold"] == 10.0
    assert info["cam"]["shape"] == [len(HAM_CLASSES), 4, 4]


def test_explain_returns_a_heatmap_peaking_on_the_dark_cell(client_factory: Client, extras_onnx: Path) -> None:
    client = client_factory(model_path=extras_onnx)
    r = client.post("/v1/classify?explain=true", content=lesion_png((0, 3)), headers={"content-type": "image/png"})
    assert r.status_code == 200
    answer = r.json()
    e = answer["explanation"]
    assert e["available"] is True and e["class"] == answer["top"]["code"]
    assert (e["width"], e["height"]) == (SIZE, SIZE)
    png = cv2.imdecode(np.frombuffer(base64.b64decode(e["png_base64"]), np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (SIZE, SIZE, 3)
    # JET: hot = red. The top-right cell (rows 0-7, columns 24-31) is the reddest region.
    red = png[..., 2].astype(int) - png[..., 0].astype(int)
    cell = SIZE // 4
    means = red.reshape(4, cell, 4, cell).mean(axis=(1, 3))
    assert np.unravel_index(int(means.argmax()), means.shape) == (0, 3), means


def test_explain_in_fhir_is_the_presented_form(client_factory: Client, extras_onnx: Path) -> None:
    client = client_factory(model_path=extras_onnx)
    r = client.post(
        "/v1/classify?explain=true",
        content=lesion_png(),
        headers={"content-type": "image/png", "accept": "application/fhir+json"},
    )
    (form,) = r.json()["presentedForm"]
    assert form["contentType"] == "image/png" and base64.b64decode(form["data"]).startswith(b"\x89PNG")


def test_heatmap_is_drawn_in_a_decode_thread(
    client_factory: Client, extras_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    original = explain_module.render_heatmap

    def recording(pixels: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> bytes:
        threads.append(threading.current_thread().name)
        return original(pixels, cam, alpha)

    monkeypatch.setattr(explain_module, "render_heatmap", recording)
    client = client_factory(model_path=extras_onnx)
    assert (
        client.post("/v1/classify?explain=1", content=lesion_png(), headers={"content-type": "image/png"}).status_code
        == 200
    )
    assert len(threads) == 1 and threads[0].startswith("lesionserve-decode")


def test_without_explain_nothing_is_drawn(
    client_factory: Client, extras_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object) -> bytes:
        raise AssertionError("drawn without ?explain")

    monkeypatch.setattr(explain_module, "render_heatmap", boom)
    client = client_factory(model_path=extras_onnx)
    for query in ("", "?explain=false", "?explain=0"):
        r = client.post(f"/v1/classify{query}", content=lesion_png(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and "explanation" not in r.json()


def test_explain_must_be_a_boolean(client_factory: Client, extras_onnx: Path) -> None:
    r = client_factory(model_path=extras_onnx).post(
        "/v1/classify?explain=maybe", content=lesion_png(), headers={"content-type": "image/png"}
    )
    assert r.status_code == 400 and r.json()["type"].endswith("/bad-request")


def test_render_heatmap_refuses_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="expected"):
        render_heatmap(np.zeros((8, 8), np.uint8), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="expected"):
        render_heatmap(np.zeros((8, 8, 3), np.uint8), np.zeros((1, 2, 2), np.float32))
    flat = render_heatmap(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2), np.float32))  # a constant map is fine
    assert flat.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("outputs", "metadata", "message"),
    [
        ({"ood": True, "cam": True}, "plain", "has the 'ood_score' output but not its metadata"),
        ({}, "extras", "has the 'ood_score' metadata but not its output"),
        ({"ood": True}, "extras", "has the 'cam' metadata but not its output"),
        ({"ood": True, "cam": True}, "cam-shape", "output 'cam' has shape"),
    ],
)
def test_outputs_and_metadata_must_agree(tmp_path: Path, outputs: dict[str, bool], metadata: str, message: str) -> None:
    metas = {
        "plain": contract_metadata(HAM_CLASSES, SIZE),
        "extras": extras_metadata(HAM_CLASSES, SIZE),
        "cam-shape": extras_metadata(HAM_CLASSES, SIZE, grid=2),
    }
    path = make_tiny_onnx(tmp_path / "m.onnx", size=SIZE, metadata=metas[metadata], **outputs)
    with pytest.raises(ModelLoadError, match=message):
        OnnxModel.load(path, ["CPUExecutionProvider"])


def test_explain_class_draws_the_map_of_the_class_asked_for(client_factory: Client, extras_onnx: Path) -> None:
    """The page's heatmap selector: ``explain_class`` draws another class's map; an unknown class is a 400."""
    client = client_factory(model_path=extras_onnx)
    post = lambda query: client.post(  # noqa: E731
        "/v1/classify" + query, content=lesion_png((0, 3)), headers={"content-type": "image/png"}
    )
    top = post("?explain=true").json()
    other = top["predictions"][-1]["code"]
    assert other != top["top"]["code"]
    chosen = post(f"?explain_class={other}").json()  # implies explain=true
    assert chosen["explanation"]["class"] == other and top["explanation"]["class"] == top["top"]["code"]
    assert chosen["predictions"] == top["predictions"]  # the answer itself does not change
    bad = post("?explain_class=not-a-class")
    assert bad.status_code == 400 and bad.json()["type"].endswith("/bad-request")
