"""Property-based tests (hypothesis) where an example table would miss cases: batch collection,
the size parsers that guard the pixel limits, multipart unwrapping and the metadata schema.

Each property is one the service relies on; hypothesis shrinks a failure to its smallest case.
"""

from __future__ import annotations

import asyncio
import io
import queue
import struct
import zlib
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from service.batcher import collect_batch
from service.bench.streams import dicom
from service.contract import ModelMetadata
from service.errors import InvalidImage, PayloadTooLarge
from service.hospital.dicom import read_dicom
from service.imaging import ImageHeader, read_header
from service.media import DECODERS, pick_decoder

# No per-example deadline: this machine is shared with training runs, so timings vary widely.
PROPERTY = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


# --- collect_batch ------------------------------------------------------------------------------


@PROPERTY
@given(
    items=st.lists(st.integers(), max_size=40),
    max_batch=st.integers(1, 16),
    max_wait_s=st.sampled_from([0.0, 0.001]),
    more_coming=st.booleans(),
)
def test_collect_batch_drains_in_order_in_full_batches_of_at_most_max_batch(
    items: list[int], max_batch: int, max_wait_s: float, more_coming: bool
) -> None:
    q: queue.Queue[int] = queue.Queue()
    for item in items:
        q.put(item)
    batches = []
    while batch := collect_batch(q, max_batch, max_wait_s, first_timeout=0.0, more_coming=lambda: more_coming):
        batches.append(batch)
    assert [x for b in batches for x in b] == items  # nothing lost, duplicated or reordered
    assert all(1 <= len(b) <= max_batch for b in batches)
    assert all(len(b) == max_batch for b in batches[:-1])  # what is waiting is taken: only the last is short


# --- the size parsers behind the pixel limits ------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_header(width: int, height: int, sof: int, app_payloads: list[bytes], fill: int, dht: bytes) -> bytes:
    """SOI, APPn segments, fill bytes, a 3-component frame header, then a DHT and a complete SOS."""
    frame = struct.pack(">BHHB", 8, height, width, 3) + bytes([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1])
    scan = bytes([3, 1, 0x00, 2, 0x11, 3, 0x11, 0, 63, 0])
    apps = b"".join(segment(0xE0 + k % 16, p) for k, p in enumerate(app_payloads))
    # DHT (C4) sits in the SOF marker range but declares no size: its bytes must not be read as one
    return b"\xff\xd8" + apps + b"\xff" * fill + segment(sof, frame) + segment(0xC4, dht) + segment(0xDA, scan)


SIDES = st.integers(1, 65535)


@PROPERTY
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
def test_png_header_size_is_read_exactly(width: int, height: int) -> None:
    assert read_header(png_header(width, height)) == ImageHeader("png", width, height)


@PROPERTY
@given(
    width=SIDES,
    height=SIDES,
    sof=st.sampled_from([0xC0, 0xC1, 0xC2]),
    apps=st.lists(st.binary(max_size=64), max_size=4),
    fill=st.integers(0, 3),
    dht=st.binary(min_size=17, max_size=40),
)
def test_jpeg_header_size_is_read_from_the_frame_header_only(
    width: int, height: int, sof: int, apps: list[bytes], fill: int, dht: bytes
) -> None:
    header = read_header(jpeg_header(width, height, sof, apps, fill, dht))
    assert header == ImageHeader("jpeg", width, height)


@PROPERTY
@given(width=st.integers(1, 40), height=st.integers(1, 40), fmt=st.sampled_from(["JPEG", "PNG"]))
def test_header_size_matches_what_an_encoder_wrote(width: int, height: int, fmt: str) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, fmt)
    assert read_header(buf.getvalue()) == ImageHeader(fmt.lower(), width, height)


@PROPERTY
@given(prefix=st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b""]), rest=st.binary(max_size=200))
def test_header_parsers_refuse_garbage_with_invalid_image_only(prefix: bytes, rest: bytes) -> None:
    try:
        header = read_header(prefix + rest)
    except InvalidImage:
        return
    except Exception as exc:  # a parser bug (IndexError, struct.error, ...) would be a 500
        pytest.fail(f"read_header raised {type(exc).__name__}: {exc}")
    assert header.width > 0 and header.height > 0


