"""A first run's plan, written while the job already runs: time to the first item does not grow with the job.

`write_plan` runs in a child process of the driver and `waves()` hands out runs of whole shards as they
are written: the first wave is the first shard alone (1,000 items, operators/plan.py) as soon as
it exists, the next ones of about `max_items` items each (or whatever is left once the listing
has ended). Listing a million local entries
takes ~30 s on one core; processing them takes hours, so after the first wave the listing is
long done.

Only a job's first run streams: a resume (whose sealed shards and finished items are matched
against the whole plan) and a job that waits for approval (its quote needs every item) list
their plan first, as before.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict

from operators.plan import Plan, Shard, plan_root, write_plan


class PlanStream:
    """`write_plan(make_rows(*args), ...)` in a child process (spawned: a clean interpreter, no
    inherited threads or event loops). In a thread of the driver the listing held the GIL: at a
    million items the first wave's first item waited for the whole listing (43 s against 21 s at
    100,000); in its own process it takes the driver's time from nobody."""

    def __init__(self, make_rows: Callable[..., Iterable[dict]], args: tuple, job_root: str,
                 storage_options: dict | None, shard_items: int):
        self.root = plan_root(job_root)
        self._shards: list[Shard] = []
        self._plan: Plan | None = None  # the whole plan, once written
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        spawn = multiprocessing.get_context("spawn")
        queue = spawn.SimpleQueue()
        self._process = spawn.Process(target=_write, args=(make_rows, args, job_root, storage_options, shard_items,
                                                           queue), name="veil-plan", daemon=True)
        self._process.start()
        threading.Thread(target=self._receive, args=(queue,), name="veil-plan", daemon=True).start()
        self._wait(lambda: bool(self._shards))  # an input that does not exist is refused before the job starts

    def _receive(self, queue) -> None:
        while True:
            kind, body = queue.get()
            with self._changed:
                if kind == "shard":
                    self._shards.append(Shard(**body))
                elif kind == "plan":
                    self._plan = Plan(self.root, list(self._shards), body["has_rar"])
                else:
                    self._error = body
                self._changed.notify_all()
            if kind != "shard":
                self._process.join()
                return

    def _wait(self, ready) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or self._plan is not None or ready())
            if self._error is not None:
                raise self._error

    @property
    def plan(self) -> Plan | None:
        """The whole plan once the listing has ended, else None."""
        return self._plan

    def waves(self, max_items: int) -> Iterator[Plan]:
        taken = 0
        while True:
            # the first wave starts with one shard; later ones wait for a full wave or the end
            self._wait(lambda n=taken: sum(s.items for s in self._shards[n:]) >= (max_items if n else 1))
            with self._changed:
                new, ended = self._shards[taken:], self._plan is not None
            if not new and ended:
                return
            if not taken:  # the first wave is the first shard alone (1,000 items): the first items come soon
                taken = 1
                yield Plan(self.root, new[:1])
                continue
            runs = Plan(self.root, new).waves(max_items)
            for wave in runs if ended else runs[:1]:
                taken += len(wave.shards)
                if wave.items:  # an empty input's one empty shard: nothing to run
                    yield wave

    def result(self) -> Plan:
        """The whole plan (waits for the listing to end)."""
        self._wait(lambda: False)
        assert self._plan is not None
        return self._plan


def _write(make_rows: Callable[..., Iterable[dict]], args: tuple, job_root: str, storage_options: dict | None,
           shard_items: int, queue) -> None:
    """The child process: the plan written, each shard announced as it is."""
    os.nice(10)  # on a small machine the first wave's tasks come first; the listing has time
    try:
        plan = write_plan(make_rows(*args), job_root, storage_options, shard_items,
                          on_shard=lambda shard: queue.put(("shard", asdict(shard))))
    except BaseException as exc:  # raised again in the driver, as it would have been there
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that cannot travel: its text does
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        queue.put(("error", exc))
        return
    queue.put(("plan", {"has_rar": plan.has_rar}))
