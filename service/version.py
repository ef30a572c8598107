"""The service's own version: the installed ``lesionserve`` distribution's (pyproject.toml ``version``).

Distinct from the model's version (``lesionserve.version`` in the .onnx file): an answer is the work of
both, so the audit trail, ``/v1/models``, the OpenAPI document, the SR (SoftwareVersions) and the FHIR
Device name each of them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SERVICE_NAME = "lesionserve"


def _installed() -> str:
    try:
        return version(SERVICE_NAME)
    except PackageNotFoundError:  # run from a source tree that was never pip-installed: say so, never guess
        return "0+unknown"


SERVICE_VERSION = _installed()
