"""The job webhook: POST the job report when a job awaits approval and when it ends.

Timeouts, a few retries with exponential backoff on network errors and 5xx/429 answers; a
4xx answer is final. The outcome goes into job.json (`webhook`). The auth header's value is
never logged nor stored.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from jobs.report import now_iso

RETRY_STATUSES = {429, 500, 502, 503, 504}


def check_webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"webhook must be an http:// or https:// URL, got {url!r}")
    return url


def post_report(
    url: str,
    doc: dict,
    header_name: str | None = None,
    header_value: str | None = None,
    timeout: float = 10.0,
    retries: int = 3,
    backoff: float = 1.0,
) -> dict:
    """POST `doc` as JSON; returns the outcome {status: sent|failed, attempts, http_status, error, at}."""
    body = json.dumps(doc, default=str).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "veil-webhook"}
    if header_name and header_value:
        headers[header_name] = header_value
    outcome = {"status": "failed", "event": doc.get("status"), "attempts": 0, "http_status": None, "error": ""}
    for attempt in range(retries + 1):
        outcome["attempts"] = attempt + 1
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                outcome.update(status="sent", http_status=resp.status, error="")
                break
        except urllib.error.HTTPError as exc:
            outcome.update(http_status=exc.code, error=f"HTTP {exc.code} {exc.reason}")
            if exc.code not in RETRY_STATUSES:
                break
        except ValueError as exc:  # a header or URL http.client refuses: final; its text may hold the secret
            outcome.update(http_status=None, error=f"{type(exc).__name__}: the request could not be built")
            break
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            outcome.update(http_status=None, error=f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    outcome["at"] = now_iso()
    return outcome
