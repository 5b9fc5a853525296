"""`veil bench VIDEO`: frames/s of one video end to end against the bare loop, the codec floor and
deface's video mode, in one run, and what bounds it (time per frame in each stage).

  pipeline  `veil run` on a folder holding the video (Ray start, model load, the write and join
            included): frames / wall seconds; also frames / the detection actor's seconds
  bare      one process, no Ray: operators/video.py on the file (decode -> detect -> track ->
            blur -> encode, the job's options), with its per-stage times
  codec     decode -> RGB -> libx264 CRF 23 -> mux only: the floor no anonymizer can beat
  peer      deface's command on the file (its video mode, CenterFace at its threshold 0.2),
            timed as it runs, start-up included; when `deface` is on PATH

All four run one after the other on the same file; each also gives its CPU time per frame (the
actor's for the pipeline, the process's with its threads for bare and codec, deface's and its
FFmpeg's for the peer), which holds when other work shares the machine and wall time does not.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import av
import psutil
import pyarrow.parquet as pq

from jobs.bench import PeakRss, _rate
from jobs.spec import build_spec
from jobs.stage_options import video_options
from models.fetch import prepared_weights
from models.runtime import backend_for
from operators.detect import Detector
from operators.video import process_video


def bench_video_pipeline(video: str, fields: dict, tmp: str) -> dict:
    folder = Path(tmp) / "in"
    folder.mkdir()
    try:  # a job does not follow a symbolic link out of its input: a hard link, else a copy
        os.link(video, folder / Path(video).name)
    except OSError:
        shutil.copyfile(video, folder / Path(video).name)
    spec = build_spec({**fields, "inputs": [str(folder)], "output": tmp, "job_id": "bench-video"})
    from jobs.run import run_job  # Ray: only here

    with PeakRss() as rss:
        t0 = time.perf_counter()
        run_job(spec, log=lambda *_: None)
        wall = time.perf_counter() - t0
    row = pq.read_table(Path(tmp) / spec.job_id / "manifest" / "images").to_pylist()[0]
    frames = int(row["frames"] or 0)
    return {"status": row["status"], "frames": frames, "wall_s": round(wall, 2), "fps": _rate(frames, wall),
            "fps_in_actor": _rate(frames, row["t_detect_ms"] / 1e3),
            "cpu_ms_per_frame": _per_frame(row["cpu_detect_ms"] / 1e3, frames), "peak_rss_mb": rss.mb()}


def bench_video_bare(video: str, fields: dict, tmp: str) -> dict:
    """operators/video.py on the file in this process (what a detection actor runs), with its stage times."""
    spec = build_spec({**fields, "inputs": [video], "output": tmp})
    classes, models = spec.resolve_models()
    detector = Detector([(e.model_dump(), prepared_weights(e)) for e in models.values()], classes,
                        spec.detection_profile().model_dump(), backend_for("cpu", spec.cpu_backend),
                        os.cpu_count() or 1)
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = process_video(detector, {"source_url": os.path.abspath(video), "rel_path": Path(video).name,
                                      "member": ""}, video_options(spec, str(Path(tmp) / "bare")))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    frames = int(result["frames"])
    stage_ms = {k: round(v / max(frames, 1), 2) for k, v in (result.get("stage_ms") or {}).items()}
    return {"status": result["status"], "frames": frames, "fps": _rate(frames, wall),
            "cpu_ms_per_frame": _per_frame(cpu, frames), "stage_ms_per_frame": stage_ms,
            "bound_by": max(stage_ms, key=stage_ms.get) if stage_ms else None}


def bench_video_codec(video: str, tmp: str) -> dict:
    """Decode -> RGB -> libx264 CRF 23 (veryfast, as veil encodes): no detection, tracking or blur."""
    t0, cpu0, n = time.perf_counter(), time.process_time(), 0
    with av.open(video) as c, av.open(str(Path(tmp) / ("codec" + Path(video).suffix)), "w") as o:
        vin = c.streams.video[0]
        s = o.add_stream("libx264", rate=vin.average_rate, options={"crf": "23", "preset": "veryfast"})
        s.width, s.height, s.pix_fmt = vin.codec_context.width, vin.codec_context.height, "yuv420p"
        for f in c.decode(video=0):
            n += 1
            for p in s.encode(av.VideoFrame.from_ndarray(f.to_ndarray(format="rgb24"), format="rgb24")):
                o.mux(p)
        for p in s.encode(None):
            o.mux(p)
    return {"fps": _rate(n, time.perf_counter() - t0), "cpu_ms_per_frame": _per_frame(time.process_time() - cpu0, n)}


def bench_video_peer(video: str, tmp: str, frames: int) -> dict | None:
    """deface's video mode on the file (its defaults but the ONNX Runtime backend, as ours), or None."""
    deface = shutil.which("deface")
    if deface is None:
        return None
    t0, cpu0 = time.perf_counter(), _children_cpu()
    subprocess.run([deface, video, "-o", str(Path(tmp) / ("deface" + Path(video).suffix)), "--thresh", "0.2",
                    "--backend", "onnxrt"], check=True, capture_output=True)
    return {"fps": _rate(frames, time.perf_counter() - t0), "cpu_ms_per_frame": _per_frame(_children_cpu() - cpu0,
                                                                                          frames)}


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (and theirs: deface's FFmpeg)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _per_frame(seconds: float, frames: int) -> float:
    return round(seconds * 1e3 / frames, 2) if frames else 0.0


def run_video_bench(video: str, fields: dict, json_path: str | None = None, peer: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="veil-bench-video-") as tmp:
        result: dict = {
            "video": video,
            "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                        "load_1m": round(os.getloadavg()[0], 2)},
            "options": fields,
            "pipeline": bench_video_pipeline(video, fields, tmp),
            "bare": bench_video_bare(video, fields, tmp),
            "codec": bench_video_codec(video, tmp),
        }
        result["peer"] = bench_video_peer(video, tmp, result["bare"]["frames"]) if peer else None
    ours = result["pipeline"]["fps"]
    result["ratios"] = {
        "pipeline_vs_bare": round(ours / max(result["bare"]["fps"], 1e-9), 3),
        "bare_vs_codec": round(result["bare"]["fps"] / max(result["codec"]["fps"], 1e-9), 3),
        "pipeline_vs_peer": round(ours / result["peer"]["fps"], 3) if result["peer"] else None,
        "bare_vs_peer": round(result["bare"]["fps"] / result["peer"]["fps"], 3) if result["peer"] else None,
        # CPU time per frame: the comparison that holds when other work shares the machine
        "peer_vs_bare_cpu_per_frame": round(result["peer"]["cpu_ms_per_frame"]
                                            / max(result["bare"]["cpu_ms_per_frame"], 1e-9), 3)
        if result["peer"] else None,
    }
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_video_bench(result: dict) -> str:
    lines = [f"{'run':<10}{'frames/s':>10}{'CPU ms/frame':>14}", "-" * 34]
    for name in ("pipeline", "bare", "codec", "peer"):
        if result.get(name):
            lines.append(f"{name:<10}{result[name]['fps']:>10.2f}{result[name]['cpu_ms_per_frame']:>14.2f}")
    r = result["ratios"]
    lines.append(f"pipeline/bare {r['pipeline_vs_bare']}, bare/codec {r['bare_vs_codec']}, pipeline/peer "
                 + (f"{r['pipeline_vs_peer']}, bare/peer {r['bare_vs_peer']}" if r["pipeline_vs_peer"] is not None
                    else "- (no peer run: `pip install deface==1.5.0`, or --no-peer)"))
    stages = result["bare"]["stage_ms_per_frame"]
    lines.append("ms per frame: " + ", ".join(f"{k} {v}" for k, v in stages.items())
                 + f" (bound by {result['bare']['bound_by']})")
    lines.append(f"pipeline: {result['pipeline']['wall_s']} s wall, {result['pipeline']['fps_in_actor']} frames/s "
                 f"in the detection actor; peak RSS (MB): {result['pipeline']['peak_rss_mb']}")
    return "\n".join(lines)
