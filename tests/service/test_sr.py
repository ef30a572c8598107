"""The classification answer as a DICOM Comprehensive SR: content, round trip, and ``Accept: application/dicom``."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.sr.codedict import codes

from service.hospital.sr import (
    DISCLAIMER,
    MALIGNANCY_REACHED,
    MALIGNANCY_SCORE,
    MALIGNANCY_THRESHOLD,
    OOD_FLAG,
    OOD_SCORE,
    PRIVATE_SCHEME,
    SNOMED_CLASSES,
    TOP_CLASS,
    build_sr,
    class_concept,
    source_header,
    sr_bytes,
    warm_up,
)
from service.schemas import (
    ClassifyResponse,
    ClassProbability,
    ImageInfo,
    Malignancy,
    ModelRef,
    OodCheck,
    Timing,
)
from tests.conftest import TEST_DATA
from tests.service.conftest import jpeg_bytes
from tests.service.test_dicom import gradient, make_dicom

DICOMS = sorted((TEST_DATA / "dicom").glob("*.dcm"))
HAM = [("mel", "Melanoma"), ("nv", "Melanocytic nevus"), ("bkl", "Benign keratosis-like lesion"),
       ("bcc", "Basal cell carcinoma"), ("akiec", "Actinic keratosis / Bowen's disease"), ("df", "Dermatofibroma"),
       ("vasc", "Vascular lesion")]  # fmt: skip


def answer(
    ood: OodCheck | None = None, probs: tuple[float, ...] = (0.55, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01)
) -> ClassifyResponse:
    preds = [ClassProbability(code=c, name=n, probability=p) for (c, n), p in zip(HAM, probs, strict=True)]
    preds.sort(key=lambda p: -p.probability)
    score = sum(p.probability for p in preds if p.code in ("mel", "bcc", "akiec"))
    return ClassifyResponse(
        request_id="r-1", model=ModelRef(name="lite0", version="2.0.0", sha256="ab" * 32), predictions=preds,
        top=preds[0], malignancy=Malignancy(score=score, threshold=0.3, above_threshold=score >= 0.3,
                                            classes=["mel", "bcc", "akiec"]),
        image=ImageInfo(width=10, height=10, format="dicom"), timing_ms=Timing(decode=1, queue=1, inference=1, total=3),
        batch_size=1, ood=ood or OodCheck(available=False, detail="none"),
    )  # fmt: skip


def roundtrip(sr: pydicom.Dataset) -> hd.sr.ComprehensiveSR:
    return hd.sr.srread(io.BytesIO(sr_bytes(sr)))


@pytest.mark.parametrize("path", DICOMS, ids=lambda p: p.name)
def test_sr_is_in_the_source_study_and_references_the_source(path: Path) -> None:
    src = pydicom.dcmread(path, stop_before_pixels=True)
    doc = roundtrip(build_sr(answer(), source_header(path.read_bytes())))
    assert doc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR Storage
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"):
        assert (doc.get(keyword) or None) == (src.get(keyword) or None), keyword  # absent in the source: empty
    assert doc.SeriesInstanceUID != src.SeriesInstanceUID and doc.Modality == "SR"
    assert (doc.PreliminaryFlag, doc.VerificationFlag, doc.CompletionFlag) == ("PRELIMINARY", "UNVERIFIED", "COMPLETE")
    evidence = doc.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
    group = doc.content.get_image_measurement_groups()[0]
    (source_image,) = group.source_images
    assert source_image.referenced_sop_instance_uid == src.SOPInstanceUID


def test_sr_holds_ranked_coded_probabilities_malignancy_and_algorithm() -> None:
    ans = answer()
    doc = roundtrip(build_sr(ans, source_header(DICOMS[0].read_bytes())))
    group = doc.content.get_image_measurement_groups()[0]
    values = [(m.name, m.value) for m in group.get_measurements()]
    ranked = [(class_concept(p.code, p.name), round(p.probability, 6)) for p in ans.predictions]
    assert values[: len(ranked)] == ranked  # rank order, every class
    assert values[len(ranked) :] == [(MALIGNANCY_SCORE, round(ans.malignancy.score, 6)), (MALIGNANCY_THRESHOLD, 0.3)]
    assert all(m.unit == hd.sr.CodedConcept("1", "UCUM", "no units") for m in group.get_measurements())
    evaluations = {q.name: q.value for q in group.get_qualitative_evaluations()}
    assert evaluations[TOP_CLASS] == hd.sr.CodedConcept("1162635006", "SCT", "Malignant melanoma")
    assert evaluations[MALIGNANCY_REACHED].value == codes.SCT.Yes.value
    assert OOD_FLAG not in evaluations  # this model has no OOD check

    def texts_of(code: str) -> list[str]:
        name = hd.sr.CodedConcept(code, "DCM", "x")
        return [i.TextValue for i in hd.sr.utils.find_content_items(group[0], name=name, recursive=True)]

    # TID 4019 Algorithm Identification: name, version, parameters
    assert (texts_of("111001"), texts_of("111003")) == (["lite0"], ["2.0.0"])
    assert any("ab" * 32 in p for p in texts_of("111002"))
    assert group.finding_type == hd.sr.CodedConcept("95324001", "SCT", "Skin lesion")
    texts = [i.TextValue for i in hd.sr.utils.find_content_items(doc, name=codes.DCM.Comment, recursive=True)]
    assert texts[0] == DISCLAIMER and "not a diagnosis" in texts[0]
    assert "Out-of-distribution check unavailable" in texts[1]


def test_class_codes_are_snomed_where_one_concept_is_the_class() -> None:
    for code, name in HAM:
        concept = class_concept(code, name)
        if code in ("mel", "nv", "bcc"):
            assert concept.scheme_designator == "SCT" and concept.value == SNOMED_CLASSES[code][0]
        else:  # groups of diagnoses (akiec, bkl, vasc) and df: the private scheme, with the model's code
            assert (concept.scheme_designator, concept.value, concept.meaning) == (PRIVATE_SCHEME, code, name)


@pytest.mark.parametrize("flagged", [True, False])
def test_ood_flag_score_and_threshold(flagged: bool) -> None:
    ood = OodCheck(available=True, score=9.0 if flagged else 1.0, threshold=5.0, out_of_distribution=flagged,
                   method="mahalanobis")  # fmt: skip
    doc = roundtrip(build_sr(answer(ood), source_header(DICOMS[0].read_bytes())))
    group = doc.content.get_image_measurement_groups()[0]
    assert {q.name: q.value.value for q in group.get_qualitative_evaluations()}[OOD_FLAG] == (
        codes.SCT.Yes.value if flagged else codes.SCT.No.value
    )
    assert {m.name: m.value for m in group.get_measurements()}[OOD_SCORE] == (9.0 if flagged else 1.0)
    summary = hd.sr.utils.find_content_items(doc, name=codes.DCM.Comment, recursive=True)[1].TextValue
    assert summary.startswith("WARNING") == flagged


def test_same_source_and_model_give_the_same_sr_uid_another_model_another() -> None:
    src = source_header(DICOMS[0].read_bytes())
    a, b = build_sr(answer(), src), build_sr(answer(), src)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    other = answer().model_copy(update={"model": ModelRef(name="x", version="3", sha256="cd" * 32)})
    assert build_sr(other, src).SOPInstanceUID != a.SOPInstanceUID
    assert a.SOPInstanceUID.startswith("2.25.") and pydicom.uid.UID(a.SOPInstanceUID).is_valid


def test_source_with_odd_patient_sex_and_no_modality_still_gets_an_sr() -> None:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(gradient(), PatientSex="U")))
    del ds.Modality
    doc = roundtrip(build_sr(answer(), ds))
    assert doc.PatientSex in ("", None) and doc.PatientID == ds.PatientID


# --- Accept: application/dicom on /v1/classify ------------------------------------------------------------
def test_classify_answers_the_sr_for_a_dicom_input(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory()
    data = DICOMS[2].read_bytes()
    headers = {"content-type": "application/dicom"}
    r = client.post("/v1/classify", content=data, headers={**headers, "accept": "application/dicom"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    doc = hd.sr.srread(io.BytesIO(r.content))
    top = client.post("/v1/classify", content=data, headers=headers).json()["top"]
    group = doc.content.get_image_measurement_groups()[0]
    assert {q.name: q.value for q in group.get_qualitative_evaluations()}[TOP_CLASS] == class_concept(
        top["code"], top["name"]
    )
    assert doc.StudyInstanceUID == pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID


def _decodes(client: TestClient) -> float:
    line = next(
        x for x in client.get("/metrics").text.splitlines() if x.startswith("lesionserve_decode_duration_seconds_count")
    )
    return float(line.rsplit(" ", 1)[1])


def test_classify_sr_for_a_jpeg_is_406_before_any_decode(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory()
    before = _decodes(client)
    r = client.post(
        "/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg", "accept": "application/dicom"}
    )
    assert r.status_code == 406 and r.headers["content-type"] == "application/problem+json"
    assert "DICOM input only" in r.json()["detail"]
    assert _decodes(client) == before  # refused from the headers: no image decoded, no model run


def test_classify_sr_for_a_ct_is_415(client_factory: Callable[..., TestClient]) -> None:
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()  # type: ignore[arg-type]
    r = client_factory().post(
        "/v1/classify", content=ct, headers={"content-type": "application/dicom", "accept": "application/dicom"}
    )
    assert r.status_code == 415 and "CT Image Storage" in r.json()["detail"]


def test_warm_up_builds_an_sr_without_failing(caplog: pytest.LogCaptureFixture) -> None:
    warm_up()
    assert not [r for r in caplog.records if "warm-up failed" in r.getMessage()]
