"""``/docs``: Swagger UI from the installed ``swagger-ui-bundle-v2`` package, under a strict CSP.

FastAPI's default page loads Swagger UI's JavaScript and CSS from a public CDN: on a hospital
network without internet the page is blank, and it runs a third party's script on a clinical
system. Here every file comes from this process (the package's vendored Swagger UI), the page has
no inline script, and its Content-Security-Policy allows scripts from this origin only. ReDoc
(which would load from a CDN as well) is off. URLs are relative, so the page also works behind a
reverse proxy that mounts the service under a prefix.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS = "/docs"
ASSETS = "/docs/assets"
# Swagger UI sets inline style attributes and draws icons as data: images; nothing else is allowed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{title} - API</title>
  <link rel="stylesheet" href="docs/assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/assets/swagger-ui-bundle.js"></script>
  <script src="docs/init.js"></script>
</body>
</html>
"""
_INIT = """window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
"""


def install_docs(app: FastAPI, title: str) -> None:
    """Serve the page, its start-up script and the package's files (the app has ``docs_url=None``)."""
    page = _PAGE.format(title=title)

    @app.get(DOCS, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page, headers=_HEADERS)

    @app.get(DOCS + "/init.js", include_in_schema=False)
    async def docs_init() -> Response:
        return Response(_INIT, media_type="text/javascript", headers=_HEADERS)

    app.mount(ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")
