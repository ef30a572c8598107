"""Results as DICOM: a classification answer as a Comprehensive SR in the source image's study.

The document follows TID 1500 (Measurement Report), the SR template viewers and PACS AI workflows
read, built with highdicom:

- Patient and Study modules copied from the source header (the one place patient attributes are
  copied: a PACS files an object by them; nothing here logs them), a new Series;
- observation context: the model as a device observer (UID derived from the .onnx file's sha256);
- procedure reported: SNOMED CT 446078004 "Dermoscopic photography (procedure)";
- the measurement group's source image and the evidence sequence: the classified SOP Instance;
- one measurement group (TID 1501), finding type SNOMED CT 95324001 "Skin lesion", with:
  TID 4019 algorithm identification (model name, version, manufacturer; sha256 and thresholds as
  parameters), the top class (private "Most likely class"), one probability per class in rank order
  (unit UCUM ``1``), the malignancy score, its threshold and "threshold reached" yes/no, and, when
  the model has the check, the out-of-distribution score, threshold and flag;
- a "Qualitative Evaluations" container with a comment that says the result is preliminary and not
  a diagnosis; the SR Document General module says so too (Preliminary Flag ``PRELIMINARY``,
  Verification ``UNVERIFIED``).

Class concepts are SNOMED CT where one concept is exactly the class (see :data:`SNOMED_CLASSES`),
else the private scheme ``99LSRV`` (docs/integration.md, "SR codes"). UIDs of the SR's series and
instance are derived from the source series/instance and the model hash: a resent image gives the
same SR UID (the PACS replaces it instead of filing a duplicate), another model gives a new one.
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service.errors import InferenceFailed, InvalidImage
from service.hospital.codes import SNOMED_CLASSES
from service.schemas import ClassifyResponse, ClassProbability, ImageInfo, Malignancy, ModelRef, Timing
from service.version import SERVICE_NAME

log = logging.getLogger(__name__)

SR_CONTENT_TYPE = "application/dicom"
PRIVATE_SCHEME = "99LSRV"  # "99" prefix: a private coding scheme designator (PS3.3 8.2)
SERIES_NUMBER = 990  # high, so the AI series sorts after the acquired ones in a viewer
SERIES_DESCRIPTION = "lesionserve AI classification (preliminary, not a diagnosis)"
MANUFACTURER = "lesionserve"
DISCLAIMER = (
    "Preliminary output of an automated classifier; not a diagnosis. To be reviewed by a clinician "
    "together with the image and the patient's history."
)


DERMOSCOPIC_PHOTOGRAPHY = hd.sr.CodedConcept("446078004", "SCT", "Dermoscopic photography")
SKIN_LESION = hd.sr.CodedConcept("95324001", "SCT", "Skin lesion")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def private(code: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code[:16], PRIVATE_SCHEME, meaning[:64])


MALIGNANCY_SCORE = private("malignancy-score", "Malignancy score")
MALIGNANCY_THRESHOLD = private("malig-threshold", "Malignancy threshold")
MALIGNANCY_REACHED = private("malig-reached", "Malignancy threshold reached")
OOD_SCORE = private("ood-score", "Out-of-distribution score")
OOD_THRESHOLD = private("ood-threshold", "Out-of-distribution threshold")
OOD_FLAG = private("ood-flag", "Image unlike the training data")
# Not DCM 121071 "Finding": TID 1501 already uses it for the finding type (skin lesion).
TOP_CLASS = private("top-class", "Most likely class")


def class_concept(code: str, name: str) -> hd.sr.CodedConcept:
    """The coded concept for a model class: SNOMED CT where one concept is the class, else private."""
    if code in SNOMED_CLASSES:
        value, meaning = SNOMED_CLASSES[code]
        return hd.sr.CodedConcept(value, "SCT", meaning)
    return private(code, name)


def source_header(data: bytes) -> Dataset:
    """The source object's header (no pixels): what the SR copies and references.

    Call after :func:`service.hospital.dicom.read_dicom` accepted ``data``: the header is known good.
    """
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


# Type 2 attributes highdicom reads from the evidence (present, possibly empty, in a conforming source).
_COPIED_BY_HIGHDICOM = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "ReferringPhysicianName",
)  # fmt: skip
# Further Patient/Study attributes a PACS matches on (issuer of the ID, other IDs), copied as they are.
_ALSO_COPIED = (
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "StudyDescription",
    "IssuerOfAccessionNumberSequence",
)  # fmt: skip


# What the SR needs to reference the image; with the two lists above, the whole of what the evidence holds.
_REFERENCE = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns",
    "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
)  # fmt: skip


_HD_CHARSETS = frozenset(v.value for v in hd.enum.SpecificCharacterSetValues)


def _character_set(source: Dataset) -> list[str] | str | None:
    r"""The source's Specific Character Set as highdicom takes it.

    With code extensions the first value may be empty, meaning the default repertoire (PS3.3 C.12.1.1.2):
    ``\ISO 2022 IR 87`` (Japanese) and ``\ISO 2022 IR 149`` (Korean) are written so by most modalities, and
    highdicom refuses the empty value. It is the same as ``ISO 2022 IR 6``, written out here.
    """
    value = source.get("SpecificCharacterSet")
    if value is None:
        return None
    values = [str(v).strip() for v in (value if isinstance(value, pydicom.multival.MultiValue) else [value])]
    if len(values) > 1 and not values[0]:
        values[0] = "ISO 2022 IR 6"
    if not all(v in _HD_CHARSETS for v in values if v):
        return "ISO_IR 192"  # one highdicom does not list (Korean ISO 2022 IR 149): the decoded text as UTF-8
    return values if len(values) > 1 else (values[0] or None)


def _evidence(source: Dataset) -> Dataset:
    """The header's attributes the SR may copy, with the Type 2 ones highdicom reads present (empty when absent).

    highdicom copies the whole Patient and Study modules of its evidence into the SR: given the full header it
    copied Patient Comments, Additional Patient History and Other Patient Names, none of them needed by a PACS
    to file the SR (issue 28, finding 14). Only the documented attributes (docs/security.md) go in.
    A sex outside the defined terms (M, F, O) is left empty: highdicom refuses it, and an SR must not
    fail for it. A missing Modality becomes XC (VL photography) or OT: the image library needs one.
    """
    ev = Dataset()
    for keyword in (*_REFERENCE, *_COPIED_BY_HIGHDICOM, *_ALSO_COPIED):
        if keyword in source:
            ev[keyword] = source[keyword]
    charset = _character_set(source)
    if charset is not None:
        ev.SpecificCharacterSet = charset
    for keyword in _COPIED_BY_HIGHDICOM:
        if keyword not in ev:
            setattr(ev, keyword, None)
    if str(ev.PatientSex or "") not in ("M", "F", "O"):
        ev.PatientSex = None
    if not str(ev.get("Modality") or "").strip():  # Type 1, yet missing in some exports; highdicom needs it
        ev.Modality = "XC" if str(ev.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.77.1") else "OT"
    return ev


_UID_NAMESPACE = uuid.UUID("5c9b1a8e-4f0e-5d2a-9b7c-1e6a3f2d8c41")  # lesionserve's, for name-based UUIDs


def derived_uid(*parts: str) -> str:
    """A UID that is a function of ``parts``: ``2.25.`` + a name-based (SHA-1, v5) UUID as an integer.

    PS3.5 B.2 allows UUID-derived UIDs under 2.25; v5 makes them repeatable, and the source UIDs
    cannot be recovered from them.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def sr_uids(source: Dataset, model_sha256: str) -> tuple[str, str]:
    """(Series, SOP Instance) UIDs of the SR: deterministic in the source and the model."""
    series = derived_uid(str(source.SeriesInstanceUID), model_sha256, "sr-series")
    instance = derived_uid(str(source.SOPInstanceUID), model_sha256, "sr-instance")
    return series, instance


