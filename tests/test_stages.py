"""Stage unit tests, without Ray: listing, item ids, decode checks, shapes, codecs, manifest rows."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from models.detections import Detections, merge_per_class
from operators.codecs import jpeg_header_segments, with_jpeg_metadata
from operators.detect import to_stored_pixels
from operators.items import UnsafePath, item_id, safe_rel_path, sniff_format
from operators.orientation import boxes_to_stored, upright
from operators.prepare import ItemFailure, check_image, detection_copy, prepare_item
from operators.sources import InputError, check_output_outside_inputs, list_sources
from operators.write import WriteOptions, detection_rows, write_item


def _jpeg(h=60, w=80, exif_orientation: int | None = None) -> bytes:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


# --- listing ---------------------------------------------------------------------------------

def test_list_folder_recursive_with_rel_paths(tmp_path):
    (tmp_path / "in" / "cam2").mkdir(parents=True)
    (tmp_path / "in" / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "in" / "cam2" / "b.JPG").write_bytes(_jpeg())
    (tmp_path / "in" / "notes.txt").write_text("x")
    rows = list_sources([str(tmp_path / "in")])
    assert [(r["rel_path"], r["kind"]) for r in rows] == [
        ("a.jpg", "image"), ("cam2/b.JPG", "image"), ("notes.txt", "other")]
    assert all(r["member"] == "" and r["size"] > 0 for r in rows)


def test_list_glob_single_file_and_several_inputs(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "1.jpg").write_bytes(_jpeg())
        (tmp_path / d / "2.png").write_bytes(b"png")
    assert [r["rel_path"] for r in list_sources([str(tmp_path / "x" / "*.jpg")])] == ["1.jpg"]
    assert [r["rel_path"] for r in list_sources([str(tmp_path / "x" / "2.png")])] == ["2.png"]
    both = list_sources([str(tmp_path / "x"), str(tmp_path / "y")])
    assert sorted(r["rel_path"] for r in both) == ["x/1.jpg", "x/2.png", "y/1.jpg", "y/2.png"]


def test_missing_input_and_output_inside_input_are_refused(tmp_path):
    with pytest.raises(InputError, match="does-not-exist"):
        list_sources([str(tmp_path / "does-not-exist")])
    with pytest.raises(InputError, match="matches no file"):
        list_sources([str(tmp_path / "*.jpg")])
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match="inside input"):
        check_output_outside_inputs([str(tmp_path / "in")], str(tmp_path / "in" / "out"))
    check_output_outside_inputs([str(tmp_path / "in")], str(tmp_path / "in-out"))  # a sibling is fine


def test_item_id_is_stable_and_distinguishes_members():
    assert item_id("s3://b/a.zip", "x.jpg") == item_id("s3://b/a.zip", "x.jpg")
    assert item_id("s3://b/a.zip", "x.jpg") != item_id("s3://b/a.zip", "y.jpg")
    assert item_id("s3://b/a.zip") != item_id("s3://b/a.zip", "")[:-1]
    assert len(item_id("/x.jpg")) == 20


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs/x.jpg", "C:\\win\\x.jpg", "a/../../x.jpg", "a\x00b.jpg", ""])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafePath):
        safe_rel_path(name)


def test_safe_names_are_normalised():
    assert safe_rel_path("cam2\\000123.jpg") == "cam2/000123.jpg"
    assert safe_rel_path("./a//b.jpg") == "a/b.jpg"


# --- read + prepare --------------------------------------------------------------------------

def test_bad_content_gets_its_cause(tmp_path):
    good = _jpeg()
    cases = {
        "text.jpg": (b"hello, I am text", "CONTENT_TYPE_ERROR"),
        "png-named.jpg": (cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes(), "CONTENT_TYPE_ERROR"),
        "truncated.png": (cv2.imencode(".png", np.full((64, 64, 3), 7, np.uint8))[1].tobytes()[:-30], "IMAGE_DEFECT"),
        "corrupt.jpg": (good[:200] + bytes(len(good) - 200), "IMAGE_DEFECT"),
        "cut.jpg": (good[: len(good) // 2], "IMAGE_DEFECT"),
    }
    for name, (data, cause) in cases.items():
        with pytest.raises(ItemFailure) as err:
            fmt, w, h, o = check_image(data, name, 10**9)
            detection_copy(data, fmt, w, h, o, 2048)
        assert err.value.cause == cause, name


def test_decompression_bomb_is_refused_before_decoding():
    data = cv2.imencode(".png", np.zeros((100, 100, 3), np.uint8))[1].tobytes()
    with pytest.raises(ItemFailure) as err:
        check_image(data, "big.png", max_pixels=5000)
    assert err.value.cause == "TOO_LARGE"


def test_prepare_item_rows(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg(400, 600))
    row = {"source_url": str(tmp_path / "a.jpg"), "rel_path": "a.jpg", "kind": "image"}
    out = prepare_item(row, None, det_max_side=300, max_pixels=10**9)
    assert out["status"] == "pending" and out["format"] == "jpeg"
    assert (out["width"], out["height"]) == (600, 400)
    assert (out["det_w"], out["det_h"]) == (300, 200)  # scaled decode + resize to the cap
    assert len(out["det"]) == 300 * 200 * 3
    gone = prepare_item({**row, "source_url": str(tmp_path / "gone.jpg")}, None, 300, 10**9)
    assert (gone["status"], gone["failure_cause"]) == ("failed", "TASK_FILE_DOESNT_EXIST")
    other = prepare_item({**row, "kind": "other"}, None, 300, 10**9)
    assert other["status"] == "skipped"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_round_trip(orientation):
    h, w = 40, 70
    stored = np.zeros((h, w, 3), np.uint8)
    stored[5:15, 50:60] = 255  # a marked square at x 50..60, y 5..15 of the stored pixels
    up = upright(stored, orientation)
    ys, xs = np.nonzero(up[:, :, 0])
    box_up = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    assert boxes_to_stored(box_up, orientation, w, h).tolist() == [[50, 5, 60, 15]]


def test_boxes_map_back_to_full_resolution_and_orientation():
    dets = Detections([[10, 20, 30, 40]], [0.9], [0])
    # detection copy is the upright (orientation 6: turned 90 deg) half-size image
    back = to_stored_pixels(dets, det_w=50, det_h=100, width=200, height=100, orientation=6)
    # upright (x, y) -> stored (y, H - x) at half size, then x2
    assert back.boxes.tolist() == [[40.0, 40.0, 80.0, 80.0]]


# --- detections, anonymize, codecs -----------------------------------------------------------

def test_detections_row_round_trip_and_merge():
    d = Detections([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [0, 0, 1],
                   details=["face", "face", "plate"], models=["m", "m", "p"])
    back = Detections.from_row(d.to_row())
    assert back.boxes.tolist() == d.boxes.tolist() and back.details == d.details
    merged = merge_per_class(d)
    assert len(merged) == 2 and merged.scores.tolist() == pytest.approx([0.9, 0.7])


def test_jpeg_metadata_is_carried_over():
    original = _jpeg(exif_orientation=6)
    assert any(s[4:10] == b"Exif\x00\x00" for s in jpeg_header_segments(original))
    encoded = cv2.imencode(".jpg", np.zeros((60, 80, 3), np.uint8))[1].tobytes()
    merged = with_jpeg_metadata(encoded, original)
    assert jpeg_header_segments(merged) == jpeg_header_segments(original)
    assert Image.open(io.BytesIO(merged)).getexif()[0x0112] == 6
    stored = cv2.imdecode(np.frombuffer(merged, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert stored.shape == (60, 80, 3)
    assert sniff_format(merged) == "jpeg"


# --- write + manifest rows -------------------------------------------------------------------

def _prepared_row(tmp_path, data: bytes, dets: Detections) -> dict:
    (tmp_path / "src.jpg").write_bytes(data)
    row = {"item_id": "i1", "source_url": str(tmp_path / "src.jpg"), "member": "", "rel_path": "d/src.jpg",
           "kind": "image"}
    row.update(prepare_item(row, None, 2048, 10**9))
    row.update(dets.to_row(), t_detect_ms=1.0)
    return row


def test_write_item_pass_through_is_byte_identical(tmp_path):
    data = _jpeg()
    opts = WriteOptions(job_id="j", job_root=str(tmp_path / "out" / "j"))
    image_row, dets, _ = write_item(_prepared_row(tmp_path, data, Detections.empty()), opts)
    assert image_row["status"] == "done" and not image_row["anonymized"]
    assert (tmp_path / "out/j/images/d/src.jpg").read_bytes() == data
    assert image_row["bytes_in"] == image_row["bytes_out"] == len(data)


def test_write_item_anonymizes_and_reports_rows(tmp_path):
    data = _jpeg(exif_orientation=3)
    opts = WriteOptions(job_id="j", job_root=str(tmp_path / "out" / "j"))
    dets = Detections([[10, 10, 50, 40]], [0.8], [0], details=["face"], models=["centerface"])
    image_row, found, anonymised = write_item(_prepared_row(tmp_path, data, dets), opts)
    assert image_row["anonymized"] and image_row["n_face"] == 1
    written = (tmp_path / "out/j/images/d/src.jpg").read_bytes()
    assert Image.open(io.BytesIO(written)).getexif()[0x0112] == 3  # EXIF kept
    rows = detection_rows(image_row, found, anonymised)
    assert rows[0]["class"] == "face" and rows[0]["is_anonymised"]
    assert rows[0]["area_frac"] == pytest.approx(40 * 30 / (80 * 60))
