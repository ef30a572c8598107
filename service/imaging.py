"""Image bytes -> the model's ``(S, S, 3)`` uint8 RGB input, with limits checked before decoding.

The header is parsed first (format, width, height) so that a decompression bomb is refused
from its first bytes. Decoding is OpenCV's (it releases the GIL, so a thread pool decodes in
parallel): EXIF orientation applied, greyscale / 16-bit / palette / RGBA / CMYK converted to
8-bit RGB (alpha is dropped, as PIL's ``convert("RGB")`` does). JPEGs much larger than the
model input are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, which is several times
faster and, because the result is still at least ``S`` on its short side, keeps the final
INTER_AREA step the same as training's.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import cv2
import numpy as np

from service.errors import InvalidImage, PayloadTooLarge
from service.schemas import DicomInfo

JPEG, PNG = "jpeg", "png"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD9)])
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


@dataclass(frozen=True)
class DecodedImage:
    """A model-ready image and what the answer reports about the upload."""

    pixels: np.ndarray  # (S, S, 3) uint8 RGB, C-contiguous
    width: int  # as displayed (after EXIF orientation)
    height: int
    format: str
    decode_s: float
    dicom: DicomInfo | None = None  # set by service.dicom.decode_dicom


def sniff_format(data: bytes) -> str | None:
    """``"jpeg"``, ``"png"`` or None, from the magic bytes (the declared type is not trusted)."""
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data.startswith(_PNG_MAGIC):
        return PNG
    return None


def _jpeg_header(data: bytes) -> tuple[int, int, int]:
    """Width, height and the offset of the first scan (SOS), walking the marker segments."""
    i, size, n = 2, None, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise InvalidImage("JPEG marker structure is corrupt")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF_MARKERS and i + 9 <= n:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            size = (width, height)
        if marker == 0xDA:
            if size is None:
                break
            return size[0], size[1], i
        i += 2 + length
    raise InvalidImage("JPEG has no frame header before its image data (truncated or not a JPEG)")


def read_header(data: bytes) -> ImageHeader:
    """Format and stored size from the first bytes only: nothing is decoded.

    Args:
        data: the uploaded bytes.

    Raises:
        InvalidImage: empty, not a JPEG/PNG, or a header too broken to read.
    """
    if not data:
        raise InvalidImage("the upload is empty")
    fmt = sniff_format(data)
    if fmt == PNG:
        if len(data) < 33 or data[12:16] != b"IHDR":
            raise InvalidImage("PNG has no IHDR header")
        width, height = struct.unpack(">II", data[16:24])
    elif fmt == JPEG:
        width, height, _ = _jpeg_header(data)
    else:
        raise InvalidImage("the upload is not a JPEG or PNG image")
    if width == 0 or height == 0:
        raise InvalidImage(f"image header declares an empty {width}x{height} image")
    return ImageHeader(fmt, width, height)


def _check_complete(data: bytes, fmt: str) -> None:
    # OpenCV fills a truncated image with grey and returns it; a half image must not be
    # classified, so the end marker is required. After the first scan 0xFFD9 can only be
    # EOI: entropy-coded data stuffs every 0xFF with 0x00.
    if fmt == JPEG:
        _, _, sos = _jpeg_header(data)
        if data.find(b"\xff\xd9", sos) < 0:
            raise InvalidImage("JPEG is truncated (no end-of-image marker)")
    elif data.rfind(b"IEND") < 0:
        raise InvalidImage("PNG is truncated (no IEND chunk)")


def center_crop_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then resize to ``size`` x ``size`` with INTER_AREA (as training).

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image.
        size: output side S in pixels.

    Returns:
        ``(S, S, 3)`` uint8 RGB, C-contiguous.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = rgb[top : top + side, left : left + side]
    out = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out, dtype=np.uint8)


def reduction_flag(header: ImageHeader, size: int) -> tuple[int, int]:
    """The (factor, imread flag) for decoding: the largest JPEG reduction still >= ``size``."""
    if header.format == JPEG:
        short = min(header.width, header.height)
        for factor, flag in _REDUCED:
            if short // factor >= size:
                return factor, flag
    return 1, cv2.IMREAD_COLOR


def decode_image(data: bytes, size: int, max_pixels: int) -> DecodedImage:
    """Decode, orient, convert and centre-crop-resize one upload.

    Args:
        data: the uploaded bytes (JPEG or PNG).
        size: the model's input side S.
        max_pixels: refuse images whose header declares more pixels than this.

    Raises:
        InvalidImage: not decodable (400).
        PayloadTooLarge: too many pixels, decided from the header alone (413).
    """
    start = time.perf_counter()
    header = read_header(data)
    if header.width * header.height > max_pixels:
        raise PayloadTooLarge(
            f"image is {header.width}x{header.height} = {header.width * header.height} pixels; the limit is {max_pixels}"
        )
    _check_complete(data, header.format)
    _, flag = reduction_flag(header, size)
    # IMREAD_COLOR(_REDUCED_*) gives 8-bit 3-channel BGR from any depth, palette, alpha or CMYK
    # source and applies EXIF orientation (IMREAD_IGNORE_ORIENTATION is not set).
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    except cv2.error:
        bgr = None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise InvalidImage(f"the {header.format.upper()} image could not be decoded")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    pixels = center_crop_resize(rgb, size)
    width, height = header.width, header.height
    if (bgr.shape[0] > bgr.shape[1]) != (height > width) and width != height:
        width, height = height, width  # EXIF rotated it by 90 degrees
    return DecodedImage(pixels, width, height, header.format, time.perf_counter() - start)
