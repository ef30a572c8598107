"""Build the model's ``lesionserve.*`` metadata from its checkpoints (schema: ``service.contract``).

The schema lives in one place, :class:`service.contract.ModelMetadata`; this module only gathers
the facts (classes, temperatures, training data, metrics) from the checkpoints and checks that the
members of an ensemble agree on what they predict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx

from export.wrappers import tta_views
from service.contract import ModelMetadata
from train.checkpoint import Checkpoint
from train.data import DISPLAY_NAMES, HAM_DATASET

# HAM10000's malignant classes: melanoma, basal cell carcinoma, actinic keratosis / Bowen's disease.
DEFAULT_MALIGNANT = ("mel", "bcc", "akiec", "scc", "melanoma")  # HAM10000, ISIC 2019, ISIC Archive labels

ISIC_2018_CITATION = (
    "Codella N. et al. Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by the "
    "International Skin Imaging Collaboration (ISIC). arXiv:1902.03368"
)


class ExportError(ValueError):
    """The inputs of an export do not make one model; the message names the problem."""


def check_members(ckpts: Sequence[Checkpoint], paths: Sequence[str | Path]) -> None:
    """An ensemble's members must predict the same classes, in the same order.

    Their input sizes may differ: the graph takes the largest (:func:`input_size`) and each smaller
    member resizes its input (``export.wrappers.CalibratedMember``).

    Args:
        ckpts: the loaded checkpoints.
        paths: their files, named in the error message.
    """
    if not ckpts:
        raise ExportError("no checkpoint given")
    first, first_path = ckpts[0], paths[0]
    for ckpt, path in zip(ckpts[1:], paths[1:], strict=True):
        if ckpt.classes != first.classes:
            raise ExportError(
                f"ensemble members disagree on classes: {first_path} has {first.classes}, {path} has {ckpt.classes}"
            )


def input_size(ckpts: Sequence[Checkpoint]) -> int:
    """The graph's input side: the largest member's (no member sees fewer pixels than it was trained on)."""
    return max(c.img_size for c in ckpts)


def training_data(ckpts: Sequence[Checkpoint]) -> dict[str, str]:
    """The training data's name, licence and citation.

    A checkpoint trained on HAM10000 gets its licence and both required citations (the data set's
    and the ISIC 2018 challenge's) even when it stored only part of them.
    """
    facts: list[dict[str, str]] = []
    for ckpt in ckpts:
        d = {k: v for k, v in ckpt.dataset.items() if v}
        if "ham10000" in d.get("name", "").lower():
            d = {**HAM_DATASET, **d}
            if "1902.03368" not in d["citation"]:
                d["citation"] = f"{d['citation']}; {ISIC_2018_CITATION}"
        facts.append({k: d.get(k, "unknown") for k in ("name", "license", "citation")})
    if all(f == facts[0] for f in facts):
        return facts[0]
    return {k: " | ".join(dict.fromkeys(f[k] for f in facts)) for k in ("name", "license", "citation")}


# A checkpoint's "test" entry is that checkpoint alone (no TTA, no ensemble) on its own training run's test
# split. Shipped as "test" it read as the exported file's held-out result, which is another number
# (python -m export.evaluate, in the card): one name per metric, so it travels under this one.
RUN_TEST_KEY = "training_run_test"


def _renamed(metrics: dict[str, Any]) -> dict[str, Any]:
    out = dict(metrics)
    if "test" in out:
        out[RUN_TEST_KEY] = out.pop("test")
    return out


def member_metrics(ckpts: Sequence[Checkpoint]) -> dict[str, Any]:
    """One member: its validation metrics. An ensemble: each member's, and the mean of shared numeric ones.

    The ensemble's own validation metrics are not known at export (no data is read here), so they
    are not invented: the card says that the mean of the members' metrics is only a guide. A member's
    own test-split figures are kept as ``training_run_test`` (:data:`RUN_TEST_KEY`), never as ``test``.
    """
    if len(ckpts) == 1:
        return _renamed(ckpts[0].metrics)
    shared = set.intersection(*(set(c.metrics) for c in ckpts))
    means = {
        k: sum(float(c.metrics[k]) for c in ckpts) / len(ckpts)
        for k in sorted(shared)
        if all(isinstance(c.metrics[k], int | float) and not isinstance(c.metrics[k], bool) for c in ckpts)
    }
    return {"members": [_renamed(c.metrics) for c in ckpts], "mean_of_members": means}


def weights_sha256(model: onnx.ModelProto) -> str:
    """sha256 over the graph's initializers (name and raw bytes, sorted by name).

    Computed from the ONNX file itself so that anyone can re-check it with ``onnx`` alone; the
    metadata that holds it is not part of the hash.
    """
    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(init.name.encode())
        h.update(onnx.numpy_helper.to_array(init).tobytes())
    return h.hexdigest()


def build_metadata(
    ckpts: Sequence[Checkpoint],
    *,
    tta: str,
    name: str,
    version: str,
    weights_hash: str,
    fp16: bool = False,
    malignancy_threshold: float | None = None,
    malignant_classes: Sequence[str] | None = None,
) -> ModelMetadata:
    """The metadata written into the file and rendered into the model card.

    Args:
        ckpts: the members (already checked with :func:`check_members`).
        tta: TTA setting name.
        name, version: the model's identity.
        weights_hash: :func:`weights_sha256` of the exported graph.
        fp16: the backbones run in float16.
        malignancy_threshold: operating point; default the first member's ``metrics["malignancy_threshold"]``
            when training chose one, else 0.5.
        malignant_classes: codes summed into the malignancy score; default mel, bcc, akiec (and scc, melanoma) when present.
    """
    first = ckpts[0]
    malignant = (
        list(malignant_classes)
        if malignant_classes is not None
        else [c for c in DEFAULT_MALIGNANT if c in first.classes]
    )
    if malignancy_threshold is None:
        malignancy_threshold = float(first.metrics.get("malignancy_threshold", 0.5))
    names: dict[str, str] = {}
    for ckpt in ckpts:
        names.update({c: n for c, n in ckpt.class_names.items() if c not in names})
    return ModelMetadata(
        classes=list(first.classes),
        # Checkpoints name their classes; HAM10000's codes fall back to their usual names.
        class_names={c: names.get(c, DISPLAY_NAMES.get(c, c)) for c in first.classes},
        malignant_classes=malignant,
        malignancy_threshold=malignancy_threshold,
        input_size=input_size(ckpts),
        preprocessing={
            "input": "uint8 RGB NHWC [N, S, S, 3]",
            "crop": "center_square",
            "resize": "cv2.INTER_AREA",
            "in_graph": "cast float32, NHWC->NCHW, TTA views, /255 and each member's mean/std,"
            " logits/temperature, softmax",
            # One normalisation per member (on [0, 1] pixels): mixed ensembles normalise per backbone.
            "normalization": [{"arch": c.arch, "mean": list(c.norm()[0]), "std": list(c.norm()[1])} for c in ckpts],
            "mean": list(first.norm()[0]),
            "std": list(first.norm()[1]),
            "backbone_dtype": "float16" if fp16 else "float32",
        },
        tta=list(tta_views(tta)),
        temperature=[float(c.temperature) for c in ckpts],
        architecture=[c.arch + ("" if c.head == "linear" else f"+{c.head}-head") for c in ckpts],
        name=name,
        version=version,
        training_data=training_data(ckpts),
        metrics=member_metrics(ckpts),
        exported_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        weights_sha256=weights_hash,
        ensemble_size=len(ckpts),
    )


def read_metadata(path: str | Path) -> ModelMetadata:
    """The metadata of an exported file, read with ``onnx`` alone (no weights are loaded).

    Args:
        path: the ``.onnx`` file.
    """
    model = onnx.load(str(path), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, source=str(path))


def one_line(message: str, limit: int = 300) -> str:
    """Collapse an error to one CLI line (torch's unpickling errors span many) and cap its length."""
    flat = " ".join(message.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def print_written(checks: Sequence[object], path: Path, size_bytes: int, card: Path) -> None:
    """What ``python -m export`` and ``python -m export.quantize`` print for a written file: its checks, then where."""
    for check in checks:
        print(f"  {check}")
    print(f"wrote {path} ({size_bytes / 1e6:.1f} MB) and {card}")
