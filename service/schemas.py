"""Response models of the HTTP API, and the one function that builds a classification answer.

The answer is a pydantic model, not a dict, so that every renderer (JSON now, FHIR later)
takes the same typed object.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.contract import ModelMetadata
from service.version import SERVICE_VERSION


class ModelRef(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the .onnx file being served")
    precision: str = Field("float32", description="float32, float16 (GPU) or int8 (CPU, quantised)")


class ClassProbability(BaseModel):
    code: str
    name: str
    probability: float
    warning: str | None = Field(None, description="Set on `top` when the image looks unlike the training data")


class OodCheck(BaseModel):
    """The out-of-distribution check; ``available`` is false for a model file without the ``ood_score`` output."""

    available: bool
    score: float | None = Field(None, description="Higher = less like the training data")
    threshold: float | None = None
    out_of_distribution: bool | None = None
    method: str | None = Field(None, description="energy or mahalanobis")
    detail: str | None = None


class Explanation(BaseModel):
    """A class activation heatmap over the centre-cropped model input (``?explain=true``).

    ``available`` is about the heatmap; the input image and its size are there either way.
    """

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    available: bool
    class_code: str | None = Field(None, alias="class", description="The class the map is for (the top class)")
    width: int | None = None
    height: int | None = None
    png_base64: str | None = Field(None, description="PNG: the heatmap blended over the model's input image")
    input_png_base64: str | None = Field(
        None, description="PNG: the model's input itself (centre crop, resized), the image the heatmap is drawn over"
    )
    detail: str | None = None


class Malignancy(BaseModel):
    score: float = Field(description="Sum of the malignant classes' probabilities")
    threshold: float
    above_threshold: bool
    classes: list[str]


class ImageInfo(BaseModel):
    width: int
    height: int
    format: str


class Timing(BaseModel):
    decode: float
    queue: float
    inference: float
    total: float


class DicomInfo(BaseModel):
    """What a DICOM upload was; identifiers are UIDs and the Accession Number, never patient data."""

    sop_class_uid: str
    sop_class_name: str
    transfer_syntax_uid: str
    transfer_syntax_name: str
    frames: int = Field(description="Frames in the object; the first one is classified")
    identifiers: dict[str, str] = Field(
        description="StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, AccessionNumber when present"
    )


class ClassifyResponse(BaseModel):
    request_id: str
    model: ModelRef
    predictions: list[ClassProbability] = Field(description="Every class, highest probability first")
    top: ClassProbability
    malignancy: Malignancy
    image: ImageInfo
    timing_ms: Timing
    batch_size: int = Field(description="Images in the inference batch this one ran in")
    dicom: DicomInfo | None = Field(None, description="Present when the upload was DICOM")
    ood: OodCheck | None = Field(None, description="The out-of-distribution check (always set by the service)")
    explanation: Explanation | None = Field(None, description="Present when asked for with ?explain=true")
    service_version: str = Field(SERVICE_VERSION, description="Version of lesionserve that made this answer")


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str
    precision: str = Field(description="float32, float16 (GPU) or int8 (CPU, quantised)")
    quantization: dict[str, object] | None = Field(None, description="How an int8 file was calibrated and verified")
    provider: str
    classes: list[str]
    class_names: dict[str, str]
    malignant_classes: list[str]
    malignancy_threshold: float
    input_size: int
    tta: list[str]
    architecture: list[str]
    ensemble_size: int
    temperature: list[float]
    metrics: dict[str, object] = Field(
        description="Validation metrics from the training run (an ensemble: each member's and their mean); "
        "not the held-out test set, whose figures are in the model card (GET /v1/models/card)"
    )
    training_data: dict[str, str]
    exported_at: str
    batch_sizes: list[int]
    max_batch_size: int
    max_wait_ms: float
    ood: dict[str, object] | None = Field(None, description="Method and threshold of the OOD check; null: none")
    cam: dict[str, object] | None = Field(None, description="Shape of the class activation maps; null: none")


class ModelsResponse(BaseModel):
    service_version: str = Field(description="Version of lesionserve itself (the model's is models[].version)")
    models: list[ModelInfo]


class Health(BaseModel):
    status: str


def rank(meta: ModelMetadata, probabilities: np.ndarray) -> list[ClassProbability]:
    """All classes with their probabilities, highest first (ties keep the model's order)."""
    order = np.argsort(-probabilities, kind="stable")
    return [
        ClassProbability(
            code=meta.classes[j], name=meta.display_name(meta.classes[j]), probability=float(probabilities[j])
        )
        for j in order
    ]


def malignancy(meta: ModelMetadata, probabilities: np.ndarray, threshold: float) -> Malignancy:
    idx = [meta.classes.index(c) for c in meta.malignant_classes]
    score = float(probabilities[idx].sum()) if idx else 0.0
    return Malignancy(
        score=score, threshold=threshold, above_threshold=score >= threshold, classes=list(meta.malignant_classes)
    )
