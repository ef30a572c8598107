"""What an answer says about how far to trust it: the out-of-distribution check and the class activation heatmap.

Both read optional outputs of the model file (``ood_score``, ``cam``; see :mod:`service.contract`). A file
without them still serves: the answer then says the check or the map is unavailable. The heatmap is drawn
with OpenCV in the decode pool (:meth:`service.runtime.Runtime.explain`), never on the event loop.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

import cv2
import numpy as np

from service import metrics
from service.contract import CAM_OUTPUT, OOD_OUTPUT, ModelMetadata
from service.errors import OutOfDistribution
from service.schemas import Explanation, OodCheck

OOD_WARNING = (
    "This image looks unlike the dermoscopic images the model was trained on; the classification may be"
    " meaningless. Check that it is a dermoscopic image of one skin lesion."
)
NO_OOD = "this model file has no out-of-distribution output (ood_score): the check is unavailable"
NO_CAM = "this model file has no class activation map output (cam): no heatmap is available"
HEATMAP_ALPHA = 0.45  # weight of the colour map over the image


def ood_check(meta: ModelMetadata, extras: Mapping[str, np.ndarray]) -> OodCheck:
    """The answer's ``ood`` field from this image's ``ood_score`` (unavailable without one)."""
    score = extras.get(OOD_OUTPUT)
    if meta.ood is None or score is None:
        return OodCheck(available=False, detail=NO_OOD)
    value = float(np.asarray(score).reshape(()))
    return OodCheck(
        available=True,
        score=value,
        threshold=meta.ood.threshold,
        out_of_distribution=bool(value > meta.ood.threshold),
        method=meta.ood.method,
    )


def enforce(check: OodCheck, policy: str) -> None:
    """Count the check (drift metrics); with ``policy`` ``reject`` a flagged image is refused (422).

    Raises:
        OutOfDistribution: flagged and ``policy == "reject"``.
    """
    if not check.available:
        return
    metrics.OOD_CHECKED_TOTAL.inc()
    if not check.out_of_distribution:
        return
    metrics.OOD_FLAGGED_TOTAL.inc()
    if policy == "reject":
        raise OutOfDistribution(
            f"the image looks unlike the training data (out-of-distribution score {check.score:.4g} above the"
            f" threshold {check.threshold:.4g}, {check.method}); it was not classified."
            " Send a dermoscopic image of one skin lesion."
        )


def render_heatmap(pixels: np.ndarray, cam: np.ndarray, alpha: float = HEATMAP_ALPHA) -> bytes:
    """PNG of a class activation map blended over the model's input.

    Args:
        pixels: ``(S, S, 3)`` uint8 RGB, the centre-cropped, resized image the model saw.
        cam: ``(h, w)`` float map of one class; scaled to [0, 1] (min to max), resized to S x S.
        alpha: weight of the colour map.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or cam.ndim != 2:
        raise ValueError(f"expected (S, S, 3) pixels and an (h, w) map, got {pixels.shape} and {cam.shape}")
    m = cam.astype(np.float32) - float(cam.min())
    m /= max(float(m.max()), 1e-12)
    side = pixels.shape[1], pixels.shape[0]
    # INTER_LINEAR maps cell centres onto the pixel centres they cover: the map stays aligned with the input.
    up = np.clip(cv2.resize(m, side, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    colour = cv2.applyColorMap(np.round(up * 255).astype(np.uint8), cv2.COLORMAP_JET)  # BGR
    blend = cv2.addWeighted(cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), 1.0 - alpha, colour, alpha, 0.0)
    return _png(blend)


def _png(bgr: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("OpenCV could not encode the image")
    return png.tobytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def explanation(
    meta: ModelMetadata,
    pixels: np.ndarray,
    probabilities: np.ndarray,
    extras: Mapping[str, np.ndarray],
    class_code: str | None = None,
) -> Explanation:
    """The answer's ``explanation``: one class's map over the input (runs in the decode pool).

    ``class_code`` picks the class (one of ``meta.classes``, checked by the caller); None: the top class. A
    clinician compares the evidence for the classes that compete (the page's selector), not only the winner's.

    The input itself comes too, with or without a map: it is what the model saw (EXIF orientation,
    DICOM photometric handling, crop and ``INTER_AREA`` resize applied here), which a client could only
    approximate, and a browser cannot decode DICOM at all. At 128 x 128: ~29 kB of PNG, ~4 ms to encode (measured).
    """
    seen = Explanation(
        available=False,
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        input_png_base64=_b64(_png(cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))),
    )
    cam = extras.get(CAM_OUTPUT)
    if meta.cam is None or cam is None:
        return seen.model_copy(update={"detail": NO_CAM})
    index = meta.classes.index(class_code) if class_code is not None else int(np.argmax(probabilities))
    png = render_heatmap(pixels, np.asarray(cam)[index])
    return seen.model_copy(update={"available": True, "class_code": meta.classes[index], "png_base64": _b64(png)})
