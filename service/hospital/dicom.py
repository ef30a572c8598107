"""DICOM input: read a Part-10 object with pydicom and check everything it declares before decoding a pixel.

Order of the checks, cheapest and safest first:
1. file meta only (preamble, ``DICM``, transfer syntax): a Deflated object is refused here, before
   pydicom would inflate it (a zip bomb hides in a few kilobytes);
2. header up to Pixel Data (``stop_before_pixels``): SOP class, colour model, bit depth, and the
   declared Rows x Columns x frames against ``max_pixels``;
3. the Pixel Data element's framing (lengths, fragment items) against the bytes received, so a
   truncated upload is refused by offset arithmetic, not by a decoder;
4. the first frame's codestream header against the DICOM header, and the decode's memory against the
   budget (:mod:`service.hospital.dicom_pixels`); only then the decode, as RGB.

Every header value is read inside one guard (:func:`_read_header`): a malformed element is a 400
naming the exception type only, never a 500 whose traceback would quote the element's bytes.

Policy (docs/integration.md): greyscale and palette images get 415 (the model was trained on colour
dermoscopy; a grey image would get a confident-looking but meaningless answer); a multi-frame object
is answered from its first frame and ``frames`` says how many it holds. Identifiers returned are the
Study/Series/SOP Instance UIDs and the Accession Number, never patient name, ID or birth date, and
nothing from the header is ever logged; problem details quote a UID only when it is well-formed and a
photometric interpretation only when it is a defined term.
"""

from __future__ import annotations

import io
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble  # no public meta-only reader for bytes
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from service.errors import InvalidImage, PayloadTooLarge, ServiceError, UnsupportedMediaType, UnsupportedSopClass
from service.hospital.dicom_pixels import ImageModule, decode_first_frame
from service.imaging import DecodedImage, center_crop_resize, decode_budget
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
KNOWN_PHOTOMETRIC = COLOUR_PHOTOMETRIC | {
    "MONOCHROME1",
    "MONOCHROME2",
    "PALETTE COLOR",
    "YBR_PARTIAL_420",
    "HSV",
    "ARGB",
    "CMYK",
}
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


def read_dicom(data: bytes, *, max_pixels: int, min_side: int | None = None) -> DicomImage:
    """Read a DICOM Part-10 object and decode its first frame to RGB.

    Args:
        data: the whole uploaded object (the caller has already applied its byte limit).
        max_pixels: the most pixels the object may declare, Rows x Columns x frames; checked on
            the header, before any pixel is decoded. It also sets the decode memory budget
            (:func:`service.imaging.decode_budget`).
        min_side: the short side the caller needs: a JPEG frame is then decoded at 1/2, 1/4 or 1/8
            scale where that still covers it (``rgb`` is smaller than ``width`` x ``height``).

    Raises:
        InvalidImage: not a DICOM Part-10 object, header malformed, incomplete or contradicted by the
            codestream, Pixel Data missing or truncated, or pixel data the decoder rejects.
        UnsupportedMediaType: a SOP class, transfer syntax, colour model or bit depth not accepted;
            the message names it.
        PayloadTooLarge: the declared pixel count is over ``max_pixels``, or the decode would need
            more memory than the budget.
    """
    ts = _check_transfer_syntax(_read_meta(data))
    header, pixel_offset = _read_header(data)
    if header.sop not in ACCEPTED_SOP_CLASSES:
        raise UnsupportedSopClass(
            f"DICOM SOP class {_uid_text(header.sop)} is not accepted: send Dermoscopic Photography, "
            "VL Photographic or colour Secondary Capture Image Storage"
        )
    _check_image_module(header, max_pixels=max_pixels)
    value = _check_pixel_data_framing(data, pixel_offset)
    rgb = decode_first_frame(data, ts, header.image, value, budget=decode_budget(max_pixels), min_side=min_side)
    return DicomImage(
        rgb=rgb,
        width=header.image.cols,
        height=header.image.rows,
        sop_class_uid=str(header.sop),
        sop_class_name=header.sop.name,
        transfer_syntax_uid=str(ts),
        transfer_syntax_name=ts.name,
        frames=header.image.frames,
        identifiers=header.identifiers,
    )


def decode_dicom(data: bytes, size: int, max_pixels: int) -> DecodedImage:
    """The ``application/dicom`` decoder of :mod:`service.media`: first frame -> model input.

    Same crop and resize as JPEG/PNG uploads and as training; the answer carries the SOP class,
    transfer syntax, frame count and the UIDs (no patient data).
    """
    start = time.perf_counter()
    img = read_dicom(data, max_pixels=max_pixels, min_side=size)
    info = DicomInfo(
        sop_class_uid=img.sop_class_uid, sop_class_name=img.sop_class_name,
        transfer_syntax_uid=img.transfer_syntax_uid, transfer_syntax_name=img.transfer_syntax_name,
        frames=img.frames, identifiers=img.identifiers,
    )  # fmt: skip
    pixels = center_crop_resize(img.rgb, size)
    return DecodedImage(pixels, img.width, img.height, "dicom", time.perf_counter() - start, dicom=info)


def check_meta(data: bytes) -> Dataset:
    """The file meta of a Part-10 object whose transfer syntax the reader takes; nothing else is parsed.

    For a fetch (WADO-RS) that must refuse a Deflated object before anything would inflate it.

    Raises:
        InvalidImage: not a Part-10 object. UnsupportedMediaType: a transfer syntax not taken.
    """
    meta = _read_meta(data)
    _check_transfer_syntax(meta)
    return meta


def _read_meta(data: bytes) -> Dataset:
    """The File Meta Information group alone: enough to refuse a syntax before parsing the dataset."""
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        return _read_file_meta_info(fp)
    except Exception as exc:  # any parse failure of hostile bytes is the sender's error, never a 500
        raise InvalidImage("Body is not a DICOM Part-10 object (no 128-byte preamble and 'DICM' prefix)") from exc


