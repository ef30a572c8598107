"""HTTP routes: thin; the work is in :mod:`service.runtime`, :mod:`service.media` and the batcher."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics, tracing
from service.batcher import Prediction
from service.clients import ClientWatch
from service.errors import PROBLEM_CONTENT_TYPE, BadRequest, NotAcceptable
from service.explain import OOD_WARNING, enforce, ood_check
from service.hospital.dicom import decode_dicom
from service.hospital.fhir import REFERENCE_TYPES
from service.imaging import DecodedImage
from service.media import fhir_references, pick_renderer, read_upload, render_dicom_sr, render_fhir
from service.runtime import Runtime
from service.schemas import (
    ClassifyResponse,
    Explanation,
    Health,
    ImageInfo,
    ModelInfo,
    ModelRef,
    ModelsResponse,
    OodCheck,
    Timing,
    malignancy,
    rank,
)
from service.version import SERVICE_VERSION


async def get_runtime(request: Request) -> Runtime:
    # The dependencies are coroutines: a plain ``def`` would run in anyio's 40 worker threads, the pool that
    # blocking calls share, and a probe would wait behind them (issue 28: /readyz took 27 s with a PACS down).
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def require_key(request: Request, rt: RuntimeDep) -> None:
    request.state.key_id = rt.keys.identify(request.headers.get("authorization"))


async def require_metrics_key(request: Request, rt: RuntimeDep) -> None:
    # With API keys on, /metrics wants one too unless METRICS_AUTH=false: the counts per class and
    # the model hash are not for anyone on the network (a scraper gets a metrics-only key).
    if rt.metrics_auth:
        request.state.key_id = rt.keys.identify(request.headers.get("authorization"), metrics=True)


_PROBLEM: dict[str, Any] = {"content": {PROBLEM_CONTENT_TYPE: {}}}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_CLASSIFY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "image/jpeg": _BINARY,
            "image/png": _BINARY,
            "application/dicom": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": _BINARY["schema"],
                        **{
                            name: {"type": "string", "description": "as the query parameter"}
                            for name in REFERENCE_TYPES
                        },
                    },
                    "required": ["image"],
                }
            },
        },
    }
}

_CLASSIFY_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, **_PROBLEM}
    for code, desc in [
        (400, "Undecodable image or malformed body"),
        (401, "Missing or invalid API key"),
        (403, "API key not allowed here (a metrics-only key)"),
        (406, "No acceptable response format"),
        (408, "Upload too slow or too long (LESIONSERVE_BODY_*); the connection is closed"),
        (413, "Too many bytes or pixels"),
        (415, "Unsupported content type"),
        (422, "Image too small (LESIONSERVE_MIN_IMAGE_SIDE), or unlike the training data (OOD_POLICY=reject)"),
        (503, "Overloaded (queue, decode queue or uploads), warming up or shutting down (see Retry-After)"),
        (504, "Deadline passed"),
    ]
}

_REF_DOC = (
    "FHIR reference to {} for the FHIR answer (Accept: application/fhir+json), e.g. {}; relative or absolute. "
    "Also accepted as a multipart field. Checked (400 invalid-fhir-reference), never logged."
)

router = APIRouter()


CLASSIFY_ROUTE = "/v1/classify"


@router.post(
    CLASSIFY_ROUTE,
    response_model=ClassifyResponse,
    dependencies=[Depends(require_key)],
    openapi_extra=_CLASSIFY_BODY,
    responses=_CLASSIFY_ERRORS,
)
async def classify(
    request: Request,
    rt: RuntimeDep,
    explain: bool = False,
    explain_class: Annotated[
        str | None,
        Query(
            description="The class the heatmap explains (a class code; implies explain=true); default: the top class"
        ),
    ] = None,
    subject: Annotated[str | None, Query(description=_REF_DOC.format("the patient", "Patient/123"))] = None,
    based_on: Annotated[str | None, Query(description=_REF_DOC.format("the order", "ServiceRequest/456"))] = None,
    encounter: Annotated[str | None, Query(description=_REF_DOC.format("the encounter", "Encounter/789"))] = None,
) -> Response:
    """Classify one dermoscopic image: multipart field ``image`` or a raw JPEG, PNG or DICOM body.

    ``Accept: application/fhir+json`` answers a FHIR R4 DiagnosticReport instead of the JSON below;
    ``Accept: application/dicom`` a DICOM Comprehensive SR in the source's study (DICOM input only, else 406).
    ``?explain=true`` adds a class activation heatmap of the top class over the model's input.
    ``subject``, ``based_on``, ``encounter`` (query or multipart fields): FHIR references the DiagnosticReport carries.
    """
    start = time.perf_counter()
    render = pick_renderer(request.headers.get("accept"))  # 406 before any work is done
    declared = request.headers.get("content-length")
    async with rt.work(), ClientWatch(request.receive, rt.uploads, declared) as client:
        with tracing.span("upload read"):
            body = await client.read_body(rt.settings.max_upload_bytes)  # 408/413/499/503 (service.clients)
        deadline = time.monotonic() + rt.settings.request_timeout_s  # the upload had its own (body_timeout_s)
        request.state.upload = body  # the audit line keeps its sha256 and length, never the bytes
        upload = await read_upload(request.headers, body)
        decoder, data = upload.decoder, upload.data
        # Checked before any decode; they identify a patient, so they stay in this frame: no state, no log.
        references = fhir_references({"subject": subject, "based_on": based_on, "encounter": encounter}, upload.fields)
        if render is render_dicom_sr and decoder is not decode_dicom:
            raise NotAcceptable("a DICOM SR (Accept: application/dicom) answers a DICOM input only; send DICOM")
        decoded = await rt.decode(decoder, data, deadline)
        if decoded.dicom is not None:
            request.state.identifiers = decoded.dicom.identifiers
        prediction = await rt.predict(decoded, deadline)
        request.state.model_ref = rt.bound(prediction).ref()  # the audit line names the model that answered
        ood = ood_check(rt.bound(prediction).meta, prediction.extras)
        enforce(ood, rt.settings.ood_policy)  # LESIONSERVE_OOD_POLICY=reject: 422
        if explain_class is not None and explain_class not in rt.bound(prediction).meta.classes:
            raise BadRequest(f"explain_class {explain_class[:32]!r} is not one of the model's classes (GET /v1/models)")
        wanted = explain or explain_class is not None
        explanation = await rt.explain(decoded, prediction, deadline, explain_class) if wanted else None
    answer = build_answer(
        rt, request.state.request_id, decoded, prediction, time.perf_counter() - start, ood, explanation
    )
    count_answer(answer)
    request.state.answer = answer_summary(answer)  # the audit line says what was answered
    if render is render_dicom_sr:  # the SR needs the source header: built off the event loop
        return await run_in_threadpool(render_dicom_sr, answer, data)
    if render is render_fhir:
        return render_fhir(answer, references)
    return render(answer)


def count_answer(answer: ClassifyResponse) -> None:
    """Prediction counters, for every entry (REST, DIMSE, DICOMweb)."""
    metrics.PREDICTIONS_TOTAL.labels(class_code=answer.top.code).inc()
    if answer.malignancy.above_threshold:
        metrics.MALIGNANCY_FLAGGED_TOTAL.inc()


def answer_summary(answer: ClassifyResponse) -> dict[str, Any]:
    """What the audit line records of an answer: class code and two flags, nothing a patient could be found by."""
    ood = answer.ood.out_of_distribution if answer.ood is not None and answer.ood.available else None
    return {"top": answer.top.code, "malignant": answer.malignancy.above_threshold, "ood": ood}


def build_answer(
    rt: Runtime,
    request_id: str,
    decoded: DecodedImage,
    prediction: Prediction,
    total_s: float,
    ood: OodCheck,
    explanation: Explanation | None = None,
) -> ClassifyResponse:
    """The typed answer every renderer (JSON, FHIR) starts from; it quotes the model that made ``prediction``."""
    served = rt.bound(prediction)  # not rt.meta: a model swap may have happened since this request's decode
    ranked = rank(served.meta, prediction.probabilities)
    top = ranked[0].model_copy(update={"warning": OOD_WARNING}) if ood.out_of_distribution else ranked[0]
    return ClassifyResponse(
        request_id=request_id,
        model=ModelRef(**served.ref()),
        predictions=ranked,
        top=top,
        malignancy=malignancy(served.meta, prediction.probabilities, served.threshold),
        image=ImageInfo(width=decoded.width, height=decoded.height, format=decoded.format),
        timing_ms=Timing(
            decode=round(decoded.decode_s * 1000, 3),
            queue=round(prediction.queue_s * 1000, 3),
            inference=round(prediction.inference_s * 1000, 3),
            total=round(total_s * 1000, 3),
        ),
        batch_size=prediction.batch_size,
        dicom=decoded.dicom,
        ood=ood,
        explanation=explanation,
    )


@router.get("/v1/models", response_model=ModelsResponse, dependencies=[Depends(require_key)])
async def models(rt: RuntimeDep) -> ModelsResponse:
    """What is loaded: classes, input size, TTA, validation metrics and the provider in use."""
    served = rt.served  # one read: a swap between two reads would mix two models
    m = served.meta
    info = ModelInfo(
        name=m.name, version=m.version, sha256=served.model.sha256, precision=m.precision,
        quantization=asdict(m.quantization) if m.quantization else None,
        provider=served.model.provider, classes=m.classes,
        class_names={c: m.display_name(c) for c in m.classes}, malignant_classes=m.malignant_classes,
        malignancy_threshold=served.threshold, input_size=m.input_size, tta=m.tta, architecture=m.architecture,
        ensemble_size=m.ensemble_size, temperature=m.temperature, metrics=m.metrics, training_data=m.training_data,
        exported_at=m.exported_at, batch_sizes=rt.batcher.sizes, max_batch_size=rt.batcher.max_batch,
        max_wait_ms=rt.settings.max_wait_ms,
        ood=asdict(m.ood) if m.ood else None, cam=asdict(m.cam) if m.cam else None,
    )  # fmt: skip
    return ModelsResponse(service_version=SERVICE_VERSION, models=[info])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Alive: the process answers (says nothing about the model)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"description": "Warming up or draining"}})
async def readyz(rt: RuntimeDep, response: Response) -> Health:
    """Ready: the model is loaded and warmed up, and the process is not draining."""
    if rt.draining:
        response.status_code = 503
        return Health(status="draining")
    if not rt.ready.is_set():
        response.status_code = 503
        return Health(status="warm-up failed" if rt.warm_up_error else "warming up")
    if not rt.audit_writable():  # AUDIT_ON_FAILURE=closed: the balancer sends no work here meanwhile
        response.status_code = 503
        return Health(status="audit not writable")
    return Health(status="ready")


@router.get("/metrics", dependencies=[Depends(require_metrics_key)], include_in_schema=False)
async def prometheus_metrics(rt: RuntimeDep) -> Response:
    metrics.QUEUE_DEPTH.set(rt.batcher.depth())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
