"""A tiny ONNX model that follows the model contract, built with ``onnx.helper`` (no torch).

Service and deploy tests use it: it loads in milliseconds, so they test the service, not a
network. Its output is a real function of the pixels (mean colour -> linear -> softmax), so
different images give different probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.contract import CamSpec, ModelMetadata, OodSpec
from train.data import DISPLAY_NAMES as HAM_NAMES
from train.data import HAM_CLASSES


def contract_metadata(classes: list[str], size: int, **overrides: object) -> dict[str, str]:
    """The ``lesionserve.*`` metadata of a test model, through the one schema definition."""
    fields: dict[str, object] = {
        "classes": classes,
        "class_names": {c: HAM_NAMES.get(c, c) for c in classes},
        "malignant_classes": [c for c in ("mel", "bcc", "akiec") if c in classes],
        "input_size": size,
        "preprocessing": {"input": "uint8 RGB NHWC", "crop": "center_square", "resize": "cv2.INTER_AREA"},
        "architecture": ["tiny-linear"],
        "name": "tiny-test-model",
        "version": "0.0.1",
        "training_data": {"name": "none (test fixture)", "license": "CC0", "citation": ""},
        "exported_at": "2026-01-01T00:00:00Z",
        "weights_sha256": "0" * 64,
    }
    fields.update(overrides)
    return ModelMetadata(**fields).to_props()  # type: ignore[arg-type]


# The optional outputs of the tiny model: ood_score = 100 x squared distance of the mean colour (on [0, 1])
# from this skin tone, so a uniform skin-tone image scores 0 and saturated colours score tens; cam = how dark
# each cell of a grid is, times (class index + 1), so every class's map peaks on the darkest cell.
TINY_SKIN = (0.8, 0.6, 0.5)


def tiny_extras(size: int, k: int, grid: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``ood_score`` [N] and ``cam`` [N, K, grid, grid] from ``x`` (float image) and ``m`` (mean colour)."""
    cell = size // grid
    nodes = [
        helper.make_node("Div", ["m", "c255"], ["m01"]),
        helper.make_node("Sub", ["m01", "skin"], ["dm"]),
        helper.make_node("Mul", ["dm", "dm"], ["dm2"]),
        helper.make_node("ReduceSum", ["dm2", "last"], ["d"], keepdims=0),
        helper.make_node("Mul", ["d", "c100"], ["ood_score"]),
        helper.make_node("Reshape", ["x", "cells"], ["xc"]),  # (N, g, cell, g, cell, 3)
        helper.make_node("ReduceMean", ["xc", "cell_axes"], ["bright"], keepdims=0),  # (N, g, g)
        helper.make_node("Sub", ["c255", "bright"], ["dark"]),
        helper.make_node("Unsqueeze", ["dark", "one"], ["dark1"]),  # (N, 1, g, g)
        helper.make_node("Mul", ["dark1", "class_w"], ["cam"]),  # (N, K, g, g)
    ]
    inits = [
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "c255"),
        numpy_helper.from_array(np.array(100.0, dtype=np.float32), "c100"),
        numpy_helper.from_array(np.array(TINY_SKIN, dtype=np.float32), "skin"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "last"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([-1, grid, cell, grid, cell, 3], dtype=np.int64), "cells"),
        numpy_helper.from_array(np.array([2, 4, 5], dtype=np.int64), "cell_axes"),
        numpy_helper.from_array((np.arange(k, dtype=np.float32) + 1).reshape(1, k, 1, 1) / 255, "class_w"),
    ]
    return nodes, inits


def extras_metadata(
    classes: list[str], size: int, *, ood: bool = True, cam: bool = True, ood_threshold: float = 10.0, grid: int = 4
) -> dict[str, str]:
    """Contract metadata declaring the tiny model's ``ood_score`` and/or ``cam`` outputs."""
    spec = OodSpec(method="mahalanobis", threshold=ood_threshold, pass_rate=0.95, fitted_on={"data": "test fixture"})
    extras = {"ood": spec} if ood else {}
    if cam:
        extras["cam"] = CamSpec(shape=[len(classes), grid, grid])  # type: ignore[assignment]
    return contract_metadata(classes, size, **extras)


def make_tiny_onnx(
    path: Path,
    size: int = 32,
    classes: list[str] | None = None,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    *,
    ood: bool = False,
    cam: bool = False,
    grid: int = 4,
) -> Path:
    """Write a contract-following model: uint8 [N,S,S,3] -> float32 probabilities [N,K] (+ ``ood_score``, ``cam``).

    Without ``metadata``, the metadata declares exactly the outputs built (:func:`extras_metadata`); pass
    ``metadata`` to build a file whose outputs and metadata disagree.
    """
    classes = classes or HAM_CLASSES
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, size=(3, len(classes))).astype(np.float32)
    b = rng.normal(0, 0.1, size=(len(classes),)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),  # (N, 3)
        helper.make_node("MatMul", ["m", "w"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(classes)])]
    inits = [
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
    ]
    if ood or cam:
        extra_nodes, extra_inits = tiny_extras(size, len(classes), grid)
        nodes += extra_nodes
        inits += extra_inits
    if ood:
        outputs.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N"]))
    if cam:
        outputs.append(helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", len(classes), grid, grid]))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    if metadata is None:
        metadata = extras_metadata(classes, size, ood=ood, cam=cam, grid=grid)
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
