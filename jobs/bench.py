"""`veil bench`: veil's throughput against the bare loop, the codec floor and the peer (deface), in one run.

All four run on the same images on the same machine, one after the other, so their ratios are
comparable even on a noisy machine:
  pipeline  the real job on Ray (steady state: items finished after the first write batch over
            the time from that batch to the last, so Ray's start-up is excluded)
  bare      one process, no Ray: the same decode + models + anonymize + encode (the limit)
  codec     decode + encode only (the floor no anonymizer can beat)
  peer      deface's CenterFace through its Python API at its defaults (threshold 0.2, full
            resolution, blurred ellipses), when `deface` is importable
With `--pass-through DIR` (images with nothing to anonymize) the pipeline also runs over that set:
its img/s and its write-stage time per image against the full pass's.
With `--repeat N` every image is used N times under new names (more items for a steady state).
When the images carry ground truth (`--labels annotations.json`, or IMAGES_DIR is the `images/`
folder of a set in the shared eval format), the detections of the pipeline and of the peer are
scored against it as `veil eval` scores them, so "faster at no lower recall" is checked in the same
run as the speed.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq

from jobs.evaluate import detections_by_rel_path
from jobs.spec import build_spec
from jobs.stage_options import write_options
from models.fetch import prepared_weights
from models.runtime import backend_for
from operators.codecs import decode_full, encode
from operators.detect import Detector, to_stored_pixels
from operators.prepare import prepare_item
from operators.sources import list_sources
from operators.write import write_item


class PeakRss:
    """Samples the RSS of this process and every Ray worker process; keeps the peaks."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peaks, self._stop = interval, {"total": 0, "largest_process": 0}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = largest = 0
            for p in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if p.info["pid"] == me or "ray::" in (p.info["name"] or "") or "ray::" in cmd:
                        rss = p.info["memory_info"].rss
                        total, largest = total + rss, max(largest, rss)
                except (psutil.Error, TypeError):
                    continue
            self.peaks["total"] = max(self.peaks["total"], total)
            self.peaks["largest_process"] = max(self.peaks["largest_process"], largest)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mb(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in self.peaks.items()}


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 3) if seconds > 0 else 0.0


def bench_pipeline(images_dir: str, fields: dict, out_dir: str, job_id: str = "bench") -> dict:
    from jobs.run import run_job

    spec = build_spec({**fields, "inputs": [images_dir], "output": out_dir, "job_id": job_id})
    with PeakRss() as rss:
        t0 = time.perf_counter()
        doc = run_job(spec, log=lambda *_: None)
        wall = time.perf_counter() - t0
    rows = pq.read_table(Path(out_dir) / spec.job_id / "manifest" / "images").to_pandas()
    times = np.sort(rows["processed_at"].astype("int64").to_numpy() / 1e3)  # ms -> s
    # Items finish in write batches sharing a timestamp: the steady rate is the items finished
    # after the first batch over the time from that batch to the last (start-up excluded).
    lo, hi = times[0], times[-1]
    steady_n = int(np.sum(times > lo))
    mp = float((rows["width"] * rows["height"]).sum() / 1e6)
    stage_ms = {c: round(float(rows[c].mean()), 2) for c in rows.columns if c.startswith("t_")}
    found = detections_by_rel_path(Path(out_dir) / spec.job_id)  # replicas keep their r<k>- prefix
    return {"img_s": _rate(steady_n, hi - lo), "img_s_wall": _rate(len(rows), wall), "wall_s": round(wall, 2),
            "mp_s": _rate(mp * steady_n / max(len(rows), 1), hi - lo), "stage_ms_per_item": stage_ms,
            "peak_rss_mb": rss.mb(), "detections": doc["totals"]["detections"], "items": len(rows),
            "anonymized_images": int(rows["anonymized"].sum()), **_write_stage(rows), "_found": found}


def _write_stage(rows) -> dict:
    """Median write-stage time (anonymize + encode + write) of images that were anonymized and of
    images passed through unchanged: what the pass-through path saves per image."""
    done = rows[rows["status"] == "done"]
    ms = done["t_anonymize_ms"] + done["t_write_ms"]
    def median(mask) -> float | None:
        return round(float(ms[mask].median()), 3) if mask.any() else None
    return {"write_ms_anonymized": median(done["anonymized"]), "write_ms_passed_through": median(~done["anonymized"])}


