"""``export.quantize``: INT8 of a real (tiny) export, calibrated on committed CC0 images, and its verification."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from export.__main__ import main as export_main
from export.bench import compare_files
from export.metadata import ExportError, read_metadata
from export.onnx_export import DEFAULT_IMAGES, export_checkpoints
from export.parity import VerificationError, load_images
from export.quantize import Calibration, Limits, backbone_nodes, main, normalisation_as_conv, quantize_file
from service.contract import INPUT_NAME, OUTPUT_NAME
from tests.export.conftest import MakeCkpt

CLASSES = ["melanoma", "nevus"]  # the committed folder's classes: tests/data/isic/{melanoma,nevus}
LOOSE = Limits(min_agreement=0.0, max_prob_diff=1.0, max_bacc_drop=1.0, max_sensitivity_drop=1.0)


@pytest.fixture(scope="module")
def fp32(make_ckpt: MakeCkpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny.onnx"
    export_checkpoints([make_ckpt("int8-src", classes=CLASSES)], out, tta="dihedral")
    return out


@pytest.fixture(scope="module")
def int8(fp32: Path) -> Path:
    out = fp32.with_name("tiny-int8.onnx")
    quantize_file(fp32, out, Calibration(DEFAULT_IMAGES, part=None, images=6), LOOSE)
    return out


def probs(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def test_int8_file_is_quantised_described_and_close_to_fp32(fp32: Path, int8: Path) -> None:
    meta, src = read_metadata(int8), read_metadata(fp32)
    assert meta.precision == "int8" and src.precision == "float32"
    q = meta.quantization
    assert q is not None and q.calibration["images"] == 6 and q.calibration["method"] == "minmax"
    assert q.source["weights_sha256"] == src.weights_sha256 != meta.weights_sha256
    committed = len(list(DEFAULT_IMAGES.rglob("*.jpg")))
    assert "7-bit" in q.weights and q.verification["images"] == committed - 6  # 6 calibrate, the rest verify
    graph = onnx.load(str(int8)).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    int8_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    # ResNet-18 has 20 convolutions: all but the first two (--float-convs 2, the default) are stored as int8.
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 20 and q.calibration["float_convs"] == 2
    stored_int8 = [
        c for c in convs if c.input[1].removesuffix("_DequantizeLinear_Output") + "_quantized" in int8_weights
    ]
    assert [c.name for c in convs if c not in stored_int8] == [c.name for c in convs[:2]]
    x = load_images(sorted(DEFAULT_IMAGES.rglob("*.jpg")), meta.input_size)
    p8, p32 = probs(int8, x), probs(fp32, x)
    assert np.allclose(p8.sum(1), 1.0, atol=1e-5)
    assert 0 < np.abs(p8 - p32).max() < 0.2  # quantised (not equal) yet close
    card = int8.with_suffix(".md").read_text()
    assert "## INT8 vs FP32" in card and "top-1 agreement with fp32" in card and src.weights_sha256 in card


def test_normalisation_rewrite_is_exact(fp32: Path, tmp_path: Path) -> None:
    model = onnx.load(str(fp32))
    names = normalisation_as_conv(model)
    conv = [n for n in model.graph.node if n.name in names]
    assert len(conv) == 1 and conv[0].op_type == "Conv" and conv[0].attribute[0].i == 3  # group: one per channel
    onnx.save(model, tmp_path / "rewritten.onnx")
    x = load_images(sorted(DEFAULT_IMAGES.rglob("*.jpg"))[:4], read_metadata(fp32).input_size)
    assert np.abs(probs(tmp_path / "rewritten.onnx", x) - probs(fp32, x)).max() < 1e-6


def test_only_backbone_feature_maps_are_quantised(fp32: Path) -> None:
    model = onnx.load(str(fp32))
    keep = normalisation_as_conv(model)
    assert len(backbone_nodes(model, keep, float_convs=3)) < len(backbone_nodes(model, keep, float_convs=0))
    chosen = set(backbone_nodes(model, keep, float_convs=0))
    by_name = {n.name: n for n in model.graph.node}
    assert {by_name[n].op_type for n in chosen} <= {"Conv", "Relu", "Add", "MaxPool", "Clip"}
    assert not chosen & set(keep)  # the normalisation stays float
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in keep]
    assert all(c.name in chosen for c in convs)
    # Nothing after the global pooling: the classifier, softmax and the cam/ood heads stay float.
    assert not [
        n for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Softmax", "Einsum") and n.name in chosen
    ]


def test_limits_refuse_and_leave_no_file(fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "refused-int8.onnx"
    strict = dataclasses.replace(LOOSE, max_prob_diff=0.0)  # a quantised file always differs a little
    with pytest.raises(VerificationError, match=r"INT8 max \|p - p_fp32\|"):
        quantize_file(fp32, out, Calibration(DEFAULT_IMAGES, part=None, images=6), strict)
    impossible = dataclasses.replace(LOOSE, min_agreement=1.01)
    with pytest.raises(VerificationError, match="top-1 agreement"):
        quantize_file(fp32, out, Calibration(DEFAULT_IMAGES, part=None, images=6), impossible)
    assert list(tmp_path.iterdir()) == []  # no output, no .partial, no .prepared, no card


def test_refuses_an_int8_or_fp16_source_and_bad_calibration(fp32: Path, int8: Path, tmp_path: Path) -> None:
    cal = Calibration(DEFAULT_IMAGES, part=None, images=6)
    with pytest.raises(ExportError, match="already INT8"):
        quantize_file(int8, tmp_path / "again.onnx", cal, LOOSE)
    with pytest.raises(ExportError, match="must differ"):
        quantize_file(fp32, fp32, cal, LOOSE)
    with pytest.raises(ExportError, match="calibration method"):
        Calibration(DEFAULT_IMAGES, part=None, method="guess")
    with pytest.raises(ExportError, match="needs --calibration-split"):
        Calibration(DEFAULT_IMAGES, part="val")


def test_cli_one_line_errors(fp32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([str(fp32), "--out", str(tmp_path / "x.onnx"), "--calibration", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("export.quantize: error: calibration data:"), err
    code = main([str(fp32), "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "needs --calibration" in err[0]
    assert export_main(["nothing.pt", "--out", str(tmp_path / "y.onnx"), "--int8", "--fp16"]) == 1
    assert "leave out --fp16" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_int8_flag_writes_both_files(
    make_ckpt: MakeCkpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "both.onnx"
    argv = [str(make_ckpt("int8-cli", classes=CLASSES)), "--out", str(out), "--tta", "none", "--int8",
            "--calibration", str(DEFAULT_IMAGES), "--calibration-images", "6", "--int8-min-agreement", "0",
            "--int8-max-prob-diff", "1", "--int8-max-bacc-drop", "1", "--int8-max-sensitivity-drop", "1"]  # fmt: skip
    assert export_main(argv) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert read_metadata(out).precision == "float32" and read_metadata(tmp_path / "both-int8.onnx").precision == "int8"
    assert "INT8 top-1 agreement" in stdout and f"wrote {tmp_path / 'both-int8.onnx'}" in stdout


def test_bench_compares_both_files(fp32: Path, int8: Path) -> None:
    result = compare_files([fp32, int8], repeats=1, threads=1)
    assert [r["precision"] for r in result["rows"]] == ["float32", "int8"]
    assert all(r["b1_ms"] > 0 and r["b16_img_s"] > 0 for r in result["rows"])
    assert result["rows"][1]["mb"] < result["rows"][0]["mb"]


def test_int8_weights_dequantise_to_the_fp32_weights(fp32: Path, int8: Path) -> None:
    """Per-channel scales: every output channel's weights come back within half a step of fp32."""
    src = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp32)).graph.initializer}
    graph = onnx.load(str(int8)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    checked = 0
    for node in graph.node:
        name = node.input[0].removesuffix("_quantized")
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and name in src and src[name].ndim == 4:
            q, scale = inits[node.input[0]].astype(np.float32), inits[node.input[1]]
            w = q * scale.reshape(-1, 1, 1, 1)
            assert np.abs(w - src[name]).max() <= scale.max() * 0.5 + 1e-7
            checked += 1
    assert checked == 18  # 20 convolutions, the first two kept float


def test_service_serves_the_int8_file_and_says_so(int8: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    settings = Settings(model_path=int8, providers="CPUExecutionProvider", log_format="text")  # type: ignore[call-arg]
    with TestClient(create_app(settings)) as client:
        until = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < until:
            time.sleep(0.05)
        info = client.get("/v1/models").json()["models"][0]
        assert info["precision"] == "int8" and info["quantization"]["calibration"]["images"] == 6
        image = (DEFAULT_IMAGES / "melanoma" / "ISIC_0000160.jpg").read_bytes()
        answer = client.post("/v1/classify", files={"image": ("x.jpg", image, "image/jpeg")})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["precision"] == "int8"
        assert answer.json()["model"]["sha256"] == info["sha256"]
