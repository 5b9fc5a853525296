"""Anonymization options at the pixel: methods, shapes, feathered edges, ignores, masks, metadata."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from jobs.spec import SpecError, build_spec
from models.detections import Detections
from operators.anonymize import AnonymizeOptions, anonymize, kernel_pixels, shape_alpha
from operators.codecs import png_chunks, with_png_metadata
from operators.prepare import prepare_item
from operators.write import WriteOptions, write_item

RNG = np.random.default_rng(7)
IMG = RNG.integers(0, 255, (120, 160, 3), dtype=np.uint8)
FACE = Detections([[40, 30, 100, 90]], [0.9], [0], details=["face"], models=["m"])
HARD = AnonymizeOptions(gradient_start={}, gradient_stop={})  # no feathering


def test_kernel_rule():
    assert kernel_pixels(0.35, 100, 40) == 15  # fraction of the shorter side, made odd
    assert kernel_pixels(61, 10, 10) == 61  # pixels
    assert kernel_pixels(0.01, 5, 5) == 3  # never below 3


@pytest.mark.parametrize("method", ["blur", "pixelate", "blacken"])
@pytest.mark.parametrize("bbox", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_methods_change_pixels_only_inside_the_shape(method, bbox, scale):
    opts = AnonymizeOptions(method=method, bbox=bbox, gradient_start={}, gradient_stop={}, shape_scale={"face": scale})
    out = anonymize(IMG, FACE, opts).image
    changed = np.any(out != IMG, axis=2)
    half_w, half_h = 30 * scale, 30 * scale  # FACE is the box 40,30 - 100,90: centre 70,60
    inside = shape_alpha(120, 160, (70 - half_w, 60 - half_h, 70 + half_w, 60 + half_h), bbox) > 0
    assert not changed[~inside].any()
    assert changed[inside].mean() > 0.9
    if method == "blacken":
        assert (out[inside] == 0).all()


def test_face_defaults_blur_the_scaled_shape_with_a_hard_edge():
    """The defaults (README "Blur strength"): a face's shape is its box scaled 1.3, full strength to
    its edge; the reported box stays the detection's."""
    result = anonymize(IMG, FACE, masks=True)
    inside = shape_alpha(120, 160, (31, 21, 109, 99), False) > 0
    assert (result.binary > 0).sum() == pytest.approx(inside.sum(), rel=0.02)
    changed = np.any(result.image != IMG, axis=2)
    assert changed[inside].mean() > 0.9 and not changed[~inside].any()
    np.testing.assert_array_equal(FACE.boxes, [[40, 30, 100, 90]])


def test_ellipse_covers_less_than_the_box():
    ellipse = shape_alpha(120, 160, (40, 30, 100, 90), bbox=False).sum()
    box = shape_alpha(120, 160, (40, 30, 100, 90), bbox=True).sum()
    assert box == 60 * 60
    assert ellipse / box == pytest.approx(np.pi / 4, abs=0.02)


def test_gradient_profile_follows_the_documented_curve():
    # along the horizontal radius of a 200 px wide ellipse: depth d = 1 - r
    alpha = shape_alpha(1, 201, (0, -100, 201, 101), bbox=False, start=0.3, stop=0.0)[0]
    centre = 100.5
    for x in range(0, 201, 5):
        depth = 1 - abs(x + 0.5 - centre) / 100.5
        assert alpha[x] == pytest.approx(np.clip(depth / 0.3, 0, 1), abs=1e-4)
    # the image follows the weights: halfway through the ramp, halfway between original and blur
    flat = np.zeros((40, 200, 3), np.uint8)
    flat[:, ::2] = 200  # stripes, so a blur changes them
    dets = Detections([[0, -80, 200, 120]], [0.9], [0])
    soft = anonymize(flat, dets, AnonymizeOptions(method="blacken")).image
    x = int(0.15 * 100)  # depth 0.15 -> alpha 0.5
    assert soft[20, x * 2, 0] == pytest.approx(200 * (1 - alpha_at(x * 2 + 0.5, 100, 0.3)), abs=2)


def alpha_at(x: float, half: float, start: float) -> float:
    return float(np.clip((1 - abs(x - half) / half) / start, 0, 1))


def test_ignores_leave_pixels_and_flag_detections():
    dets = Detections([[40, 30, 100, 90], [120, 10, 150, 40]], [0.9, 0.8], [0, 0])
    ignore = (110, 0, 50, 50)  # holds the second face wholly
    opts = AnonymizeOptions(bbox=True, ignores=[ignore, (40, 30, 20, 20)], gradient_start={}, gradient_stop={})
    result = anonymize(IMG, dets, opts, masks=True)
    assert result.anonymised.tolist() == [True, False]
    assert np.array_equal(result.image[0:50, 110:160], IMG[0:50, 110:160])
    assert np.array_equal(result.image[30:50, 40:60], IMG[30:50, 40:60])  # part of face 1 ignored
    assert (result.binary[30:50, 40:60] == 0).all() and (result.binary[60:90, 70:100] == 255).all()


def test_instance_mask_codes():
    dets = Detections([[10, 10, 40, 40], [50, 50, 90, 80], [100, 10, 150, 60], [0, 90, 60, 119]],
                      [0.9, 0.9, 0.9, 0.9], [0, 1, 2, 3])
    result = anonymize(IMG, dets, AnonymizeOptions(bbox=True), masks=True)
    red = {int(result.instance[25, 25, 0]), int(result.instance[65, 70, 0]), int(result.instance[35, 125, 0]),
           int(result.instance[100, 30, 0])}
    assert red == {192, 64, 128, 255}  # face, plate, person, vehicle
    assert [int(result.instance[25, 25, 2]), int(result.instance[65, 70, 2])] == [1, 2]  # instance numbers


