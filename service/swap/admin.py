"""``POST /v1/admin/models/reload``: swap the model while serving (admin API keys only).

Off unless ``LESIONSERVE_ADMIN_KEY_IDS`` names at least one API key id: then only those keys may
call it (401 without a valid key, 403 with another one). The reload runs in a worker thread and
the answer says what happened: 200 with the old and new model, or a problem+json naming the failed
check (422 ``model-rejected``, 400 ``model-path-refused``, 409 ``reload-in-progress``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from service.errors import PROBLEM_CONTENT_TYPE, Forbidden
from service.routes import RuntimeDep
from service.schemas import ModelRef
from service.swap.reloader import Reloader

RELOAD_ROUTE = "/v1/admin/models/reload"


class ReloadRequest(BaseModel):
    path: str | None = Field(
        None, description="An .onnx file in the models folder (relative to it, or absolute); default: the current file."
    )
    force: bool = Field(False, description="Accept a changed class list, input size, malignant classes or provider.")


class CanaryResult(BaseModel):
    images: int
    top_class_changed: int | None = Field(description="Canary images whose top class differs from the old model's.")


class ReloadResponse(BaseModel):
    result: str = Field(description="success, or unchanged (the file has the serving model's sha256)")
    model: ModelRef = Field(description="The model serving from now on.")
    previous: ModelRef | None = None
    path: str
    trigger: str
    seconds: float
    forced_changes: list[str] = Field(default_factory=list)
    canary: CanaryResult | None = None
    step_seconds: dict[str, float] = Field(
        default_factory=dict, description="load, warm_up (every batch shape) and canary, each run between two batches"
    )


async def require_admin(request: Request, rt: RuntimeDep) -> None:
    admins = rt.settings.admin_ids
    if not admins:
        raise Forbidden("the admin API is off: set LESIONSERVE_ADMIN_KEY_IDS to the key ids allowed to use it")
    key_id = rt.keys.identify(request.headers.get("authorization"))  # 401 without a valid key
    request.state.key_id = key_id
    if key_id not in admins:
        raise Forbidden(f"API key {key_id!r} is not an admin key")


_PROBLEM: dict[str, Any] = {"content": {PROBLEM_CONTENT_TYPE: {}}}
router = APIRouter()


@router.post(
    RELOAD_ROUTE,
    response_model=ReloadResponse,
    dependencies=[Depends(require_admin)],
    responses={
        code: {"description": desc, **_PROBLEM}
        for code, desc in [
            (400, "The path is not an .onnx file in the models folder (check: path)"),
            (401, "Missing or invalid API key"),
            (403, "Not an admin key, or the admin API is off"),
            (409, "Another reload is running"),
            (422, "The new model failed a check (check: load, contract, warm_up or canary); the old one serves on"),
            (503, "Warming up or draining"),
        ]
    },
)
async def reload_model(request: Request, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load a model file beside the serving one, check it, warm it up, run the canary images, then switch.

    Requests keep being answered throughout; each is answered wholly by one model (its ``model.sha256``
    says which). Any failed check leaves the serving model as it was.
    """
    reloader: Reloader = request.app.state.reloader
    body = body or ReloadRequest()
    result = await asyncio.to_thread(reloader.reload, body.path, force=body.force, trigger="api")
    return ReloadResponse(**result)
