"""The Ray Jobs API client of `veil submit/status/cancel`: token authentication and a fresh head's start-up.

Since Ray 2.5x a head started where a token exists (`~/.ray/auth_token`, which any local `ray.init()`
writes) turns token authentication on, while a client process defaults to RAY_AUTH_MODE=disabled and
sends no token: every request is refused 401 "Missing authentication token". So the client is made
without a token first and, when the cluster answers 401, again with the token found where Ray's own
loader looks: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. A token is
sent only to a cluster that asks for one.

For its first seconds a new head has no job agent yet and answers a submission 500 "No available agent
to submit job, please try again later": that is retried with backoff for a minute.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
AGENT_RETRY_S = 60.0  # how long a head may take to start its job agent
NO_AGENT = "No available agent"
TOKEN_SOURCES = "RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"


class TokenMissing(ConnectionError):
    """The cluster asks for a token and none is available here."""


def local_token_header() -> dict[str, str]:
    """{"authorization": "Bearer ..."} from the token Ray's loader finds here, or {}."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since it was first read
    return dict(loader.get_token_for_http_header(ignore_auth_mode=True) or {})


def job_client(address: str | None):
    """A JobSubmissionClient for `address` (None: RAY_API_SERVER_ADDRESS or RAY_ADDRESS), with the local
    token when the cluster requires one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:  # 401 or 403 on the version check
        headers = local_token_header()
        if not headers:
            raise TokenMissing(f"the Ray cluster at {address or 'RAY_ADDRESS'} uses token authentication and no "
                               f"token was found here: set {TOKEN_SOURCES}") from None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise TokenMissing(f"the Ray cluster at {address or 'RAY_ADDRESS'} refused the token found here "
                           f"({TOKEN_SOURCES}): it is not this cluster's token") from None


def retry_no_agent(call: Callable[[], T], limit_s: float = AGENT_RETRY_S, log=None) -> T:
    """`call()`, again after 1, 2, 4, 8... s (at most 10 s apart) while the head answers that it has no
    job agent yet, for up to `limit_s` seconds; other errors pass at once."""
    log = log or (lambda text: print(text, file=sys.stderr))
    deadline = time.monotonic() + limit_s
    delay = 1.0
    while True:
        try:
            return call()
        except RuntimeError as exc:
            left = deadline - time.monotonic()
            if NO_AGENT not in str(exc) or left <= 0:
                raise
            log(f"the Ray head has no job agent yet (it is starting): retrying in {min(delay, left):.0f} s")
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)
