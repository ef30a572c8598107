"""The plain FastAPI implementation the service is measured against: PIL decode, one ONNX
Runtime call per request, no batching, default ORT threads. Deliberately naive.

    python -m service.bench.baseline MODEL.onnx PORT
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool


def create_baseline_app(model_path: str) -> FastAPI:
    """One session, one ``run`` per request from FastAPI's thread pool.

    Args:
        model_path: a contract-following .onnx file (only its input size is read).
    """
    from PIL import Image  # dev extra only: the bench is not part of the serving image

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    size = int(json.loads(session.get_modelmeta().custom_metadata_map["lesionserve.input_size"]))
    classes = json.loads(session.get_modelmeta().custom_metadata_map["lesionserve.classes"])
    app = FastAPI()

    def predict(data: bytes) -> dict[str, float]:
        import io

        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BOX)
        probs = session.run(None, {"image": np.asarray(img, dtype=np.uint8)[None]})[0][0]
        return {c: float(p) for c, p in zip(classes, probs, strict=True)}

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, float]:
        return await run_in_threadpool(predict, await request.body())

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    uvicorn.run(create_baseline_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
