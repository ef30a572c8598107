"""INT8 for CPU-only hospitals: static quantisation of an exported float32 file, calibrated on real images.

``python -m export.quantize MODEL.onnx --calibration DATA --calibration-split SPLIT [--part val]
[--out MODEL-int8.onnx]``, or ``python -m export CKPT ... --int8 --calibration DATA ...`` (docs/export.md).

What is quantised, decided by measurement on the reference model (docs/export.md, "INT8"):

- The backbones' convolutions with their ReLU/ReLU6 and residual Adds, in ONNX Runtime's QDQ format:
  weights int8 per output channel (symmetric), activations uint8 per tensor (asymmetric, ranges from
  the calibration images). Clip/Relu must be quantised with the convolutions: left float, every
  convolution's output is quantised on its raw pre-activation range and top-1 agreement fell to 0.68.
- Weights on a 7-bit range (``reduce_range``) by default: on x86 CPUs without VNNI (this project's CI
  machine: AVX2 only) the uint8 x int8 kernels add pairs of products in int16 and saturate at full
  range (agreement 0.88 vs 0.955 with 7 bits). ``--full-range`` is for VNNI CPUs.
- Each member's first two convolutions stay float32 (``--float-convs``, default 2): on the reference
  model, quantising everything kept top-1 agreement at 0.954 and held-out balanced accuracy dropped
  0.010; keeping the stem and the first depthwise convolution float gave 0.965 and a drop of 0.001
  (batch-16 speed-up over float32 1.49x, docs/export.md).
- Also float32: the uint8 -> float cast and the TTA views (pixel permutations, nothing to gain), the
  per-member normalisation, the pooled head (classifier, temperature, softmax), ``ood_score`` and
  ``cam``. With ``--float-convs 0`` the normalisation is rewritten from Sub/Div into a 3-channel 1x1
  convolution first (exact): with the stem quantised ONNX Runtime computes the image in NHWC, where a
  Sub/Div broadcasting over an innermost axis of 3 took 18% of the INT8 run.

Every INT8 file is verified against its float32 source on images the calibration did not see (top-1
agreement, largest probability difference, balanced accuracy and malignancy sensitivity at the file's
threshold, the OOD flag) and against itself (batch vs singles, dihedral invariance); past a limit the
export fails and no file is left.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from sklearn.metrics import balanced_accuracy_score

from export.card import render_card
from export.evaluate import select, update_card
from export.metadata import ExportError, one_line, print_written, read_metadata, weights_sha256
from export.ood import choose_ood_threshold
from export.parity import NHWC_SYMMETRIES, Check, VerificationError
from service.contract import CAM_OUTPUT, INPUT_NAME, OOD_OUTPUT, OUTPUT_NAME, ModelMetadata, QuantizationSpec
from train.data import DataError, load_images, load_labelled

log = logging.getLogger(__name__)

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}  # fmt: skip
DEFAULT_METHOD = "minmax"
DEFAULT_CALIBRATION_IMAGES = 200
DEFAULT_FLOAT_CONVS = 2
# Ops quantised together with the convolutions (the activations fold into the integer kernels).
FOLLOWERS = ("Clip", "Relu", "Add", "MaxPool")
MEMBER = re.compile(r"members\.\d+\.")  # export.wrappers.LesionModel names each member's weights so
SECTION_START, SECTION_END = "<!-- int8 vs fp32: start -->", "<!-- int8 vs fp32: end -->"


@dataclass(frozen=True)
class Limits:
    """Past any of these the INT8 file is refused (``--int8-*`` flags)."""

    min_agreement: float = 0.95  # top-1 equal to the float32 file's, share of verification images
    max_prob_diff: float = 0.35  # largest |p_int8 - p_fp32| over every class of every image
    # Balanced accuracy, float32 minus int8. Wider than the 0.01 target on held-out test: the verification
    # images (reference: validation minus calibration) hold 14 df, where one flip moves it by 0.010.
    max_bacc_drop: float = 0.02
    max_sensitivity_drop: float = 0.01  # malignancy sensitivity at the file's threshold, float32 minus int8


@dataclass(frozen=True)
class Calibration:
    """Where the calibration and verification images come from.

    The labelled set's ``part`` (validation by default: never the test part) is shuffled with ``seed``;
    the first ``images`` calibrate, the rest (at most ``verify_images``, 0 = all) verify.
    """

    data: Path
    split: Path | None = None
    part: str | None = "val"
    images: int = DEFAULT_CALIBRATION_IMAGES
    verify_images: int = 0
    method: str = DEFAULT_METHOD
    seed: int = 0
    reduce_range: bool = True
    float_convs: int = DEFAULT_FLOAT_CONVS  # the first convolutions of each member stay float32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ExportError(f"calibration method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.float_convs < 0:
            raise ExportError(f"--float-convs must be >= 0, got {self.float_convs}")
        if self.images < 1:
            raise ExportError(f"--calibration-images must be >= 1, got {self.images}")
        if self.part is not None and self.split is None:
            raise ExportError(f"--part {self.part} needs --calibration-split (the training run's split.json)")


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    card: Path
    metadata: ModelMetadata
    checks: list[Check]
    size_bytes: int
    comparison: dict[str, Any]


class _Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
    """Feeds the graph's own input: uint8 NHWC images, centre-cropped and resized as the service does."""

    def __init__(self, images: np.ndarray, batch: int = 8) -> None:
        self.images, self.batch, self.i = images, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.images):
            return None
        out = {INPUT_NAME: self.images[self.i : self.i + self.batch]}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0


