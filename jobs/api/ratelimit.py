"""Per-credential rate limits: a token bucket per user or API key, in this replica's memory.

Each signed-in user (token or Basic) and each API key may make `per_minute` requests a minute,
with bursts up to the same number; past it the route answers 429 in its API's own shape, with a
Retry-After header. Replicas count separately (put a shared limiter in front for a global cap).
"""

from __future__ import annotations

import threading
import time


class RateLimited(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"rate limit reached: retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, per_minute: int):
        """`per_minute` <= 0: no limit."""
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}  # who -> (tokens, when)
        self._lock = threading.Lock()

    def check(self, who: str, now: float | None = None) -> None:
        """Take one request from `who`'s bucket; RateLimited when it is empty."""
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, since = self._buckets.get(who, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - since) * self.rate)
            if tokens < 1:
                self._buckets[who] = (tokens, now)
                raise RateLimited((1 - tokens) / self.rate)
            self._buckets[who] = (tokens - 1, now)
            if len(self._buckets) > 100_000:  # forget the idle ones: memory stays bounded
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}

    def guard(self, who: str, error) -> None:
        """`check`, raising `error(429, message, headers)` (an API's own error class) instead."""
        try:
            self.check(who)
        except RateLimited as exc:
            raise error(exc) from None
