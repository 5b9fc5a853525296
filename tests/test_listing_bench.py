"""Benchmark (slow, by hand): listing 200,000 S3 keys, one LIST at a time (the walk before issue 20)
against many in flight (operators/remote_walk.py), in one run, on the same server and machine.

    python -m pytest -m slow tests/test_listing_bench.py -s       # VEIL_LIST_BENCH_KEYS=20000 for a quick run

The server is moto in a child process (tests/s3_bench_server.py), two ways:
  moto        as it is: each LIST scans the whole bucket and renders XML in Python, one at a time,
              so moto's own CPU is the bottleneck of both walks
  latency     moto's answers replayed from memory, each after 30 ms (a real S3 round trip): the client
Both walks must give the same entries in the same order. Figures are printed and written to
`bench-results/listing.json` when that folder exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SETUPS = {"moto": 0.0, "latency": 0.03}  # seconds each LIST takes beyond the client's own work


def _walk_figures(url: str, threads: int) -> tuple[list, dict]:
    import s3fs

    from operators.remote_walk import sequential_walk, walk_remote

    fs = s3fs.S3FileSystem(endpoint_url=url, key="testing", secret="testing", skip_instance_cache=True,
                           config_kwargs={"max_pool_connections": threads})
    cpu, t = time.process_time(), time.monotonic()
    entries = list(sequential_walk(fs, "bench") if threads == 1 else walk_remote(fs, "bench", threads))
    wall, cpu = time.monotonic() - t, time.process_time() - cpu
    fs.invalidate_cache()
    return entries, {"s": round(wall, 2), "driver_cpu_s": round(cpu, 2),
                     "driver_cpu_us_per_key": round(1e6 * cpu / max(len(entries), 1), 1)}


def listing_figures(keys: int, threads: int = 16, setups: dict = SETUPS) -> dict:
    figures: dict = {"keys": keys, "threads": threads, "load_average": os.getloadavg()}
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    for name, delay in setups.items():
        server = subprocess.Popen([sys.executable, str(HERE / "s3_bench_server.py"), str(keys), str(delay)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        try:
            urls = json.loads(server.stdout.readline())
            url = urls["replay"] if delay else urls["moto"]
            if delay:  # the replay records moto's answers to both walks' requests first (not timed)
                _walk_figures(url, 1), _walk_figures(url, threads)
            old, figures[f"{name}-sequential"] = _walk_figures(url, 1)
            new, figures[f"{name}-parallel"] = _walk_figures(url, threads)
            assert len(old) == keys and new == old  # same entries, same order
            figures[f"{name}-speedup"] = round(figures[f"{name}-sequential"]["s"] / figures[f"{name}-parallel"]["s"], 2)
        finally:
            server.stdin.close()
            server.wait(timeout=60)
    return figures


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_parallel_listing_is_faster(s3_endpoint):  # s3_endpoint: the AWS_* test credentials in the environment
    keys = int(os.environ.get("VEIL_LIST_BENCH_KEYS", "200000"))
    figures = listing_figures(keys)
    print("\nlisting:", json.dumps(figures, indent=1))
    if Path("bench-results").is_dir():
        Path("bench-results/listing.json").write_text(json.dumps(figures, indent=2))
    assert figures["latency-speedup"] >= 4
