"""What a running `veil run` shows: on a terminal a progress bar (items, ETA, items/s, failures so far),
elsewhere a plain line every few seconds; counted in items, archive members included, not input files.
And Ray's routine lines kept from the user's screen.

The item count of a job with archives is not known when it starts (members are listed on the
workers): a background thread lists the archives on the driver, as `veil quote` does (a zip's
central directory, a 7z or RAR header), and the bar gets its total when that ends.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import IO

from jobs.report import Totals
from operators.archives import ArchiveOptions, expand_rows

PLAIN_INTERVAL_S = 10.0  # a line this often when the output is not a terminal (a log file, CI)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class JobProgress:
    """Call `update(totals)` as stats come back and `close()` at the end; `total` is the item count once
    known (None while archives are still being listed)."""

    def __init__(self, todo: list[dict], archive: ArchiveOptions, finished: set[str] | frozenset = frozenset(),
                 out: IO[str] | None = None, bar: bool | None = None, log=print,
                 interval: float = PLAIN_INTERVAL_S, plain: int | None = None) -> None:
        """`plain`: the count of the items that are no archives, when `todo` holds the archives only
        (a planned job: its rows sit in plan shards, not in the driver)."""
        self.out = out or sys.stdout
        self.log = log
        self.interval = interval
        self.started = time.monotonic()
        self._last_line = self.started
        archives = [s for s in todo if s.get("kind") == "archive"]
        plain = plain if plain is not None else len(todo) - len(archives)
        self.total: int | None = plain if not archives else None
        self._bar = None
        if bar if bar is not None else self.out.isatty():
            from tqdm import tqdm

            try:  # a pty may report 0 columns (script, some CI runners): then a fixed width
                sized = os.get_terminal_size(self.out.fileno()).columns > 0
            except (OSError, ValueError, AttributeError):
                sized = False
            self._bar = tqdm(total=self.total, unit=" items", file=self.out, dynamic_ncols=sized,
                             ncols=None if sized else 100, smoothing=0.05,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
                                        "{postfix}")
            self._bar.set_postfix_str("failed 0")
        if archives:
            threading.Thread(target=self._count, args=(archives, plain, archive, finished), daemon=True,
                             name="veil-count-items").start()

    def _count(self, archives: list[dict], plain: int, archive: ArchiveOptions, finished) -> None:
        def members(row: dict) -> int:
            try:
                return sum(1 for r in expand_rows(row, archive) if r.get("item_id") not in finished)
            except Exception:  # the job reports the archive's failure; the count only counts
                return 1

        with ThreadPoolExecutor(4) as pool:
            total = plain + sum(pool.map(members, archives))
        self.total = total  # one assignment: readers see the whole count or none
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()  # the ETA from now on

    def update(self, totals: Totals) -> None:
        failed = totals.by_status.get("failed", 0)
        if self._bar is not None:
            self._bar.total = self.total  # the counting thread may have set it meanwhile
            self._bar.set_postfix_str(f"failed {failed}", refresh=False)
            self._bar.update(totals.items - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self.log("  " + self.line(totals, now - self.started))

    def line(self, totals: Totals, elapsed: float) -> str:
        rate = totals.items / elapsed if elapsed > 0 else 0.0
        total = self.total
        text = f"{totals.items} of {total if total is not None else '?'} items"
        text += f" ({totals.by_status.get('failed', 0)} failed), {rate:.3g} items/s, {_duration(elapsed)} elapsed"
        if total is not None and rate > 0 and total > totals.items:
            text += f", ETA {_duration((total - totals.items) / rate)}"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --- Ray's routine lines ---------------------------------------------------------------------------------

# printed on every run, and nothing the user can act on:
NOISE = (
    # C++ log of the driver: Ray Data passes each actor's UDF as an object reference, and its actors restart
    "has constructor arguments in the object store and max_restarts > 0",
)


@contextmanager
def quiet_ray() -> Iterator[None]:
    """Keep Ray's routine messages off the terminal for the block: the notice that a local Ray turned token
    authentication on (a loopback cluster of this process), Ray Data's note that an actor pool is smaller
    than its minimum (the job sizes it), Ray Data's own progress bars (the job shows its own), and the
    C++ lines of NOISE, which no logger controls: those are filtered out of file descriptor 2."""
    loggers = [logging.getLogger(name) for name in (
        "ray._private.authentication.authentication_token_setup",  # "Token authentication is enabled..."
        "ray.data._internal.progress",  # "Progress bars disabled...": the job's own bar is on
    )]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import ray.data

        context = ray.data.DataContext.get_current()
        bars = context.enable_progress_bars
        context.enable_progress_bars = False
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        context = None
    with warnings.catch_warnings(), _filtered_stderr(NOISE):
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
            if context is not None:
                context.enable_progress_bars = bars


@contextmanager
def _filtered_stderr(drop: tuple[str, ...]) -> Iterator[None]:
    """fd 2 through a pipe; a thread copies every line back to the real stderr except those containing
    one of `drop`. Python's sys.stderr writes to fd 2 too, so it goes the same way, in order."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_fd, write_fd = os.pipe()
    except (OSError, ValueError):  # no fd 2 (embedded), nothing to filter
        yield
        return
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                if not any(d.encode() in line for d in drop):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, daemon=True, name="veil-stderr")
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the pump sees its end
        thread.join(timeout=5)
        os.close(saved)
