"""DICOM input: read a Part-10 object with pydicom and check everything it declares before decoding a pixel.

Order of the checks, cheapest and safest first:
1. file meta only (preamble, ``DICM``, transfer syntax): a Deflated object is refused here, before
   pydicom would inflate it (a zip bomb hides in a few kilobytes);
2. header up to Pixel Data (``stop_before_pixels``): SOP class, colour model, bit depth, and the
   declared Rows x Columns x frames against ``max_pixels``;
3. the Pixel Data element's framing (lengths, fragment items) against the bytes received, so a
   truncated upload is refused by offset arithmetic, not by a decoder;
4. only then the decode of the first frame, as RGB.

Policy (docs/integration.md): greyscale and palette images get 415 (the model was trained on colour
dermoscopy; a grey image would get a confident-looking but meaningless answer); a multi-frame object
is answered from its first frame and ``frames`` says how many it holds. Identifiers returned are the
Study/Series/SOP Instance UIDs and the Accession Number, never patient name, ID or birth date, and
nothing from the header is ever logged except SOP class and transfer syntax names.
"""

from __future__ import annotations

import io
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble  # no public meta-only reader for bytes
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import UID

from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from service.imaging import DecodedImage, center_crop_resize
from service.schemas import DicomInfo

logger = logging.getLogger(__name__)

DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ACCEPTED_SOP_CLASSES = frozenset({DERMOSCOPIC_PHOTOGRAPHY, VL_PHOTOGRAPHIC, SECONDARY_CAPTURE})

# Little-endian syntaxes whose decoders are installed (pydicom native, Pillow, pylibjpeg plugins) and
# tested in tests/service/test_dicom.py. Left out on purpose: Deflated (inflates before any check),
# Explicit VR Big Endian (retired in 2004), HTJ2K (decoder present, but nothing here to test it with).
SUPPORTED_TRANSFER_SYNTAXES = frozenset(
    {
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.RLELossless,
        pydicom.uid.JPEGBaseline8Bit,
        pydicom.uid.JPEGExtended12Bit,  # 8-bit data only: BitsAllocated is checked below
        pydicom.uid.JPEGLossless,
        pydicom.uid.JPEGLosslessSV1,
        pydicom.uid.JPEGLSLossless,
        pydicom.uid.JPEGLSNearLossless,
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.JPEG2000,
    }
)
COLOUR_PHOTOMETRIC = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
IDENTIFIER_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber")

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_ITEM, _SEQ_DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class DicomImage:
    """The first frame of a DICOM object as RGB, plus what the answer may say about the object."""

    rgb: np.ndarray = field(repr=False)  # (H, W, 3) uint8 RGB
    width: int
    height: int
    sop_class_uid: str
    sop_class_name: str
    transfer_syntax_uid: str
    transfer_syntax_name: str
    frames: int
    identifiers: dict[str, str]


def is_dicom(data: bytes) -> bool:
    """True when the bytes start like a DICOM Part-10 file (128-byte preamble, then ``DICM``).

    For sniffing multipart parts labelled ``application/octet-stream``; it reads nothing else.
    """
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_dicom(data: bytes, *, max_pixels: int) -> DicomImage:
    """Read a DICOM Part-10 object and decode its first frame to RGB.

    Args:
        data: the whole uploaded object (the caller has already applied its byte limit).
        max_pixels: the most pixels the object may declare, Rows x Columns x frames; checked on
            the header, before any pixel is decoded.

    Raises:
        InvalidImage: not a DICOM Part-10 object, header incomplete, Pixel Data missing or truncated,
            or pixel data the decoder rejects.
        UnsupportedMediaType: a SOP class, transfer syntax, colour model or bit depth not accepted;
            the message names it.
        PayloadTooLarge: the declared pixel count is over ``max_pixels``.
    """
    ts = _check_transfer_syntax(_read_meta(data))
    header, pixel_offset = _read_header(data)
    sop = _check_sop_class(header)
    rows, cols, frames = _check_image_module(header, sop, max_pixels=max_pixels)
    _check_pixel_data_framing(data, pixel_offset)
    rgb = _decode_first_frame(data, ts, rows=rows, cols=cols)
    return DicomImage(
        rgb=rgb,
        width=cols,
        height=rows,
        sop_class_uid=str(sop),
        sop_class_name=sop.name,
        transfer_syntax_uid=str(ts),
        transfer_syntax_name=ts.name,
        frames=frames,
        identifiers=_identifiers(header),
    )


