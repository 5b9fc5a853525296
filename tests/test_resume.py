"""A job killed with SIGKILL, then resumed: every item done exactly once, credits charged once.

The job runs as a real `veil run` subprocess (its own local Ray), followed from this process with
`veil status` while it runs, then killed with its whole process group and resumed here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.cli import main
from operators.manifest import DETECTIONS_SCHEMA, IMAGES_SCHEMA, write_part
from operators.resume import drop_duplicates


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"veil run ended early: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_kill_minus_nine_then_resume_is_exactly_once(ray_local, photos, tmp_path, capsys):
    src, _ = photos("faces", 4)
    for k in range(5):  # 24 images in all
        for p in sorted(src.glob("2*.jpg")):
            (src / f"c{k}-{p.name}").write_bytes(p.read_bytes())
    out = tmp_path / "out"
    parts = out / "job/manifest/images"
    pricing = tmp_path / "pricing.yaml"
    pricing.write_text("credits_per_image: 0.5\ncredits_per_megapixel: 1.0\n")
    args = [str(src), str(out), "--job-id", "job", "--face", "--pricing", str(pricing), "--batch-size", "2"]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for(lambda: (out / "job/job.json").exists()
                  and json.loads((out / "job/job.json").read_text())["status"] == "processing", 120, proc)
        # another process follows the job while it runs
        status = subprocess.run([sys.executable, "-m", "jobs.cli", "status", "job", "--output", str(out)],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "job: processing" in status.stdout, status.stdout + status.stderr
        _wait_for(lambda: parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= 1, 180, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-job
        proc.wait(timeout=30)
    before = pq.read_table(parts).to_pylist()
    assert 0 < len(before) < 24, "the kill should land mid-job"
    assert json.loads((out / "job/job.json").read_text())["status"] == "processing"  # what a kill leaves

    capsys.readouterr()
    assert main(["run", *args]) == 0
    assert "finished earlier" in capsys.readouterr().out
    rows = pq.read_table(parts).to_pylist()
    assert len(rows) == 24 and Counter(r["status"] for r in rows) == {"done": 24}
    assert len({r["item_id"] for r in rows}) == 24  # exactly once
    first = {r["item_id"]: r["processed_at"] for r in before if r["status"] == "done"}
    assert all(r["processed_at"] == first[r["item_id"]] for r in rows if r["item_id"] in first)  # not redone
    expected = sum(round(0.5 + r["width"] * r["height"] / 1e6, 6) for r in rows)
    doc = json.loads((out / "job/job.json").read_text())
    assert abs(doc["credits"]["total"] - expected) < 1e-6 and abs(sum(r["credits"] for r in rows) - expected) < 1e-6
    assert doc["status"] == "done" and doc["totals"]["done"] == 24 and len(doc["runs"]) == 1
    dets = pq.read_table(out / "job/manifest/detections").to_pylist()
    assert Counter(d["item_id"] for d in dets) == {r["item_id"]: r["n_face"] for r in rows if r["n_face"]}


def test_rows_written_late_by_a_killed_runs_workers_are_dropped_when_the_resume_ends(ray_local, photos, tmp_path):
    """A SIGKILL of the driver's process group left its Ray workers writing parts for 2 s more; a
    resume started meanwhile redoes those items. At its end each item has one row, the latest,
    and the late part's detections go with it."""
    src, _ = photos("faces", 4)
    out = tmp_path / "out"
    args = [str(src), str(out), "--job-id", "job", "--face"]
    assert main(["run", *args]) == 0
    job_root = str(out / "job")
    images, detections = (pq.read_table(out / "job/manifest" / t) for t in ("images", "detections"))
    late = images.set_column(images.schema.get_field_index("processed_at"), "processed_at",
                             pc.subtract(images["processed_at"], pa.scalar(timedelta(seconds=30))))
    write_part(job_root, "detections", detections, DETECTIONS_SCHEMA, part="part-killed-run-late.parquet")
    write_part(job_root, "images", late, IMAGES_SCHEMA, part="part-killed-run-late.parquet")
    # written after the resume compacted its start (what run_job calls when a resumed job ends)
    state = drop_duplicates(job_root)
    assert state.rows_dropped == images.num_rows and state.parts_removed == 2
    rows = pq.read_table(out / "job/manifest/images").to_pylist()
    assert sorted(r["item_id"] for r in rows) == sorted(images["item_id"].to_pylist())  # one row each
    assert {r["processed_at"] for r in rows} == set(images["processed_at"].to_pylist())  # the latest kept
    assert pq.read_table(out / "job/manifest/detections").num_rows == detections.num_rows
    assert not list((out / "job/manifest").glob("*/part-killed-run-late*"))


def test_sigterm_ends_a_running_job_as_cancelled(photos, tmp_path):
    """What `veil cancel`, `ray job stop` and Kubernetes send: the job says it was cancelled."""
    src, _ = photos("wider", 80)  # enough that the job is still running when the signal comes
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(src), str(out), "--job-id", "t"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for(lambda: (out / "t/job.json").exists()
                  and json.loads((out / "t/job.json").read_text())["status"] == "processing", 120, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0, proc.stdout.read().decode(errors="replace")[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    doc = json.loads((out / "t/job.json").read_text())
    assert (doc["status"], doc["description"]) == ("cancelled", "stopped by the user") and doc["finished_at"], \
        proc.stdout.read().decode(errors="replace")[-3000:]
