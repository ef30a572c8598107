"""FHIR R4 output: a classification answer as a ``DiagnosticReport`` an HIS can file against the study.

Shape (validated in tests with ``fhir.resources.R4B``, whose DiagnosticReport/Observation/Device are
the R4 ones; fhir.resources >= 7 has no plain R4 package):

- ``DiagnosticReport`` status ``preliminary`` (an AI output awaiting a clinician's review), a local
  ``code``, ``subject``, ``basedOn`` and ``encounter`` when the caller gave them (:class:`References`:
  the HIS's own references, checked for shape here and never logged), ``issued``, ``conclusion``, ``identifier`` (request id; DICOM Accession Number typed
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

Class codings carry the local code and, where one concept is exactly the class, its SNOMED CT code: the
same concepts as the SR (:mod:`service.hospital.codes`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from service.errors import InvalidFhirReference
from service.hospital.codes import SNOMED_CLASSES, SNOMED_CT_URI

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
# A literal reference (FHIR R4 3.3.3): relative "Type/id" or absolute "http(s)://base/Type/id", with an
# optional "/_history/vid". The resource types each field may point at (R4 DiagnosticReport).
_REFERENCE = re.compile(
    r"^(?:https?://[A-Za-z0-9\-._~%!$&'()*+,;=:@/]{1,400}/)?(?P<type>[A-Z][A-Za-z]{1,63})/[A-Za-z0-9\-.]{1,64}"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)
REFERENCE_TYPES: dict[str, tuple[str, ...]] = {
    "subject": ("Patient", "Group", "Device", "Location"),
    "based_on": ("ServiceRequest", "CarePlan", "ImmunizationRecommendation", "MedicationRequest", "NutritionOrder"),
    "encounter": ("Encounter",),
}


@dataclass(frozen=True)
class References:
    """The caller's FHIR references for the report (patient, order, encounter); each None when not given.

    They identify a patient: never logged, never in an error's ``detail`` (which names the field only).
    """

    subject: str | None = None
    based_on: str | None = None
    encounter: str | None = None

    @classmethod
    def parse(cls, values: Mapping[str, str | None]) -> References:
        """Check each given value as a literal reference to a resource type its field allows.

        Raises:
            InvalidFhirReference: 400, naming the field and the expected form, never the value.
        """
        checked: dict[str, str | None] = {}
        for name, types in REFERENCE_TYPES.items():
            value = values.get(name)
            if value is None or value == "":
                checked[name] = None
                continue
            match = _REFERENCE.match(value)
            if match is None or match["type"] not in types:
                raise InvalidFhirReference(
                    f"{name!r} is not a FHIR reference to {' or '.join(types)}: expected {types[0]}/<id> "
                    f"or https://<fhir base>/{types[0]}/<id>"
                )
            checked[name] = value
        return cls(**checked)


_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def diagnostic_report(
    answer: Mapping[str, Any] | BaseModel,
    *,
    identifiers: Mapping[str, str] | None,
    issued: datetime,
    references: References | None = None,
) -> dict[str, Any]:
    """Build a FHIR R4 DiagnosticReport (a JSON-ready dict) from the service's classification answer.

    Args:
        answer: the JSON classification answer (``request_id``, ``model``, ``predictions``, ``top``,
            ``malignancy``), as a mapping or the response model.
        identifiers: DICOM identifiers from :func:`service.hospital.dicom.read_dicom` (Study/Series/SOP
            Instance UID, Accession Number), or None for a JPEG/PNG upload.
        issued: when the answer was made; must be timezone-aware (FHIR ``instant``).
        references: the caller's ``subject`` / ``basedOn`` / ``encounter`` (already checked), or None.

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
    report["contained"] = [_device(model, data.get("service_version")), *observations]
    report["identifier"] = _report_identifiers(request_id, ids.get("AccessionNumber"))
    refs = references or References()
    if refs.based_on:
        report["basedOn"] = [{"reference": refs.based_on}]
    report["status"] = "preliminary"
    report["code"] = {
        "coding": [
            {"system": CODE_SYSTEM, "code": "dermoscopy-ai", "display": "Dermoscopic lesion classification (AI)"}
        ],
        "text": "Dermoscopic lesion classification (AI, preliminary)",
    }
    if refs.subject:
        report["subject"] = {"reference": refs.subject}
    if refs.encounter:
        report["encounter"] = {"reference": refs.encounter}
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
    report["conclusionCode"] = [{"coding": _class_codings(top), "text": str(top["name"])}]
    heatmap = data.get("explanation") or {}
    if heatmap.get("available"):
        code = heatmap.get("class_code") or heatmap.get("class")
        report["presentedForm"] = [
            {"contentType": "image/png", "data": heatmap["png_base64"], "title": f"Class activation heatmap: {code}"}
        ]
    return report


def _device(model: Mapping[str, Any], service_version: object) -> dict[str, Any]:
    versions: list[dict[str, Any]] = [{"type": {"text": "model"}, "value": str(model["version"])}]
    if service_version:  # the software that ran the model: an answer is the work of both
        versions.append({"type": {"text": "lesionserve (service)"}, "value": str(service_version)})
    return {
        "resourceType": "Device",
        "id": DEVICE_ID,
        "identifier": [{"system": MODEL_SHA256_SYSTEM, "value": str(model["sha256"])}],
        "deviceName": [{"name": str(model["name"]), "type": "model-name"}],
        "type": {"text": "Software: dermoscopic image classifier (ONNX model)"},
        "version": versions,
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


def _class_codings(p: Mapping[str, Any]) -> list[dict[str, str]]:
    """The local code, then SNOMED CT where one concept is exactly the class (the SR's concept)."""
    codings = [{"system": CLASS_SYSTEM, "code": str(p["code"]), "display": str(p["name"])}]
    if str(p["code"]) in SNOMED_CLASSES:
        value, meaning = SNOMED_CLASSES[str(p["code"])]
        codings.append({"system": SNOMED_CT_URI, "code": value, "display": meaning})
    return codings


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
    return _observation(obs_id, {"coding": _class_codings(p), "text": text}, p["probability"])


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