def bench_bare(images_dir: str, fields: dict, out_dir: str) -> dict:
    spec = build_spec({**fields, "inputs": [images_dir], "output": out_dir})
    classes, models = spec.resolve_models()
    detector = Detector([(e.model_dump(), prepared_weights(e)) for e in models.values()], classes,
                        spec.detection_profile().model_dump(), backend_for("cpu", spec.cpu_backend),
                        os.cpu_count() or 1)
    options = write_options(spec, str(Path(out_dir) / "bare"), job_id="bare")
    rows = [r for r in list_sources([images_dir]) if r["kind"] == "image"]
    times = []
    for row in rows:
        t0 = time.perf_counter()
        item = {**row, **prepare_item(row, None, spec.det_max_side, spec.max_pixels)}
        det = np.frombuffer(item["det"], np.uint8).reshape(item["det_h"], item["det_w"], 3)
        found = detector.detect([det])[0]
        item.update(to_stored_pixels(found, item["det_w"], item["det_h"], item["width"],
                                     item["height"], item["orientation"]).to_row())
        write_item(item, options)
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times  # the first image pays for session warm-up
    return {"img_s": _rate(len(steady), sum(steady)), "ms_per_img": round(1e3 * float(np.mean(steady)), 2)}


def bench_codec(images_dir: str) -> dict:
    rows = [r for r in list_sources([images_dir]) if r["kind"] == "image"]
    t0 = time.perf_counter()
    for row in rows:
        data = Path(row["source_url"]).read_bytes()
        fmt = "png" if data[:4] == b"\x89PNG" else "jpeg"
        encode(decode_full(data), fmt)
    return {"img_s": _rate(len(rows), time.perf_counter() - t0)}


def bench_peer(images_dir: str) -> dict | None:
    """deface 1.5.0 at its defaults, through its Python API; None if deface is not installed."""
    try:
        import imageio.v2 as iio
        from deface.centerface import CenterFace
        from deface.deface import anonymize_frame
    except ImportError:
        return None
    centerface = CenterFace(in_shape=None, backend="onnxrt")
    rows = [r for r in list_sources([images_dir]) if r["kind"] == "image"]
    times, found = [], {}
    for row in rows:
        t0 = time.perf_counter()
        frame = iio.imread(row["source_url"])
        dets, _ = centerface(frame, threshold=0.2)
        found[row["rel_path"]] = [{"class": "face", "score": float(d[4]), "x1": float(d[0]), "y1": float(d[1]),
                                   "x2": float(d[2]), "y2": float(d[3])} for d in dets]
        anonymize_frame(dets, frame, mask_scale=1.3, replacewith="blur", ellipse=True, draw_scores=False,
                        replaceimg=None, mosaicsize=20)
        iio.imwrite(io.BytesIO(), frame, format="jpeg")
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times
    return {"img_s": _rate(len(steady), sum(steady)), "_found": found}


def replicate(images_dir: str, repeat: int, dest: Path) -> str:
    """A folder with every image of `images_dir` `repeat` times under new names (r0-, r1-, ...)."""
    if repeat <= 1:
        return images_dir
    dest.mkdir(parents=True)
    for row in (r for r in list_sources([images_dir]) if r["kind"] == "image"):
        data = Path(row["source_url"]).read_bytes()
        for k in range(repeat):
            target = dest / f"r{k}-{row['rel_path'].replace('/', '_')}"
            target.write_bytes(data)
    return str(dest)


def find_labels(images_dir: str, labels: str | None = None) -> dict | None:
    """Ground truth of the bench images: `labels`, else the annotations.json of the eval-format set
    whose images/ folder IMAGES_DIR is; None when there is none."""
    if labels:
        return json.loads(Path(labels).read_text())
    folder = Path(images_dir)
    candidate = folder.parent / "annotations.json"
    return json.loads(candidate.read_text()) if folder.name == "images" and candidate.is_file() else None


