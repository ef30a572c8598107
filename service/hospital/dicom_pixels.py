"""The first frame of a DICOM object's Pixel Data -> RGB, with the codestream checked before decoding.

:mod:`service.hospital.dicom` has already checked the header (size against ``max_pixels``, colour model, bit
depth) and the Pixel Data framing. Here, per transfer syntax, the codec's own header is read
(:mod:`service.codecs`) and must agree with the DICOM header: a 64x64 header in front of a
30000x30000 JPEG is a 400 before a byte is decoded. Then the decode's working memory is estimated
and refused (413) over the budget, and only then does a decoder run, each one strict about
truncated data: libjpeg-turbo (``simplejpeg``, strict) for JPEG baseline, extended and lossless,
CharLS for JPEG-LS, openjpeg for JPEG 2000, pylibjpeg-rle for RLE. Native pixels are a view into
the upload, not a copy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np
import pydicom
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeOptions
from pydicom.uid import UID

from service import codecs
from service.codecs import Codestream
from service.errors import InvalidImage, ServiceError
from service.imaging import decode_jpeg_rgb, reduction_factor

_JPEG_DCT = frozenset({pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEGExtended12Bit})
_JPEG_LOSSLESS = frozenset({pydicom.uid.JPEGLossless, pydicom.uid.JPEGLosslessSV1})
_JPEG_LS = frozenset({pydicom.uid.JPEGLSLossless, pydicom.uid.JPEGLSNearLossless})
_J2K = frozenset({pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000})
# The plugin that pydicom must use per syntax: the one that refuses truncated data (pylibjpeg's
# libjpeg decodes a cut JPEG-LS stream without complaint; CharLS does not).
_PLUGIN = {
    **dict.fromkeys(_JPEG_LS, "pyjpegls"),
    **dict.fromkeys(_J2K, "pylibjpeg"),
    pydicom.uid.RLELossless: "pylibjpeg",
}
_YBR = ("YBR_FULL", "YBR_FULL_422")
_HEAD_BYTES = 1 << 20  # codec headers (JPEG APPn segments are 64 KiB at most each) end well before this


@dataclass(frozen=True)
class ImageModule:
    """The Image Pixel module as plain values (read once, inside the header's error guard)."""

    rows: int
    cols: int
    frames: int
    photometric: str
    planar: int


def decode_first_frame(
    data: bytes, ts: UID, image: ImageModule, value: tuple[int, int], *, budget: int, min_side: int | None = None
) -> np.ndarray:
    """Decode frame 0 to ``(H, W, 3)`` RGB, or smaller by a power of two when ``min_side`` allows (JPEG).

    Args:
        data: the whole object.
        ts: its transfer syntax (one of service.hospital.dicom.SUPPORTED_TRANSFER_SYNTAXES).
        image: the header's Image Pixel module.
        value: (start, end) of the Pixel Data value in ``data``, framing already checked.
        budget: bytes of working memory the decode may use.
        min_side: the short side the caller needs; JPEG DCT frames are decoded at 1/2, 1/4 or 1/8
            scale when that still covers it. None: full size.

    Raises:
        InvalidImage: the codestream contradicts the header, is corrupt, or is short of data.
        PayloadTooLarge: the decode would need more than ``budget`` bytes.
        UnsupportedMediaType: a codestream variant not decoded here (e.g. 12-bit samples).
    """
    start, end = value
    if not ts.is_compressed:
        return _native(data, start, end, image)
    frame = _first_frame(data, start, end, image.frames)
    head = bytes(frame[:_HEAD_BYTES])  # the codec headers are at the start of the frame
    if ts in _JPEG_DCT or ts in _JPEG_LOSSLESS:
        info = _matching(codecs.jpeg_codestream(head), image, "JPEG")
        if (ts in _JPEG_LOSSLESS) != (info.process == "lossless"):
            raise InvalidImage(f"the DICOM transfer syntax {ts.name} does not match its {info.process} JPEG data")
        factor = reduction_factor(info, min_side) if min_side else 1
        out_pixels = -(-info.width // factor) * -(-info.height // factor)
        # Lossless streams are never colour-transformed by libjpeg; DICOM RGB means no transform either.
        as_rgb = info.process == "lossless" or image.photometric == "RGB"
        extra = _conversion_bytes(image, out_pixels) + (len(frame) if as_rgb else 0)  # the RGB rewrite: a copy
        codecs.check_budget(info, budget, "a DICOM JPEG frame", out_pixels, extra)
        rgb = decode_jpeg_rgb(frame, info, factor, rgb_stream=as_rgb)
        return _ybr_to_rgb(rgb) if info.process == "lossless" and image.photometric in _YBR else rgb
    if ts in _JPEG_LS:
        info = _matching(codecs.jpeg_codestream(head), image, "JPEG-LS")
        if info.process != "jpeg-ls":
            raise InvalidImage(f"the DICOM transfer syntax {ts.name} does not match its {info.process} JPEG data")
    elif ts in _J2K:
        info = _matching(codecs.j2k_codestream(head), image, "JPEG 2000")
    else:  # RLE: the segments are the samples; the size is the header's
        if codecs.rle_segments(bytes(frame[:64]), len(frame)) != 3:
            raise InvalidImage("the DICOM header declares 3 samples per pixel but its RLE frame has another count")
        info = Codestream("rle", image.cols, image.rows, 3, 8)
    # pydicom's decoders take the encapsulated value (one copy) and cut the frame from it (another).
    extra = _conversion_bytes(image, info.pixels) + 2 * (end - start)
    codecs.check_budget(info, budget, f"a DICOM {info.process.upper()} frame", extra=extra)
    return _with_pydicom(data[start:end], ts, image)


def _matching(info: Codestream, image: ImageModule, codec: str) -> Codestream:
    """The codestream's declared geometry must be the header's: the header is what was size-checked."""
    if (info.width, info.height, info.components) != (image.cols, image.rows, 3) or info.precision > 8 or info.signed:
        raise InvalidImage(
            f"the DICOM header declares {image.cols}x{image.rows}, 3 samples of 8 bits, but its {codec} "
            f"codestream declares {info.width}x{info.height}, {info.components} of {info.precision} bits"
        )
    return info


def _conversion_bytes(image: ImageModule, pixels: int) -> int:
    return 6 * pixels if image.photometric != "RGB" else 0  # a YBR->RGB pass: two more 3-byte copies


def _native(data: bytes, start: int, end: int, image: ImageModule) -> np.ndarray:
    need = image.rows * image.cols * (2 if image.photometric == "YBR_FULL_422" else 3)  # 4:2:2: Y Y Cb Cr
    if end - start < need * image.frames:
        raise InvalidImage(f"DICOM Pixel Data holds {end - start} bytes; the header declares {need * image.frames}")
    need = image.rows * image.cols * 3
    if image.photometric == "YBR_FULL_422":  # subsampled: pydicom's native decoder upsamples it
        arr, _ = get_decoder(pydicom.uid.ExplicitVRLittleEndian).as_array(
            data[start:end],
            index=0,
            **_options(image, image.frames),  # type: ignore[arg-type]
        )
        return _ybr_to_rgb(arr)
    flat = np.frombuffer(data, np.uint8, count=need, offset=start)  # a view into the upload
    rgb = (
        flat.reshape(3, image.rows, image.cols).transpose(1, 2, 0)
        if image.planar == 1
        else flat.reshape(image.rows, image.cols, 3)
    )
    return _ybr_to_rgb(rgb) if image.photometric in _YBR else rgb


def _first_frame(data: bytes, start: int, end: int, frames: int) -> bytes | memoryview:
    """Frame 0 of the encapsulated value at ``data[start:end]`` (framing already checked).

    The usual single-frame, single-fragment object gets a view into the upload; anything else is cut
    out by pydicom (which follows the offset tables).
    """
    (bot_len,) = struct.unpack_from("<I", data, start + 4)
    first = start + 8 + bot_len  # the first fragment item
    if first + 8 > end:  # the framing walk was checked, but never read past the value for a length
        raise InvalidImage("DICOM encapsulated Pixel Data is malformed (offset table past the value)")
    (frag_len,) = struct.unpack_from("<I", data, first + 4)
    after = first + 8 + frag_len
    if frames == 1 and data[after : after + 4] == b"\xfe\xff\xdd\xe0":  # then the sequence delimiter
        return memoryview(data)[first + 8 : after]
    try:
        return get_frame(data[start:end], 0, number_of_frames=frames)
    except Exception as exc:  # pydicom's fragment parser raises ValueError/struct.error on garbage
        raise InvalidImage(f"DICOM encapsulated Pixel Data is malformed ({type(exc).__name__})") from None


def _with_pydicom(value: bytes, ts: UID, image: ImageModule) -> np.ndarray:
    try:
        # The encapsulated value with the header's module as keywords: no second parse of the object.
        arr, meta = get_decoder(ts).as_array(
            value,
            index=0,
            decoding_plugin=_PLUGIN[ts],
            **_options(image, image.frames),  # type: ignore[arg-type]  # pydicom types **kwargs as DecodeOptions
        )
    except ServiceError:
        raise
    except Exception as exc:  # corrupt or truncated codestreams raise decoder-specific errors
        raise InvalidImage(f"DICOM pixel data could not be decoded ({ts.name})") from exc
    if arr.shape != (image.rows, image.cols, 3) or arr.dtype != np.uint8:
        raise InvalidImage(f"DICOM pixel data decoded to {arr.shape} {arr.dtype}, expected 8-bit RGB")
    # openjpeg applies a J2K stream's own component transform (YBR_ICT/RCT); only YBR_FULL is left to us.
    return _ybr_to_rgb(arr) if str(meta.get("photometric_interpretation")) in _YBR else arr


def _options(image: ImageModule, frames: int) -> DecodeOptions:  # pydicom annotates each kwarg as this
    """The Image Pixel module for pydicom's decoders (no Dataset needed); colour is converted by us."""
    return {
        "rows": image.rows, "columns": image.cols, "samples_per_pixel": 3, "bits_allocated": 8, "bits_stored": 8,
        "photometric_interpretation": image.photometric, "pixel_representation": 0,
        "number_of_frames": frames, "planar_configuration": image.planar, "as_rgb": False,
        "pixel_keyword": "PixelData",
    }  # fmt: skip


def _ybr_to_rgb(ybr: np.ndarray) -> np.ndarray:
    """DICOM YBR_FULL (Y, Cb, Cr; JPEG's full-range BT.601) -> RGB, in uint8 with OpenCV (no float copy)."""
    ycrcb = np.ascontiguousarray(ybr[..., [0, 2, 1]])  # OpenCV's order is Y, Cr, Cb
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB, dst=ycrcb)