def decode_dicom(data: bytes, size: int, max_pixels: int) -> DecodedImage:
    """The ``application/dicom`` decoder of :mod:`service.media`: first frame -> model input.

    Same crop and resize as JPEG/PNG uploads and as training; the answer carries the SOP class,
    transfer syntax, frame count and the UIDs (no patient data).
    """
    start = time.perf_counter()
    img = read_dicom(data, max_pixels=max_pixels)
    info = DicomInfo(
        sop_class_uid=img.sop_class_uid, sop_class_name=img.sop_class_name,
        transfer_syntax_uid=img.transfer_syntax_uid, transfer_syntax_name=img.transfer_syntax_name,
        frames=img.frames, identifiers=img.identifiers,
    )  # fmt: skip
    pixels = center_crop_resize(img.rgb, size)
    return DecodedImage(pixels, img.width, img.height, "dicom", time.perf_counter() - start, dicom=info)


def _read_meta(data: bytes) -> Dataset:
    """The File Meta Information group alone: enough to refuse a syntax before parsing the dataset."""
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        return _read_file_meta_info(fp)
    except (InvalidDicomError, EOFError, ValueError, struct.error, KeyError, TypeError) as exc:
        raise InvalidImage("Body is not a DICOM Part-10 object (no 128-byte preamble and 'DICM' prefix)") from exc


def _check_transfer_syntax(meta: Dataset) -> UID:
    raw = meta.get("TransferSyntaxUID")
    if not raw:
        raise InvalidImage("DICOM file meta information has no Transfer Syntax UID")
    ts = UID(str(raw))
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        raise UnsupportedMediaType(f"DICOM transfer syntax {ts.name} ({ts}) is not supported")
    if not get_decoder(ts).is_available:  # a plugin missing from this installation
        raise UnsupportedMediaType(f"No decoder is installed for DICOM transfer syntax {ts.name} ({ts})")
    return ts


