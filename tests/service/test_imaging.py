"""service.imaging: odd image types made here with Pillow/OpenCV, limits read from headers, training parity."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from service import imaging
from service.codecs import jpeg_codestream, png_codestream
from service.errors import InvalidImage, PayloadTooLarge
from service.imaging import center_crop_resize, decode_image, read_header, reduction_factor
from tests.conftest import TEST_DATA, shared_data
from tests.service.conftest import encode, jpeg_bytes, png_bytes

S = 32
LIMIT = 10_000_000


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    """A valid 30000x30000 1-bit PNG (~110 KB): 900 million pixels once decoded."""
    side = 30000
    row = b"\x00" * (1 + side // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise AssertionError("cv2.imdecode was called")

    monkeypatch.setattr(imaging.cv2, "imdecode", boom)


def test_png_bomb_is_refused_from_its_header(png_bomb: bytes, no_decode: None) -> None:
    assert len(png_bomb) < 1_000_000
    assert read_header(png_bomb).width == 30000
    with pytest.raises(PayloadTooLarge, match="30000x30000"):
        decode_image(png_bomb, S, LIMIT)


def test_huge_jpeg_header_is_refused_without_decoding(no_decode: None) -> None:
    data = bytearray(jpeg_bytes(64, 48))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 40000, 40000)  # forge the frame size
    with pytest.raises(PayloadTooLarge, match="40000x40000"):
        decode_image(bytes(data), S, LIMIT)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"%PDF-1.7 this is not an image", "not a JPEG or PNG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "IHDR"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "no frame header"),
    ],
)
def test_undecodable_uploads(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        decode_image(data, S, LIMIT)


@pytest.mark.parametrize("make", [jpeg_bytes, png_bytes])
def test_truncated_images_are_refused(make: object) -> None:
    data = make(200, 150)  # type: ignore[operator]
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: len(data) * 2 // 3], S, LIMIT)


def test_truncated_progressive_jpeg_is_refused() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    data = encode(noisy, "JPEG", progressive=True, quality=90)
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2], S, LIMIT)


def test_greyscale_becomes_three_equal_channels() -> None:
    out = decode_image(encode(Image.new("L", (64, 48), 77), "PNG"), S, LIMIT)
    assert out.pixels.shape == (S, S, 3)
    assert (out.pixels == 77).all()


def test_16_bit_png_is_scaled_not_truncated() -> None:
    grey = np.full((48, 64), 65535, np.uint16)
    grey[:, :32] = 0x8000  # scaled: 128; a truncating cast (& 0xFF) would give 0
    ok, buf = cv2.imencode(".png", grey)
    assert ok
    out = decode_image(buf.tobytes(), S, LIMIT)
    assert out.pixels[S // 2, 0].tolist() == [128, 128, 128]
    assert out.pixels[S // 2, -1].tolist() == [255, 255, 255]


def test_palette_png_is_expanded() -> None:
    out = decode_image(encode(Image.new("RGB", (64, 48), (0, 128, 255)).convert("P"), "PNG"), S, LIMIT)
    assert np.abs(out.pixels[S // 2, S // 2].astype(int) - [0, 128, 255]).max() <= 3


def test_rgba_png_drops_alpha_like_pil_convert_rgb() -> None:
    img = Image.new("RGBA", (64, 48), (10, 200, 30, 0))
    out = decode_image(encode(img, "PNG"), S, LIMIT)
    assert out.pixels[S // 2, S // 2].tolist() == list(img.convert("RGB").getpixel((32, 24)))


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    img = Image.new("RGB", (64, 48), (255, 0, 0)).convert("CMYK")
    assert img.mode == "CMYK"
    out = decode_image(encode(img, "JPEG", quality=95), S, LIMIT)
    r, g, b = out.pixels[S // 2, S // 2].astype(int)
    assert r > 240 and g < 15 and b < 15


@pytest.mark.parametrize("size", [S, 16])  # 16: also through the reduced-size JPEG decode
def test_exif_orientation_is_applied(size: int) -> None:
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = (255, 0, 0)  # left half red, right half blue, as stored
    stored[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half ends on top
    data = encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    out = decode_image(data, size, LIMIT)
    assert (out.width, out.height) == (40, 80)
    top, bottom = out.pixels[1, size // 2].astype(int), out.pixels[-2, size // 2].astype(int)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_progressive_jpeg_decodes_like_baseline() -> None:
    rng = np.random.default_rng(1)
    img = Image.fromarray(cv2.GaussianBlur(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), (9, 9), 3))
    base = decode_image(encode(img, "JPEG", quality=95), S, LIMIT).pixels.astype(int)
    prog = decode_image(encode(img, "JPEG", quality=95, progressive=True), S, LIMIT).pixels.astype(int)
    assert np.abs(base - prog).mean() < 1.0


def test_center_crop_resize_matches_training() -> None:
    train_pre = pytest.importorskip("train.preprocess", reason="train/preprocess.py is not in this checkout")
    rng = np.random.default_rng(2)
    for h, w, size in [(450, 600, 224), (600, 450, 224), (31, 97, 16), (224, 224, 224), (50, 40, 64)]:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(center_crop_resize(rgb, size), train_pre.center_crop_resize(rgb, size))


def test_center_crop_takes_the_middle_square() -> None:
    rgb = np.zeros((40, 100, 3), np.uint8)
    rgb[:, 30:70] = 255  # exactly the central 40x40 square is white
    assert (center_crop_resize(rgb, 20) == 255).all()


def test_reduced_decode_only_when_still_at_least_the_input_size() -> None:
    assert reduction_factor(jpeg_codestream(jpeg_bytes(600, 450)), 224) == 2
    assert reduction_factor(jpeg_codestream(jpeg_bytes(600, 440)), 224) == 1  # 220 < 224
    assert reduction_factor(jpeg_codestream(jpeg_bytes(2000, 1800)), 224) == 8
    assert reduction_factor(png_codestream(png_bytes(2000, 1800)), 224) == 1  # PNG: no DCT scaling


def full_decode(path: Path, size: int) -> np.ndarray:
    bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    return center_crop_resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size)


def test_reduced_decode_of_a_large_photo_is_close_to_a_full_decode() -> None:
    path = TEST_DATA / "large" / "ISIC_0000446.jpg"
    header = read_header(path.read_bytes())
    assert reduction_factor(jpeg_codestream(path.read_bytes()), 224) > 1
    out = decode_image(path.read_bytes(), 224, 100_000_000)
    assert (out.width, out.height) == (header.width, header.height)
    assert np.abs(out.pixels.astype(int) - full_decode(path, 224)).mean() < 2.0


def test_real_600x450_images_decode_close_to_a_full_decode() -> None:
    folder = shared_data("ham10000-600x450")
    for path in sorted(folder.glob("*.jpg"))[:10]:
        out = decode_image(path.read_bytes(), 224, LIMIT)
        assert (out.width, out.height, out.format) == (600, 450, "jpeg")
        assert np.abs(out.pixels.astype(int) - full_decode(path, 224)).mean() < 3.0
