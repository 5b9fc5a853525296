"""Credit accounts of the API keys: what each job reserved at approval and what it was charged.

    STORAGE/credits/<account>/<job_id>.json    {"state": "reserved" | "charged", "credits": N, "at": ...}

An API key's balance is its `credits` in the users file; what is available is that minus every entry
of its account. There is one entry per job, named by the job id, and it is only ever replaced,
never added to: approving reserves the quote, the job's end replaces the reservation with the credits
of the items that ended `done` (the job's `credits.total`, from its manifest), and nothing else
writes it. So repeated calls of approve or get_job_result, or a resumed job, charge a job once.

Reservations are checked and written under a lock in this process; replicas do not share the lock
(object stores have no transactions), so two approvals on two replicas at the same instant can both
pass the check. A bigger service keeps accounts in a database.
"""

from __future__ import annotations

import json
import re
import threading

from jobs.report import now_iso
from operators.storage import filesystem, join, write_atomic

EPS = 1e-9
ACCOUNT = re.compile(r"[0-9a-f]{32}")


class InsufficientCredits(Exception):
    pass


class Accounts:
    def __init__(self, storage: str, storage_options: dict | None = None):
        self.root = join(storage, "credits")
        self.storage_options = storage_options or {}
        self._lock = threading.Lock()

    def _url(self, account: str, job_id: str = "") -> str:
        if not ACCOUNT.fullmatch(account):
            raise ValueError("not an account id")
        return join(self.root, account, f"{job_id}.json" if job_id else "")

    def entries(self, account: str) -> dict[str, dict]:
        """{job id: entry} of the account."""
        fs, path = filesystem(self._url(account), self.storage_options)
        fs.invalidate_cache(path)  # another replica may have written since this one listed
        found = fs.glob(path.rstrip("/") + "/*.json") if fs.exists(path) else []
        out = {}
        for p in found:
            try:
                out[p.rsplit("/", 1)[1][:-5]] = json.loads(fs.cat_file(p))
            except (OSError, ValueError):
                continue  # replaced right now
        return out

    def balance(self, account: str, credits: float | None, exclude: str = "") -> dict:
        """The account's figures; `exclude`: a job whose own entry does not count (its re-approval)."""
        entries = {k: v for k, v in self.entries(account).items() if k != exclude}
        used = sum(float(e["credits"]) for e in entries.values() if e.get("state") == "charged")
        reserved = sum(float(e["credits"]) for e in entries.values() if e.get("state") == "reserved")
        return {"credits": credits, "used": round(float(used), 6), "reserved": round(float(reserved), 6),
                "available": None if credits is None else round(credits - used - reserved, 6)}

    def reserve(self, account: str, credits: float | None, job_id: str, amount: float) -> dict:
        """Reserve `amount` for the job, or InsufficientCredits when the balance does not cover it."""
        with self._lock:
            figures = self.balance(account, credits, exclude=job_id)
            if figures["available"] is not None and amount > figures["available"] + EPS:
                raise InsufficientCredits(f"the job is quoted {amount:g} credits and the API key has "
                                          f"{figures['available']:g} available")
            self._write(account, job_id, "reserved", amount)
            return figures

    def charge(self, account: str, job_id: str, amount: float) -> None:
        """The job's final charge, replacing its reservation (an earlier charge of a resumed job too)."""
        with self._lock:
            self._write(account, job_id, "charged", amount)

    def release(self, account: str, job_id: str) -> None:
        """Drop a reservation (a job deleted before it ran); a charge stays."""
        with self._lock:
            entry = self.entries(account).get(job_id)
            if entry and entry.get("state") == "reserved":
                fs, path = filesystem(self._url(account, job_id), self.storage_options)
                fs.rm(path)

    def _write(self, account: str, job_id: str, state: str, amount: float) -> None:
        doc = {"job_id": job_id, "state": state, "credits": round(float(amount), 6), "at": now_iso()}
        write_atomic(self._url(account, job_id), json.dumps(doc).encode(), self.storage_options)
