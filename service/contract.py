"""The model contract's metadata schema: ``lesionserve.*`` keys of an ONNX file's ``metadata_props``.

Pure standard library on purpose: ``export/`` writes these keys through :meth:`ModelMetadata.to_props`
and ``service/`` reads them back through :meth:`ModelMetadata.from_props`, so there is one
definition of the schema and the service needs neither ``export/`` nor PyTorch to read it.
Every value is JSON. Reading from a file needs only ``onnxruntime``::

    sess = onnxruntime.InferenceSession(path)
    meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)

or only ``onnx``: ``{p.key: p.value for p in onnx.load(path).metadata_props}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

PREFIX = "lesionserve."
SCHEMA_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
# Optional outputs beside ``probabilities``; each is declared by its own metadata key (``ood``, ``cam``).
OOD_OUTPUT = "ood_score"
CAM_OUTPUT = "cam"
OOD_METHODS = ("energy", "mahalanobis")

TTA_VIEWS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "hflip": ("identity", "hflip"),  # the 2-view budget of the model card's view table
    "flips": ("identity", "hflip", "vflip", "rot180"),
    "dihedral": ("identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose"),
}


class MetadataError(ValueError):
    """The file lacks or garbles the contract's metadata; the message says which key and why."""


@dataclass(frozen=True)
class OodSpec:
    """How to read the ``ood_score`` output ``float32 [N]``: higher = less like the training data.

    Attributes:
        method: ``energy`` (-logsumexp of the logits) or ``mahalanobis`` (squared distance of the
            pooled features to the nearest class mean, shared covariance fitted on training features).
        threshold: an image is out of distribution when its score is above this.
        pass_rate: the share of in-distribution validation images at or below ``threshold``.
        fitted_on: where the threshold (and, for Mahalanobis, the means and covariance) came from.
    """

    method: str
    threshold: float
    pass_rate: float
    fitted_on: dict[str, Any] = field(default_factory=dict)
    output: str = OOD_OUTPUT

    def __post_init__(self) -> None:
        if self.method not in OOD_METHODS:
            raise MetadataError(f"ood.method {self.method!r} is not one of {', '.join(OOD_METHODS)}")
        if not math.isfinite(self.threshold):
            raise MetadataError(f"ood.threshold must be a finite number, got {self.threshold}")
        if not 0.0 < self.pass_rate <= 1.0:
            raise MetadataError(f"ood.pass_rate must be in (0, 1], got {self.pass_rate}")
        if self.output != OOD_OUTPUT:
            raise MetadataError(f"ood.output must be {OOD_OUTPUT!r}, got {self.output!r}")


@dataclass(frozen=True)
class CamSpec:
    """How to read the ``cam`` output ``float32 [N, K, h, w]``: one class activation map per class.

    Each map is the last feature map weighted by the head's row of that class, already un-rotated per
    TTA view and averaged like the probabilities; cell (i, j) covers input pixels
    ``[i*S/h, (i+1)*S/h) x [j*S/w, (j+1)*S/w)``. Unit: logits (mean over cells + a bias = the logit).

    Attributes:
        shape: ``[K, h, w]``.
        head: ``linear`` (exact CAM) or ``mlp`` (exact per-image linearisation of the ReLU MLP head).
    """

    shape: list[int]
    head: str = "linear"
    method: str = "class activation map (Zhou et al. 2016), un-rotated per TTA view, mean over views and members"
    output: str = CAM_OUTPUT

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(not isinstance(d, int) or d < 1 for d in self.shape):
            raise MetadataError(f"cam.shape must be [K, h, w] of positive integers, got {self.shape!r}")
        if self.output != CAM_OUTPUT:
            raise MetadataError(f"cam.output must be {CAM_OUTPUT!r}, got {self.output!r}")


PRECISIONS = ("float32", "float16", "int8")


@dataclass(frozen=True)
class QuantizationSpec:
    """How an INT8 file was made from its float32 source (``python -m export.quantize``, docs/export.md).

    Attributes:
        precision: ``int8``.
        format: ONNX Runtime's ``QDQ`` (QuantizeLinear/DequantizeLinear pairs that the CPU provider
            fuses into integer kernels).
        weights, activations: what was quantised how (e.g. ``int8 per-channel symmetric, 7-bit range``).
        kept_float: the parts of the graph left in float32 and why they were.
        calibration: the images behind the activation ranges: data, part, count, method.
        source: name, version and ``weights_sha256`` of the float32 file it was made from.
        verification: INT8 vs float32 on images the calibration did not see (agreement, differences,
            balanced accuracy, malignancy sensitivity), with the limits the export enforced.
    """

    precision: str
    format: str
    weights: str
    activations: str
    kept_float: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision != "int8":
            raise MetadataError(f"quantization.precision must be 'int8', got {self.precision!r}")


