"""FHIR references (``subject``, ``based_on``, ``encounter``) and SNOMED CT codes in the DiagnosticReport.

An HIS files a report against its patient, order and encounter: the references come in as query parameters
or multipart fields, are checked as FHIR references, land in ``subject`` / ``basedOn`` / ``encounter``, and
appear in no log, audit line or error detail. Class codings carry SNOMED CT beside the local code: the SR's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.hospital.codes import SNOMED_CT_URI
from service.hospital.fhir import References, diagnostic_report
from service.hospital.sr import class_concept
from service.logs import JsonFormatter
from service.version import SERVICE_VERSION
from tests.service.conftest import jpeg_bytes
from tests.service.test_api import assert_problem
from tests.service.test_fhir import ISSUED, make_answer, validate

ClientFactory = Callable[..., TestClient]
FHIR = "application/fhir+json"
# Distinctive values, so that a leak into any log is found by a plain substring search
PATIENT = "Patient/pt-7c1e99"
ORDER = "https://his.example/fhir/ServiceRequest/ord-55aa31"
ENCOUNTER = "Encounter/enc-0d4417/_history/2"


def test_references_fill_subject_based_on_and_encounter_and_validate() -> None:
    refs = References.parse({"subject": PATIENT, "based_on": ORDER, "encounter": ENCOUNTER})
    report = diagnostic_report(make_answer(), identifiers=None, issued=ISSUED, references=refs)
    parsed = validate(report)
    assert parsed.subject.reference == PATIENT
    assert [r.reference for r in parsed.basedOn] == [ORDER]
    assert parsed.encounter.reference == ENCOUNTER
    bare = diagnostic_report(make_answer(), identifiers=None, issued=ISSUED)
    assert not {"subject", "basedOn", "encounter"} & set(bare)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", "123"),  # no type
        ("subject", "Observation/1"),  # a type the field does not allow
        ("subject", "Patient/has space"),
        ("subject", "patient/123"),  # resource types start upper-case
        ("based_on", "Patient/123"),
        ("encounter", "Encounter/" + "x" * 65),  # ids are at most 64 characters
        ("encounter", "javascript:alert(1)//Encounter/1"),
        ("subject", "Patient/1\nX-Injected: 1"),
    ],
)
def test_a_value_that_is_not_an_allowed_reference_is_refused_without_echoing_it(field: str, value: str) -> None:
    from service.errors import InvalidFhirReference

    with pytest.raises(InvalidFhirReference) as caught:
        References.parse({field: value})
    assert field in caught.value.detail and value not in caught.value.detail


def test_class_codings_carry_the_srs_snomed_codes_beside_the_local_ones() -> None:
    report = diagnostic_report(make_answer(), identifiers=None, issued=ISSUED)
    validate(report)
    checked = 0
    for obs in (r for r in report["contained"] if r["resourceType"] == "Observation" and r["id"].startswith("p-")):
        local, *snomed = obs["code"]["coding"]
        assert local["system"].startswith("https://lesionserve.dev/")
        concept = class_concept(local["code"], local["display"])
        if concept.scheme_designator == "SCT":  # the SR codes this class in SNOMED CT: the report must too
            assert snomed == [{"system": SNOMED_CT_URI, "code": concept.value, "display": concept.meaning}]
            checked += 1
        else:
            assert snomed == []
    assert checked == 3  # nv, mel, bcc in make_answer
    top = report["conclusionCode"][0]["coding"]  # nv
    assert [c["system"] for c in top] == [local["system"], SNOMED_CT_URI] and top[1]["code"] == "400096001"


def test_the_device_names_the_model_and_the_service_version() -> None:
    report = diagnostic_report(make_answer(), identifiers=None, issued=ISSUED)
    validate(report)
    device = report["contained"][0]
    assert [v["value"] for v in device["version"]] == ["1.2.0", SERVICE_VERSION]


def test_through_the_api_query_and_multipart_references_reach_the_report_and_no_log(
    client_factory: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    audit = tmp_path / "audit.jsonl"
    client = client_factory(audit_log=str(audit), log_level="DEBUG")
    caplog.set_level(logging.DEBUG)
    params = {"subject": PATIENT, "based_on": ORDER, "encounter": ENCOUNTER}
    r = client.post(
        "/v1/classify", params=params, content=jpeg_bytes(), headers={"content-type": "image/jpeg", "accept": FHIR}
    )
    assert r.status_code == 200, r.text
    parsed = validate(r.json())
    assert (parsed.subject.reference, parsed.basedOn[0].reference, parsed.encounter.reference) == (
        PATIENT, ORDER, ENCOUNTER,
    )  # fmt: skip
    # the same as multipart fields beside the image
    r = client.post(
        "/v1/classify", files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}, data=params, headers={"accept": FHIR}
    )
    assert r.status_code == 200, r.text
    assert validate(r.json()).subject.reference == PATIENT
    # refused: 400 with its own type, the value not echoed, nothing classified
    r = client.post(
        "/v1/classify", params={"subject": "Observation/obs-31337"}, content=jpeg_bytes(),
        headers={"content-type": "image/jpeg", "accept": FHIR},
    )  # fmt: skip
    body = assert_problem(r, 400, "invalid-fhir-reference")
    assert "obs-31337" not in json.dumps(body) and "subject" in str(body["detail"])
    # the same name twice, differently
    r = client.post(
        "/v1/classify", params={"subject": PATIENT}, files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")},
        data={"subject": "Patient/other-1"}, headers={"accept": FHIR},
    )  # fmt: skip
    assert_problem(r, 400, "bad-request")
    # never logged: app log, access log, audit trail, anything on stdout/stderr
    out, err = capfd.readouterr()
    service_records = [r for r in caplog.records if not r.name.startswith("httpx")]  # httpx: the test's own client
    logged = "".join(JsonFormatter().format(r) for r in service_records) + audit.read_text() + out + err
    assert audit.read_text().count("\n") >= 4
    for secret in ("pt-7c1e99", "ord-55aa31", "enc-0d4417", "obs-31337", "other-1"):
        assert secret not in logged
