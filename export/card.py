"""The model card ``NAME.md``, rendered from the same metadata that is written into the ONNX file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from export.parity import Check
from service.contract import CAM_OUTPUT, INPUT_NAME, OOD_OUTPUT, OUTPUT_NAME, PREFIX, ModelMetadata


def _scalar(k: str, v: Any) -> str:
    return f"- `{k}`: {v:.4f}" if isinstance(v, float) else f"- `{k}`: `{json.dumps(v)}`"


_MEMBER_COLUMNS = ("balanced_accuracy", "accuracy", "auc_macro", "macro_f1", "ece", "nll", "temperature", "n")


def _member_table(members: Sequence[dict[str, Any]]) -> list[str]:
    """One row per member: the scalars people compare (a JSON dump per member was unreadable in a 3-member card)."""
    cols = [c for c in _MEMBER_COLUMNS if any(isinstance(m.get(c), (int, float)) for m in members)]
    if not cols:
        return [f"{i + 1}. no scalar metrics" for i in range(len(members))]

    def cell(v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return "-"
        return str(v) if isinstance(v, int) else f"{v:.4f}"

    lines = ["| member | " + " | ".join(f"`{c}`" for c in cols) + " |", "|---:" + "|---:" * len(cols) + "|"]
    lines += [f"| {i + 1} | " + " | ".join(cell(m.get(c)) for c in cols) + " |" for i, m in enumerate(members)]
    return lines


def _metrics_lines(metrics: dict[str, Any], classes: Sequence[str]) -> list[str]:
    if not metrics:
        return ["No validation metrics were stored in the checkpoint(s)."]
    if "members" in metrics:
        lines = [
            "Ensemble: the ensemble itself was not evaluated at export. Mean of the members' validation metrics"
            " (a guide, not the ensemble's score):",
            "",
        ]
        lines += [f"- `{k}`: {v:.4f}" for k, v in metrics.get("mean_of_members", {}).items()]
        lines += ["", "Per member (in the order of the architecture list above):", ""]
        lines += _member_table(metrics["members"])
        return lines
    tables = {"per_class", "confusion_matrix"}
    lines = [_scalar(k, v) for k, v in metrics.items() if k not in tables]
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and all(isinstance(r, dict) for r in per_class.values()):
        order = ["precision", "recall", "f1", "support"]
        cols = sorted(
            {c for r in per_class.values() for c in r}, key=lambda c: (order.index(c) if c in order else 9, c)
        )
        lines += ["", "| class | " + " | ".join(cols) + " |", "|---" + "|---:" * len(cols) + "|"]
        lines += [
            f"| `{c}` | "
            + " | ".join(f"{r.get(k, 0):.3f}" if isinstance(r.get(k), float) else f"{r.get(k, '')}" for k in cols)
            + " |"
            for c, r in per_class.items()
        ]
    cm = metrics.get("confusion_matrix")
    if isinstance(cm, list) and len(cm) == len(classes):
        lines += ["", "Confusion matrix (rows: true class, columns: predicted):", ""]
        lines += ["| | " + " | ".join(f"`{c}`" for c in classes) + " |", "|---" + "|---:" * len(classes) + "|"]
        lines += [f"| `{c}` | " + " | ".join(str(x) for x in row) + " |" for c, row in zip(classes, cm, strict=True)]
    return lines


def _extra_outputs(meta: ModelMetadata) -> list[str]:
    lines = []
    if meta.ood is not None:
        lines.append(
            f"- output `{OOD_OUTPUT}`: float32 `[N]`, higher = less like the training data ({meta.ood.method})."
        )
    if meta.cam is not None:
        k, h, w = meta.cam.shape
        lines.append(f"- output `{CAM_OUTPUT}`: float32 `[N, {k}, {h}, {w}]`, one class activation map per class.")
    return lines


def _ood_limitation(meta: ModelMetadata) -> list[str]:
    if meta.ood is None:
        return [
            "- Dermoscopic images only: clinical photographs, histology and non-skin images are out of distribution",
            "  and still get a confident-looking answer; nothing in this file detects them (no `ood_score` output).",
        ]
    return [
        "- Dermoscopic images only: clinical photographs, histology and non-skin images are out of distribution.",
        "  The out-of-distribution check below flags many of them, not all (see its measured detection rate);",
        "  a flagged answer still carries probabilities, which then mean little.",
    ]


def _ood_section(meta: ModelMetadata) -> list[str]:
    if meta.ood is None:
        return []
    o = meta.ood
    how = {
        "mahalanobis": "squared Mahalanobis distance of the pooled backbone features to the nearest class mean,"
        " with one covariance shared by the classes (Ledoit-Wolf shrinkage), fitted on the training images",
        "energy": "energy score, -logsumexp of the logits (before the temperature)",
    }[o.method]
    plain = {k: v for k, v in o.fitted_on.items() if not isinstance(v, dict)}
    fitted = ", ".join(f"{k} {v}" for k, v in sorted(plain.items()))
    shifts, refit = o.fitted_on.get("acquisition_shifts"), o.fitted_on.get("refit")
    over = "the in-distribution validation images"
    lines = []
    if isinstance(shifts, dict):
        over = (
            f"the in-distribution validation images and {shifts.get('copies_per_image')} acquisition-shifted"
            " copies of each"
        )
        lines.append(
            f"The copies ({shifts.get('shifts_per_copy')} shifts each, drawn from {', '.join(shifts.get('shifts', []))};"
            " `export/acquisition.py`) stand in for other dermatoscopes, cameras and exports, so that real"
            " dermoscopy from another source is not flagged for its look alone."
        )
    if isinstance(refit, dict):
        lines.append(
            f"Chosen again by `python -m export.ood_refit` at {refit.get('at')} (graph unchanged): it was"
            f" {float(refit['previous_threshold']):.6g}; {float(refit['validation_pass_rate_unshifted']):.1%} of the"
            " unshifted validation images pass now."
        )
    if isinstance(o.fitted_on.get("int8_refit"), dict):
        r = o.fitted_on["int8_refit"]
        lines.append(
            f"INT8: first refitted on {r.get('images')} verification images from fp32 {r.get('fp32_threshold')}."
        )
    return [
        "## Out-of-distribution check",
        "",
        f"Output `{OOD_OUTPUT}`: {how}; averaged over the TTA views and the members like the probabilities.",
        f"An image is out of distribution when its score is above **{o.threshold:.6g}**: the threshold that"
        f" {o.pass_rate:.1%} of {over} stay at or below. Fitted on: {fitted}.",
        *lines,
        "Measured detection rates are added by `python -m export.ood_eval` (section below, when run).",
        "",
    ]


def replace_ood_section(card: str, meta: ModelMetadata) -> str:
    """``card`` with its "Out-of-distribution check" section rendered again from ``meta`` (unchanged if absent)."""
    head = "## Out-of-distribution check\n"
    start = card.find(head)
    if start < 0:
        return card
    end = card.find("\n## ", start + len(head))
    end = len(card) if end < 0 else end + 1
    return card[:start] + "\n".join(_ood_section(meta)) + "\n" + card[end:]


def _cam_section(meta: ModelMetadata) -> list[str]:
    if meta.cam is None:
        return []
    k, h, w = meta.cam.shape
    head = (
        "exact: the head is linear on global-average-pooled features, so a map's mean plus the class bias is the"
        " class logit"
        if meta.cam.head == "linear"
        else f"head `{meta.cam.head}`: the ReLU MLP head is linearised exactly per image (its own ReLU pattern),"
        " so a map's mean plus that image's effective bias is the class logit"
    )
    return [
        "## Class activation map",
        "",
        f"Output `{CAM_OUTPUT}`: `[N, {k}, {h}, {w}]`, the last feature map weighted by each class's head row"
        f" ({head}). Each TTA view's map is turned back before the views are averaged, so cell (i, j) covers the",
        f"input's rows i·S/{h}..(i+1)·S/{h} and columns j·S/{w}..(j+1)·S/{w}; with the dihedral views the map"
        " of a rotated image is the rotated map (checked at export). It shows where the evidence for a class"
        " lies, not why; a coarse grid, not a segmentation.",
        "",
    ]


def render_card(meta: ModelMetadata, checks: Sequence[Check], *, file_name: str, size_bytes: int, opset: int) -> str:
    """Markdown model card.

    Args:
        meta: the file's metadata (the one source of the facts below).
        checks: the verification checks that passed at export.
        file_name: the ``.onnx`` file's name.
        size_bytes: its size.
        opset: the ONNX opset it was exported with.
    """
    data = meta.training_data
    s = meta.input_size
    members = ", ".join(f"{a} (T={t:.3g})" for a, t in zip(meta.architecture, meta.temperature, strict=True))
    lines = [
        f"# Model card: {meta.name} {meta.version}",
        "",
        f"File `{file_name}` ({size_bytes / 1e6:.1f} MB, ONNX opset {opset}), exported {meta.exported_at}.",
        f"Weights sha256 (over the graph initializers): `{meta.weights_sha256}`.",
        "",
        "## Intended use",
        "",
        "Decision support for clinicians: ranks the likely diagnoses of one dermoscopic image of a skin lesion",
        "and gives a malignancy score. It is not a diagnosis, was not validated prospectively, and is not a",
        "medical device. Out of scope: clinical (non-dermoscopic) photographs, non-skin images, lesions outside",
        "the classes below, and any use that the training data's licence forbids.",
        "",
        "## Classes",
        "",
        "| column | code | name | malignant |",
        "|---:|---|---|:---:|",
    ]
    lines += [
        f"| {j} | `{c}` | {meta.display_name(c)} | {'yes' if c in meta.malignant_classes else ''} |"
        for j, c in enumerate(meta.classes)
    ]
    lines += [
        "",
        f"Malignancy score = sum of the probabilities of {', '.join(meta.malignant_classes) or '(none)'};"
        f" operating threshold {meta.malignancy_threshold:g}.",
        "",
        "## Input, output and what happens inside",
        "",
        f"- input `{INPUT_NAME}`: uint8 `[N, {s}, {s}, 3]` RGB; the caller centre-crops to a square and resizes to"
        f" {s} with `{meta.preprocessing.get('resize', 'cv2.INTER_AREA')}`.",
        f"- inside: {meta.preprocessing.get('in_graph', '')}; backbone dtype"
        f" {meta.preprocessing.get('backbone_dtype', 'float32')}.",
        f"- test-time augmentation: {len(meta.tta)} view(s), averaged: {', '.join(meta.tta)}.",
        f"- architecture: {meta.ensemble_size} member(s), probabilities averaged: {members}.",
        "  Temperatures were fitted on validation data by training (1 = not fitted).",
        f"- output `{OUTPUT_NAME}`: float32 `[N, {len(meta.classes)}]`, rows sum to 1.",
        *_extra_outputs(meta),
        "",
        "## Training data",
        "",
        f"- data: {data.get('name', 'unknown')}",
        f"- licence: {data.get('license', 'unknown')}",
        f"- citation: {data.get('citation', 'unknown')}",
        "",
        "Models trained on CC BY-NC 4.0 data inherit its terms: non-commercial use, attribution required.",
        "",
        "## Validation metrics",
        "",
        *_metrics_lines(meta.metrics, meta.classes),
        "",
        "## Limitations",
        "",
        *_ood_limitation(meta),
        f"- Resolution: images are centre-cropped and resized to {s}x{s}; a lesion off-centre or smaller than",
        "  the crop loses detail, and fine structures below that resolution are not seen.",
        "- Population: HAM10000 comes from two sites (Vienna, Queensland) and is mostly light skin (Fitzpatrick",
        "  I-III); darker skin types, acral and mucosal lesions are underrepresented and accuracy there is unknown.",
        "- Classes: only the classes above; any other diagnosis is forced into one of them.",
        "- Validation is retrospective, on held-out lesions of the same data set, not prospective or external.",
        "",
        *_ood_section(meta),
        *_cam_section(meta),
        "## Verification at export",
        "",
        *[f"- {c}" for c in checks],
        "",
        "## Reading the metadata",
        "",
        f"All facts above are in the file's `metadata_props` under `{PREFIX}*` (JSON values); read them with",
        "`onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map` and",
        "`service.contract.ModelMetadata.from_props(...)`.",
        "",
    ]
    return "\n".join(lines)
