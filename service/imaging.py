"""Image bytes -> the model's ``(S, S, 3)`` uint8 RGB input, with limits checked before decoding.

The codestream's own header is read first (:mod:`service.codecs`: format, size, components, coding),
so a decompression bomb is refused from its first bytes and the decode's working memory is known
before it starts: over ``DECODE_BYTES_PER_PIXEL x max_pixels`` is 413.

JPEG is decoded by libjpeg-turbo (``simplejpeg``) in strict mode: a stream that libjpeg has to patch
up (missing or short entropy-coded data, which it would fill with grey) is refused, never classified.
Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, which is several times faster and,
because the result is still at least ``S`` on its short side, keeps the final INTER_AREA step the same
as training's; EXIF orientation is applied to that small image. PNG is decoded by OpenCV after the
IDAT stream was checked to hold exactly the pixels IHDR declares (libpng would fill a short image).
Both release the GIL, so a thread pool decodes in parallel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg

from service import codecs
from service.codecs import Codestream
from service.errors import ImageTooSmall, InvalidImage, PayloadTooLarge, UnsupportedMediaType
from service.schemas import DicomInfo

JPEG, PNG = "jpeg", "png"
# The decode memory budget per allowed pixel: a full-size PNG at MAX_PIXELS (6 bytes/pixel measured,
# docs/service.md) fits, so MAX_PIXELS stays the one knob. The constant covers the decoders' fixed
# buffers (Huffman tables, row buffers).
DECODE_BYTES_PER_PIXEL = 6
DECODE_FIXED_BYTES = 8 * codecs.MB
_DCT_SCALES = (8, 4, 2)  # libjpeg's power-of-two scaled IDCT; odd factors would change the pixels
# EXIF orientation -> the OpenCV steps that display the stored image upright (OpenCV's own table).
_ORIENT = {2: (False, 1), 3: (False, -1), 4: (False, 0), 5: (True, None), 6: (True, 1), 7: (True, -1), 8: (True, 0)}


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
    dicom: DicomInfo | None = None  # set by service.hospital.dicom.decode_dicom


def check_min_side(decoded: DecodedImage, min_side: int) -> None:
    """Refuse an image whose shorter side is under ``min_side`` pixels (any format, DICOM too).

    Raises:
        ImageTooSmall: 422; the detail names both sides and the limit.
    """
    if min(decoded.width, decoded.height) < min_side:
        raise ImageTooSmall(
            f"image is {decoded.width}x{decoded.height} pixels; its shorter side must be at least {min_side} "
            "(LESIONSERVE_MIN_IMAGE_SIDE): a smaller one would be enlarged more than twice per side before the model sees it"
        )


def sniff_format(data: bytes) -> str | None:
    """``"jpeg"``, ``"png"`` or None, from the magic bytes (the declared type is not trusted)."""
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data.startswith(codecs.PNG_MAGIC):
        return PNG
    return None


def decode_budget(max_pixels: int) -> int:
    """Bytes one decode may use, from the pixel limit (see ``DECODE_BYTES_PER_PIXEL``)."""
    return DECODE_BYTES_PER_PIXEL * max_pixels + DECODE_FIXED_BYTES


def _codestream(data: bytes) -> Codestream:
    if not data:
        raise InvalidImage("the upload is empty")
    fmt = sniff_format(data)
    if fmt == PNG:
        return codecs.png_codestream(data)
    if fmt == JPEG:
        return codecs.jpeg_codestream(data)
    raise InvalidImage("the upload is not a JPEG or PNG image")


def _nonempty_codestream(data: bytes) -> Codestream:
    info = _codestream(data)
    if info.width == 0 or info.height == 0:
        raise InvalidImage(f"image header declares an empty {info.width}x{info.height} image")
    return info


def read_header(data: bytes) -> ImageHeader:
    """Format and stored size from the first bytes only: nothing is decoded.

    Raises:
        InvalidImage: empty, not a JPEG/PNG, or a header too broken to read.
    """
    info = _nonempty_codestream(data)
    return ImageHeader(PNG if info.process == "png" else JPEG, info.width, info.height)


def center_crop_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then resize to ``size`` x ``size`` with INTER_AREA (as training).

    Args:
        rgb: ``(H, W, C)`` uint8 image; any channel order (it is kept), any strides.
        size: output side S in pixels.

    Returns:
        ``(S, S, C)`` uint8, C-contiguous.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = rgb[top : top + side, left : left + side]  # a view: no copy of the decoded image
    out = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out, dtype=np.uint8)


def reduction_factor(info: Codestream, size: int) -> int:
    """The largest DCT-domain reduction that keeps the short side >= ``size`` (1: full size)."""
    if info.process in ("baseline", "extended", "progressive"):
        short = min(info.width, info.height)
        for factor in _DCT_SCALES:
            if short // factor >= size:
                return factor
    return 1


def decode_jpeg_rgb(
    data: bytes | memoryview, info: Codestream, factor: int = 1, *, rgb_stream: bool = False
) -> np.ndarray:
    """Strict libjpeg-turbo decode of a JPEG (DCT or lossless) to (H/f, W/f, 3) RGB.

    Args:
        data: the codestream.
        info: its header (:func:`service.codecs.jpeg_codestream`).
        factor: DCT-domain reduction (1, 2, 4 or 8).
        rgb_stream: the 3 components are R, G, B (no YCbCr transform; DICOM ``RGB`` and lossless).

    Raises:
        InvalidImage: corrupt, truncated or short of data (libjpeg warnings are errors here).
        UnsupportedMediaType: not 8-bit, or a component count other than 1, 3 or 4.
    """
    if info.precision != 8 or info.components not in (1, 3, 4) or info.process == "jpeg-ls":
        raise UnsupportedMediaType(
            f"{info.precision}-bit JPEG with {info.components} component(s) ({info.process}) is not supported"
        )
    stream = codecs.as_rgb_stream(data) if rgb_stream and info.components == 3 else data
    min_h, min_w = -(-info.height // factor), -(-info.width // factor)  # exactly 1/factor
    try:
        if info.components == 4:  # Adobe CMYK/YCCK: libjpeg gives (inverted) CMYK, converted below
            cmyk = simplejpeg.decode_jpeg(stream, colorspace="CMYK", min_height=min_h, min_width=min_w, strict=True)
            return _inverted_cmyk_to_rgb(cmyk)
        out: np.ndarray = simplejpeg.decode_jpeg(
            stream, colorspace="RGB", min_height=min_h, min_width=min_w, strict=True
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise InvalidImage(f"the JPEG image data is corrupt or incomplete ({type(exc).__name__})") from exc
    return out


def _inverted_cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    # Adobe writes CMYK JPEGs inverted (255 = no ink), as OpenCV and Pillow assume: R = C' x K' / 255.
    k = cmyk[..., 3:4].astype(np.uint16)
    return ((cmyk[..., :3].astype(np.uint16) * k + 127) // 255).astype(np.uint8)


def _orient(img: np.ndarray, orientation: int) -> np.ndarray:
    if orientation not in _ORIENT:
        return img
    transpose, flip = _ORIENT[orientation]
    if transpose:
        img = cv2.transpose(img)
    return img if flip is None else cv2.flip(img, flip)


def decode_image(data: bytes, size: int, max_pixels: int) -> DecodedImage:
    """Decode, orient, convert and centre-crop-resize one upload.

    Args:
        data: the uploaded bytes (JPEG or PNG).
        size: the model's input side S.
        max_pixels: refuse images whose header declares more pixels than this; also sets the
            decode memory budget (:func:`decode_budget`).

    Raises:
        InvalidImage: not decodable, truncated or short of data (400).
        PayloadTooLarge: too many pixels, or too much decode memory, decided from the header alone (413).
        UnsupportedMediaType: a JPEG variant this service does not decode (415).
    """
    start = time.perf_counter()
    info = _nonempty_codestream(data)
    fmt = PNG if info.process == "png" else JPEG
    if info.pixels > max_pixels:
        raise PayloadTooLarge(f"image is {info.width}x{info.height} = {info.pixels} pixels; the limit is {max_pixels}")
    if fmt == JPEG:
        factor = reduction_factor(info, size)
        out_pixels = -(-info.width // factor) * -(-info.height // factor)
        rgb_stream = info.process == "lossless"  # may be rewritten as RGB: one copy of the stream
        codecs.check_budget(info, decode_budget(max_pixels), "a JPEG", out_pixels, len(data) if rgb_stream else 0)
        if not codecs.jpeg_has_end(data, info.scan_offset):
            raise InvalidImage("JPEG is truncated (no end-of-image marker)")
        orientation = codecs.exif_orientation(data, info.scan_offset)
        rgb = _orient(decode_jpeg_rgb(data, info, factor, rgb_stream=rgb_stream), orientation)
        pixels = center_crop_resize(rgb, size)
        swapped = orientation >= 5  # orientations 5-8 turn the image by 90 degrees
    else:
        codecs.check_budget(info, decode_budget(max_pixels), "a PNG")
        codecs.check_png_complete(data, info)
        # IMREAD_COLOR gives 8-bit 3-channel BGR from any depth, palette or alpha, and applies EXIF
        # orientation (eXIf chunk). Crop and resize first, convert the small result: no full-size copy.
        try:
            bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            bgr = None
        if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
            raise InvalidImage("the PNG image could not be decoded")
        pixels = cv2.cvtColor(center_crop_resize(bgr, size), cv2.COLOR_BGR2RGB)
        swapped = (bgr.shape[0] > bgr.shape[1]) != (info.height > info.width) and info.width != info.height
    width, height = (info.height, info.width) if swapped else (info.width, info.height)
    return DecodedImage(np.ascontiguousarray(pixels), width, height, fmt, time.perf_counter() - start)
