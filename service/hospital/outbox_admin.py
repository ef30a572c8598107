"""The outbox's admin API (the same admin API keys as the model reload): inspect, retry and drop dead letters.

- ``GET /v1/admin/outbox``: counts (pending, dead, delivered within the retention), bytes held, the oldest
  pending SR's age, the caps.
- ``GET /v1/admin/outbox/letters?state=dead|pending|delivered``: the letters, oldest first, without their SR
  bytes: id, SR SOP Instance UID, destination, attempts, times, the reason and the last error (PHI-free).
- ``POST /v1/admin/outbox/retry`` and ``POST /v1/admin/outbox/drop`` with ``{"ids": [...]}`` or
  ``{"all": true}``: dead letters back to pending (due now, attempts reset), or deleted. A pending letter is
  never dropped: that would be the silent loss the outbox exists to prevent.

501 ``not-configured`` when this server has no outbox. Each retry or drop writes an audit line (key id, count).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, model_validator

from service.errors import PROBLEM_CONTENT_TYPE, NotConfigured
from service.hospital.delivery import OutboxSender
from service.hospital.outbox import Row
from service.routes import RuntimeDep
from service.swap.admin import require_admin

OUTBOX_ROUTE = "/v1/admin/outbox"
router = APIRouter(dependencies=[Depends(require_admin)])
_PROBLEM: dict[str, Any] = {"content": {PROBLEM_CONTENT_TYPE: {}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key", **_PROBLEM},
    403: {"description": "Not an admin key, or the admin API is off", **_PROBLEM},
    501: {"description": "This server has no outbox (no DIMSE, no DICOMWEB_PUSH_SR)", **_PROBLEM},
}


class OutboxSummary(BaseModel):
    path: str
    pending: int
    dead: int
    delivered: int = Field(description="Delivered SRs still listed (OUTBOX_RETENTION_S); their bytes are deleted")
    bytes: int = Field(description="Bytes of pending and dead SRs")
    oldest_pending_age_s: float | None
    max_items: int
    max_bytes: int


class LetterView(BaseModel):
    id: int
    sr_sop_instance_uid: str
    destination: str = Field(description="dimse or stow-rs")
    address: str = Field(description="AE@host:port or the DICOMweb URL it was written for")
    state: str
    bytes: int
    request_id: str = Field(description="The request that made it: its audit lines carry the same id")
    created_at: float
    next_attempt_at: float | None
    attempts: int
    done_at: float | None
    reason: str | None = Field(description="A dead letter's reason: refused, attempts, age")
    last_error: str | None


class Selection(BaseModel):
    ids: list[int] | None = Field(None, max_length=10_000)
    all: bool = False

    @model_validator(mode="after")
    def _one(self) -> Selection:
        if (self.ids is None) == (not self.all):
            raise ValueError("give either ids or all: true")
        return self


class Changed(BaseModel):
    count: int


def _outbox(request: Request) -> OutboxSender:
    outbox: OutboxSender | None = getattr(request.app.state, "outbox", None)
    if outbox is None:
        raise NotConfigured("this server has no SR outbox (LESIONSERVE_DIMSE_ENABLED or LESIONSERVE_DICOMWEB_PUSH_SR)")
    return outbox


@router.get(OUTBOX_ROUTE, response_model=OutboxSummary, responses=_RESPONSES)
async def outbox_summary(request: Request, rt: RuntimeDep) -> OutboxSummary:
    """How many SRs wait for the PACS, how many were given up on, and the oldest one's age."""
    outbox = _outbox(request)
    s = await asyncio.to_thread(outbox.outbox.stats)
    age = None if s.oldest_pending_at is None else round(max(0.0, time.time() - s.oldest_pending_at), 3)
    return OutboxSummary(
        path=str(rt.settings.outbox_path), pending=s.pending, dead=s.dead, delivered=s.delivered, bytes=s.bytes,
        oldest_pending_age_s=age, max_items=rt.settings.outbox_max_items, max_bytes=rt.settings.outbox_max_bytes,
    )  # fmt: skip


@router.get(OUTBOX_ROUTE + "/letters", response_model=list[LetterView], responses=_RESPONSES)
async def outbox_letters(
    request: Request,
    state: Literal["dead", "pending", "delivered"] = "dead",
    limit: int = Query(100, ge=1, le=10_000),
) -> list[LetterView]:
    """The letters in one state, oldest first (dead letters by default)."""
    rows = await asyncio.to_thread(_outbox(request).outbox.letters, state, limit)
    return [_view(r) for r in rows]


def _view(r: Row) -> LetterView:
    return LetterView(
        id=r.id, sr_sop_instance_uid=r.sr_uid, destination=r.kind, address=r.destination, state=r.state,
        bytes=r.size, request_id=r.request_id, created_at=r.created_at,
        next_attempt_at=r.next_at if r.state == "pending" else None, attempts=r.attempts, done_at=r.done_at,
        reason=r.reason, last_error=r.error,
    )  # fmt: skip


@router.post(OUTBOX_ROUTE + "/retry", response_model=Changed, responses=_RESPONSES)
async def outbox_retry(request: Request, rt: RuntimeDep, body: Selection) -> Changed:
    """Dead letters back to pending, due now, with a fresh attempt count and age (after fixing the PACS)."""
    outbox = _outbox(request)
    count = await asyncio.to_thread(outbox.outbox.requeue, None if body.all else body.ids, time.time())
    outbox.refresh_gauges()
    outbox.wake()
    _audit(request, rt, "retry", count)
    return Changed(count=count)


@router.post(OUTBOX_ROUTE + "/drop", response_model=Changed, responses=_RESPONSES)
async def outbox_drop(request: Request, rt: RuntimeDep, body: Selection) -> Changed:
    """Delete dead letters: their SRs will never reach the PACS (the images can be sent again)."""
    outbox = _outbox(request)
    count = await asyncio.to_thread(outbox.outbox.drop, None if body.all else body.ids)
    outbox.refresh_gauges()
    _audit(request, rt, "drop", count)
    return Changed(count=count)


def _audit(request: Request, rt: RuntimeDep, action: str, count: int) -> None:
    if rt.audit is None:
        return
    rt.audit.record(
        request_id=request.state.request_id, key_id=getattr(request.state, "key_id", None), model=None, body=None,
        content_type=None, status=200, problem_type=None, latency_ms=0.0,
        channel={"entry": "outbox-admin", "action": action, "count": str(count)},
    )  # fmt: skip