def _check_transfer_syntax(meta: Dataset) -> UID:
    try:
        ts = UID(str(meta.get("TransferSyntaxUID") or "").strip())
    except Exception as exc:  # a malformed element converts lazily, here
        raise InvalidImage("DICOM file meta information is malformed") from exc
    if not ts:
        raise InvalidImage("DICOM file meta information has no Transfer Syntax UID")
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        raise UnsupportedMediaType(f"DICOM transfer syntax {_uid_text(ts)} is not supported")
    if not get_decoder(ts).is_available:  # a plugin missing from this installation
        raise UnsupportedMediaType(f"No decoder is installed for DICOM transfer syntax {_uid_text(ts)}")
    return ts


@dataclass(frozen=True)
class _Header:
    """Everything used from the dataset, converted to plain values inside one error guard."""

    sop: UID
    image: ImageModule
    samples: int
    bits: int
    identifiers: dict[str, str]


def _read_header(data: bytes) -> tuple[_Header, int]:
    """The dataset up to Pixel Data as plain values, and the offset where Pixel Data starts.

    pydicom converts element values lazily, on first access, so a malformed element (a wrong VR, an
    odd length that swallows its neighbours) raises wherever it is first read. Every value is read
    here, in one guard: whatever pydicom raises becomes a 400 naming only the exception type.
    Exception messages are never passed on: pydicom's quote the raw element bytes.
    """
    fp = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        sop = UID(str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "").strip())
        image = ImageModule(
            rows=_int(ds, "Rows"),
            cols=_int(ds, "Columns"),
            frames=_int(ds, "NumberOfFrames", default=1),
            photometric=str(ds.get("PhotometricInterpretation") or "").strip(),
            planar=_int(ds, "PlanarConfiguration", default=0),
        )
        header = _Header(
            sop, image, _int(ds, "SamplesPerPixel", default=1), _int(ds, "BitsAllocated"), _identifiers(ds)
        )
    except ServiceError:
        raise
    except Exception as exc:
        raise InvalidImage(f"DICOM header is malformed ({type(exc).__name__})") from None
    if not sop:
        raise InvalidImage("DICOM object has no SOP Class UID")
    return header, fp.tell()


def _uid_text(uid: UID) -> str:
    """A UID for a problem detail: its name and value if it is well-formed, else nothing of it."""
    return f"{uid.name} ({uid})" if uid.is_valid else "(a malformed UID)"


def _check_image_module(header: _Header, *, max_pixels: int) -> None:
    """Colour model, bit depth and declared size, all from the header."""
    img, sop = header.image, header.sop
    if img.rows < 1 or img.cols < 1 or img.frames < 1:
        raise InvalidImage(f"DICOM image declares an empty size ({img.cols}x{img.rows}, {img.frames} frame(s))")
    if img.photometric not in COLOUR_PHOTOMETRIC or header.samples != 3:
        # Quote the photometric interpretation only when it is a defined term: it is header text.
        shown = img.photometric if img.photometric in KNOWN_PHOTOMETRIC else "an unknown value"
        raise UnsupportedMediaType(
            f"DICOM {sop.name} with photometric interpretation {shown or 'missing'} and "
            f"{header.samples} sample(s) per pixel is not accepted: only colour (RGB or YBR) images are"
        )
    if header.bits != 8:
        raise UnsupportedMediaType(f"DICOM image with {header.bits} bits allocated is not supported: 8-bit colour only")
    if img.planar not in (0, 1):
        raise InvalidImage("DICOM Planar Configuration must be 0 or 1")
    declared = img.rows * img.cols * img.frames
    if declared > max_pixels:
        raise PayloadTooLarge(
            f"DICOM image declares {img.cols}x{img.rows} pixels x {img.frames} frame(s) = {declared} pixels, "
            f"over the limit of {max_pixels}"
        )


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


def _check_pixel_data_framing(data: bytes, offset: int) -> tuple[int, int]:
    """Walk the Pixel Data element's framing (no decoding); returns the value's (start, end).

    Missing, empty or truncated data is refused here by offset arithmetic, not by a decoder.
    """
    if data[offset : offset + 4] != _PIXEL_DATA_TAG:
        raise InvalidImage("DICOM object has no Pixel Data (missing, or the file is truncated)")
    # pydicom may have sniffed implicit VR despite the declared syntax; read the element as it is written.
    vr = data[offset + 4 : offset + 6]
    explicit_vr = vr in (b"OB", b"OW")
    if not explicit_vr and len(vr) == 2 and vr.isalpha() and vr.isupper():  # a VR, but not one Pixel Data has
        # Read as implicit, its bytes made a length that the framing walk and the decoder disagreed on: a
        # struct error and a 500 (issue 28, finding 12). Only the two letters are quoted, never other bytes.
        raise InvalidImage(f"DICOM Pixel Data has VR {vr.decode('ascii')}; it must be OB or OW")
    pos = offset + (12 if explicit_vr else 8)  # tag, [VR, 2 reserved], 4-byte length
    if pos > len(data):
        raise InvalidImage("DICOM Pixel Data is truncated")
    (length,) = struct.unpack_from("<I", data, pos - 4)
    if length != _UNDEFINED_LENGTH:  # native pixels: one value of declared length
        if length == 0:
            raise InvalidImage("DICOM Pixel Data is empty")
        if pos + length > len(data):
            raise InvalidImage(f"DICOM Pixel Data is truncated: {len(data) - pos} of {length} bytes present")
        return pos, pos + length
    start, items = pos, 0  # encapsulated: offset-table item, then fragment items, then the sequence delimiter
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
    return start, pos


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