@PROPERTY
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), frames=st.integers(1, 4), slack=st.integers(-3, 3))
def test_dicom_pixel_limit_counts_rows_columns_and_frames(rows: int, cols: int, frames: int, slack: int) -> None:
    declared = rows * cols * frames
    limit = max(64, declared + slack)  # 64: the smallest LESIONSERVE_MAX_PIXELS allowed
    pixels = np.full((frames, rows, cols, 3), 90, dtype=np.uint8).tobytes()
    data = dicom(pixels, rows, cols, **({"NumberOfFrames": frames} if frames > 1 else {}))
    if declared > limit:
        with pytest.raises(PayloadTooLarge):
            read_dicom(data, max_pixels=limit)
    else:
        image = read_dicom(data, max_pixels=limit)
        assert (image.height, image.width, image.frames) == (rows, cols, frames)


# --- multipart ---------------------------------------------------------------------------------------


def multipart(files: dict[str, Any], data: dict[str, str]) -> tuple[Headers, bytes]:
    request = httpx.Request("POST", "http://lesionserve.test/v1/classify", files=files, data=data)
    return Headers(raw=[(k.lower(), v) for k, v in request.headers.raw]), request.read()


@PROPERTY
@given(
    payload=st.binary(max_size=2048),
    media_type=st.sampled_from(["image/jpeg", "image/png", "application/dicom", "IMAGE/PNG; name=x"]),
    filename=st.text(st.characters(codec="ascii", exclude_characters='"\\\r\n'), max_size=20),
    fields=st.dictionaries(st.sampled_from(["note", "patient", "id"]), st.text(max_size=20), max_size=3),
)
def test_multipart_image_part_comes_out_byte_for_byte(
    payload: bytes, media_type: str, filename: str, fields: dict[str, str]
) -> None:
    headers, body = multipart({"image": (filename or "x", payload, media_type)}, fields)
    decoder, data = asyncio.run(pick_decoder(headers, body))
    assert data == payload  # CRLFs, dashes or a boundary-like run inside the image change nothing
    assert decoder is DECODERS[media_type.split(";")[0].lower()]


@PROPERTY
@given(head=st.binary(min_size=128, max_size=128), tail=st.binary(max_size=64), dicom=st.booleans())
def test_generic_multipart_part_is_sniffed_as_dicom_by_its_magic_only(head: bytes, tail: bytes, dicom: bool) -> None:
    payload = head + (b"DICM" if dicom else b"JPEG") + tail
    headers, body = multipart({"image": ("upload", payload, "application/octet-stream")}, {})
    decoder, data = asyncio.run(pick_decoder(headers, body))
    assert data == payload
    assert decoder is DECODERS["application/dicom" if dicom else "image/jpeg"]


# --- the metadata schema ---------------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text()
JSON = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)
)


@st.composite
def metadata(draw: st.DrawFn) -> ModelMetadata:
    classes = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=10, unique=True))
    members = draw(st.integers(1, 3))
    positive = st.floats(min_value=1e-6, max_value=100, allow_nan=False)
    return ModelMetadata(
        classes=classes,
        input_size=draw(st.integers(8, 1024)),
        name=draw(st.text(max_size=30)),
        version=draw(st.text(max_size=10)),
        class_names={c: draw(st.text(max_size=30)) for c in classes},
        malignant_classes=draw(st.lists(st.sampled_from(classes), unique=True)),
        malignancy_threshold=draw(st.floats(0.0, 1.0)),
        preprocessing=draw(st.dictionaries(st.text(max_size=10), JSON, max_size=3)),
        tta=draw(st.lists(st.text(max_size=10), min_size=1, max_size=8)),
        temperature=draw(st.lists(positive, min_size=members, max_size=members)),
        architecture=draw(st.lists(st.text(max_size=20), min_size=members, max_size=members)),
        training_data=draw(st.dictionaries(st.sampled_from(["name", "license", "citation"]), st.text(max_size=20))),
        metrics=draw(st.dictionaries(st.text(max_size=10), JSON, max_size=4)),
        exported_at=draw(st.text(max_size=25)),
        weights_sha256=draw(st.text("0123456789abcdef", min_size=64, max_size=64)),
        ensemble_size=members,
    )


@PROPERTY
@given(meta=metadata())
def test_metadata_survives_the_trip_through_metadata_props(meta: ModelMetadata) -> None:
    props = meta.to_props()
    assert all(isinstance(v, str) for v in props.values())  # ONNX metadata_props hold strings only
    assert ModelMetadata.from_props(props) == meta


@PROPERTY
@given(meta=metadata(), dropped=st.sampled_from(ModelMetadata.REQUIRED))
def test_metadata_missing_any_required_key_is_refused_naming_it(meta: ModelMetadata, dropped: str) -> None:
    props = meta.to_props()
    del props["lesionserve." + dropped]
    with pytest.raises(ValueError, match="lesionserve." + dropped):
        ModelMetadata.from_props(props)