def _num(name: hd.sr.CodedConcept, value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 6), unit=NO_UNITS)


def _yes_no(flag: bool) -> hd.sr.CodedConcept:
    code = codes.SCT.Yes if flag else codes.SCT.No
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _algorithm(answer: ClassifyResponse) -> hd.sr.AlgorithmIdentification:
    m, params = answer.malignancy, [f"model sha256 {answer.model.sha256}"]
    params.append(f"malignancy threshold {m.threshold:g} on the sum of {', '.join(m.classes) or 'no classes'}")
    if answer.ood is not None and answer.ood.available:
        params.append(f"out-of-distribution check {answer.ood.method}, threshold {answer.ood.threshold:g}")
    return hd.sr.AlgorithmIdentification(
        name=answer.model.name[:64], version=answer.model.version[:64], parameters=params, manufacturer=MANUFACTURER
    )


def _group(answer: ClassifyResponse, source: Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = [_num(class_concept(p.code, p.name), p.probability) for p in answer.predictions]
    m = answer.malignancy
    measurements += [_num(MALIGNANCY_SCORE, m.score), _num(MALIGNANCY_THRESHOLD, m.threshold)]
    evaluations = [
        hd.sr.QualitativeEvaluation(TOP_CLASS, class_concept(answer.top.code, answer.top.name)),
        hd.sr.QualitativeEvaluation(MALIGNANCY_REACHED, _yes_no(m.above_threshold)),
    ]
    ood = answer.ood
    if ood is not None and ood.available and ood.score is not None and ood.threshold is not None:
        measurements += [_num(OOD_SCORE, ood.score), _num(OOD_THRESHOLD, ood.threshold)]
        evaluations.append(hd.sr.QualitativeEvaluation(OOD_FLAG, _yes_no(bool(ood.out_of_distribution))))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(str(source.SOPInstanceUID), answer.model.sha256, "tracking"),
            identifier="lesion classification",
        ),
        finding_type=SKIN_LESION,
        algorithm_id=_algorithm(answer),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _comments(answer: ClassifyResponse) -> Sequence[hd.sr.ContentItem]:
    """TID 1500 row 12: free-text evaluations; here the disclaimer and a one-line summary."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    m, top = answer.malignancy, answer.top
    relation = "at or above" if m.above_threshold else "below"
    summary = (
        f"Most likely: {top.name} ({top.probability:.1%}). Malignancy score {m.score:.3f}, {relation} the "
        f"threshold {m.threshold:.3f}. Model {answer.model.name} {answer.model.version}."
    )
    if answer.ood is not None:
        if not answer.ood.available:
            summary += " Out-of-distribution check unavailable for this model."
        elif answer.ood.out_of_distribution:
            summary = "WARNING: the image looks unlike the training data; the result may be meaningless. " + summary
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            for text in (DISCLAIMER, summary)
        ]
    )
    return [container]


def build_sr(answer: ClassifyResponse, source: Dataset) -> hd.sr.ComprehensiveSR:
    """The SR for one classified DICOM instance.

    Args:
        answer: the classification answer (the JSON one), with the OOD check when the model has one.
        source: the classified object's header (:func:`source_header`); Patient and Study come from it.

    Raises:
        ValueError: the source lacks what an SR needs (Study/Series/SOP Instance UID, SOP Class UID).
    """
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not str(source.get(keyword) or "").strip():
            raise ValueError(f"the source object has no {keyword}: an SR cannot reference it")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(answer.model.sha256, "device"),
        name=answer.model.name[:64],
        manufacturer_name=MANUFACTURER,
        model_name=f"{answer.model.name} {answer.model.version}"[:64],
    )
    evidence = _evidence(source)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=DERMOSCOPIC_PHOTOGRAPHY,
        imaging_measurements=[_group(answer, evidence)],
        # no Image Library (TID 1600): highdicom's knows no Dermoscopic Photography modality code; the group's
        # source image and the evidence sequence reference the instance instead
    )
    report[0].ContentSequence.extend(_comments(answer))
    series_uid, instance_uid = sr_uids(source, answer.model.sha256)
    sr = hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
    )
    sr.PreliminaryFlag = "PRELIMINARY"  # highdicom sets it from is_final; said here because it matters
    for keyword in _ALSO_COPIED:
        if keyword in source:
            sr[keyword] = source[keyword]
    # LO, multi-valued: the software that made the SR, then the model that made the answer
    versions = [f"{SERVICE_NAME} {answer.service_version}"[:64], f"{answer.model.name} {answer.model.version}"[:64]]
    sr.add_new("SoftwareVersions", "LO", versions)
    return sr


def make_sr(answer: ClassifyResponse, data: bytes) -> Dataset:
    """The SR for the classified Part-10 object ``data`` (CPU work: call it off the event loop).

    Raises:
        InvalidImage: the object lacks a valid Study, Series or SOP Instance UID: the sender's fault, 400 / C000
            (it was a 500 / 0110 "SR could not be built", issue 28 finding 12).
        InferenceFailed: the SR could not be built (a header highdicom refuses); logged by type only.
    """
    identifiers = answer.dicom.identifiers if answer.dicom is not None else {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not identifiers.get(keyword):  # only well-formed UIDs are kept there
            raise InvalidImage(f"the DICOM object has no valid {keyword}: its result cannot be filed as an SR")
    try:
        return build_sr(answer, source_header(data))
    except Exception as exc:  # highdicom's messages may quote header values: never pass them on
        log.error("SR could not be built", extra={"error": type(exc).__name__})
        raise InferenceFailed(f"the result could not be written as a DICOM SR ({type(exc).__name__})") from None


def warm_up() -> None:
    """Build one SR from synthetic values: highdicom reads its tables lazily (about 2 s of JSON on the
    first SR), which should happen at start, not inside the first C-STORE."""
    source = Dataset()
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"  # VL Photographic Image Storage
    source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID = (derived_uid("warm", k) for k in "abc")
    source.Rows, source.Columns, source.SamplesPerPixel, source.BitsAllocated = 1, 1, 3, 8  # a "source image"
    source.PhotometricInterpretation = "RGB"
    p = ClassProbability(code="x", name="warm-up", probability=1.0)
    answer = ClassifyResponse(
        request_id="warm-up", model=ModelRef(name="warm-up", version="0", sha256="0" * 64), predictions=[p], top=p,
        malignancy=Malignancy(score=0.0, threshold=0.5, above_threshold=False, classes=[]),
        image=ImageInfo(width=1, height=1, format="dicom"), timing_ms=Timing(decode=0, queue=0, inference=0, total=0),
        batch_size=1,
    )  # fmt: skip
    try:
        sr_bytes(build_sr(answer, source))
    except Exception as exc:  # best effort: a real call reports its own errors
        log.warning("SR warm-up failed", extra={"error": type(exc).__name__})


def warm_up_in_background() -> threading.Thread:
    """:func:`warm_up` in a daemon thread (the model warms up meanwhile; /readyz waits for that, not this)."""
    thread = threading.Thread(target=warm_up, name="lesionserve-sr-warmup", daemon=True)
    thread.start()
    return thread


def sr_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM Part-10 file (what C-STORE, STOW-RS and ``Accept: application/dicom`` carry)."""
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