def _row(tmp_path, data: bytes, name: str, dets: Detections) -> dict:
    (tmp_path / name).write_bytes(data)
    row = {"item_id": "x", "source_url": str(tmp_path / name), "member": "", "rel_path": name, "kind": "image"}
    row.update(prepare_item(row, None, 2048, 10**9))
    row.update(dets.to_row(), t_detect_ms=0.0)
    return row


def _jpeg(quality=90, gps=False) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1
    if gps:
        exif[0x8825] = {1: "N", 2: (48.0, 8.0, 30.0)}
    buf = io.BytesIO()
    Image.fromarray(IMG).save(buf, "JPEG", quality=quality, exif=exif, icc_profile=b"\0" * 128)
    return buf.getvalue()


def test_masks_metadata_and_mask_scale_are_written(tmp_path):
    opts = WriteOptions(job_id="j", job_root=str(tmp_path / "j"), save_mask="all", mask_scale=50, save_metadata=True)
    write_item(_row(tmp_path, _jpeg(), "a.jpg", FACE), opts)
    binary = cv2.imread(str(tmp_path / "j/masks/binary/a.jpg.png"), cv2.IMREAD_UNCHANGED)
    instance = cv2.imread(str(tmp_path / "j/masks/instance/a.jpg.png"), cv2.IMREAD_UNCHANGED)
    assert binary.shape == (60, 80) and instance.shape == (60, 80, 3)
    assert binary[30, 35] == 255 and binary[0, 0] == 0 and instance[30, 35, 2] == 192  # BGR on disk
    meta = json.loads((tmp_path / "j/metadata/a.jpg.json").read_text())
    assert meta["detections"][0]["bbox"] == {"topLeftX": 40.0, "topLeftY": 30.0, "width": 60.0, "height": 60.0}
    assert meta["detections"][0]["is_anonymised"] is True


def test_detect_method_writes_no_image(tmp_path):
    opts = WriteOptions(job_id="j", job_root=str(tmp_path / "j"), anonymize=AnonymizeOptions(method="detect"))
    row, _, anonymised = write_item(_row(tmp_path, _jpeg(), "a.jpg", FACE), opts)
    assert row["output_url"] is None and not (tmp_path / "j/images").exists()
    assert (tmp_path / "j/masks/binary/a.jpg.png").exists() and (tmp_path / "j/metadata/a.jpg.json").exists()
    assert anonymised.tolist() == [False]


def test_quality_changes_size_monotonically(tmp_path):
    sizes = []
    for q in (30, 60, 90):
        opts = WriteOptions(job_id="j", job_root=str(tmp_path / f"q{q}"), quality=q)
        sizes.append(write_item(_row(tmp_path, _jpeg(), "a.jpg", FACE), opts)[0]["bytes_out"])
    assert sizes == sorted(sizes) and sizes[0] < sizes[2]


def test_exif_icc_kept_and_gps_stripped(tmp_path):
    data = _jpeg(gps=True)
    kept = WriteOptions(job_id="j", job_root=str(tmp_path / "keep"))
    stripped = WriteOptions(job_id="j", job_root=str(tmp_path / "gps"), strip_metadata="gps")
    write_item(_row(tmp_path, data, "a.jpg", FACE), kept)
    write_item(_row(tmp_path, data, "a.jpg", FACE), stripped)
    out_kept = Image.open(tmp_path / "keep/images/a.jpg")
    out_gps = Image.open(tmp_path / "gps/images/a.jpg")
    assert 0x8825 in out_kept.getexif() and 0x8825 not in out_gps.getexif()
    assert out_kept.info["icc_profile"] == out_gps.info["icc_profile"] == b"\0" * 128
    # pass-through with stripping: metadata changes, pixels stay the encoded originals
    write_item(_row(tmp_path, data, "b.jpg", Detections.empty()), stripped)
    assert 0x8825 not in Image.open(tmp_path / "gps/images/b.jpg").getexif()


def test_png_metadata_chunks_survive(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>GPano:ProjectionType equirectangular</x:xmpmeta>")
    buf = io.BytesIO()
    Image.fromarray(IMG).save(buf, "PNG", pnginfo=info)
    encoded = cv2.imencode(".png", IMG)[1].tobytes()
    merged = with_png_metadata(encoded, buf.getvalue())
    assert b"GPano" in merged and [k for k, _ in png_chunks(merged)][0] == b"IHDR"
    assert np.array_equal(cv2.imdecode(np.frombuffer(merged, np.uint8), cv2.IMREAD_COLOR), IMG)


@pytest.mark.parametrize("field, value", [
    ("mask-scale", 101), ("save-mask", "some"), ("strip-metadata", "exif"), ("quality", -1),
    ("compress-level", 10), ("face-anonymization-gradient-start", 1.5), ("method", "smudge"),
    ("ignores", [{"topLeftX": -1, "topLeftY": 0, "width": 5, "height": 5}]), ("kernel-size-face", 0),
])
def test_invalid_parameters_are_refused_with_their_name(field, value):
    with pytest.raises(SpecError, match=field.split("-")[0]):
        build_spec({"inputs": ["a"], "output": "b", field: value})


def test_score_without_debug_is_refused():
    with pytest.raises(SpecError, match="debug"):
        build_spec({"inputs": ["a"], "output": "b", "score": True})
