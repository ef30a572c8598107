"""The page at ``/`` and its files, shipped inside this package: no build step, no CDN.

A hospital network often has no internet, and a clinical system should run no third party's script,
so every file the page needs comes from this process. The Content-Security-Policy allows scripts and
styles from this origin only (the page has no inline script, no inline style, no ``style`` attribute;
bar widths are set through the CSSOM, which CSP does not restrict) and images from this origin or
``data:`` (the model-input crop and heatmap come back as base64 PNGs in the JSON answer) or ``blob:`` (the
user's own JPEG or PNG, shown whole from memory with the model's crop drawn on it; it never leaves the tab
again). URLs in the
page are relative, so it also works behind a reverse proxy that mounts the service under a prefix.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.exceptions import HTTPException

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on each load: after an upgrade the page and its script must not come from two versions.
    "Cache-Control": "no-cache",
}
INDEX = "index.html"
# The only files served under /ui/: a fixed table, so no request path ever reaches the file system.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def install_ui(app: FastAPI) -> None:
    """Serve ``/`` (the page) and ``/ui/<file>``; the files are read once, here."""
    index = _read(INDEX)
    assets = {name: (_read(name), media_type) for name, media_type in ASSETS.items()}

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(index, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, "not one of the page's files")
        body, media_type = assets[name]
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)