def normalisation_as_conv(model: onnx.ModelProto) -> list[str]:
    """Rewrite each ``Div(Sub(x, mean), std)`` with per-channel constants into one grouped 1x1 Conv.

    Exact (the float32 outputs do not change), and the Conv keeps NCHW where the Sub/Div would be
    computed in NHWC beside the int8 convolutions, at several times the cost. Returns the new nodes'
    names (they stay float32).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for sub in graph.node:
        users = consumers.get(sub.output[0], []) if sub.op_type == "Sub" else []
        if len(users) != 1 or users[0].op_type != "Div" or sub.input[1] not in inits or users[0].input[1] not in inits:
            continue
        div = users[0]
        mean = numpy_helper.to_array(inits[sub.input[1]]).astype(np.float32)
        std = numpy_helper.to_array(inits[div.input[1]]).astype(np.float32)
        if mean.ndim != 4 or mean.shape[1] != mean.size or std.shape != mean.shape:
            continue  # only the per-channel [1, C, 1, 1] normalisation of an NCHW image
        c = mean.size
        w = numpy_helper.from_array((1.0 / std).reshape(c, 1, 1, 1), f"{sub.name}_norm_weight")
        b = numpy_helper.from_array((-mean / std).reshape(c), f"{sub.name}_norm_bias")
        graph.initializer.extend([w, b])
        conv = helper.make_node(
            "Conv", [sub.input[0], w.name, b.name], [div.output[0]], name=f"{sub.name}_as_conv", group=c,
            kernel_shape=[1, 1],
        )  # fmt: skip
        replaced[id(sub)] = conv
        dropped.add(id(div))
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return [n.name for n in replaced.values()]


def backbone_nodes(model: onnx.ModelProto, keep_float: Sequence[str], float_convs: int = 0) -> list[str]:
    """The nodes to quantise: every Conv with constant weights (but ``keep_float`` and the first
    ``float_convs`` of each ensemble member), and each Clip/Relu/Add/MaxPool all of whose inputs come
    from nodes already chosen (in graph order).

    That is the backbones' feature maps and nothing after their global pooling: the classifier,
    temperature, softmax and the ``ood_score``/``cam`` heads stay float32.
    """
    inits = {t.name for t in model.graph.initializer}
    chosen: list[str] = []
    produced: set[str] = set()
    seen: dict[str, int] = {}  # convolutions met so far per member (weights named members.<i>.…)
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type == "Conv":
            ok = node.name not in keep_float and len(node.input) > 1 and node.input[1] in inits
            if ok:
                member = MEMBER.match(node.input[1])
                key = member.group(0) if member else ""
                seen[key] = seen.get(key, 0) + 1
                ok = seen[key] > float_convs
        elif node.op_type in FOLLOWERS:
            tensors = [i for i in node.input if i and i not in inits]
            ok = bool(tensors) and all(t in produced for t in tensors)
        else:
            ok = False
        if ok:
            chosen.append(node.name)
            produced.update(node.output)
    return chosen


def _no_preprocess_advice(record: logging.LogRecord) -> bool:
    """Drop onnxruntime.quantization's advice to run its pre-processing: the exporter has already folded
    BatchNorm into the convolutions and fixed every shape but the batch, which is what it would do."""
    return "pre-processing before quantization" not in record.getMessage()


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, images: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    parts = [sess.run(None, {INPUT_NAME: images[i : i + batch]}) for i in range(0, len(images), batch)]
    return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}


def load_calibration(cal: Calibration, meta: ModelMetadata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibration images, verification images and the verification images' labels."""
    data = select(load_labelled(cal.data, None, meta.classes), cal.split, cal.part)
    n = len(data.paths)
    if n < 2:
        raise ExportError(f"calibration needs at least 2 images, {cal.data} part {cal.part} has {n}")
    order = np.random.default_rng(cal.seed).permutation(n)
    n_cal = min(cal.images, n - 1)  # at least one image is left to verify on
    cal_idx = order[:n_cal]
    ver_idx = order[n_cal:] if not cal.verify_images else order[n_cal : n_cal + cal.verify_images]
    log.info("calibration: %d images, verification: %d images (%s part %s)", n_cal, len(ver_idx), cal.data, cal.part)
    size = meta.input_size
    calibration = load_images([data.paths[i] for i in cal_idx], size)
    verification = load_images([data.paths[i] for i in ver_idx], size)
    return calibration, verification, np.asarray(data.labels)[ver_idx]


