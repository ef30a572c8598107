"""service.hospital.dicom: what decodes (compared with independent decodes), what is refused and that refusals never decode."""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import simplejpeg
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels.decoders.base import Decoder
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from service.hospital.dicom import (
    DERMOSCOPIC_PHOTOGRAPHY,
    IDENTIFIER_KEYWORDS,
    SECONDARY_CAPTURE,
    VL_PHOTOGRAPHIC,
    DicomImage,
    is_dicom,
    read_dicom,
)
from tests.conftest import TEST_DATA, shared_data

COMMITTED = sorted((TEST_DATA / "dicom").glob("*.dcm"))
MAX_PIXELS = 40_000_000
PATIENT_NAME, PATIENT_ID = "DOE^JANE^SYNTH", "PID-SYNTH-0042"


class DecoderCalled(BaseException):
    """Not an Exception subclass on purpose: read_dicom's decode guard must not swallow it."""


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any pixel decode fail loudly: a refusal that still decodes would raise DecoderCalled."""
    forbid_decoding(monkeypatch)


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`no_decoding` from a test's body: after a service has started (its canary decodes JPEGs)."""

    def boom(*args: object, **kwargs: object) -> None:
        raise DecoderCalled("a pixel decoder was called")

    for name in ("as_array", "iter_array", "as_buffer", "iter_buffer"):
        monkeypatch.setattr(Decoder, name, boom)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", boom)  # every JPEG, plain or in DICOM, goes to libjpeg-turbo
    monkeypatch.setattr(cv2, "imdecode", boom)  # PNG uploads


