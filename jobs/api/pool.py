"""A fixed set of worker threads taking work by priority: callers who wait on the line first.

A synchronous call holds its HTTP connection open until its image is done; an asynchronous task
is polled. With one FIFO queue, a burst of asynchronous uploads would make every synchronous
caller wait behind all of them (and time out); here they go first, and asynchronous tasks keep
their order among themselves.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

WAITING, BACKGROUND = 0, 1  # priorities: lower runs first


class PriorityPool:
    def __init__(self, workers: int, name: str = "veil-task"):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO within a priority
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, priority: int, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._queue.put((priority, next(self._order), fn, args, future))
        return future

    def _work(self) -> None:
        while True:
            _, _, fn, args, future = self._queue.get()
            if fn is None:
                return
            # a worker that took an item while shutdown drained the queue drops it too: otherwise a
            # task a stopped replica left `queued` (for another to requeue) would still run here
            if self._stopped.is_set():
                future.cancel()
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Stop taking work: queued items are dropped (their tasks stay `queued` in the storage)."""
        self._stopped.set()
        while True:
            try:
                _, _, fn, _, future = self._queue.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.cancel()
        for _ in self._threads:
            self._queue.put((-1, next(self._order), None, (), None))
