"""Regenerate docs/overview.md's example answers (between ``<!-- examples:start/end -->``) from the bundled model.

``.venv/bin/python models/readme_examples.py``: runs the real app in-process on ``models/reference.onnx``
(CPU provider) and replaces, in order, the four JSON blocks of that section: a JPEG answer,
a DICOM answer (ranked predictions left out), the FHIR DiagnosticReport, and a problem+json
refusal. The sentence before the first block names the model from its own metadata.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings

REPO = Path(__file__).resolve().parents[1]
README = REPO / "docs" / "overview.md"  # the README shows a shortened copy of the first answer
MODEL = REPO / "models" / "reference.onnx"
JPEG = REPO / "tests" / "data" / "isic" / "melanoma" / "ISIC_0000160.jpg"
DICOM = REPO / "tests" / "data" / "dicom" / "ISIC_0000030_dermoscopic.dcm"
START, END = "<!-- examples:start -->", "<!-- examples:end -->"


def answers() -> tuple[dict, list[dict]]:
    settings = Settings(model_path=MODEL, providers="CPUExecutionProvider", log_format="text", audit_log="off")
    with TestClient(create_app(settings)) as c:
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        info = c.get("/v1/models").json()["models"][0]
        c.post("/v1/classify", content=JPEG.read_bytes(), headers={"content-type": "image/jpeg"})  # warm caches
        jpeg = c.post("/v1/classify", content=JPEG.read_bytes(), headers={"content-type": "image/jpeg"}).json()
        dcm = c.post("/v1/classify", content=DICOM.read_bytes(), headers={"content-type": "application/dicom"}).json()
        for k in ("predictions", "batch_size"):
            dcm.pop(k, None)
        fhir = c.post(
            "/v1/classify",
            content=DICOM.read_bytes(),
            headers={"content-type": "application/dicom", "accept": "application/fhir+json"},
        ).json()
        problem = c.post("/v1/classify", content=b"hello", headers={"content-type": "text/plain"}).json()
    return info, [jpeg, dcm, fhir, problem]


def main() -> int:
    info, blocks = answers()
    text = README.read_text()
    head, rest = text.split(START, 1)
    section, tail = rest.split(END, 1)
    parts = re.split(r"(```json\n.*?\n```)", section, flags=re.S)
    slots = [i for i, p in enumerate(parts) if p.startswith("```json")]
    if len(slots) != len(blocks):
        print(
            f"expected {len(blocks)} JSON blocks in the examples of {README.name}, found {len(slots)}", file=sys.stderr
        )
        return 1
    for i, block in zip(slots, blocks, strict=True):
        parts[i] = "```json\n" + json.dumps(block, indent=2) + "\n```"
    archs = info["architecture"] if isinstance(info.get("architecture"), list) else [info.get("architecture")]
    what = archs[0] if len(archs) == 1 else f"an ensemble of {', '.join(archs)}"
    views = len(info.get("tta", []))
    parts[0] = re.sub(
        r"A real answer of the bundled model \(.*?\):",
        f"A real answer of the bundled model (`models/reference.onnx`, {what} at {info['input_size']} px with"
        f" {views} TTA view{'s' if views != 1 else ''},\non this 2-core CPU; the request id and timings change per call):",
        parts[0],
        flags=re.S,
    )
    README.write_text(head + START + "".join(parts) + END + tail)
    print(f"{README.name} examples regenerated from {info['name']} {info['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
