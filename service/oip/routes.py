"""OIP v2 REST routes on the same runtime as ``/v1/classify``: one batcher, one set of limits, auth, metrics, audit.

Each image of an ``infer`` request is decoded and queued on its own, so the N images of one request meet in
the batcher like N ``/v1/classify`` calls. An image that fails for its own reason (undecodable, too large,
refused as out-of-distribution) fails alone: its row of ``probabilities`` is NaN and the ``error`` output
says why, the others are answered. When every image fails, or the server cannot take the work (503, 504),
the request fails as a whole with the protocol's ``{"error": ...}`` body (:mod:`service.errors`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.clients import ClientWatch
from service.errors import BadRequest, ModelNotFound, ServiceError
from service.explain import enforce, ood_check
from service.hospital.dicom import decode_dicom, is_dicom
from service.imaging import decode_image
from service.oip.tensors import INPUT, encode_response, parse_request
from service.routes import RuntimeDep, answer_summary, build_answer, count_answer, require_key
from service.runtime import Runtime, Served
from service.schemas import ClassifyResponse

INFER_ROUTE = "/v2/models/{model_name}/infer"
INFER_VERSION_ROUTE = "/v2/models/{model_name}/versions/{model_version}/infer"
PROBABILITIES, MALIGNANCY, OOD, ERROR = "probabilities", "malignancy_score", "ood_score", "error"
HEADER_LENGTH = "Inference-Header-Content-Length"

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])


def path_name(rt: Runtime, served: Served) -> str:
    # KServe routes /v2/models/<InferenceService name>/...: LESIONSERVE_SERVED_MODEL_NAME lets the paths use that name.
    return rt.settings.served_model_name or served.meta.name


def served_model(rt: Runtime, name: str, version: str | None) -> Served:
    """The loaded model if the path names it (and its version, when given); else 404."""
    served = rt.served
    if name != path_name(rt, served) or version not in (None, served.meta.version):
        loaded = f"{path_name(rt, served)} version {served.meta.version}"
        asked = name if version is None else f"{name} version {version}"
        raise ModelNotFound(f"no model {asked!r} is loaded here; this server serves {loaded}")
    return served


def output_names(served: Served) -> list[str]:
    return [PROBABILITIES, MALIGNANCY, *([OOD] if served.meta.ood else []), ERROR]


@router.get("")
async def server_metadata(rt: RuntimeDep) -> dict[str, Any]:
    return {"name": "lesionserve", "version": rt.served.meta.version, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


def _ready(rt: Runtime) -> bool:
    return rt.ready.is_set() and not rt.draining


@router.get("/health/ready")
async def ready(rt: RuntimeDep) -> Response:
    return JSONResponse({"ready": _ready(rt)}, status_code=200 if _ready(rt) else 503)


@router.get("/models/{model_name}/ready")
@router.get("/models/{model_name}/versions/{model_version}/ready")
async def model_ready(rt: RuntimeDep, model_name: str, model_version: str | None = None) -> Response:
    served = served_model(rt, model_name, model_version)
    ok = _ready(rt)
    return JSONResponse({"name": path_name(rt, served), "ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{model_name}", dependencies=[Depends(require_key)])
@router.get("/models/{model_name}/versions/{model_version}", dependencies=[Depends(require_key)])
async def model_metadata(rt: RuntimeDep, model_name: str, model_version: str | None = None) -> dict[str, Any]:
    served = served_model(rt, model_name, model_version)
    k = len(served.meta.classes)
    outputs = [
        {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, k]},
        {"name": MALIGNANCY, "datatype": "FP32", "shape": [-1]},
        *([{"name": OOD, "datatype": "FP32", "shape": [-1]}] if served.meta.ood else []),
        {"name": ERROR, "datatype": "BYTES", "shape": [-1]},
    ]
    return {
        "name": path_name(rt, served),
        "versions": [served.meta.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": outputs,
        # Not in the protocol's schema but allowed beside it: what column j of probabilities means.
        "parameters": {"classes": served.meta.classes, "malignant_classes": served.meta.malignant_classes},
    }


async def _one(rt: Runtime, request_id: str, data: bytes, deadline: float) -> ClassifyResponse:
    start = time.perf_counter()
    decoder = decode_dicom if is_dicom(data) else decode_image  # the image decoder sniffs JPEG and PNG
    decoded = await rt.decode(decoder, data, deadline)
    prediction = await rt.predict(decoded, deadline)
    ood = ood_check(rt.bound(prediction).meta, prediction.extras)
    enforce(ood, rt.settings.ood_policy)
    answer = build_answer(rt, request_id, decoded, prediction, time.perf_counter() - start, ood)
    count_answer(answer)
    return answer


@router.post("/models/{model_name}/infer", dependencies=[Depends(require_key)])
@router.post("/models/{model_name}/versions/{model_version}/infer", dependencies=[Depends(require_key)])
async def infer(request: Request, rt: RuntimeDep, model_name: str, model_version: str | None = None) -> Response:
    """Classify N images sent as one BYTES input ``image`` of shape [N] (JSON: base64; binary: raw bytes)."""
    served = served_model(rt, model_name, model_version)
    declared = request.headers.get("content-length")
    async with rt.work(), ClientWatch(request.receive, rt.uploads, declared) as client:
        body = await client.read_body(rt.settings.max_upload_bytes)
        deadline = time.monotonic() + rt.settings.request_timeout_s
        request.state.upload = body  # the audit line keeps its sha256 and length, never the bytes
        parsed = parse_request(body, request.headers.get(HEADER_LENGTH), rt.settings.queue_size)
        unknown = sorted(set(parsed.outputs or ()) - set(output_names(served)))
        if unknown:
            raise BadRequest(f"unknown output {unknown[0]!r}; this model has {', '.join(output_names(served))}")
        request_id = request.state.request_id
        results = await asyncio.gather(
            *(_one(rt, request_id, data, deadline) for data in parsed.images), return_exceptions=True
        )
    answers = [r for r in results if isinstance(r, ClassifyResponse)]
    for r in results:  # the server's own trouble (overload, deadline, shutdown) fails the request as a whole
        if isinstance(r, ServiceError) and r.status >= 500:
            raise r
        if isinstance(r, BaseException) and not isinstance(r, ServiceError):
            raise r  # a real fault: the middleware logs it once and answers 500
    if not answers:  # nothing to answer: the first image's status, every image's reason
        first = results[0]
        assert isinstance(first, ServiceError)  # the loop above raised every other kind
        first.detail = _all_failed(results)
        raise first
    request.state.model_ref = answers[0].model.model_dump()  # the audit line names the model that answered
    if len(results) == 1:  # the audit line has room for one image's answer and identifiers
        request.state.answer = answer_summary(answers[0])
        if answers[0].dicom is not None:
            request.state.identifiers = answers[0].dicom.identifiers
    return _respond(path_name(rt, served), served, parsed.request_id, parsed.outputs, parsed.binary, results)


def _all_failed(results: list[Any]) -> str:
    return "; ".join(f"image {i}: {r.detail}" for i, r in enumerate(results))


def _respond(
    name: str, served: Served, request_id: str | None, asked: list[str] | None, binary: set[str], results: list[Any]
) -> Response:
    k = len(served.meta.classes)
    n = len(results)
    probs = np.full((n, k), np.nan, dtype=np.float32)
    malignancy = np.full(n, np.nan, dtype=np.float32)
    ood = np.full(n, np.nan, dtype=np.float32)
    errors = [""] * n
    for i, r in enumerate(results):
        if isinstance(r, ClassifyResponse):
            by_code = {p.code: p.probability for p in r.predictions}
            probs[i] = [by_code[c] for c in served.meta.classes]
            malignancy[i] = r.malignancy.score
            ood[i] = r.ood.score if r.ood is not None and r.ood.score is not None else np.nan
        else:
            errors[i] = r.detail
    tensors: dict[str, np.ndarray | list[str]] = {PROBABILITIES: probs, MALIGNANCY: malignancy, OOD: ood, ERROR: errors}
    names = asked if asked is not None else output_names(served)
    head = {"model_name": name, "model_version": served.meta.version, "id": request_id or ""}
    body, header_length = encode_response(head, {name: tensors[name] for name in names}, binary)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})
