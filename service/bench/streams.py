"""Inputs for the memory bench and the hostile-input tests: every codec the service decodes, valid or forged.

Valid streams come from the encoders the service installs (libjpeg-turbo through ``simplejpeg``,
CharLS, openjpeg, pylibjpeg-rle) plus a small lossless-JPEG encoder written here (none of those
writes process 14). Forged ones keep a valid stream and change what its header declares: the
attacks of the security review (a small DICOM header in front of a huge codestream, a JPEG
declaring far more pixels than its data holds).
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import simplejpeg
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

DERMOSCOPIC = UID("1.2.840.10008.5.1.4.1.1.77.1.7")
# Canary patient values: a test fails if any of these reaches a log (tests/service/test_phi_canary.py).
CANARY_NAME, CANARY_BIRTH_DATE, CANARY_MRN = "CANARY^PATIENT^QX", "19230607", "MRN-CANARY-7Q3Z"


def pattern(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A smooth, colourful RGB test image (compresses like a photo, not like noise)."""
    y, x = np.mgrid[0:rows, 0:cols]
    rgb = np.stack([(x * 3 + seed) % 256, (y * 2) % 256, ((x + y) // 2 + 40 * seed) % 256], axis=-1)
    return rgb.astype(np.uint8)


def jpeg(rgb: np.ndarray, *, progressive: bool = False, quality: int = 90) -> bytes:
    """Baseline (or progressive) YCbCr 4:4:4 JPEG with a JFIF header."""
    data: bytes = simplejpeg.encode_jpeg(rgb, quality=quality, colorsubsampling="444")
    if progressive:  # simplejpeg writes baseline only; Pillow (dev extra) writes progressive
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=quality, progressive=True, subsampling=0)
        data = buf.getvalue()
    return data


# ---- lossless JPEG (ITU-T T.81 process 14, predictor 1), Huffman table K.3 -----------------------
_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_lossless(rgb: np.ndarray) -> bytes:
    """Process 14, selection value 1 (DICOM's JPEG Lossless SV1), 8-bit, 3 interleaved components."""
    h, w, nc = rgb.shape
    x = rgb.astype(np.int32)
    pred = np.empty_like(x)
    pred[0, 0], pred[0, 1:], pred[1:, 0], pred[1:, 1:] = 128, x[0, :-1], x[:-1, 0], x[1:, :-1]
    diff = (x - pred).reshape(-1)
    ssss = np.zeros(diff.shape, np.int64)
    nz = diff != 0
    ssss[nz] = np.floor(np.log2(np.abs(diff[nz]))).astype(np.int64) + 1
    extra = np.where(diff < 0, diff + (1 << ssss) - 1, diff)
    lengths, codes, code, k = np.zeros(12, np.int64), np.zeros(12, np.int64), 0, 0
    for length, count in enumerate(_DC_BITS, 1):
        for _ in range(count):
            lengths[k], codes[k], k, code = length, code, k + 1, code + 1
        code <<= 1
    value = (codes[ssss] << ssss) | extra  # Huffman code, then SSSS extra bits
    nbits = lengths[ssss] + ssss
    shifts = nbits[:, None] - 1 - np.arange(nbits.max())[None, :]  # MSB first
    bits = ((value[:, None] >> np.maximum(shifts, 0)) & 1)[shifts >= 0].astype(np.uint8)
    bits = np.concatenate([bits, np.ones(-len(bits) % 8, np.uint8)])  # pad with 1s
    packed = np.packbits(bits)
    stuffed = np.insert(packed, np.flatnonzero(packed == 0xFF) + 1, 0).tobytes()  # 0xFF -> 0xFF00
    out = b"\xff\xd8" + _segment(0xC4, b"\x00" + bytes(_DC_BITS) + bytes(range(12)))
    out += _segment(0xC3, struct.pack(">BHHB", 8, h, w, nc) + b"".join(bytes([i + 1, 0x11, 0]) for i in range(nc)))
    out += _segment(0xDA, bytes([nc]) + b"".join(bytes([i + 1, 0]) for i in range(nc)) + b"\x01\x00\x00")
    return out + stuffed + b"\xff\xd9"


def jpeg_ls(rgb: np.ndarray) -> bytes:
    import jpeg_ls as charls

    return bytes(charls.encode_array(rgb, lossy_error=0, interleave_mode=2))


def j2k(rgb: np.ndarray) -> bytes:
    from openjpeg.utils import encode_array

    return bytes(encode_array(rgb, photometric_interpretation=1, use_mct=True))  # 1: RGB input


# ---- forging what a header declares -------------------------------------------------------------


def forge_jpeg_size(data: bytes, width: int, height: int, components: int | None = None) -> bytes:
    """The same JPEG (or JPEG-LS) whose frame header (SOF) declares another size."""
    out = bytearray(data)
    i = 2
    while i < len(out):
        marker = out[i + 1]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
            struct.pack_into(">HH", out, i + 5, height, width)
            if components is not None:
                out[i + 9] = components
            return bytes(out)
        i += 2 + struct.unpack_from(">H", out, i + 2)[0]
    raise ValueError("no SOF marker")


def forge_j2k_size(data: bytes, width: int, height: int) -> bytes:
    """The same J2K codestream whose SIZ declares another image size (one tile covering it)."""
    out = bytearray(data)
    struct.pack_into(">IIIIII", out, 8, width, height, 0, 0, width, height)
    return bytes(out)


# ---- DICOM wrappers ---------------------------------------------------------------------------


def dicom(
    pixel_data: bytes | list[bytes],
    rows: int,
    cols: int,
    ts: UID = ExplicitVRLittleEndian,
    photometric: str = "RGB",
    **header: object,
) -> bytes:
    """A Dermoscopic Photography object with canary patient values; a list of frames is encapsulated."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DERMOSCOPIC
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DERMOSCOPIC, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientBirthDate, ds.PatientID = CANARY_NAME, CANARY_BIRTH_DATE, CANARY_MRN
    ds.AccessionNumber, ds.Modality = "ACC42", "XC"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 3, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration = 8, 8, 7, 0, 0
    ds.PixelData = encapsulate(pixel_data) if isinstance(pixel_data, list) else pixel_data
    if isinstance(pixel_data, list):
        ds["PixelData"].VR = "OB"
    for key, value in header.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buf.getvalue()


def rle(rgb: np.ndarray) -> bytes:
    """One RLE Lossless frame (three byte-plane segments)."""
    from rle.utils import encode_pixel_data

    rows, cols = rgb.shape[:2]
    return bytes(
        encode_pixel_data(rgb.tobytes(), rows=rows, columns=cols, samples_per_pixel=3, bits_allocated=8, byteorder="<")
    )


TS = pydicom.uid  # the transfer syntax UIDs, for callers
