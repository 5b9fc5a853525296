"""The credit ledger behind `--max-credits`: items reserve their credits before they are processed.

One ledger per job (a Ray actor in the pipeline, a plain object in tests). Calls are served one
at a time, so however many prepare tasks ask at once, the credits reserved never pass the cap.
An item that cannot reserve is `skipped` with BUDGET_EXCEEDED; an item that fails after
reserving gives its credits back, since failed items cost nothing.
"""

from __future__ import annotations

import threading

EPS = 1e-9  # float sums of credits: do not refuse an item over rounding noise


class CreditLedger:
    def __init__(self, cap: float | None, charged: float = 0.0):
        """`cap`: the most credits the whole job may charge (None: no cap); `charged`: what earlier
        runs of a resumed job already charged (it counts against the cap)."""
        self.cap = cap
        self.reserved = float(charged)
        self.refused = 0
        self._lock = threading.Lock()  # for in-process use from threads; a Ray actor is serial anyway

    def reserve(self, requests: list[tuple[str, float]]) -> list[bool]:
        """Grant each (item_id, credits) in order while the cap allows; refusals are final."""
        granted = []
        with self._lock:
            for _, credits in requests:
                ok = self.cap is None or self.reserved + credits <= self.cap + EPS
                if ok:
                    self.reserved += credits
                else:
                    self.refused += 1
                granted.append(ok)
        return granted

    def release(self, requests: list[tuple[str, float]]) -> None:
        """Give back the credits of items that failed after reserving."""
        with self._lock:
            self.reserved -= sum(c for _, c in requests)

    def state(self) -> dict:
        return {"cap": self.cap, "reserved": round(self.reserved, 6), "refused": self.refused}


class Billing:
    """What the prepare stage needs to price an item: the pricing table (anything with
    `item_credits(width, height, classes)`), the job's classes, and the ledger if capped."""

    def __init__(self, pricing, classes: list[str], ledger=None):
        self.pricing = pricing
        self.classes = list(classes)
        self.ledger = ledger

    def credits(self, width: int, height: int) -> float:
        return float(self.pricing.item_credits(int(width), int(height), self.classes))

    def video_credits(self, duration_s: float) -> float:
        return float(self.pricing.video_credits(float(duration_s), self.classes))