def score_found(labels: dict, found: dict[str, list[dict]], classes: list[str], repeat: int) -> dict:
    """Recall and precision per class against the labels (veil eval's matching), on the first copy
    of each image; found is keyed by the file's relative path in the bench folder."""
    from jobs.evaluate import score_set

    prefix = "r0-" if repeat > 1 else ""
    by_file = {im["file"]: found.get(prefix + Path(im["file"]).name, []) for im in labels["images"]}
    labelled = {b["label"] for im in labels["images"] for b in im["boxes"]}
    scored = score_set(labels, by_file, [c for c in classes if c in labelled])
    out = {}
    for cls, r in scored["classes"].items():
        b = r["buckets"]
        out[cls] = {"recall": b.get("all", {}).get("recall"), "recall_ge20": b.get(">=20", {}).get("recall"),
                    "precision_ge20": b.get(">=20", {}).get("precision"), "boxes": b.get("all", {}).get("boxes")}
    return out


def run_bench(images_dir: str, fields: dict, json_path: str | None = None, peer: bool = True,
              repeat: int = 1, pass_through_dir: str | None = None, labels: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
        images = replicate(images_dir, repeat, Path(tmp) / "in-full")
        result = {
            "images": images_dir,
            "repeat": repeat,
            "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
            "options": fields,
            "pipeline": bench_pipeline(images, fields, tmp),
            "bare": bench_bare(images, fields, tmp),
            "codec": bench_codec(images),
            "peer": bench_peer(images) if peer else None,
        }
        if pass_through_dir:
            plain = replicate(pass_through_dir, repeat, Path(tmp) / "in-pass-through")
            result["pass_through"] = bench_pipeline(plain, fields, tmp, job_id="pass-through")
    truth = find_labels(images_dir, labels)
    # detections per image travel inside each run's result; they are scored here, not written out
    found = {name: (result.get(name) or {}).pop("_found", None) for name in ("pipeline", "peer", "pass_through")}
    if truth is not None:
        classes = build_spec({**fields, "inputs": [images_dir], "output": "/tmp"}).resolve_models()[0]
        result["quality"] = {"pipeline": score_found(truth, found["pipeline"], classes, repeat)}
        if found["peer"] is not None:
            result["quality"]["peer"] = score_found(truth, found["peer"], ["face"], repeat)
    ours = result["pipeline"]["img_s"]
    result["ratios"] = {
        "pipeline_vs_bare": round(ours / max(result["bare"]["img_s"], 1e-9), 3),
        "pipeline_vs_peer": round(ours / result["peer"]["img_s"], 3) if result["peer"] else None,
    }
    if pass_through_dir:
        pt = result["pass_through"]
        result["ratios"]["pass_through_vs_full"] = round(pt["img_s"] / max(ours, 1e-9), 3)
        full, passed = result["pipeline"]["write_ms_anonymized"], pt["write_ms_passed_through"]
        result["ratios"]["pass_through_write_stage_speedup"] = (
            round(full / max(passed, 1e-3), 1) if full is not None and passed is not None else None)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_bench(result: dict) -> str:
    lines = [f"{'run':<10}{'img/s':>10}", "-" * 20]
    for name in ("pipeline", "bare", "codec", "peer", "pass_through"):
        if result.get(name):
            lines.append(f"{name:<10}{result[name]['img_s']:>10.2f}")
    peer = result["ratios"]["pipeline_vs_peer"]
    lines.append(f"pipeline/bare {result['ratios']['pipeline_vs_bare']}, pipeline/peer "
                 + (f"{peer}" if peer is not None else "- (no peer run: `pip install deface==1.5.0`, or --no-peer)"))
    if "pass_through_vs_full" in result["ratios"]:
        lines.append(f"pass-through/full {result['ratios']['pass_through_vs_full']} (img/s), write stage "
                     f"{result['ratios']['pass_through_write_stage_speedup']}x faster per image")
    for who, per_class in (result.get("quality") or {}).items():
        for cls, q in per_class.items():
            lines.append(f"{who} {cls}: recall {q['recall']} (>= 20 px {q['recall_ge20']}), "
                         f"precision >= 20 px {q['precision_ge20']}, {q['boxes']} labelled")
    lines.append(f"peak RSS (MB): {result['pipeline']['peak_rss_mb']}")
    return "\n".join(lines)