def _sensitivity(probs: np.ndarray, labels: np.ndarray, meta: ModelMetadata) -> float | None:
    idx = [meta.classes.index(c) for c in meta.malignant_classes]
    positive = np.isin(labels, idx)
    if not idx or not positive.any():
        return None
    flagged = probs[:, idx].sum(1) >= meta.malignancy_threshold
    return float((flagged & positive).sum() / positive.sum())


def compare(
    fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], labels: np.ndarray, meta: ModelMetadata
) -> dict[str, Any]:
    """INT8 vs float32 outputs of the same images: what the card reports and the limits judge."""
    p32, p8 = fp32[OUTPUT_NAME].astype(np.float64), int8[OUTPUT_NAME].astype(np.float64)
    present = sorted(set(labels.tolist()))
    out: dict[str, Any] = {
        "images": len(labels),
        "top1_agreement": float((p32.argmax(1) == p8.argmax(1)).mean()),
        "max_prob_diff": float(np.abs(p32 - p8).max()),
        "mean_max_prob_diff": float(np.abs(p32 - p8).max(1).mean()),
        "balanced_accuracy_fp32": float(balanced_accuracy_score(labels, p32.argmax(1))) if len(present) > 1 else None,
        "balanced_accuracy_int8": float(balanced_accuracy_score(labels, p8.argmax(1))) if len(present) > 1 else None,
        "malignancy_sensitivity_fp32": _sensitivity(p32, labels, meta),
        "malignancy_sensitivity_int8": _sensitivity(p8, labels, meta),
    }
    if meta.ood is not None and OOD_OUTPUT in fp32 and OOD_OUTPUT in int8:
        f32, f8 = fp32[OOD_OUTPUT] > meta.ood.threshold, int8[OOD_OUTPUT] > meta.ood.threshold
        out["ood_flag_agreement"] = float((f32 == f8).mean())
        out["ood_pass_rate_fp32"] = float((~f32).mean())
        out["ood_pass_rate_int8"] = float((~f8).mean())
    if CAM_OUTPUT in fp32 and CAM_OUTPUT in int8:
        a, b = fp32[CAM_OUTPUT].reshape(len(labels), -1), int8[CAM_OUTPUT].reshape(len(labels), -1)
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        corr = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        out["cam_correlation_median"] = float(np.median(corr))
    return out


