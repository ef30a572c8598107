"""Response models of the HTTP API, and the one function that builds a classification answer.

The answer is a pydantic model, not a dict, so that every renderer (JSON now, FHIR later)
takes the same typed object.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from service.contract import ModelMetadata


class ModelRef(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the .onnx file being served")


class ClassProbability(BaseModel):
    code: str
    name: str
    probability: float


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


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str
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
    metrics: dict[str, object]
    training_data: dict[str, str]
    exported_at: str
    batch_sizes: list[int]
    max_batch_size: int
    max_wait_ms: float


class ModelsResponse(BaseModel):
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