@dataclass(frozen=True)
class ModelMetadata:
    """Everything the service needs to know about a model, read from the file itself.

    Keys (all prefixed ``lesionserve.``, values JSON):
        schema_version: int, this schema's version (1).
        classes: ordered class codes; column j of ``probabilities`` is ``classes[j]``.
        class_names: code -> display name.
        malignant_classes: codes summed into the malignancy score (HAM10000: mel, bcc, akiec).
        malignancy_threshold: operating point on the malignancy score chosen at export.
        input_size: S of the uint8 ``image`` input ``[N, S, S, 3]``.
        preprocessing: what the graph does and what the caller must do first (dict).
        tta: the test-time-augmentation views averaged inside the graph.
        temperature: one fitted temperature per ensemble member.
        architecture: one architecture name per ensemble member.
        name, version: the model's identity.
        training_data: {"name", "license", "citation"}.
        metrics: validation metrics (dict).
        exported_at: ISO 8601 UTC time of export.
        weights_sha256: sha256 of the exported weights.
        ensemble_size: number of members averaged.
        ood, cam (optional): :class:`OodSpec` and :class:`CamSpec` of the optional outputs; absent
            when the file has no such output (files exported before them still serve).
        quantization (optional): :class:`QuantizationSpec` of an INT8 file; absent for float files.
    """

    classes: list[str]
    input_size: int
    name: str
    version: str
    class_names: dict[str, str] = field(default_factory=dict)
    malignant_classes: list[str] = field(default_factory=list)
    malignancy_threshold: float = 0.5
    preprocessing: dict[str, Any] = field(default_factory=dict)
    tta: list[str] = field(default_factory=lambda: ["identity"])
    temperature: list[float] = field(default_factory=lambda: [1.0])
    architecture: list[str] = field(default_factory=list)
    training_data: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    exported_at: str = ""
    weights_sha256: str = ""
    ensemble_size: int = 1
    schema_version: int = SCHEMA_VERSION
    ood: OodSpec | None = None
    cam: CamSpec | None = None
    quantization: QuantizationSpec | None = None

    REQUIRED = (
        "schema_version", "classes", "class_names", "malignant_classes", "malignancy_threshold", "input_size",
        "preprocessing", "tta", "temperature", "architecture", "name", "version", "training_data", "metrics",
        "exported_at", "weights_sha256", "ensemble_size",
    )  # fmt: skip
    OPTIONAL: ClassVar[dict[str, type[OodSpec] | type[CamSpec] | type[QuantizationSpec]]] = {
        "ood": OodSpec, "cam": CamSpec, "quantization": QuantizationSpec,
    }  # fmt: skip

    def __post_init__(self) -> None:
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise MetadataError(f"classes must be a non-empty list of distinct codes, got {self.classes!r}")
        unknown = [c for c in self.malignant_classes if c not in self.classes]
        if unknown:
            raise MetadataError(f"malignant_classes {unknown} are not among classes {self.classes}")
        if not 0.0 <= self.malignancy_threshold <= 1.0:
            raise MetadataError(f"malignancy_threshold must be in [0, 1], got {self.malignancy_threshold}")
        if self.input_size < 8:
            raise MetadataError(f"input_size must be >= 8, got {self.input_size}")
        if any(t <= 0 for t in self.temperature):
            raise MetadataError(f"temperatures must be > 0, got {self.temperature}")
        if self.schema_version != SCHEMA_VERSION:
            raise MetadataError(f"schema_version {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        if self.cam is not None and self.cam.shape[0] != len(self.classes):
            raise MetadataError(f"cam.shape {self.cam.shape} does not start with the {len(self.classes)} classes")

    @property
    def precision(self) -> str:
        """``int8`` for a quantised file, else the backbones' float type (``float32`` or ``float16``)."""
        if self.quantization is not None:
            return self.quantization.precision
        dtype = str(self.preprocessing.get("backbone_dtype", "float32"))
        return dtype if dtype in PRECISIONS else "float32"

    def display_name(self, code: str) -> str:
        return self.class_names.get(code, code)

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries to write into the ONNX file (optional specs only when present)."""
        return {PREFIX + k: json.dumps(v, sort_keys=True) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> ModelMetadata:
        """Parse and validate; a missing or malformed key raises :class:`MetadataError` naming it."""
        missing = [k for k in cls.REQUIRED if PREFIX + k not in props]
        if missing:
            raise MetadataError(
                f"{source} is not a lesionserve model: metadata_props lack "
                + ", ".join(PREFIX + k for k in missing)
                + " (export it with `python -m export`)"
            )
        values: dict[str, Any] = {}
        for k in cls.REQUIRED:
            try:
                values[k] = json.loads(props[PREFIX + k])
            except json.JSONDecodeError as exc:
                raise MetadataError(f"{source}: {PREFIX}{k} is not valid JSON ({exc.msg})") from exc
        for k, spec in cls.OPTIONAL.items():
            if PREFIX + k not in props:
                continue
            try:
                raw = json.loads(props[PREFIX + k])
                values[k] = spec(**raw)
            except json.JSONDecodeError as exc:
                raise MetadataError(f"{source}: {PREFIX}{k} is not valid JSON ({exc.msg})") from exc
            except TypeError as exc:
                raise MetadataError(f"{source}: malformed {PREFIX}{k} ({exc})") from exc
        try:
            return cls(**values)
        except TypeError as exc:
            raise MetadataError(f"{source}: malformed lesionserve metadata ({exc})") from exc