def judge(c: dict[str, Any], limits: Limits) -> list[Check]:
    """The comparison against the limits, as checks (a failed one names its measured value)."""
    checks = [
        Check("INT8 top-1 agreement with fp32", c["top1_agreement"], limits.min_agreement,
              c["top1_agreement"] >= limits.min_agreement, f"minimum; on {c['images']} unseen images"),
        Check("INT8 max |p - p_fp32|", c["max_prob_diff"], limits.max_prob_diff,
              c["max_prob_diff"] <= limits.max_prob_diff),
    ]  # fmt: skip
    if c["balanced_accuracy_fp32"] is not None:
        drop = c["balanced_accuracy_fp32"] - c["balanced_accuracy_int8"]
        detail = f"fp32 {c['balanced_accuracy_fp32']:.4f}, int8 {c['balanced_accuracy_int8']:.4f}"
        checks.append(
            Check("INT8 balanced-accuracy drop", drop, limits.max_bacc_drop, drop <= limits.max_bacc_drop, detail)
        )
    if c["malignancy_sensitivity_fp32"] is not None:
        drop = c["malignancy_sensitivity_fp32"] - c["malignancy_sensitivity_int8"]
        detail = f"fp32 {c['malignancy_sensitivity_fp32']:.4f}, int8 {c['malignancy_sensitivity_int8']:.4f}"
        ok = drop <= limits.max_sensitivity_drop
        checks.append(Check("INT8 malignancy-sensitivity drop", drop, limits.max_sensitivity_drop, ok, detail))
    return checks


def self_checks(sess: ort.InferenceSession, images: np.ndarray, meta: ModelMetadata, path: Path) -> list[Check]:
    """The INT8 file on its own: valid ONNX, a batch equals its singles, and dihedral TTA stays invariant.

    Integer kernels are exact given their inputs, so both hold to float rounding like in float32.
    """
    checks = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
        checks.append(Check("onnx.checker full_check", 0.0, 0.0, True))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        checks.append(Check("onnx.checker full_check", 1.0, 0.0, False, str(exc).splitlines()[0]))
    eight = np.concatenate([images] * -(-8 // len(images)))[:8]
    batch = sess.run([OUTPUT_NAME], {INPUT_NAME: eight})[0]
    singles = np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: eight[i : i + 1]})[0] for i in range(8)])
    diff = float(np.abs(batch - singles).max())
    checks.append(Check("INT8 batch of 8 vs 8 singles", diff, 1e-4, diff <= 1e-4))
    if len(meta.tta) == 8:
        base = batch[:4]
        worst = max(
            float(np.abs(sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(f(eight[:4]))})[0] - base).max())
            for f in NHWC_SYMMETRIES.values()
        )
        checks.append(Check("INT8 dihedral invariance (6 symmetries)", worst, 1e-4, worst <= 1e-4))
    return checks