def _read_header(data: bytes) -> tuple[Dataset, int]:
    """The dataset up to Pixel Data, and the offset where reading stopped (where Pixel Data starts)."""
    fp = io.BytesIO(data)
    try:
        header = pydicom.dcmread(fp, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on garbage; none of them may become a 500
        raise InvalidImage(f"DICOM header could not be parsed ({type(exc).__name__})") from exc
    return header, fp.tell()


def _check_sop_class(header: Dataset) -> UID:
    raw = header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID")
    if not raw:
        raise InvalidImage("DICOM object has no SOP Class UID")
    sop = UID(str(raw))
    if sop not in ACCEPTED_SOP_CLASSES:
        raise UnsupportedMediaType(
            f"DICOM SOP class {sop.name} ({sop}) is not accepted: send Dermoscopic Photography, "
            "VL Photographic or colour Secondary Capture Image Storage"
        )
    return sop


def _check_image_module(header: Dataset, sop: UID, *, max_pixels: int) -> tuple[int, int, int]:
    """Colour model, bit depth and declared size, all from the header; returns (rows, cols, frames)."""
    rows, cols = _int(header, "Rows"), _int(header, "Columns")
    frames = _int(header, "NumberOfFrames", default=1)
    if rows < 1 or cols < 1 or frames < 1:
        raise InvalidImage(f"DICOM image declares an empty size ({cols}x{rows}, {frames} frame(s))")
    photometric = str(header.get("PhotometricInterpretation", "")).strip()
    samples = _int(header, "SamplesPerPixel", default=1)
    if photometric not in COLOUR_PHOTOMETRIC or samples != 3:
        raise UnsupportedMediaType(
            f"DICOM {sop.name} with photometric interpretation {photometric or 'missing'} and "
            f"{samples} sample(s) per pixel is not accepted: only colour (RGB or YBR) images are"
        )
    bits = _int(header, "BitsAllocated")
    if bits != 8:
        raise UnsupportedMediaType(f"DICOM image with {bits} bits allocated is not supported: 8-bit colour only")
    declared = rows * cols * frames
    if declared > max_pixels:
        raise PayloadTooLarge(
            f"DICOM image declares {cols}x{rows} pixels x {frames} frame(s) = {declared} pixels, "
            f"over the limit of {max_pixels}"
        )
    return rows, cols, frames


def _int(header: Dataset, keyword: str, default: int | None = None) -> int:
    value: Any = header.get(keyword)
    if value is None or value == "":
        if default is None:
            raise InvalidImage(f"DICOM image has no {keyword} (header incomplete or truncated)")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidImage(f"DICOM {keyword} is not an integer") from exc


def _check_pixel_data_framing(data: bytes, offset: int) -> None:
    """Walk the Pixel Data element's framing (no decoding): refuse missing, empty or truncated data."""
    if data[offset : offset + 4] != _PIXEL_DATA_TAG:
        raise InvalidImage("DICOM object has no Pixel Data (missing, or the file is truncated)")
    # pydicom may have sniffed implicit VR despite the declared syntax; read the element as it is written.
    explicit_vr = data[offset + 4 : offset + 6] in (b"OB", b"OW")
    pos = offset + (12 if explicit_vr else 8)  # tag, [VR, 2 reserved], 4-byte length
    if pos > len(data):
        raise InvalidImage("DICOM Pixel Data is truncated")
    (length,) = struct.unpack_from("<I", data, pos - 4)
    if length != _UNDEFINED_LENGTH:  # native pixels: one value of declared length
        if length == 0:
            raise InvalidImage("DICOM Pixel Data is empty")
        if pos + length > len(data):
            raise InvalidImage(f"DICOM Pixel Data is truncated: {len(data) - pos} of {length} bytes present")
        return
    items = 0  # encapsulated: offset-table item, then fragment items, then the sequence delimiter
    while True:
        if pos + 8 > len(data):
            raise InvalidImage("DICOM encapsulated Pixel Data is truncated (no sequence delimiter)")
        group, element, item_len = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if (group, element) == _SEQ_DELIMITER:
            break
        if (group, element) != _ITEM:
            raise InvalidImage("DICOM encapsulated Pixel Data is malformed (unexpected tag)")
        if item_len == _UNDEFINED_LENGTH or pos + item_len > len(data):
            raise InvalidImage("DICOM encapsulated Pixel Data is truncated inside a fragment")
        pos += item_len
        items += 1
    if items < 2:
        raise InvalidImage("DICOM encapsulated Pixel Data has no fragments")


def _decode_first_frame(data: bytes, ts: UID, *, rows: int, cols: int) -> np.ndarray:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        fast = _baseline_jpeg_fast(ds, ts)
        if fast is not None:
            return _checked(fast, rows, cols)
        # as_rgb (True by default) converts YBR to RGB, and pydicom knows when a JPEG decoder has already
        # done so (baseline JPEG with YBR_FULL_422 comes back from Pillow/libjpeg as RGB): no double conversion.
        arr, meta = get_decoder(ts).as_array(ds, index=0)
    except Exception as exc:  # corrupt codestreams raise decoder-specific errors
        logger.info("DICOM pixel decode failed: %s (%s)", type(exc).__name__, ts.name)
        raise InvalidImage(f"DICOM pixel data could not be decoded ({ts.name})") from exc
    photometric = str(meta.get("photometric_interpretation", "RGB"))
    if photometric in ("YBR_FULL", "YBR_FULL_422"):  # defensive: a plugin that returned YCbCr
        arr = convert_color_space(arr, photometric, "RGB")
    return _checked(arr, rows, cols)


def _baseline_jpeg_fast(ds: Dataset, ts: UID) -> np.ndarray | None:
    """Fast path for the usual dermatoscope export: baseline JPEG, YCbCr in the stream (YBR_FULL[_422]).

    OpenCV's libjpeg-turbo does YCbCr->RGB itself, ~10x faster than pydicom's plugins (Pillow decodes to
    raw YCbCr and converts in numpy; pylibjpeg is slower still). RGB-labelled streams
    (JPEG without colour transform) keep pydicom's path, which knows to tell the decoder not to
    convert. tests/service/test_dicom.py checks both paths agree. None = use pydicom.
    """
    if ts != pydicom.uid.JPEGBaseline8Bit or ds.get("PhotometricInterpretation") not in ("YBR_FULL_422", "YBR_FULL"):
        return None
    frames = _int(ds, "NumberOfFrames", default=1)
    codestream = next(generate_frames(ds.PixelData, number_of_frames=frames))
    # IGNORE_ORIENTATION: an EXIF tag inside the codestream must not rotate what the header describes.
    bgr = cv2.imdecode(np.frombuffer(codestream, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        return None  # not a 3-component 8-bit JPEG after all: let pydicom decide (and refuse)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _checked(arr: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if arr.shape != (rows, cols, 3) or arr.dtype != np.uint8:
        raise InvalidImage(f"DICOM pixel data decoded to {arr.shape} {arr.dtype}, expected ({rows}, {cols}, 3) uint8")
    return np.ascontiguousarray(arr)


def _identifiers(header: Dataset) -> dict[str, str]:
    """Study/Series/SOP Instance UIDs and Accession Number, where present and well-formed."""
    out: dict[str, str] = {}
    for keyword in IDENTIFIER_KEYWORDS:
        value = str(header.get(keyword) or "").strip()
        if not value:
            continue
        if keyword.endswith("UID") and not UID(value).is_valid:
            logger.info("DICOM %s is not a valid UID; left out of the answer", keyword)  # the value is not logged
            continue
        if keyword == "AccessionNumber" and (len(value) > 16 or not value.isprintable()):  # SH: 16 chars
            logger.info("DICOM AccessionNumber is not a valid SH value; left out of the answer")
            continue
        out[keyword] = value
    return out
