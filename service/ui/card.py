"""``GET /v1/models/card``: the loaded model's card, as Markdown or as HTML rendered here.

``python -m export`` writes the card beside the model file (``NAME.onnx`` -> ``NAME.md``); the ONNX
metadata holds the facts, the card holds what a clinician must read (intended use, limitations,
held-out figures). It is read from disk on each request, so it follows the file being served, and it
is refused when its title names another model or version than the one loaded: a stale card next to a
replaced model would show the wrong limitations.
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from service.errors import ServiceError
from service.media import _offers
from service.routes import RuntimeDep, require_key
from service.runtime import Runtime
from service.ui.markdown import render
from service.ui.static import SECURITY_HEADERS

CARD_ROUTE = "/v1/models/card"
MAX_CARD_BYTES = 1024 * 1024  # a card is tens of kB; a bigger file beside the model is not a card
MARKDOWN = "text/markdown; charset=utf-8"
_TITLE = re.compile(r"^#\s+Model card:\s*(.+?)\s*$", re.MULTILINE)


class CardNotFound(ServiceError):
    status, slug, title = 404, "card-not-found", "No model card for the loaded model"


def card_path(rt: Runtime) -> Path:
    """Where the loaded model's card is: beside its ``.onnx`` file, same stem, ``.md``."""
    model_path = getattr(rt.model, "path", None) or rt.settings.model_path  # a swapped-in model knows its path
    return Path(model_path).with_suffix(".md")


def read_card(rt: Runtime) -> str:
    """The card's Markdown, checked to be the loaded model's.

    Raises:
        CardNotFound: no card, unreadable, too big, or for another model/version (404).
    """
    path = card_path(rt)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CARD_BYTES + 1)
    except OSError:
        raise CardNotFound(
            f"no model card beside the model file (looked for {path.name}); python -m export writes it"
        ) from None
    if len(data) > MAX_CARD_BYTES:
        raise CardNotFound(f"{path.name} is over {MAX_CARD_BYTES} bytes; not served as a model card")
    text = data.decode("utf-8", errors="replace")
    want = f"{rt.meta.name} {rt.meta.version}"
    title = _TITLE.search(text)
    if title is None or title[1] != want:
        found = title[1] if title else "no '# Model card: NAME VERSION' title"
        raise CardNotFound(f"{path.name} is not the card of the loaded model {want!r} (it says: {found!r})")
    return text


def wants_html(accept: str | None) -> bool:
    """HTML when the client prefers ``text/html`` (a browser following a link); Markdown otherwise."""
    for offer in _offers(accept or ""):
        if offer.q <= 0:
            continue
        return offer.media_type == "text/html"
    return False


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Model card: {title}</title>
<link rel="stylesheet" href="../../ui/app.css">
</head>
<body>
<main id="card" class="card">
{body}
</main>
</body>
</html>
"""

router = APIRouter()


@router.get(
    CARD_ROUTE,
    dependencies=[Depends(require_key)],
    responses={
        200: {"content": {"text/markdown": {}, "text/html": {}}, "description": "The card (Accept: text/html: HTML)"},
        401: {"description": "Missing or invalid API key"},
        404: {"description": "No card beside the model file, or one for another model"},
    },
)
def model_card(request: Request, rt: RuntimeDep) -> Response:
    """The loaded model's card: what it is for, its classes, validation, limitations.

    ``text/markdown`` by default; with ``Accept: text/html`` a page rendered here (a safe Markdown
    subset: the card's text is escaped, raw HTML in it is shown, never run).
    """
    text = read_card(rt)
    if not wants_html(request.headers.get("accept")):
        return Response(text, media_type=MARKDOWN, headers=SECURITY_HEADERS)
    page = _PAGE.format(title=escape(f"{rt.meta.name} {rt.meta.version}"), body=render(text))
    return HTMLResponse(page, headers=SECURITY_HEADERS)
