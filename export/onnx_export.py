"""Checkpoints -> one verified, self-describing ONNX file (+ its model card).

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, the default since
PyTorch 2.9). In torch 2.13 the legacy TorchScript exporter still runs but warns that it will be
removed, and it leaves the class axis of the output symbolic; the dynamo exporter gives a clean
graph (BatchNorm folded into the convolutions, static ``K``, dynamic ``N``). Weights are saved inside
the file (no external data) so that a model is exactly one file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from export.card import render_card
from export.explain import ExplainedLesionModel, ExplainError, cam_shape
from export.metadata import ExportError, build_metadata, check_members, input_size, weights_sha256
from export.ood import OodConfig, ood_heads, threshold_ood
from export.parity import Check, load_images, verify
from export.wrappers import CalibratedMember, LesionModel, tta_views
from service.contract import INPUT_NAME, OUTPUT_NAME, CamSpec, ModelMetadata
from train.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO / "tests" / "data" / "isic"  # committed CC0 dermoscopy images


@dataclass(frozen=True)
class ExportResult:
    path: Path
    card: Path
    metadata: ModelMetadata
    checks: list[Check]
    size_bytes: int


def export_graph(
    model: nn.Module,
    path: Path,
    size: int,
    opset: int = DEFAULT_OPSET,
    channels_last: bool = True,
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> None:
    """Export ``model`` with a dynamic batch axis to a single self-contained file.

    Args:
        model: eval-mode module taking ``(N, S, S, 3)`` uint8 (``channels_last``) or ``(N, 3, S, S)`` float32.
        path: where to write.
        size: input side S.
        opset: ONNX opset (>= 18 for the dynamo exporter).
        channels_last: the contract's uint8 NHWC input; False for a bare float NCHW backbone (benchmarks).
        output_names: one name per output of ``model``, probabilities first.
    """
    # The exporter warns once per missing torchvision op; those ops are never used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per deduplicated constant
    # Batch 2 as the example: with 1, torch.export may specialise the batch axis to a constant.
    shape = (2, size, size, 3) if channels_last else (2, 3, size, size)
    example = (
        torch.randint(0, 256, shape, dtype=torch.uint8) if channels_last else torch.randn(shape, dtype=torch.float32)
    )
    batch = torch.export.Dim("N", min=1, max=4096)
    # torch.export's own pytree code trips a FutureWarning of torch's in 2.13; nothing for us to change.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    try:
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes={"image" if channels_last else "x": {0: batch}},
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types; the caller needs one clear message
        raise ExportError(f"torch.onnx.export failed for opset {opset}: {type(exc).__name__}: {exc}") from exc


def build_module(
    ckpts: Sequence[Checkpoint], tta: str, fp16: bool
) -> tuple[LesionModel, LesionModel, list[LesionModel]]:
    """The module to export, its float32 reference, and one float32 single-member module per ensemble member.

    The checks compare the file with the float32 references, so an fp16 file is judged against the
    model as trained, not against PyTorch's own fp16 rounding.
    """
    views = tta_views(tta)

    side = input_size(ckpts)

    def wrap(group: Sequence[Checkpoint], half: bool) -> LesionModel:
        members = [CalibratedMember(c.build(), c.temperature, half, *c.norm(), c.img_size, side) for c in group]
        return LesionModel(members, views)

    reference = wrap(ckpts, False)
    singles = [wrap([c], False) for c in ckpts] if len(ckpts) > 1 else []
    return (wrap(ckpts, True) if fp16 else reference), reference, singles


@dataclass(frozen=True)
class Extras:
    """The modules to export and check once the optional outputs are added, and what describes them."""

    model: nn.Module
    reference: nn.Module
    outputs: list[str]
    cam: CamSpec | None
    n_train: int | None  # training images behind the Mahalanobis statistics


def with_extras(
    model: LesionModel, reference: LesionModel, ckpts: Sequence[Checkpoint], ood: OodConfig | None, cam: bool
) -> Extras:
    """Wrap both modules in :class:`~export.explain.ExplainedLesionModel` when an optional output is asked for."""
    if not cam and ood is None:
        return Extras(model, reference, [OUTPUT_NAME], None, None)
    members = [m for m in reference.members if isinstance(m, CalibratedMember)]
    size, classes = input_size(ckpts), ckpts[0].classes
    cam_spec, heads, n_train = None, None, None
    try:
        if cam:
            h, w = cam_shape(members, size)
            cam_spec = CamSpec(shape=[len(classes), h, w], head="+".join(sorted({c.head for c in ckpts})))
        if ood is not None:
            heads, n_train = ood_heads(ood, members, classes, size)
    except ExplainError as exc:
        raise ExportError(str(exc)) from exc
    hw = (cam_spec.shape[1], cam_spec.shape[2]) if cam_spec is not None else None
    explained = ExplainedLesionModel(model, heads, cam, hw)
    ref = explained if reference is model else ExplainedLesionModel(reference, heads, cam, hw)
    return Extras(explained, ref, explained.output_names(), cam_spec, n_train)


def export_checkpoints(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    tta: str = "dihedral",
    name: str | None = None,
    version: str = "0.1.0",
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    malignancy_threshold: float | None = None,
    images: str | Path = DEFAULT_IMAGES,
    ood: OodConfig | None = None,
    cam: bool = True,
) -> ExportResult:
    """Load, wrap, export, write metadata, verify, then move the file into place and write its card.

    The file is written next to ``out`` under a temporary name and only renamed once every check
    passed: a failed export never leaves a model that looks usable.

    Args:
        checkpoints: one checkpoint, or several for an ensemble.
        out: the ``.onnx`` path; the card goes beside it as ``NAME.md``.
        tta: ``none``, ``flips`` or ``dihedral``.
        name, version: the model's identity (name defaults to the file's stem).
        opset: ONNX opset.
        fp16: backbones in float16 (half the file size).
        malignancy_threshold: operating point written into the metadata.
        images: folder of real images (searched recursively for JPEG/PNG) for the parity checks.
        ood: fit and add the ``ood_score`` output (:mod:`export.ood`); None: no OOD output.
        cam: add the ``cam`` output (class activation maps, :mod:`export.explain`).
    """
    tta_views(tta)  # fail on an unknown TTA before loading anything
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"--out must end in .onnx, got {out}")
    if not checkpoints:
        raise ExportError("no checkpoint given")
    ckpts = [load_checkpoint(p) for p in checkpoints]
    check_members(ckpts, list(checkpoints))
    image_paths = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not image_paths:
        raise ExportError(f"no verification images (*.jpg, *.png) under {images}")
    size = input_size(ckpts)
    model, reference, singles = build_module(ckpts, tta, fp16)
    extras = with_extras(model, reference, ckpts, ood, cam)
    # Built (and validated) before anything is written; the weights hash is filled in after the export.
    meta = build_metadata(
        ckpts,
        tta=tta,
        name=name or out.stem,
        version=version,
        weights_hash="",
        fp16=fp16,
        malignancy_threshold=malignancy_threshold,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        export_graph(extras.model, partial, size, opset, output_names=extras.outputs)
        proto = onnx.load(str(partial))
        ood_spec = threshold_ood(partial, ood, meta.classes, size, extras.n_train) if ood is not None else None
        meta = dataclasses.replace(meta, weights_sha256=weights_sha256(proto), ood=ood_spec, cam=extras.cam)
        del proto.metadata_props[:]
        for key, value in meta.to_props().items():
            proto.metadata_props.add(key=key, value=value)
        proto.doc_string = f"{meta.name} {meta.version}: lesionserve skin-lesion classifier (see {out.stem}.md)"
        onnx.save(proto, str(partial))  # one file: weights inline, no external data
        checks = verify(
            partial,
            extras.reference,
            load_images(image_paths, size),
            fp16=fp16,
            dihedral=tta == "dihedral",
            members=singles,
            outputs=extras.outputs,
        )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    size_bytes = out.stat().st_size
    card = out.with_suffix(".md")
    card.write_text(render_card(meta, checks, file_name=out.name, size_bytes=size_bytes, opset=opset))
    log.info("wrote %s (%.1f MB) and %s", out, size_bytes / 1e6, card)
    return ExportResult(out, card, meta, checks, size_bytes)
