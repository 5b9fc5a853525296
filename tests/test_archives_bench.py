"""Benchmark (slow, by hand): a >= 2 GB zip of real photos through the whole job on 2 CPUs.

    python -m pytest -m slow tests/test_archives_bench.py -s        # VEIL_BENCH_GB=0.2 for a quick run

Reports the peak memory (private USS and RSS) of every Ray worker process and the bytes they read (read_chars from
/proc/PID/io: every read() syscall, so an upper bound on archive bytes read). Targets from the
issue: peak RSS per worker under 1.5 GB, bytes read under 1.1x the archive.
"""

from __future__ import annotations

import os
import threading
import time
import zipfile

import psutil
import pytest


def _workers() -> list[psutil.Process]:
    """Ray worker processes of this test's own local Ray (descendants of this process only: other
    Ray sessions may run on the same machine)."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::") or "default_worker.py" in cmd:
            out.append(proc)
    return out


class Monitor(threading.Thread):
    """Polls the Ray workers: peak RSS, peak private memory (USS: RSS without the shared pages of
    the object store, which every reader of a block maps) and read_chars per process."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.rss: dict[int, tuple[int, str]] = {}
        self.uss: dict[int, tuple[int, str]] = {}
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            for proc in _workers():
                try:
                    mem, io = proc.memory_full_info(), proc.io_counters().read_chars
                    name = " ".join(proc.cmdline())[:60].strip()
                except psutil.Error:
                    continue
                for table, value in ((self.rss, mem.rss), (self.uss, mem.uss)):
                    if value > table.get(proc.pid, (0, ""))[0]:
                        table[proc.pid] = (value, name)
                self.first.setdefault(proc.pid, io)
                self.last[proc.pid] = io
            time.sleep(self.every)


def _build_zip(shared_dir, tmp_path):
    """A zip of at least VEIL_BENCH_GB GB (default 2) of replicated real photos; (path, members)."""
    target = float(os.environ.get("VEIL_BENCH_GB", "2")) * 1e9
    photos = sorted((shared_dir / "eval" / "plates" / "images").glob("*.jpg"))
    archive = tmp_path / "in" / "drive.zip"
    archive.parent.mkdir()
    n = 0
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        while archive.stat().st_size < target:  # stored, as cameras' JPEGs do not compress
            photo = photos[n % len(photos)]
            z.write(photo, f"cam{n % 4}/{n:07d}-{photo.name}")
            n += 1
    return archive, n


@pytest.mark.slow
def test_bench_archive_path_alone(shared_dir, tmp_path):
    """Expand + read every member in one process: the archive code's own memory and bytes read."""
    from operators.archives import ArchiveOptions, expand_rows, read_member
    from operators.sources import list_sources

    archive, n = _build_zip(shared_dir, tmp_path)
    me = psutil.Process()
    read0, started, peak, total = me.io_counters().read_chars, time.monotonic(), 0, 0
    (src,) = list_sources([str(archive)])
    for row in expand_rows(src, ArchiveOptions()):
        total += len(read_member(row))
        peak = max(peak, me.memory_full_info().uss) if total % 64 == 0 else peak
    read = me.io_counters().read_chars - read0
    print(
        f"\narchive path: {n} members, {total / 1e9:.2f} GB of members in {time.monotonic() - started:.1f} s; "
        f"peak USS {peak / 2**20:.0f} MiB; read {read / archive.stat().st_size:.3f}x the archive"
    )
    assert total > 0.99 * archive.stat().st_size and read < 1.05 * archive.stat().st_size
    assert peak < 512 * 2**20


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~8 min alone on 2 cores; more when the machine is shared
def test_bench_large_zip(ray_local, shared_dir, tmp_path):
    from jobs.run import run_job
    from jobs.spec import build_spec
    from operators.manifest import read_table

    archive, n = _build_zip(shared_dir, tmp_path)
    size = archive.stat().st_size
    spec = build_spec(
        {
            "inputs": [str(archive)],
            "output": str(tmp_path / "out"),
            "job_id": "bench",
            "face": True,
            "detect_actors": 1,
            "det_max_side": 512,  # the archive path is measured here, not detection quality
        }
    )
    # A one-member job first, so that worker start-up (imports read from disk) is not counted
    warm = tmp_path / "warm" / "w.zip"
    warm.parent.mkdir()
    with zipfile.ZipFile(warm, "w") as z:
        first = next(iter(zipfile.ZipFile(archive).namelist()))
        z.writestr(first.rsplit("/", 1)[-1], zipfile.ZipFile(archive).read(first))
    run_job(spec.model_copy(update={"inputs": [str(warm)], "job_id": "warm"}), log=print)
    monitor = Monitor()
    for proc in _workers():  # baseline for workers that already exist
        monitor.first[proc.pid] = proc.io_counters().read_chars
    monitor.start()
    started = time.monotonic()
    doc = run_job(spec, log=print)
    wall = time.monotonic() - started
    monitor.stop.set()
    monitor.join()
    rows = read_table(str(tmp_path / "out" / "bench"), "images").to_pylist()
    done = sum(r["status"] == "done" for r in rows)
    read = sum(monitor.last[p] - monitor.first[p] for p in monitor.last)
    peak, title = max(monitor.uss.values())
    for pid, (uss, name) in sorted(monitor.uss.items(), key=lambda kv: -kv[1][0]):
        print(f"  worker {pid}: peak USS {uss / 2**30:.2f} GiB, peak RSS {monitor.rss[pid][0] / 2**30:.2f} GiB  {name}")
    print(
        f"\nbench: zip {size / 1e9:.2f} GB, {n} members, {done} done in {wall:.0f} s "
        f"({n / wall:.1f} img/s); peak private memory per worker {peak / 2**30:.2f} GiB ({title}), "
        f"peak RSS {max(monitor.rss.values())[0] / 2**30:.2f} GiB; {len(monitor.uss)} worker processes; "
        f"bytes read by workers {read / 1e9:.2f} GB = {read / size:.3f}x the archive"
    )
    assert doc["status"] == "done" and done == n
    assert max(monitor.rss.values())[0] < 1.5 * 2**30  # the target: peak RSS per worker
    assert read < 1.1 * size
