"""What a running job shows: a bar with ETA on a terminal (a real pty), plain lines elsewhere, counted in
items with archive members; and Ray's routine lines kept off stderr."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import time
import zipfile
from collections import Counter

import numpy as np

from jobs.progress import JobProgress
from jobs.report import Totals
from operators.archives import ArchiveOptions
from operators.sources import list_sources


def _stats(statuses: list[str]) -> dict[str, np.ndarray]:
    from models.detections import CLASSES

    n = len(statuses)
    return {"status": np.array(statuses), "failure_cause": np.array(["IMAGE_DEFECT" if s == "failed" else ""
                                                                    for s in statuses]),
            "anonymized": np.zeros(n, bool), "megapixels": np.zeros(n), **{f"n_{c}": np.zeros(n, int) for c in CLASSES}}


def _inputs(tmp_path, members: int = 30, plain: int = 4) -> list[dict]:
    """`plain` files and a zip of `members` files (the job's items: plain + members)."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(plain):
        (src / f"p{i}.jpg").write_bytes(b"x")
    with zipfile.ZipFile(src / "cam.zip", "w") as z:
        for i in range(members):
            z.writestr(f"cam/{i}.jpg", b"y")
    return list_sources([str(src)])


def _wait_total(progress: JobProgress) -> int:
    deadline = time.monotonic() + 30
    while progress.total is None:
        assert time.monotonic() < deadline, "archives never counted"
        time.sleep(0.05)
    return progress.total


def test_a_terminal_gets_a_bar_with_eta_rate_and_failures(tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    out = os.fdopen(slave, "w", encoding="utf-8")
    progress = JobProgress(_inputs(tmp_path), ArchiveOptions(), out=out)  # bar=None: a terminal decides
    assert _wait_total(progress) == 34  # 4 files + 30 members, not 5 input files
    totals = Totals()
    for chunk in (["done"] * 8, ["done"] * 6 + ["failed"] * 2):
        totals.add(_stats(chunk))
        progress.update(totals)
        time.sleep(0.2)
    progress.close()
    out.flush()
    screen = os.read(master, 65536).decode("utf-8", "replace")
    frames = [f for f in screen.replace("\n", "\r").split("\r") if f.strip()]
    last = frames[-1]
    assert "16/34" in last and "items/s" in last and "failed 2" in last, frames
    assert "<" in last and "?" not in last.split("<")[1], last  # elapsed<remaining: an ETA
    assert any("█" in f for f in frames)


def test_without_a_terminal_plain_lines_in_items(tmp_path):
    lines: list[str] = []
    progress = JobProgress(_inputs(tmp_path, members=12, plain=2), ArchiveOptions(), out=io.StringIO(),
                           log=lines.append, interval=0)
    assert progress._bar is None
    total = _wait_total(progress)
    totals = Totals()
    totals.add(_stats(["done"] * 5 + ["failed"]))
    progress.update(totals)
    assert total == 14 and lines and lines[-1].startswith("  6 of 14 items (1 failed), ")
    assert "items/s" in lines[-1] and "ETA " in lines[-1]


def test_resumed_items_and_unreadable_archives_count_right(tmp_path):
    sources = _inputs(tmp_path, members=5, plain=1)
    members = [r for r in sources if r["kind"] == "archive"]
    from operators.archives import expand_rows

    done_before = {r["item_id"] for r in expand_rows(members[0], ArchiveOptions())}
    assert len(done_before) == 5
    progress = JobProgress(sources, ArchiveOptions(), finished=set(list(done_before)[:2]), out=io.StringIO())
    assert _wait_total(progress) == 1 + 3
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    progress = JobProgress(list_sources([str(tmp_path / "bad")]), ArchiveOptions(), out=io.StringIO())
    assert _wait_total(progress) == 1  # the archive's failure row


def test_ray_noise_is_kept_off_stderr_and_the_rest_goes_through():
    code = """
import logging, os, sys, warnings
from jobs.progress import quiet_ray
with quiet_ray():
    os.write(2, b"[core_worker.cc:2465] Actor X has constructor arguments in the object store and max_restarts > 0\\n")
    logging.getLogger("ray._private.authentication.authentication_token_setup").warning("Token authentication is on")
    warnings.warn("The minimum number of concurrent actors for 'X' is set to 2")
    os.write(2, b"a real error from C\\n")
    print("a real Python error", file=sys.stderr)
print("after", file=sys.stderr)
"""
    logging_setup = "import logging; logging.basicConfig();"
    r = subprocess.run([sys.executable, "-c", logging_setup + code], capture_output=True, text=True, timeout=120,
                       env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stderr
    lines = Counter(r.stderr.splitlines())
    assert lines == Counter(["a real error from C", "a real Python error", "after"]), r.stderr
