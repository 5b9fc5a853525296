"""Per-credential rate limits: a token bucket per user or API key, in this replica's memory.

Each signed-in user (token or Basic) and each API key may make `per_minute` requests a minute,
with bursts up to the same number; past it the route answers 429 in its API's own shape, with a
Retry-After header. Replicas count separately (put a shared limiter in front for a global cap).

Failed password checks (sign-in, HTTP Basic) have their own, much smaller budget per client
address and per user name (`AuthThrottle`): each costs a scrypt hash, and a guesser would
otherwise try ~13 passwords a second.
"""

from __future__ import annotations

import math
import threading
import time


def retry_after_header(seconds: float) -> dict[str, str]:
    """Whole seconds, at least 1: `Retry-After: 0` invites a retry at once, which fails again."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class RateLimited(Exception):
    def __init__(self, retry_after: float, what: str = "rate limit reached"):
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"{what}: retry in {self.retry_after} s")

    @property
    def headers(self) -> dict[str, str]:
        return retry_after_header(self.retry_after)


class RateLimiter:
    def __init__(self, per_minute: int):
        """`per_minute` <= 0: no limit."""
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}  # who -> (tokens, when)
        self._lock = threading.Lock()

    def _tokens(self, who: str, now: float) -> float:
        """`who`'s tokens at `now`, refilled since its last request (call under the lock)."""
        tokens, since = self._buckets.get(who, (self.capacity, now))
        return min(self.capacity, tokens + (now - since) * self.rate)

    def _store(self, who: str, tokens: float, now: float, idle_s: float) -> None:
        self._buckets[who] = (tokens, now)
        if len(self._buckets) > 100_000:  # forget the idle ones: memory stays bounded
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < idle_s}

    def check(self, who: str, now: float | None = None) -> None:
        """Take one request from `who`'s bucket; RateLimited when it is empty."""
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = self._tokens(who, now)
            if tokens < 1:
                self._buckets[who] = (tokens, now)
                raise RateLimited((1 - tokens) / self.rate)
            self._store(who, tokens - 1, now, 60)

    def wait(self, who: str, now: float | None = None) -> float:
        """Seconds until `who` has a whole token again (0: it has one); takes nothing."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = self._tokens(who, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def take(self, who: str, now: float | None = None) -> None:
        """Take one token from `who`'s bucket even when it is empty (never below 0)."""
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            self._store(who, max(0.0, self._tokens(who, now) - 1), now, 600)

    def guard(self, who: str, error) -> None:
        """`check`, raising `error(429, message, headers)` (an API's own error class) instead."""
        try:
            self.check(who)
        except RateLimited as exc:
            raise error(exc) from None


class AuthThrottle:
    """Failed password checks per client address and per user name, each a token bucket that
    only failures drain: past `per_user` failures for one name, or `per_address` from one
    address, within a minute (the budget refills evenly), the check is refused with 429 before
    any hashing, until the bucket holds a token again. A correct password costs nothing.

    Per user as well as per address, so guessing one account from many addresses is slow too;
    the price is that a flood of wrong guesses can hold a real user back for a few seconds."""

    def __init__(self, per_user: int = 10, per_address: int = 30):
        self.users, self.addresses = RateLimiter(per_user), RateLimiter(per_address)

    def check(self, address: str, user: str) -> None:
        """RateLimited when either budget is spent."""
        wait = max(self.addresses.wait(address), self.users.wait(user))
        if wait > 0:
            raise RateLimited(wait, "too many failed sign-ins")

    def failed(self, address: str, user: str) -> None:
        self.addresses.take(address)
        self.users.take(user)

    def verify(self, auth, address: str, user: str, password: str):
        """`auth.check_password` behind the throttle: RateLimited before hashing when a budget is spent."""
        from jobs.api.auth import AuthError

        self.check(address, user)
        try:
            return auth.check_password(user, password)
        except AuthError:
            self.failed(address, user)
            raise


def client_address(request) -> str:
    """The caller's address as the server saw it (behind a proxy: the proxy's, unless uvicorn runs
    with --proxy-headers and trusts it)."""
    return request.client.host if request.client else "unknown"
