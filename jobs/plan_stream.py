"""A first run's plan, written while the job already runs: time to the first item does not grow with the job.

`write_plan` runs in a thread of the driver and `waves()` hands out runs of whole shards as they
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

import threading
from collections.abc import Iterable, Iterator

from operators.plan import Plan, Shard, plan_root, write_plan


class PlanStream:
    def __init__(self, rows: Iterable[dict], job_root: str, storage_options: dict | None, shard_items: int):
        self.root = plan_root(job_root)
        self._shards: list[Shard] = []
        self._plan: Plan | None = None  # the whole plan, once written
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._write, args=(rows, job_root, storage_options, shard_items),
                                        name="veil-plan", daemon=True)
        self._thread.start()
        self._wait(lambda: bool(self._shards))  # an input that does not exist is refused before the job starts

    def _write(self, rows: Iterable[dict], job_root: str, storage_options: dict | None, shard_items: int) -> None:
        try:
            plan = write_plan(rows, job_root, storage_options, shard_items, on_shard=self._add)
        except BaseException as exc:  # raised again in the thread that takes the waves
            with self._changed:
                self._error = exc
                self._changed.notify_all()
            return
        with self._changed:
            self._plan = plan
            self._changed.notify_all()

    def _add(self, shard: Shard) -> None:
        with self._changed:
            self._shards.append(shard)
            self._changed.notify_all()

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