def gradient(rows: int = 24, cols: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth RGB image: chroma subsampling and lossy coding change it only a little."""
    y, x = np.mgrid[0:rows, 0:cols]
    rgb = np.stack([x * 255 // max(cols - 1, 1), y * 255 // max(rows - 1, 1), (x + y + seed * 40) % 256], axis=-1)
    return rgb.astype(np.uint8)


def make_dicom(
    pixels: np.ndarray | None,
    *,
    sop: str = DERMOSCOPIC_PHOTOGRAPHY,
    ts: UID = ExplicitVRLittleEndian,
    photometric: str = "RGB",
    pixel_bytes: bytes | None = None,
    **header: object,
) -> bytes:
    """A Part-10 DICOM with synthetic patient headers. ``pixels``: (H, W, 3) or (F, H, W, 3) uint8, or None."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.AccessionNumber = "ACC123"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19700101"
    ds.Modality = "XC"
    if pixels is not None:
        frames = pixels.shape[0] if pixels.ndim == 4 else 1
        rows, cols = pixels.shape[-3:-1]
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, pixels.shape[-1]
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        if pixels.shape[-1] == 3:
            ds.PlanarConfiguration = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = pixel_bytes if pixel_bytes is not None else pixels.tobytes()
        if ts.is_compressed and pixel_bytes is None:
            ds.compress(ts, pixels, encoding_plugin="pylibjpeg" if ts == JPEG2000Lossless else "")
    for key, value in header.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)
    return buf.getvalue()


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def header_of(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---- the committed CC0 files: always run ------------------------------------------------------


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_dicom_decodes_like_its_embedded_jpeg(path: Path) -> None:
    data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    image = read_dicom(data, max_pixels=MAX_PIXELS)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"  # the case where the JPEG decoder returns RGB
    # Independent reference: Pillow on the embedded JPEG codestream, outside pydicom entirely.
    fragment = next(generate_frames(ds.PixelData, number_of_frames=1))
    reference = np.asarray(Image.open(io.BytesIO(fragment)).convert("RGB"))
    assert image.rgb.shape == reference.shape == (ds.Rows, ds.Columns, 3)
    assert image.rgb.dtype == np.uint8 and image.rgb.flags.c_contiguous
    assert mean_abs_diff(image.rgb, reference) < 1.0  # a second YBR->RGB pass would be off by tens
    assert (image.width, image.height, image.frames) == (ds.Columns, ds.Rows, 1)
    expected_sop = DERMOSCOPIC_PHOTOGRAPHY if "dermoscopic" in path.name else VL_PHOTOGRAPHIC
    assert image.sop_class_uid == expected_sop
    assert image.sop_class_name in ("Dermoscopic Photography Image Storage", "VL Photographic Image Storage")
    assert (image.transfer_syntax_uid, image.transfer_syntax_name) == (JPEGBaseline8Bit, "JPEG Baseline (Process 1)")
    assert image.identifiers == {k: str(ds[k].value) for k in IDENTIFIER_KEYWORDS if ds.get(k)}
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"} <= set(image.identifiers)
    assert str(ds.PatientName) not in repr(image) and str(ds.PatientID) not in repr(image)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_fast_jpeg_path_agrees_with_pydicom_and_is_taken(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    data = path.read_bytes()
    reference = pydicom.dcmread(io.BytesIO(data)).pixel_array  # pydicom's own decode and YBR handling
    fast = read_dicom(data, max_pixels=MAX_PIXELS).rgb
    assert mean_abs_diff(fast, reference) < 1.0
    assert np.abs(fast.astype(int) - reference.astype(int)).max() <= 16  # IDCT/upsampling rounding only
    monkeypatch.setattr(Decoder, "as_array", lambda *a, **k: pytest.fail("pydicom decoder used"))
    np.testing.assert_array_equal(read_dicom(data, max_pixels=MAX_PIXELS).rgb, fast)


def test_identifiers_are_uids_and_accession_never_patient_fields() -> None:
    data = make_dicom(gradient())
    image = read_dicom(data, max_pixels=MAX_PIXELS)
    ds = header_of(data)
    assert image.identifiers == {
        "StudyInstanceUID": ds.StudyInstanceUID,
        "SeriesInstanceUID": ds.SeriesInstanceUID,
        "SOPInstanceUID": ds.SOPInstanceUID,
        "AccessionNumber": "ACC123",
    }
    values = " ".join(image.identifiers.values())
    assert PATIENT_NAME not in values and PATIENT_ID not in values and "19700101" not in values


def test_dicom_image_is_frozen() -> None:
    image = read_dicom(make_dicom(gradient()), max_pixels=MAX_PIXELS)
    assert isinstance(image, DicomImage)
    with pytest.raises(dataclasses.FrozenInstanceError):
        image.frames = 2  # type: ignore[misc]


def test_malformed_uid_is_left_out() -> None:
    image = read_dicom(make_dicom(gradient(), StudyInstanceUID="1.2.abc"), max_pixels=MAX_PIXELS)
    assert "StudyInstanceUID" not in image.identifiers and "SOPInstanceUID" in image.identifiers


# ---- synthetic objects: each transfer syntax and colour model we claim --------------------------


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("sop", [DERMOSCOPIC_PHOTOGRAPHY, VL_PHOTOGRAPHIC, SECONDARY_CAPTURE])
def test_lossless_syntaxes_round_trip_exactly(ts: UID, sop: str) -> None:
    rgb = gradient(rows=64, cols=80, seed=3)  # openjpeg's default 6 resolutions need >= 32 px
    image = read_dicom(make_dicom(rgb, sop=sop, ts=ts), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(image.rgb, rgb)
    assert image.transfer_syntax_uid == ts and image.sop_class_uid == sop


def test_planar_configuration_1_is_interleaved_back() -> None:
    rgb = gradient()
    planar = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()  # RRR..GGG..BBB..
    image = read_dicom(make_dicom(rgb, pixel_bytes=planar, PlanarConfiguration=1), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(image.rgb, rgb)


def test_native_ybr_full_is_converted_to_rgb() -> None:
    rgb = gradient()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image = read_dicom(make_dicom(ybr, photometric="YBR_FULL"), max_pixels=MAX_PIXELS)
    assert np.abs(image.rgb.astype(int) - rgb.astype(int)).max() <= 2  # rounding in two conversions
    assert mean_abs_diff(image.rgb, ybr) > 10  # i.e. the YBR values were not passed through as RGB


def test_native_ybr_full_422_is_upsampled_and_converted() -> None:
    rgb = gradient(rows=16, cols=32)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.uint16)
    # 4:2:2 native layout: Y0 Y1 Cb Cr per pixel pair, chroma averaged over the pair (PS3.5 8.2.3).
    pairs = ybr.reshape(16, 16, 2, 3)
    cb = (pairs[..., 0, 1] + pairs[..., 1, 1] + 1) // 2
    cr = (pairs[..., 0, 2] + pairs[..., 1, 2] + 1) // 2
    packed = np.stack([pairs[..., 0, 0], pairs[..., 1, 0], cb, cr], axis=-1).astype(np.uint8).tobytes()
    data = make_dicom(rgb, photometric="YBR_FULL_422", pixel_bytes=packed)
    image = read_dicom(data, max_pixels=MAX_PIXELS)
    assert image.rgb.shape == (16, 32, 3)
    assert mean_abs_diff(image.rgb, rgb) < 3.0  # only chroma subsampling error remains


def test_jpeg_baseline_ybr_full_422_is_not_converted_twice() -> None:
    rgb = gradient(rows=32, cols=48)
    codestream = jpeg_bytes(rgb)  # Pillow writes YCbCr JFIF: the decoder returns RGB
    data = make_dicom(rgb, ts=JPEGBaseline8Bit, photometric="YBR_FULL_422", pixel_bytes=encapsulate([codestream]))
    image = read_dicom(data, max_pixels=MAX_PIXELS)
    reference = np.asarray(Image.open(io.BytesIO(codestream)).convert("RGB"))
    assert mean_abs_diff(image.rgb, reference) < 1.0
    assert mean_abs_diff(image.rgb, rgb) < 3.0


def test_multiframe_answers_first_frame_and_counts_frames() -> None:
    frames = np.stack([gradient(seed=s) for s in range(3)])
    assert not np.array_equal(frames[0], frames[1])
    image = read_dicom(make_dicom(frames), max_pixels=MAX_PIXELS)
    assert image.frames == 3
    np.testing.assert_array_equal(image.rgb, frames[0])


# ---- refusals: 415 with a reason --------------------------------------------------------------


@pytest.mark.parametrize(
    ("photometric", "samples", "reason"),
    [("MONOCHROME2", 1, "MONOCHROME2"), ("MONOCHROME1", 1, "MONOCHROME1"), ("PALETTE COLOR", 1, "PALETTE COLOR")],
)
def test_greyscale_and_palette_are_415(no_decoding: None, photometric: str, samples: int, reason: str) -> None:
    grey = gradient()[..., :samples]
    with pytest.raises(UnsupportedMediaType, match=reason):
        read_dicom(make_dicom(grey, sop=SECONDARY_CAPTURE, photometric=photometric), max_pixels=MAX_PIXELS)


def test_16_bit_colour_is_415(no_decoding: None) -> None:
    rgb16 = gradient().astype(np.uint16) * 256
    data = make_dicom(gradient(), pixel_bytes=rgb16.tobytes(), BitsAllocated=16, BitsStored=16, HighBit=15)
    with pytest.raises(UnsupportedMediaType, match="16 bits"):
        read_dicom(data, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    ("sop", "name"),
    [("1.2.840.10008.5.1.4.1.1.2", "CT Image Storage"), ("1.2.840.10008.5.1.4.1.1.88.11", "Basic Text SR Storage")],
)
def test_other_sop_classes_are_415_naming_the_class(no_decoding: None, sop: str, name: str) -> None:
    with pytest.raises(UnsupportedMediaType, match=name):
        read_dicom(make_dicom(gradient(), sop=sop), max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    ("ts", "name"),
    [
        (pydicom.uid.DeflatedExplicitVRLittleEndian, "Deflated Explicit VR Little Endian"),
        (pydicom.uid.ExplicitVRBigEndian, "Explicit VR Big Endian"),
        (pydicom.uid.HTJ2KLossless, "High-Throughput JPEG 2000"),
        (pydicom.uid.MPEG2MPML, "MPEG2"),
    ],
)
def test_other_transfer_syntaxes_are_415_before_the_dataset_is_parsed(
    monkeypatch: pytest.MonkeyPatch, ts: UID, name: str
) -> None:
    data = with_transfer_syntax(make_dicom(gradient()), ts)
    # The dataset must never be parsed under a refused syntax (Deflate would be inflated first: a zip bomb).
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: pytest.fail("dataset parsed"))
    with pytest.raises(UnsupportedMediaType, match=name):
        read_dicom(data, max_pixels=MAX_PIXELS)


def with_transfer_syntax(data: bytes, ts: UID) -> bytes:
    """The same dataset bytes behind a file meta group that declares ``ts``."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    meta.TransferSyntaxUID = ts
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + data[fp.tell() :]


def test_no_decoding_fixture_intercepts_the_decode_path(no_decoding: None) -> None:
    """Guards the guard: the refusal tests below would prove nothing if the patch missed read_dicom's decoder."""
    with pytest.raises(DecoderCalled):
        read_dicom(COMMITTED[0].read_bytes(), max_pixels=MAX_PIXELS)


# ---- refusals without decoding: not DICOM, no pixels, truncated, too large ----------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"not a dicom at all", b"\xff\xd8\xff\xe0" + b"\0" * 200, b"\0" * 128 + b"DICM", b"\0" * 128 + b"DICM\x02"],
    ids=["empty", "text", "jpeg-magic", "dicm-only", "meta-truncated"],
)
def test_not_dicom_is_invalid_image(no_decoding: None, body: bytes) -> None:
    with pytest.raises(InvalidImage, match="DICOM"):
        read_dicom(body, max_pixels=MAX_PIXELS)


def test_is_dicom_sniffs_the_part10_prefix() -> None:
    assert is_dicom(COMMITTED[0].read_bytes()) and is_dicom(make_dicom(gradient()))
    assert not is_dicom(jpeg_bytes(gradient())) and not is_dicom(b"") and not is_dicom(b"\0" * 128 + b"DIC")


def test_no_pixel_data_is_invalid_image_without_decoding(no_decoding: None) -> None:
    data = make_dicom(None, Rows=32, Columns=32, SamplesPerPixel=3, PhotometricInterpretation="RGB", BitsAllocated=8)
    with pytest.raises(InvalidImage, match="no Pixel Data"):
        read_dicom(data, max_pixels=MAX_PIXELS)


def test_empty_pixel_data_is_invalid_image(no_decoding: None) -> None:
    with pytest.raises(InvalidImage, match="empty"):
        read_dicom(make_dicom(gradient(), pixel_bytes=b""), max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("keep", [0.98, 0.5, 0.02])
def test_truncated_encapsulated_dicom_is_refused_without_decoding(no_decoding: None, keep: float) -> None:
    data = COMMITTED[0].read_bytes()
    with pytest.raises(InvalidImage, match=r"truncated|no Pixel Data"):
        read_dicom(data[: int(len(data) * keep)], max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("cut", [1, 100, 1000])
def test_truncated_native_dicom_is_refused_without_decoding(no_decoding: None, cut: int) -> None:
    data = make_dicom(gradient())
    with pytest.raises(InvalidImage, match="truncated"):
        read_dicom(data[:-cut], max_pixels=MAX_PIXELS)


def test_header_cut_before_image_module_is_invalid_image(no_decoding: None) -> None:
    data = COMMITTED[0].read_bytes()
    pixel_offset = data.index(b"\xe0\x7f\x10\x00")
    with pytest.raises(InvalidImage):
        read_dicom(data[: pixel_offset // 2], max_pixels=MAX_PIXELS)


def test_30000_by_30000_declared_is_413_without_decoding(no_decoding: None) -> None:
    tiny = gradient(rows=2, cols=2)  # 12 bytes of pixels behind a header that declares 900 Mpx
    data = make_dicom(tiny, Rows=30000, Columns=30000)
    with pytest.raises(PayloadTooLarge, match="30000x30000"):
        read_dicom(data, max_pixels=MAX_PIXELS)


def test_pixel_limit_counts_frames(no_decoding: None) -> None:
    frames = np.stack([gradient(rows=10, cols=10)] * 4)
    with pytest.raises(PayloadTooLarge, match="4 frame"):
        read_dicom(make_dicom(frames), max_pixels=399)


def test_pixel_limit_is_inclusive() -> None:
    image = read_dicom(make_dicom(gradient(rows=10, cols=20)), max_pixels=200)
    assert (image.width, image.height) == (20, 10)


def test_corrupt_codestream_is_invalid_image() -> None:
    rgb = gradient()
    garbage = b"\xff\xd8" + bytes(range(256)) * 4  # framing is fine, the JPEG inside is not
    data = make_dicom(rgb, ts=JPEGBaseline8Bit, photometric="YBR_FULL_422", pixel_bytes=encapsulate([garbage]))
    with pytest.raises(InvalidImage, match=r"could not be decoded|corrupt"):
        read_dicom(data, max_pixels=MAX_PIXELS)


# ---- no PHI in logs ---------------------------------------------------------------------------


def test_logs_never_carry_patient_fields(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    bodies = [p.read_bytes() for p in COMMITTED]
    bodies += [make_dicom(gradient()), make_dicom(gradient(), StudyInstanceUID="1.2.abc", AccessionNumber="x" * 16)]
    bodies += [make_dicom(gradient(), sop="1.2.840.10008.5.1.4.1.1.2"), bodies[0][:5000], make_dicom(gradient())[:-3]]
    for body in bodies:
        try:
            read_dicom(body, max_pixels=MAX_PIXELS)
        except (InvalidImage, UnsupportedMediaType) as exc:
            assert PATIENT_NAME not in exc.detail and "TEST^SYNTHETIC" not in exc.detail
    captured = capsys.readouterr()
    text = caplog.text + captured.out + captured.err
    for phi in (PATIENT_NAME, PATIENT_ID, "19700101", "TEST^SYNTHETIC", "TEST-ISIC_"):
        assert phi not in text


# ---- the shared pydicom test files: skip when ../shared/data is absent ------------------------

DECODABLE = [
    "GDCMJ2K_TextGBR.dcm",
    "SC_jpeg_no_color_transform.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_jpeg.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_small_odd.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
]
REFUSED = {
    "examples_rgb_color.dcm": "Ultrasound Image Storage",
    "examples_ybr_color.dcm": "Ultrasound Multi-frame Image Storage",
}


@pytest.fixture(scope="module")
def testfiles() -> Path:
    return shared_data("dicom/pydicom_testfiles")


@pytest.mark.parametrize("name", DECODABLE)
def test_shared_decodable_file_matches_pydicoms_decode_and_uids(testfiles: Path, name: str) -> None:
    data = (testfiles / name).read_bytes()
    image = read_dicom(data, max_pixels=MAX_PIXELS)
    ds = pydicom.dcmread(io.BytesIO(data))
    reference = ds.pixel_array  # pydicom's own decode + YBR->RGB conversion
    assert reference.shape == image.rgb.shape
    assert mean_abs_diff(image.rgb, reference) < 0.5
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if ds.get(keyword):
            assert image.identifiers[keyword] == ds[keyword].value
    assert str(ds.get("PatientName", "")) not in {str(v) for v in image.identifiers.values()} - {""}


@pytest.mark.parametrize(
    "name",
    ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_small_odd.dcm"],
)
def test_shared_ybr_and_lossy_variants_match_the_lossless_rgb_original(testfiles: Path, name: str) -> None:
    """The SC_rgb_* files are one test pattern: YBR and lossy copies must land near the lossless RGB one."""
    original = read_dicom((testfiles / "SC_rgb_rle.dcm").read_bytes(), max_pixels=MAX_PIXELS).rgb
    other = read_dicom((testfiles / name).read_bytes(), max_pixels=MAX_PIXELS).rgb
    if other.shape != original.shape:  # SC_rgb_small_odd is a 3x3 crop: only check it is colour
        assert other.shape == (3, 3, 3)
        return
    assert mean_abs_diff(other, original) < 3.0


@pytest.mark.parametrize(("name", "reason"), sorted(REFUSED.items()))
def test_shared_undecodable_files_are_415_with_reason(
    testfiles: Path, no_decoding: None, name: str, reason: str
) -> None:
    with pytest.raises(UnsupportedMediaType, match=reason):
        read_dicom((testfiles / name).read_bytes(), max_pixels=MAX_PIXELS)


def test_shared_constructed_file_matches_the_original_isic_jpeg() -> None:
    dicom_dir = shared_data("dicom/constructed_from_isic_uda1_cc0")
    original_jpg = shared_data("isic-archive-cc0") / "ISIC_0000002.jpg"
    image = read_dicom((dicom_dir / "ISIC_0000002_vlphoto.dcm").read_bytes(), max_pixels=MAX_PIXELS)
    reference = np.asarray(Image.open(original_jpg).convert("RGB"))
    assert mean_abs_diff(image.rgb, reference) < 1.0


def test_every_shared_dicom_is_classified_by_this_suite(testfiles: Path) -> None:
    """A file added to the shared set must be put in DECODABLE or REFUSED, not silently ignored."""
    assert {p.name for p in testfiles.glob("*.dcm")} == set(DECODABLE) | set(REFUSED)