def int8_section(c: dict[str, Any], spec: QuantizationSpec, fp32_name: str, limits: Limits) -> str:
    """The card's "INT8 vs FP32" section."""

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    cal = spec.calibration
    rows = [
        ("top-1 agreement with fp32", f(c["top1_agreement"]), f">= {limits.min_agreement:g}"),
        ("largest probability difference", f(c["max_prob_diff"]), f"<= {limits.max_prob_diff:g}"),
        ("mean of each image's largest difference", f(c["mean_max_prob_diff"]), ""),
        ("balanced accuracy fp32 / int8", f"{f(c['balanced_accuracy_fp32'])} / {f(c['balanced_accuracy_int8'])}",
         f"drop <= {limits.max_bacc_drop:g}"),
        ("malignancy sensitivity fp32 / int8",
         f"{f(c['malignancy_sensitivity_fp32'])} / {f(c['malignancy_sensitivity_int8'])}",
         f"drop <= {limits.max_sensitivity_drop:g}"),
    ]  # fmt: skip
    if "ood_flag_agreement" in c:
        rows.append(("OOD flag agreement (fp32 threshold)", f(c["ood_flag_agreement"]), ""))
        rows.append(
            (
                "OOD pass rate fp32 / int8 (fp32 threshold)",
                f"{f(c['ood_pass_rate_fp32'])} / {f(c['ood_pass_rate_int8'])}",
                "",
            )
        )
    if "ood_threshold_int8" in c:
        rows.append(("OOD threshold fp32 -> int8 (refitted at the same pass rate)",
                     f"{c['ood_threshold_fp32']:.1f} -> {c['ood_threshold_int8']:.1f}", ""))  # fmt: skip
    if "cam_correlation_median" in c:
        rows.append(("heatmap correlation with fp32 (median)", f(c["cam_correlation_median"]), ""))
    lines = [
        SECTION_START,
        "## INT8 vs FP32",
        "",
        f"This file is the INT8 form of `{fp32_name}` (weights sha256 `{spec.source.get('weights_sha256', '')}`),"
        " made by `python -m export.quantize` for CPU-only servers; on a GPU serve the float file.",
        f"Weights: {spec.weights}. Activations: {spec.activations}. Format: {spec.format}.",
        f"Calibration: {cal.get('images')} images of {cal.get('description')}, method `{cal.get('method')}`.",
        "Kept in float32: " + "; ".join(spec.kept_float) + ".",
        "",
        f"Measured at export on {c['images']} images of the same part that the calibration did not see, both"
        " files in ONNX Runtime (CPU); the export fails past the limits:",
        "",
        "| measure | value | limit |",
        "|---|---:|---|",
        *[f"| {a} | {b} | {lim} |" for a, b, lim in rows],
        "",
        "Speed and the held-out test figures of both files: docs/export.md (INT8) and the README.",
        SECTION_END,
    ]
    return "\n".join(lines)


def describe(
    cal: Calibration,
    meta: ModelMetadata,
    source: Path,
    n_cal: int,
    n_nodes: int,
    comparison: dict[str, Any],
    limits: Limits,
) -> QuantizationSpec:
    """The ``quantization`` metadata of the INT8 file."""
    bits = "7-bit range" if cal.reduce_range else "full 8-bit range"
    where = f"part `{cal.part}` of `{cal.split}`" if cal.part else "all images"
    kept = ["uint8 -> float cast and TTA views", "per-member normalisation (a 3-channel 1x1 convolution)",
            "pooled head: classifier, temperature, softmax", "ood_score and cam heads"]  # fmt: skip
    if cal.float_convs:
        kept.insert(2, f"each member's first {cal.float_convs} convolutions (the most sensitive to quantisation)")
    return QuantizationSpec(
        precision="int8",
        format="QDQ (ONNX Runtime static quantisation)",
        weights=f"int8, per output channel, symmetric, {bits}",
        activations="uint8, per tensor, asymmetric, ranges from the calibration images",
        kept_float=kept,
        calibration={"data": str(cal.data), "description": f"{where} of `{cal.data}` (shuffled, seed {cal.seed})",
                     "images": n_cal, "method": cal.method, "seed": cal.seed, "quantized_nodes": n_nodes,
                     "float_convs": cal.float_convs},
        source={"name": meta.name, "version": meta.version, "weights_sha256": meta.weights_sha256, "file": source.name},
        verification={**comparison, "limits": dataclasses.asdict(limits)},
    )  # fmt: skip


