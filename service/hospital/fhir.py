"""FHIR R4 output: a classification answer as a ``DiagnosticReport`` an HIS can file against the study.

Shape (validated in tests with ``fhir.resources.R4B``, whose DiagnosticReport/Observation/Device are
the R4 ones; fhir.resources >= 7 has no plain R4 package):

- ``DiagnosticReport`` status ``preliminary`` (an AI output awaiting a clinician's review), a local
  ``code``, ``issued``, ``conclusion``, ``identifier`` (request id; DICOM Accession Number typed
  ``ACSN``), ``imagingStudy`` as a logical reference by the Study Instance UID
  (``urn:dicom:uid`` / ``urn:oid:...``), ``result`` -> the contained Observations;
- a contained ``Device`` for the model (name, version, sha256 of the .onnx file). R4 does not allow
  a Device as ``DiagnosticReport.performer`` or ``Observation.performer``; its place is
  ``Observation.device``, which every Observation here references;
- one contained ``Observation`` per class probability and one for the malignancy score, each a
  ``valueQuantity`` with UCUM unit ``1``; the malignancy one carries the threshold as
  ``referenceRange.high`` and an ``interpretation`` H/N;
- when the model has an out-of-distribution check, an ``Observation`` for its score (threshold as
  ``referenceRange.high``, interpretation H when the image looks unlike the training data, which the
  ``conclusion`` then says first); with ``?explain=true`` the heatmap PNG as ``presentedForm``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel

FHIR_CONTENT_TYPE = "application/fhir+json"
CODE_SYSTEM = "https://lesionserve.dev/fhir/CodeSystem/lesion-classification"
CLASS_SYSTEM = "https://lesionserve.dev/fhir/CodeSystem/lesion-class"
REQUEST_ID_SYSTEM = "https://lesionserve.dev/fhir/request-id"
MODEL_SHA256_SYSTEM = "https://lesionserve.dev/fhir/model-sha256"
DICOM_UID_SYSTEM = "urn:dicom:uid"
UCUM = "http://unitsofmeasure.org"
V2_IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DEVICE_ID = "model"

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def diagnostic_report(
    answer: Mapping[str, Any] | BaseModel,
    *,
    identifiers: Mapping[str, str] | None,
    issued: datetime,
) -> dict[str, Any]:
    """Build a FHIR R4 DiagnosticReport (a JSON-ready dict) from the service's classification answer.

    Args:
        answer: the JSON classification answer (``request_id``, ``model``, ``predictions``, ``top``,
            ``malignancy``), as a mapping or the response model.
        identifiers: DICOM identifiers from :func:`service.hospital.dicom.read_dicom` (Study/Series/SOP
            Instance UID, Accession Number), or None for a JPEG/PNG upload.
        issued: when the answer was made; must be timezone-aware (FHIR ``instant``).

    Raises:
        ValueError: ``issued`` is naive, or the answer lacks a field the report needs.
    """
    if issued.tzinfo is None or issued.utcoffset() is None:
        raise ValueError("issued must be timezone-aware: FHIR instant requires a zone")
    data = answer.model_dump() if isinstance(answer, BaseModel) else answer
    try:
        request_id = str(data["request_id"])
        model, predictions, top, malignancy = data["model"], data["predictions"], data["top"], data["malignancy"]
    except KeyError as exc:
        raise ValueError(f"classification answer lacks {exc.args[0]!r}") from exc
    ids = dict(identifiers or {})

    ood = data.get("ood") or {}
    observations = [_class_observation(p, index) for index, p in enumerate(predictions)]
    observations.append(_malignancy_observation(malignancy))
    if ood.get("available"):
        observations.append(_ood_observation(ood))
    report: dict[str, Any] = {"resourceType": "DiagnosticReport"}
    if _FHIR_ID.match(request_id):
        report["id"] = request_id
    report["contained"] = [_device(model), *observations]
    report["identifier"] = _report_identifiers(request_id, ids.get("AccessionNumber"))
    report["status"] = "preliminary"
    report["code"] = {
        "coding": [
            {"system": CODE_SYSTEM, "code": "dermoscopy-ai", "display": "Dermoscopic lesion classification (AI)"}
        ],
        "text": "Dermoscopic lesion classification (AI, preliminary)",
    }
    report["issued"] = issued.isoformat()
    study_uid = ids.get("StudyInstanceUID", "")
    if _OID.match(study_uid):
        report["imagingStudy"] = [
            {
                "type": "ImagingStudy",
                "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"},
                "display": "DICOM study of the classified image",
            }
        ]
    report["result"] = [{"reference": f"#{o['id']}", "display": o["code"]["text"]} for o in observations]
    report["conclusion"] = _ood_sentence(ood) + _conclusion(top, malignancy, model)
    report["conclusionCode"] = [{"coding": [_class_coding(top)], "text": str(top["name"])}]
    heatmap = data.get("explanation") or {}
    if heatmap.get("available"):
        code = heatmap.get("class_code") or heatmap.get("class")
        report["presentedForm"] = [
            {"contentType": "image/png", "data": heatmap["png_base64"], "title": f"Class activation heatmap: {code}"}
        ]
    return report


def _device(model: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "id": DEVICE_ID,
        "identifier": [{"system": MODEL_SHA256_SYSTEM, "value": str(model["sha256"])}],
        "deviceName": [{"name": str(model["name"]), "type": "model-name"}],
        "type": {"text": "Software: dermoscopic image classifier (ONNX model)"},
        "version": [{"value": str(model["version"])}],
    }


def _report_identifiers(request_id: str, accession: str | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"use": "usual", "system": REQUEST_ID_SYSTEM, "value": request_id}]
    if accession:
        out.append(
            {
                "type": {"coding": [{"system": V2_IDENTIFIER_TYPE, "code": "ACSN", "display": "Accession ID"}]},
                "value": accession,
            }
        )
    return out


def _class_coding(p: Mapping[str, Any]) -> dict[str, str]:
    return {"system": CLASS_SYSTEM, "code": str(p["code"]), "display": str(p["name"])}


def _probability(value: float) -> dict[str, Any]:
    return {"value": round(float(value), 6), "unit": "1", "system": UCUM, "code": "1"}


def _observation(obs_id: str, code: dict[str, Any], value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "preliminary",
        "code": code,
        "valueQuantity": _probability(value),
        "device": {"reference": f"#{DEVICE_ID}"},
    }


def _class_observation(p: Mapping[str, Any], index: int) -> dict[str, Any]:
    # Class codes come from the model file; an id must be [A-Za-z0-9-.], so fall back to the index.
    code = str(p["code"])
    obs_id = f"p-{code}" if _FHIR_ID.match(f"p-{code}") else f"p-{index}"
    text = f"Probability of {p['name']}"
    return _observation(obs_id, {"coding": [_class_coding(p)], "text": text}, p["probability"])


def _interpreted(obs: dict[str, Any], high: bool, text: str, threshold: float, range_text: str) -> dict[str, Any]:
    """``obs`` with an H/N interpretation and its threshold as ``referenceRange.high``."""
    coding = {"system": INTERPRETATION_SYSTEM, "code": "H" if high else "N", "display": "High" if high else "Normal"}
    obs["interpretation"] = [{"coding": [coding], "text": text}]
    obs["referenceRange"] = [{"high": _probability(threshold), "text": range_text}]
    return obs


def _malignancy_observation(m: Mapping[str, Any]) -> dict[str, Any]:
    coding = {"system": CODE_SYSTEM, "code": "malignancy-score", "display": "Malignancy score"}
    classes = ", ".join(str(c) for c in m.get("classes", []))
    obs = _observation("malignancy", {"coding": [coding], "text": f"Malignancy score (sum of {classes})"}, m["score"])
    above = bool(m["above_threshold"])
    text = "at or above the malignancy threshold" if above else "below the malignancy threshold"
    return _interpreted(obs, above, text, m["threshold"], "malignancy threshold")


def _ood_observation(ood: Mapping[str, Any]) -> dict[str, Any]:
    coding = {"system": CODE_SYSTEM, "code": "ood-score", "display": "Out-of-distribution score"}
    text = f"Out-of-distribution score ({ood['method']}; higher = less like the training data)"
    obs = _observation("ood", {"coding": [coding], "text": text}, ood["score"])
    flagged = bool(ood["out_of_distribution"])
    text = "unlike the training data" if flagged else "like the training data"
    return _interpreted(obs, flagged, text, ood["threshold"], "out-of-distribution threshold")


def _ood_sentence(ood: Mapping[str, Any]) -> str:
    if not ood.get("available"):
        return "" if not ood else "Out-of-distribution check unavailable for this model. "
    if not ood.get("out_of_distribution"):
        return ""
    return (
        "WARNING: the image looks unlike the training data (dermoscopic images of skin lesions); "
        "the classification below may be meaningless. "
    )


def _conclusion(top: Mapping[str, Any], m: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    relation = "at or above" if m["above_threshold"] else "below"
    return (
        f"Most likely: {top['name']} ({float(top['probability']):.1%}). "
        f"Malignancy score {float(m['score']):.3f}, {relation} the threshold {float(m['threshold']):.3f}. "
        f"Preliminary output of {model['name']} {model['version']}; not a diagnosis, to be reviewed by a clinician."
    )
