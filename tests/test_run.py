"""End to end on a local Ray: real photos with faces, bad files, and what the job leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.run import run_job
from jobs.spec import build_spec


def _add_bad_files(folder: Path, good_jpeg: Path) -> None:
    data = good_jpeg.read_bytes()
    (folder / "corrupt.jpg").write_bytes(data[:300] + bytes(len(data) - 300))
    png = cv2.imencode(".png", np.full((64, 64, 3), 9, np.uint8))[1].tobytes()
    (folder / "truncated.png").write_bytes(png[: len(png) - 40])
    (folder / "text.jpg").write_text("this is not a photo")
    (folder / "README.txt").write_text("not an image either")


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, shared_dir, ray_local):
    """One job over 6 WIDER photos (4 as PNG, so untouched pixels can be compared exactly) + bad files."""
    root = tmp_path_factory.mktemp("job")
    src = root / "in"
    (src / "png").mkdir(parents=True)
    images = json.loads((shared_dir / "eval/wider/annotations.json").read_text())["images"]
    # photos with larger faces, so the default threshold surely finds some
    chosen = sorted(images, key=lambda im: -max((b["xyxy"][2] - b["xyxy"][0]) for b in im["boxes"]))[:6]
    for im in chosen[:2]:
        (src / Path(im["file"]).name).write_bytes((shared_dir / "eval/wider" / im["file"]).read_bytes())
    for im in chosen[2:]:
        photo = cv2.imread(str(shared_dir / "eval/wider" / im["file"]))
        cv2.imwrite(str(src / "png" / (Path(im["file"]).stem + ".png")), photo)
    _add_bad_files(src, shared_dir / "eval/wider" / chosen[0]["file"])
    spec = build_spec({"inputs": [str(src)], "output": str(root / "out"), "job_id": "e2e"})
    doc = run_job(spec)
    images = pq.read_table(root / "out/e2e/manifest/images").to_pylist()
    dets = pq.read_table(root / "out/e2e/manifest/detections").to_pylist()
    return src, root / "out" / "e2e", doc, images, dets


def test_job_report_and_manifest_rows(finished_job):
    src, job_root, doc, images, dets = finished_job
    assert doc["status"] == "done"
    assert json.loads((job_root / "job.json").read_text())["status"] == "done"
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    assert sorted(r["rel_path"] for r in images) == files  # one row per input file
    by_name = {r["rel_path"]: r for r in images}
    assert (by_name["corrupt.jpg"]["status"], by_name["corrupt.jpg"]["failure_cause"]) == ("failed", "IMAGE_DEFECT")
    assert by_name["truncated.png"]["failure_cause"] == "IMAGE_DEFECT"
    assert by_name["text.jpg"]["failure_cause"] == "CONTENT_TYPE_ERROR"
    assert by_name["README.txt"]["status"] == "skipped"
    done = [r for r in images if r["status"] == "done"]
    assert len(done) == 6
    assert doc["totals"]["done"] == 6 and doc["totals"]["failed"] == 3 and doc["totals"]["skipped"] == 1
    assert doc["totals"]["detections"]["face"] == len(dets) > 0
    for r in done:  # manifest rows match the files
        out = Path(r["output_url"])
        assert out == job_root / "images" / r["rel_path"] and out.stat().st_size == r["bytes_out"]
        assert r["n_face"] == sum(1 for d in dets if d["item_id"] == r["item_id"])
    assert not (job_root / "images" / "corrupt.jpg").exists()


def test_outputs_follow_the_umask(finished_job, tmp_path):
    """Outputs go through a temp file (mkstemp: 0600) and a rename; they must still be readable by
    others as the umask allows (0644 under 022), for a web server or a downstream job."""
    import os
    import stat

    from operators.storage import current_umask, write_atomic

    _, job_root, _, _, _ = finished_job
    files = [p for p in job_root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.name == "job.json" for p in files)
    expected = 0o666 & ~current_umask()  # the session's umask, which the Ray workers inherited
    assert {str(p.relative_to(job_root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        str(p.relative_to(job_root)): oct(expected) for p in files}
    for mask, mode in ((0o022, 0o644), (0o027, 0o640)):
        previous = os.umask(mask)
        try:
            write_atomic(str(tmp_path / f"masks/binary/{mask:o}.png"), b"x")
        finally:
            os.umask(previous)
        assert stat.S_IMODE((tmp_path / f"masks/binary/{mask:o}.png").stat().st_mode) == mode


def test_faces_are_blurred_and_the_rest_untouched(finished_job):
    src, job_root, _, images, dets = finished_job
    checked = 0
    for r in images:
        if r["status"] != "done" or not r["rel_path"].endswith(".png") or not r["n_face"]:
            continue
        before = cv2.imread(str(src / r["rel_path"]))
        after = cv2.imread(r["output_url"])
        near = np.zeros(before.shape[:2], bool)
        for d in (d for d in dets if d["item_id"] == r["item_id"]):
            x1, y1, x2, y2 = int(d["x1"]), int(d["y1"]), int(np.ceil(d["x2"])), int(np.ceil(d["y2"]))
            mx, my = (x2 - x1) * 0.15 + 1, (y2 - y1) * 0.15 + 1  # a face's shape is its box scaled 1.3
            near[max(0, int(y1 - my)):int(y2 + my) + 1, max(0, int(x1 - mx)):int(x2 + mx) + 1] = True
            inner = (slice(y1 + (y2 - y1) // 3, y2 - (y2 - y1) // 3), slice(x1 + (x2 - x1) // 3, x2 - (x2 - x1) // 3))
            if (y2 - y1) >= 9 and (x2 - x1) >= 9:
                assert np.any(before[inner] != after[inner]), "pixels inside a detected face must change"
        assert np.array_equal(before[~near], after[~near]), "pixels away from detections must be identical"
        checked += 1
    assert checked >= 1


def test_images_without_detections_are_byte_identical(finished_job):
    src, job_root, _, images, _ = finished_job
    untouched = [r for r in images if r["status"] == "done" and not r["anonymized"]]
    for r in untouched:
        assert Path(r["output_url"]).read_bytes() == (src / r["rel_path"]).read_bytes()


def test_rerun_with_a_new_job_id_gives_the_same_item_ids(finished_job, tmp_path):
    src, _, _, images, _ = finished_job
    doc = run_job(build_spec({"inputs": [str(src / "png")], "output": str(tmp_path), "job_id": "again"}))
    again = pq.read_table(tmp_path / "again/manifest/images").to_pylist()
    first = {r["rel_path"]: r["item_id"] for r in images if r["rel_path"].startswith("png/")}
    assert {"png/" + r["rel_path"]: r["item_id"] for r in again} == first
    assert doc["totals"]["done"] == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "/nonexistent/photos", "/tmp/veil-out"], "/nonexistent/photos"),
        (["run", "IN", "IN/out"], "inside input"),
        (["run", "IN", "/tmp/veil-out", "--quality", "150"], "quality"),
        (["run", "IN", "/tmp/veil-out", "--mask-scale", "101"], "mask-scale"),
        (["run", "IN", "/tmp/veil-out", "--face-threshold", "2"], "face-threshold"),
    ],
)
def test_bad_invocations_are_refused_before_work(argv, message, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    argv = [a.replace("IN", str(tmp_path / "in")) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_anonymizes_the_samples_the_install_ships(ray_local, tmp_path, capsys):
    """The README's first command: twice, and each run does the work (a new job each time)."""
    from jobs.demo import run_demo

    assert run_demo(str(tmp_path / "demo")) == 0
    assert run_demo(str(tmp_path / "demo")) == 0
    jobs = [p for p in (tmp_path / "demo").iterdir() if (p / "job.json").exists()]
    assert len(jobs) == 2
    for job in jobs:
        doc = json.loads((job / "job.json").read_text())
        assert doc["status"] == "done" and doc["totals"]["done"] >= 5 and doc["totals"]["detections"]["face"] >= 1
        assert doc["credits"]["total"] == doc["totals"]["done"]  # 1 credit per image by default
    assert "anonymized images" in capsys.readouterr().out