def quantize_file(
    source: str | Path,
    out: str | Path,
    calibration: Calibration,
    limits: Limits = Limits(),
) -> QuantizeResult:
    """Quantise ``source`` (a float32 lesionserve file) to ``out``, verify, write metadata and card.

    The file is written as ``out.partial`` and renamed only once every check passed.
    """
    source, out = Path(source), Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"--out must end in .onnx, got {out}")
    if out.resolve() == source.resolve():
        raise ExportError("--out must differ from the float32 source file")
    meta = read_metadata(source)
    if meta.quantization is not None:
        raise ExportError(f"{source} is already INT8; quantise its float32 source")
    if meta.precision != "float32":
        raise ExportError(f"{source} has {meta.precision} backbones; quantise a float32 export (without --fp16)")
    try:
        cal_images, ver_images, labels = load_calibration(calibration, meta)
    except DataError as exc:
        raise ExportError(f"calibration data: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    prepared = out.with_name(out.name + ".prepared")
    partial = out.with_name(out.name + ".partial")
    try:
        model = onnx.load(str(source))
        # With the stem quantised, ORT computes the image in NHWC and Sub/Div broadcast slowly over C=3;
        # with a float stem they stay NCHW and cost less than the rewrite (measured, docs/export.md).
        keep_float = normalisation_as_conv(model) if calibration.float_convs == 0 else []
        nodes = backbone_nodes(model, keep_float, calibration.float_convs)
        if not any(n.op_type == "Conv" and n.name in nodes for n in model.graph.node):
            raise ExportError(f"{source}: no convolution to quantise")
        onnx.save(model, str(prepared))
        started = time.monotonic()
        root = logging.getLogger()  # onnxruntime.quantization warns on the root logger
        root.addFilter(_no_preprocess_advice)
        try:
            quantize_static(
                str(prepared), str(partial), _Reader(cal_images), quant_format=QuantFormat.QDQ,
                nodes_to_quantize=nodes, per_channel=True, reduce_range=calibration.reduce_range,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=METHODS[calibration.method],
            )  # fmt: skip
        finally:
            root.removeFilter(_no_preprocess_advice)
        log.info("quantised %d nodes in %.0f s", len(nodes), time.monotonic() - started)
        fp32_out = _run(_session(source), ver_images)
        sess = _session(partial)
        int8_out = _run(sess, ver_images)
        comparison = compare(fp32_out, int8_out, labels, meta)
        checks = self_checks(sess, ver_images[:8], meta, partial) + judge(comparison, limits)
        del sess
        failed = [c for c in checks if not c.passed]
        if failed:
            raise VerificationError(f"{out}: INT8 verification failed: " + "; ".join(str(c) for c in failed))
        proto = onnx.load(str(partial))
        spec = describe(calibration, meta, source, len(cal_images), len(nodes), comparison, limits)
        ood = meta.ood
        if ood is not None and OOD_OUTPUT in int8_out:
            # INT8 features move the Mahalanobis scores (median +5% on the reference): the fp32 threshold
            # would flag more in-distribution images, so it is refitted at the same pass rate on the
            # verification images (the part the fp32 threshold came from, minus the calibration images).
            threshold, rate = choose_ood_threshold(int8_out[OOD_OUTPUT], ood.pass_rate)
            refit = {"images": len(labels), "fp32_threshold": ood.threshold, "fp32_pass_rate": ood.pass_rate}
            ood = dataclasses.replace(ood, threshold=threshold, pass_rate=rate,
                                      fitted_on={**ood.fitted_on, "int8_refit": refit})  # fmt: skip
            comparison["ood_threshold_fp32"], comparison["ood_threshold_int8"] = refit["fp32_threshold"], threshold
        new_meta = dataclasses.replace(
            meta,
            ood=ood, quantization=spec, weights_sha256=weights_sha256(proto),
            exported_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )  # fmt: skip
        del proto.metadata_props[:]
        for key, value in new_meta.to_props().items():
            proto.metadata_props.add(key=key, value=value)
        proto.doc_string = f"{meta.name} {meta.version} (int8): lesionserve skin-lesion classifier (see {out.stem}.md)"
        onnx.save(proto, str(partial))
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
    size_bytes = out.stat().st_size
    card = out.with_suffix(".md")
    card.write_text(render_card(new_meta, checks, file_name=out.name, size_bytes=size_bytes, opset=opset))
    update_card(card, int8_section(comparison, spec, source.name, limits), SECTION_START, SECTION_END)
    log.info("wrote %s (%.1f MB) and %s", out, size_bytes / 1e6, card)
    return QuantizeResult(out, card, new_meta, checks, size_bytes, comparison)


def add_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The calibration and limit flags, shared by ``python -m export --int8`` and ``python -m export.quantize``."""
    p.add_argument("--calibration", metavar="DATA", help="labelled training-distribution images (folder or CSV)")
    p.add_argument("--calibration-split", metavar="SPLIT", help="split.json of the training run")
    p.add_argument(
        "--part",
        dest="calibration_part",
        default="val",
        help="part of the split to calibrate and verify on (default val; never test)",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=DEFAULT_CALIBRATION_IMAGES,
        help=f"images for the activation ranges (default {DEFAULT_CALIBRATION_IMAGES}); the rest verify",
    )
    p.add_argument("--verify-images", type=int, default=0, help="at most this many verification images (0: all)")
    p.add_argument(
        "--calibration-method", default=DEFAULT_METHOD, help=f"{', '.join(METHODS)} (default {DEFAULT_METHOD})"
    )
    p.add_argument(
        "--float-convs",
        type=int,
        default=DEFAULT_FLOAT_CONVS,
        help=f"keep each member's first N convolutions float32 (default {DEFAULT_FLOAT_CONVS})",
    )
    p.add_argument(
        "--full-range",
        action="store_true",
        help="8-bit weight range: only for CPUs with VNNI (without it the int8 kernels saturate)",
    )
    d = Limits()
    p.add_argument("--int8-min-agreement", type=float, default=d.min_agreement, help=f"default {d.min_agreement}")
    p.add_argument("--int8-max-prob-diff", type=float, default=d.max_prob_diff, help=f"default {d.max_prob_diff}")
    p.add_argument("--int8-max-bacc-drop", type=float, default=d.max_bacc_drop, help=f"default {d.max_bacc_drop}")
    p.add_argument("--int8-max-sensitivity-drop", type=float, default=d.max_sensitivity_drop,
                   help=f"default {d.max_sensitivity_drop}")  # fmt: skip


def from_arguments(args: argparse.Namespace) -> tuple[Calibration, Limits]:
    if args.calibration is None:
        raise ExportError("INT8 needs --calibration DATA (labelled training-distribution images)")
    split = Path(args.calibration_split) if args.calibration_split else None
    part = args.calibration_part if split is not None else None
    cal = Calibration(
        Path(args.calibration), split, part, args.calibration_images, args.verify_images,
        args.calibration_method, reduce_range=not args.full_range, float_convs=args.float_convs,
    )  # fmt: skip
    limits = Limits(args.int8_min_agreement, args.int8_max_prob_diff, args.int8_max_bacc_drop,
                    args.int8_max_sensitivity_drop)  # fmt: skip
    return cal, limits


def default_out(source: Path) -> Path:
    return source.with_name(source.stem + "-int8.onnx")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.quantize", description=__doc__.splitlines()[0])
    p.add_argument("model", help="float32 .onnx written by `python -m export`")
    p.add_argument("--out", help="INT8 file (default: MODEL-int8.onnx beside it; card: same stem, .md)")
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    source = Path(args.model)
    try:
        cal, limits = from_arguments(args)
        result = quantize_file(source, Path(args.out) if args.out else default_out(source), cal, limits)
    except (ExportError, VerificationError, DataError) as exc:
        print(f"export.quantize: error: {one_line(str(exc), 600)}", file=sys.stderr)
        return 1
    print_written(result.checks, result.path, result.size_bytes, result.card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
