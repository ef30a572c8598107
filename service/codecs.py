"""What a codestream declares about itself, read from its headers without decoding a pixel.

Every decoder in the service (plain JPEG/PNG uploads and every DICOM transfer syntax) asks this module
first: the codec's own width, height, component count and precision (which a DICOM header may contradict:
the 64x64 header in front of a 30000x30000 JPEG), whether the data can possibly be complete, and how much
memory the decode will need (:func:`decode_cost`), so that a decode that would go over the budget is
refused before it allocates anything.

The memory figures are per decoded pixel and were measured with ``python -m service.bench.memory``
(docs/service.md); each is rounded up.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"

# SOF markers: C0 baseline, C1 extended, C2 progressive, C3 lossless (Huffman); C9-CB the same with
# arithmetic coding; F7 is JPEG-LS (SOF55). C5-C7 and CD-CF are hierarchical (differential) frames.
_SOF_PROCESS = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless", 0xF7: "jpeg-ls",
                0xC9: "arithmetic", 0xCA: "arithmetic", 0xCB: "arithmetic"}  # fmt: skip
_HIERARCHICAL = frozenset({0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD9)])  # TEM, RSTn, SOI: no length field
_SOS, _EOI, _APP0, _APP14 = 0xDA, 0xD9, 0xE0, 0xEE

# Working memory per decoded pixel (3 samples), measured (see the module docstring) and rounded up.
BYTES_PER_PIXEL = {"lossless": 5, "png": 7, "jpeg-ls": 7, "rle": 7, "j2k": 16, "native": 4}
MB = 1 << 20


@dataclass(frozen=True)
class Codestream:
    """What a codestream's own header declares.

    ``process`` names the coding (``baseline``, ``extended``, ``progressive``, ``lossless``, ``jpeg-ls``,
    ``arithmetic``, ``j2k``, ``png``, ``rle``); ``blocks`` is the number of 8x8 DCT blocks over all
    components (JPEG only: a progressive decode keeps every block's coefficients in memory).
    """

    process: str
    width: int
    height: int
    components: int
    precision: int
    blocks: int = 0
    tiles: int = 1
    scan_offset: int = 0  # JPEG: where the first scan's entropy-coded data starts
    signed: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height


# ---- JPEG (and JPEG-LS, which shares the marker syntax) --------------------------------------------


def jpeg_codestream(data: bytes) -> Codestream:
    """Walk the marker segments up to the first scan and return what the frame header (SOF) declares.

    Raises:
        InvalidImage: no frame header before the first scan (truncated, or not a JPEG), or broken segments.
        UnsupportedMediaType: a hierarchical JPEG (several frames of different sizes).
    """
    if not data.startswith(b"\xff\xd8"):
        raise InvalidImage("the JPEG codestream does not start with SOI")
    i, n, frame = 2, len(data), None
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
        (length,) = struct.unpack_from(">H", data, i + 2)
        if length < 2 or i + 2 + length > n:
            break  # a segment cut off by the end of the data: truncated
        if marker in _HIERARCHICAL:
            raise UnsupportedMediaType("hierarchical JPEG is not supported")
        if marker in _SOF_PROCESS and frame is None:
            frame = _frame_header(data[i + 4 : i + 2 + length], _SOF_PROCESS[marker])
        if marker == _SOS:
            if frame is None:
                break
            return Codestream(**{**frame.__dict__, "scan_offset": i + 2 + length})
        i += 2 + length
    raise InvalidImage("JPEG has no frame header before its image data (truncated or not a JPEG)")


def _frame_header(seg: bytes, process: str) -> Codestream:
    if len(seg) < 6:
        raise InvalidImage("JPEG frame header is truncated")
    precision, height, width, ncomp = struct.unpack_from(">BHHB", seg)
    if ncomp < 1 or len(seg) < 6 + 3 * ncomp:
        raise InvalidImage("JPEG frame header is truncated")
    sampling = [(seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 0x0F) for k in range(ncomp)]
    if any(h < 1 or v < 1 for h, v in sampling):
        raise InvalidImage("JPEG frame header has a zero sampling factor")
    hmax, vmax = max(h for h, _ in sampling), max(v for _, v in sampling)
    blocks = sum(math.ceil(width * h / hmax / 8) * math.ceil(height * v / vmax / 8) for h, v in sampling)
    return Codestream(process, width, height, ncomp, precision, blocks=blocks)


def jpeg_has_end(data: bytes, scan_offset: int) -> bool:
    # After the first scan 0xFFD9 can only be EOI: entropy-coded data stuffs every 0xFF with 0x00.
    return data.find(b"\xff\xd9", scan_offset) >= 0


def as_rgb_stream(data: bytes | memoryview) -> bytes | bytearray | memoryview:
    """The same JPEG with its 3 components marked as RGB when nothing in the stream says what they are.

    DICOM's ``RGB`` photometric interpretation on a JPEG transfer syntax means the encoder applied no
    colour transform, but libjpeg decides from the stream alone: JFIF means YCbCr, an Adobe marker
    carries a transform flag, and without either it guesses YCbCr for component ids 1, 2, 3 (the
    ambiguous case: pydicom's SC_jpeg_no_color_transform.dcm). Only that case is rewritten, to
    libjpeg's own RGB signal: component ids 'R', 'G', 'B' in SOF and SOS (one copy of the stream,
    patched in place). A stream that says what it holds is believed over the DICOM label.
    """
    i, ids, patches = 2, {}, []
    while i + 4 <= len(data):
        marker = data[i + 1]
        if marker in _STANDALONE or marker == 0xFF:
            i += 2 if marker != 0xFF else 1
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        tag = bytes(data[i + 4 : i + 9])
        # libjpeg's own test: a JFIF segment of 14+ bytes, an Adobe one of 12+ (a shorter one is ignored).
        if (marker == _APP0 and tag == b"JFIF\0" and length >= 16) or (
            marker == _APP14 and tag == b"Adobe" and length >= 14
        ):
            return data  # the stream declares its colour space itself
        if marker in _SOF_PROCESS and length >= 17 and data[i + 9] == 3:
            for k, new in enumerate(b"RGB"):
                ids[data[i + 10 + 3 * k]] = new
                patches.append((i + 10 + 3 * k, new))
        elif marker == _SOS and i + 5 + 2 * data[i + 4] <= len(data):
            patches += [
                (i + 5 + 2 * k, ids[data[i + 5 + 2 * k]]) for k in range(data[i + 4]) if data[i + 5 + 2 * k] in ids
            ]
            out = bytearray(data)
            for pos, value in patches:
                out[pos] = value
            return out
        i += 2 + length
    return data  # no scan found: the decoder will refuse it


def exif_orientation(data: bytes, scan_offset: int) -> int:
    """The EXIF orientation (1-8) from an APP1 segment before the first scan; 1 when absent or unreadable."""
    i = 2
    while i + 4 <= scan_offset:
        marker = data[i + 1]
        if marker in _STANDALONE or marker == 0xFF:
            i += 2 if marker != 0xFF else 1
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\0\0":
            return _tiff_orientation(data[i + 10 : i + 2 + length])
        i += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(endian + "I", tiff, 4)
        (count,) = struct.unpack_from(endian + "H", tiff, ifd)
        for k in range(count):
            tag, kind, _, value = struct.unpack_from(endian + "HHIH", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112 and kind == 3:  # Orientation, SHORT
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


# ---- PNG ---------------------------------------------------------------------------------------------

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel (3: palette index)


def png_codestream(data: bytes) -> Codestream:
    """Width, height and channel layout from IHDR."""
    if len(data) < 33 or not data.startswith(PNG_MAGIC) or data[12:16] != b"IHDR":
        raise InvalidImage("PNG has no IHDR header")
    width, height, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16) or interlace > 1:
        raise InvalidImage("PNG header declares an invalid colour type, bit depth or interlace method")
    return Codestream("png", width, height, _PNG_CHANNELS[colour], depth, tiles=1 + interlace)


def check_png_complete(data: bytes, info: Codestream) -> None:
    """Inflate the IDAT stream (discarding the output) and require exactly the bytes IHDR implies.

    libpng treats "not enough image data" as a warning and fills the rest of the image; a half image
    must not be classified. Memory stays flat: the output goes to a fixed-size window and is dropped.
    """
    expected = _png_raw_size(info)
    inflater, got, pos, seen_iend = zlib.decompressobj(), 0, 8, False
    try:
        while pos + 8 <= len(data):
            length, kind = struct.unpack_from(">I4s", data, pos)
            body = data[pos + 8 : pos + 8 + length]
            if len(body) < length:
                break
            if kind == b"IDAT":
                chunk = inflater.decompress(body, 1 << 16)
                while True:
                    got += len(chunk)
                    if got > expected or not inflater.unconsumed_tail:
                        break
                    chunk = inflater.decompress(inflater.unconsumed_tail, 1 << 16)
            elif kind == b"IEND":
                seen_iend = True
                break
            pos += 12 + length
    except zlib.error as exc:
        raise InvalidImage("PNG image data is corrupt") from exc
    if not seen_iend:
        raise InvalidImage("PNG is truncated (no IEND chunk)")
    if got != expected or not inflater.eof:
        raise InvalidImage(f"PNG image data is incomplete ({got} of {expected} bytes)")


def _png_raw_size(info: Codestream) -> int:
    bits = info.components * info.precision  # per pixel

    def pass_size(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits + 7) // 8)  # a filter byte per row

    w, h = info.width, info.height
    if info.tiles == 1:  # not interlaced
        return pass_size(w, h)
    # Adam7: (x0, y0, dx, dy) of the seven passes
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    return sum(pass_size((w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy) for x0, y0, dx, dy in passes)


# ---- JPEG 2000 ---------------------------------------------------------------------------------------


def j2k_codestream(data: bytes) -> Codestream:
    """Image size, components, precision and tile count from the SIZ segment (raw codestream or JP2)."""
    stream = _jp2_payload(data) if data.startswith(JP2_SIGNATURE) else data
    if not stream.startswith(J2K_SOC_SIZ) or len(stream) < 42:
        raise InvalidImage("the JPEG 2000 codestream has no SIZ header")
    (lsiz,) = struct.unpack_from(">H", stream, 4)
    x, y, xo, yo, xt, yt, xto, yto, ncomp = struct.unpack_from(">IIIIIIIIH", stream, 8)
    if ncomp < 1 or lsiz != 38 + 3 * ncomp or len(stream) < 4 + lsiz:
        raise InvalidImage("the JPEG 2000 SIZ header is malformed")
    if x <= xo or y <= yo or xt == 0 or yt == 0 or xto > xo or yto > yo:
        raise InvalidImage("the JPEG 2000 SIZ header declares an empty image or invalid tiling")
    comps = [stream[42 + 3 * k : 45 + 3 * k] for k in range(ncomp)]
    if any(c[1] != 1 or c[2] != 1 for c in comps):
        raise UnsupportedMediaType("JPEG 2000 with subsampled components is not supported")
    precisions = {(c[0] & 0x7F) + 1 for c in comps}
    tiles = math.ceil((x - xto) / xt) * math.ceil((y - yto) / yt)
    return Codestream("j2k", x - xo, y - yo, ncomp, max(precisions), tiles=tiles, signed=bool(comps[0][0] & 0x80))


def _jp2_payload(data: bytes) -> bytes:
    pos = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:
            if pos + 16 > len(data):
                break
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif length == 0:
            length = len(data) - pos
        if length < header:
            break
        if kind == b"jp2c":
            return data[pos + header : pos + length]
        pos += length
    raise InvalidImage("the JP2 file has no codestream box")


# ---- RLE (DICOM PS3.5 Annex G) ----------------------------------------------------------------------


def rle_segments(header: bytes, frame_len: int) -> int:
    """The number of segments an RLE frame header (its first 64 bytes) declares, offsets checked in range."""
    if len(header) < 64 or frame_len < 64:
        raise InvalidImage("the RLE frame header is truncated")
    count, *offsets = struct.unpack_from("<16I", header)
    used = offsets[:count]
    if not 1 <= count <= 15 or used[0] != 64 or used != sorted(used) or used[-1] >= frame_len:
        raise InvalidImage("the RLE frame header is malformed")
    return int(count)


# ---- the memory budget ------------------------------------------------------------------------------


def decode_cost(info: Codestream, out_pixels: int | None = None, extra: int = 0) -> int:
    """Bytes of working memory the decode of ``info`` needs, from its header alone.

    Args:
        info: what the codestream declares.
        out_pixels: pixels the decoder produces when it scales down while decoding (JPEG DCT
            scaling); default the declared size.
        extra: bytes the caller needs on top (e.g. a colour conversion of the output).
    """
    out = info.pixels if out_pixels is None else out_pixels
    fixed = 2 * MB  # tables, row buffers, the decoder's own state
    if info.process in ("baseline", "extended", "arithmetic"):
        return 3 * out + extra + fixed  # libjpeg streams a few MCU rows into the (possibly scaled) output
    if info.process == "progressive":
        return 128 * info.blocks + 3 * out + extra + fixed  # every block's 64 coefficients (int16) are kept
    # A JPEG 2000 tile costs openjpeg a few kilobytes of bookkeeping before any pixel.
    tiles = 8192 * info.tiles if info.process == "j2k" else 0
    return BYTES_PER_PIXEL[info.process] * out + tiles + extra + fixed


def check_budget(info: Codestream, budget_bytes: int, what: str, out_pixels: int | None = None, extra: int = 0) -> None:
    """Refuse (413) a decode whose working memory (:func:`decode_cost`) would pass ``budget_bytes``."""
    need = decode_cost(info, out_pixels, extra)
    if need > budget_bytes:
        raise PayloadTooLarge(
            f"{what} of {info.width}x{info.height} would need about {need // MB} MiB to decode; "
            f"the limit is {budget_bytes // MB} MiB"
        )
