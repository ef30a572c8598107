"""HTTP routes: thin; the work is in :mod:`service.runtime`, :mod:`service.media` and the batcher."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.batcher import Prediction
from service.clients import ClientWatch
from service.errors import PROBLEM_CONTENT_TYPE, NotAcceptable
from service.explain import OOD_WARNING, enforce, ood_check
from service.hospital.dicom import decode_dicom
from service.imaging import DecodedImage
from service.media import pick_decoder, pick_renderer, render_dicom_sr
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


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def require_key(request: Request, rt: RuntimeDep) -> None:
    request.state.key_id = rt.keys.identify(request.headers.get("authorization"))


def require_metrics_key(request: Request, rt: RuntimeDep) -> None:
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
                "schema": {"type": "object", "properties": {"image": _BINARY["schema"]}, "required": ["image"]}
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
        (422, "The image looks unlike the training data (LESIONSERVE_OOD_POLICY=reject)"),
        (503, "Overloaded (queue, decode queue or uploads), warming up or shutting down (see Retry-After)"),
        (504, "Deadline passed"),
    ]
}

router = APIRouter()


CLASSIFY_ROUTE = "/v1/classify"


@router.post(
    CLASSIFY_ROUTE,
    response_model=ClassifyResponse,
    dependencies=[Depends(require_key)],
    openapi_extra=_CLASSIFY_BODY,
    responses=_CLASSIFY_ERRORS,
)
async def classify(request: Request, rt: RuntimeDep, explain: bool = False) -> Response:
    """Classify one dermoscopic image: multipart field ``image`` or a raw JPEG, PNG or DICOM body.

    ``Accept: application/fhir+json`` answers a FHIR R4 DiagnosticReport instead of the JSON below;
    ``Accept: application/dicom`` a DICOM Comprehensive SR in the source's study (DICOM input only, else 406).
    ``?explain=true`` adds a class activation heatmap of the top class over the model's input.
    """
    start = time.perf_counter()
    render = pick_renderer(request.headers.get("accept"))  # 406 before any work is done
    declared = request.headers.get("content-length")
    async with rt.work(), ClientWatch(request.receive, rt.uploads, declared) as client:
        body = await client.read_body(rt.settings.max_upload_bytes)  # 408/413/499/503 (service.clients)
        deadline = time.monotonic() + rt.settings.request_timeout_s  # the upload had its own (body_timeout_s)
        request.state.upload = body  # the audit line keeps its sha256 and length, never the bytes
        decoder, data = await pick_decoder(request.headers, body)
        if render is render_dicom_sr and decoder is not decode_dicom:
            raise NotAcceptable("a DICOM SR (Accept: application/dicom) answers a DICOM input only; send DICOM")
        decoded = await rt.decode(decoder, data, deadline)
        if decoded.dicom is not None:
            request.state.identifiers = decoded.dicom.identifiers
        prediction = await rt.predict(decoded, deadline)
        request.state.model_ref = rt.bound(prediction).ref()  # the audit line names the model that answered
        ood = ood_check(rt.bound(prediction).meta, prediction.extras)
        enforce(ood, rt.settings.ood_policy)  # LESIONSERVE_OOD_POLICY=reject: 422
        explanation = await rt.explain(decoded, prediction, deadline) if explain else None
    answer = build_answer(
        rt, request.state.request_id, decoded, prediction, time.perf_counter() - start, ood, explanation
    )
    count_answer(answer)
    if render is render_dicom_sr:  # the SR needs the source header: built off the event loop
        return await run_in_threadpool(render_dicom_sr, answer, data)
    return render(answer)


def count_answer(answer: ClassifyResponse) -> None:
    """Prediction counters, for every entry (REST, DIMSE, DICOMweb)."""
    metrics.PREDICTIONS_TOTAL.labels(class_code=answer.top.code).inc()
    if answer.malignancy.above_threshold:
        metrics.MALIGNANCY_FLAGGED_TOTAL.inc()


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
    return ModelsResponse(models=[info])


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
    return Health(status="ready")


@router.get("/metrics", dependencies=[Depends(require_metrics_key)], include_in_schema=False)
async def prometheus_metrics(rt: RuntimeDep) -> Response:
    metrics.QUEUE_DEPTH.set(rt.batcher.depth())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
