"""A ResNet-50-shaped contract-following ONNX model built with ``onnx.helper`` (no torch).

For the load-test harness (``python -m service.bench``) and the slow shutdown test: the same
layer shapes and FLOPs as torchvision's ResNet-50 (batch norm folded into the convolutions,
as an exported model has it), random He-initialised weights, the contract's in-graph
preprocessing (uint8 NHWC -> scaled, normalised NCHW) and softmax. A trained export from
``python -m export`` serves in its place; the timings depend on shapes, not on weights.

    python -m tests.resnet_onnx OUT.onnx [--size 224] [--width 64] [--blocks 3,4,6,3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.tiny_model import HAM_CLASSES, contract_metadata

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


class _Graph:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, array: np.ndarray, prefix: str = "w") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True, gain: float = 1.0) -> str:
        std = gain * np.sqrt(2.0 / (cin * k * k))
        w = self.const((self.rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32))
        b = self.const(np.zeros(cout, np.float32), "b")
        y = self.name("conv")
        pad = k // 2
        self.nodes.append(
            helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        )
        return self.relu(y) if relu else y

    def relu(self, x: str) -> str:
        y = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [y]))
        return y

    def bottleneck(self, x: str, cin: int, width: int, stride: int) -> tuple[str, int]:
        cout = width * 4
        h = self.conv(x, cin, width, 1)
        h = self.conv(h, width, width, 3, stride)  # stride on the 3x3 (torchvision "v1.5")
        h = self.conv(h, width, cout, 1, relu=False, gain=0.2)  # small last layer keeps the sum stable
        skip = self.conv(x, cin, cout, 1, stride, relu=False) if (stride != 1 or cin != cout) else x
        y = self.name("add")
        self.nodes.append(helper.make_node("Add", [h, skip], [y]))
        return self.relu(y), cout


def make_resnet_onnx(
    path: Path, size: int = 224, width: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3), seed: int = 0
) -> Path:
    """Write a ResNet-50-shaped model (default arguments: 25.5 M parameters, 4.1 GFLOPs at 224).

    Args:
        path: where to write the .onnx file.
        size: input side S.
        width: stem width (64 for ResNet-50; smaller for fast tests).
        blocks: bottlenecks per stage.
        seed: weight seed.
    """
    g = _Graph(seed)
    classes = HAM_CLASSES
    g.nodes.append(helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT))
    mean, std = g.const(MEAN, "mean"), g.const(STD, "std")
    g.nodes += [
        helper.make_node("Sub", ["xf", mean], ["xc"]),
        helper.make_node("Div", ["xc", std], ["xn"]),
        helper.make_node("Transpose", ["xn"], ["x"], perm=[0, 3, 1, 2]),  # (N, 3, S, S)
    ]
    h = g.conv("x", 3, width, 7, 2)
    g.nodes.append(helper.make_node("MaxPool", [h], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    h, cin = "pool", width
    for stage, count in enumerate(blocks):
        for i in range(count):
            h, cin = g.bottleneck(h, cin, width * 2**stage, 2 if (i == 0 and stage > 0) else 1)
    fc_w = g.const((g.rng.standard_normal((cin, len(classes))) * 0.01).astype(np.float32))
    fc_b = g.const(np.zeros(len(classes), np.float32), "b")
    g.nodes += [
        helper.make_node("GlobalAveragePool", [h], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["feat"]),  # (N, C)
        helper.make_node("Gemm", ["feat", fc_w, fc_b], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        g.nodes,
        "resnet-bench",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(classes)])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    meta = contract_metadata(
        classes, size, name=f"resnet{sum(blocks) * 3 + 2}-w{width}-random-bench", architecture=["resnet50-shaped"]
    )
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--blocks", default="3,4,6,3")
    args = parser.parse_args()
    blocks = tuple(int(b) for b in args.blocks.split(","))
    print(make_resnet_onnx(args.out, args.size, args.width, blocks))


if __name__ == "__main__":
    main()
