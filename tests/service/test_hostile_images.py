"""Hostile images from the security review (issue 19): decode bombs, codestreams that contradict their
DICOM header, short data. Each is refused from headers, before any decoder runs, or by a strict decoder;
valid files of every codec still decode exactly."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import codecs
from service.bench import streams
from service.bench.streams import TS, pattern
from service.errors import InvalidImage, PayloadTooLarge
from service.hospital.dicom import read_dicom
from service.imaging import decode_budget, decode_image
from tests.service.test_dicom import forbid_decoding, no_decoding  # noqa: F401  # the fixture: every pixel decoder raises

ClientFactory = Callable[..., TestClient]
IMG = pattern(48, 64)
LIMIT = 50_000_000


def classify(client: TestClient, data: bytes, content_type: str = "application/dicom") -> dict[str, object]:
    r = client.post("/v1/classify", content=data, headers={"content-type": content_type})
    body: dict[str, object] = r.json()
    body["_status"] = r.status_code
    return body


# ---- a DICOM header in front of a much larger codestream: 400 before decoding, every codec -----------

BOMBS = {
    "jpeg-baseline": (TS.JPEGBaseline8Bit, "YBR_FULL_422", lambda: streams.forge_jpeg_size(streams.jpeg(IMG), 30000, 30000)),
    "jpeg-lossless": (TS.JPEGLosslessSV1, "RGB", lambda: streams.forge_jpeg_size(streams.jpeg_lossless(IMG), 30000, 30000)),
    "jpeg-ls": (TS.JPEGLSLossless, "RGB", lambda: streams.forge_jpeg_size(streams.jpeg_ls(IMG), 30000, 30000)),
    "j2k": (TS.JPEG2000Lossless, "RGB", lambda: streams.forge_j2k_size(streams.j2k(IMG), 30000, 30000)),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_codestream_larger_than_its_dicom_header_is_400_without_decoding(
    client_factory: ClientFactory, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ts, photometric, make = BOMBS[kind]
    data = streams.dicom([make()], 48, 64, ts, photometric)  # the header says 64x48
    assert len(data) < 10_000
    client = client_factory()  # started first: the swap canary decodes its JPEGs at start
    forbid_decoding(monkeypatch)
    body = classify(client, data)
    assert body["_status"] == 400, body
    assert "30000x30000" in str(body["detail"]) and "64x48" in str(body["detail"])


@pytest.mark.parametrize("kind", ["jpeg-baseline", "jpeg-ls"])
@pytest.mark.usefixtures("no_decoding")
def test_component_count_other_than_the_header_is_400(kind: str) -> None:
    ts, photometric, _ = BOMBS[kind]
    encoded = streams.jpeg(IMG) if kind == "jpeg-baseline" else streams.jpeg_ls(IMG)
    data = streams.dicom([streams.forge_jpeg_size(encoded, 64, 48, components=1)], 48, 64, ts, photometric)
    with pytest.raises(InvalidImage, match="1 of 8 bits"):
        read_dicom(data, max_pixels=LIMIT)


@pytest.mark.usefixtures("no_decoding")
def test_rle_frame_with_another_segment_count_is_400() -> None:
    frame = bytearray(streams.rle(IMG))
    frame[0] = 1  # declares one segment (greyscale) behind a 3-sample header
    with pytest.raises(InvalidImage, match="RLE"):
        read_dicom(streams.dicom([bytes(frame)], 48, 64, TS.RLELossless), max_pixels=LIMIT)


@pytest.mark.usefixtures("no_decoding")
def test_transfer_syntax_and_jpeg_process_must_agree() -> None:
    data = streams.dicom([streams.jpeg(IMG)], 48, 64, TS.JPEGLosslessSV1)  # a DCT stream labelled lossless
    with pytest.raises(InvalidImage, match="does not match"):
        read_dicom(data, max_pixels=LIMIT)


@pytest.mark.usefixtures("no_decoding")
def test_native_pixel_data_shorter_than_declared_is_400() -> None:
    data = streams.dicom(IMG.tobytes()[: 48 * 64 * 3 - 300], 48, 64)
    with pytest.raises(InvalidImage, match="holds"):
        read_dicom(data, max_pixels=LIMIT)


# ---- within the pixel limit but over the decode memory budget: 413 before decoding --------------------


def test_j2k_over_the_memory_budget_is_413_before_decoding(
    client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    side = 4000  # 16 Mpx: under max_pixels, but openjpeg needs ~16 bytes a pixel
    data = streams.dicom([streams.forge_j2k_size(streams.j2k(IMG), side, side)], side, side, TS.JPEG2000Lossless)
    client = client_factory(max_pixels=20_000_000)  # started first: the swap canary decodes its JPEGs at start
    forbid_decoding(monkeypatch)
    body = classify(client, data)
    assert body["_status"] == 413, body
    assert "MiB" in str(body["detail"])


def test_progressive_jpeg_pays_for_its_coefficient_buffer() -> None:
    info = codecs.jpeg_codestream(streams.forge_jpeg_size(streams.jpeg(IMG, progressive=True), 6000, 6000))
    assert info.process == "progressive" and info.blocks == 3 * 750 * 750  # 4:4:4
    scaled = 750 * 750
    assert codecs.decode_cost(info, scaled) >= 128 * info.blocks  # not just the 1/8-scale output
    baseline = codecs.jpeg_codestream(streams.forge_jpeg_size(streams.jpeg(IMG), 6000, 6000))
    assert codecs.decode_cost(baseline, scaled) < 4 * scaled + 4 * codecs.MB  # scaled output + fixed buffers
    with pytest.raises(PayloadTooLarge, match="MiB"):
        codecs.check_budget(info, decode_budget(36_000_000) // 2, "a JPEG", scaled)


# ---- short data: libjpeg/openjpeg/CharLS would fill the rest; here it is 400 ---------------------------


def test_jpeg_declaring_4000_square_with_64_square_data_is_400(client_factory: ClientFactory) -> None:
    small = streams.jpeg(pattern(64, 64))
    forged = streams.forge_jpeg_size(small, 4000, 4000)  # EOI kept: only the data is short
    assert len(forged) < 5_000 and forged.endswith(b"\xff\xd9")
    body = classify(client_factory(), forged, "image/jpeg")
    assert body["_status"] == 400, body
    assert str(body["type"]).endswith("/invalid-image")


@pytest.mark.parametrize("kind", ["jpeg-baseline", "jpeg-lossless", "jpeg-ls", "j2k"])
def test_truncated_dicom_codestream_is_400(client_factory: ClientFactory, kind: str) -> None:
    ts, photometric, _ = BOMBS[kind]
    rgb = pattern(96, 128)
    encoded = {"jpeg-baseline": streams.jpeg, "jpeg-lossless": streams.jpeg_lossless,
               "jpeg-ls": streams.jpeg_ls, "j2k": streams.j2k}[kind](rgb)  # fmt: skip
    end = b"\xff\xd9"
    cut = encoded[: len(encoded) * 2 // 3] + end  # framing stays valid: only the codestream is short
    body = classify(client_factory(), streams.dicom([cut], 96, 128, ts, photometric))
    assert body["_status"] == 400, body


def test_png_with_short_image_data_is_400() -> None:
    import struct
    import zlib

    rows = b"".join(b"\x00" + IMG[r].tobytes() for r in range(40))  # 40 of 48 rows

    def chunk(kind: bytes, payload: bytes) -> bytes:  # fmt: skip
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    png = codecs.PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    with pytest.raises(InvalidImage, match="incomplete"):
        decode_image(png, 32, LIMIT)


# ---- what must still work ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lossless", "jpeg-ls", "j2k", "rle", "native"])
def test_lossless_codecs_decode_exactly(kind: str) -> None:
    frame = {"lossless": lambda: [streams.jpeg_lossless(IMG)], "jpeg-ls": lambda: [streams.jpeg_ls(IMG)],
             "j2k": lambda: [streams.j2k(IMG)], "rle": lambda: [streams.rle(IMG)], "native": IMG.tobytes}[kind]()  # fmt: skip
    ts = {"lossless": TS.JPEGLosslessSV1, "jpeg-ls": TS.JPEGLSLossless, "j2k": TS.JPEG2000Lossless,
          "rle": TS.RLELossless, "native": TS.ExplicitVRLittleEndian}[kind]  # fmt: skip
    np.testing.assert_array_equal(read_dicom(streams.dicom(frame, 48, 64, ts), max_pixels=LIMIT).rgb, IMG)


def test_native_rgb_is_a_view_into_the_upload_not_a_copy() -> None:
    data = streams.dicom(IMG.tobytes(), 48, 64)
    rgb = read_dicom(data, max_pixels=LIMIT).rgb
    assert not rgb.flags.owndata and np.shares_memory(rgb, np.frombuffer(data, np.uint8))


def test_dicom_jpeg_is_decoded_at_reduced_scale_when_the_model_input_allows() -> None:
    rgb = pattern(480, 640)
    data = streams.dicom([streams.jpeg(rgb)], 480, 640, TS.JPEGBaseline8Bit, "YBR_FULL_422")
    small = read_dicom(data, max_pixels=LIMIT, min_side=112)
    assert small.rgb.shape == (120, 160, 3) and (small.width, small.height) == (640, 480)  # 1/4, header size kept
    full = read_dicom(data, max_pixels=LIMIT).rgb
    assert full.shape == (480, 640, 3)
    assert np.abs(cv2.resize(full, (160, 120), interpolation=cv2.INTER_AREA).astype(int) - small.rgb).mean() < 3
