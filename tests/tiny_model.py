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

from service.contract import ModelMetadata
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


def make_tiny_onnx(
    path: Path, size: int = 32, classes: list[str] | None = None, seed: int = 0, metadata: dict[str, str] | None = None
) -> Path:
    """Write a contract-following model: uint8 [N,S,S,3] -> float32 probabilities [N,K]."""
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
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(classes)])],
        initializer=[
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(b, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    meta = metadata if metadata is not None else contract_metadata(classes, size)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
