"""`veil submit` and `veil cancel`: the same `veil run` on a remote Ray cluster, through the Ray Jobs API.

    veil submit --address http://HEAD:8265 [--wait] [--job-id ID] -- run INPUT... OUTPUT [options]
    veil cancel JOB_ID --address http://HEAD:8265 [--output OUTPUT]

(the commands are in jobs/cli/submit.py; this module is what they, and `veil serve --ray-address`
through jobs/api/ray_jobs.py, call). The job travels as its whole JobSpec in JSON: the driver runs
`python -m jobs.cli run --job-id ID --spec-json '{...}' -- INPUT... OUTPUT`.

The job's code travels with the submission (runtime_env working_dir = this repository, or the three
packages when veil is installed from a wheel); its Python packages come from the cluster's image, or
from `--pip` (a virtualenv per node, built from veil's own requirements). The Ray submission id is
`veil-<JOB_ID>`, so a job is found again by the job id that names its output folder.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from jobs.ray_client import retry_no_agent
from jobs.report import load_report, now_iso
from jobs.spec import SECRET_FIELDS, JobSpec, SpecError  # SECRET_FIELDS: excluded from dumps, needed by the driver
from operators.storage import is_local, join, write_atomic

SUBMISSION_PREFIX = "veil-"
# `veil run` options that are not JobSpec fields: how the job runs, not what it makes
RUN_CONTROLS = ("approve", "auto_approve_below", "retry_failed", "allow_spec_change")
PACKAGES = ("jobs", "operators", "models")
# Not needed on the cluster, and some are large: the zip Ray uploads stays a few hundred KiB.
EXCLUDES = [
    "/.git", "/.ci", "/tests", "/notebooks", "/cluster", "/.benchmarks", "/build", "/dist", "/out",
    "/bench-results", "/.venv", "/venv", "/.hypothesis", "*.egg-info", "**/__pycache__", "*.pyc", ".ruff_cache",
    ".pytest_cache", ".mypy_cache", "*.onnx",
]
# Exit status of `veil submit --wait` by final Ray status (FAILED passes the driver's own code on).
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
# Each attempt of a job is its own Ray job: `veil-<ID>`, then `veil-<ID>-2`, `veil-<ID>-3`... A reused
# id raced Ray's monitor of the ended job: it notices the supervisor actor gone a moment after the
# end, reads the status by submission id and, finding the new attempt there, marks it FAILED ("Job
# supervisor actor died", Ray 2.60, a resume right after a stop on a loaded machine). Own ids also
# keep every attempt's logs.


class RayJobNotFound(LookupError):
    """No Ray job with the submission id `veil-<JOB_ID>` on that cluster."""


RESUME_LEASE_WAIT_S = 60  # a stopped attempt's driver exits within Ray's stop timeout plus its own cleanup


def submission_id(job_id: str, attempt: int = 1) -> str:
    return SUBMISSION_PREFIX + job_id + (f"-{attempt}" if attempt > 1 else "")


def submissions(client, job_id: str) -> list:
    """The cluster's Ray jobs of a veil job, oldest attempt first (JobDetails with .submission_id)."""
    first = submission_id(job_id)
    found = [info for info in client.list_jobs()
             if (info.metadata or {}).get("veil_job_id") == job_id or info.submission_id == first]
    return sorted(found, key=lambda info: (_attempt(info), info.start_time or 0))


def _attempt(info) -> int:
    try:
        return int((info.metadata or {}).get("veil_attempt", 1))
    except ValueError:
        return 1


def latest_submission(client, job_id: str):
    """The JobDetails of the job's latest attempt on the cluster; RayJobNotFound when it has none."""
    found = submissions(client, job_id)
    if not found:
        raise RayJobNotFound(f"no Ray job {submission_id(job_id)} (or a later attempt of it)")
    return found[-1]


def _client(address: str | None):
    from jobs.ray_client import job_client

    return job_client(address)  # with the local token when the cluster uses token authentication


# --- what travels with the job ---------------------------------------------------------------------


def repo_root() -> Path | None:
    """The source tree veil runs from, when it is one (an editable install or a checkout)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and all((root / p).is_dir() for p in PACKAGES):
        return root
    return None


def pip_requirements(extra: str | None = "gpu") -> list[str]:
    """veil's requirements for a runtime_env virtualenv: the base list plus one extra (cpu/gpu).

    Ray itself is left out: the virtualenv sees the cluster's Ray, and a second Ray in it breaks the
    workers (Ray's docs say so)."""
    from packaging.requirements import Requirement

    reqs = []
    for text in metadata.requires("veil") or []:
        req = Requirement(text)
        if req.name.lower() == "ray":
            continue
        marker = str(req.marker) if req.marker else ""
        if "extra" in marker:
            if not extra or not req.marker.evaluate({"extra": extra}):
                continue
            req.marker = None
        reqs.append(str(req))
    return reqs


def runtime_env(pip: bool = False, pip_extra: str | None = "gpu", env_vars: dict[str, str] | None = None) -> dict:
    root = repo_root()
    if root is not None:
        env: dict = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    else:  # installed from a wheel: ship the packages themselves
        import importlib

        env = {"py_modules": [str(Path(importlib.import_module(p).__file__).parent) for p in PACKAGES]}
    if pip:
        env["pip"] = pip_requirements(pip_extra)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


# --- the run command that becomes the entrypoint ---------------------------------------------------


def spec_json(spec: JobSpec) -> str:
    """The spec but its inputs and output (the run's positional arguments), as `veil run --spec-json`
    reads it back: every field, the secrets that job.json leaves out included (the archive password,
    the webhook header value), so no option is lost on the way to the cluster, whether the command
    line has a flag for it or not."""
    fields = spec.model_dump(mode="json", exclude_defaults=True, exclude={"inputs", "output"})
    fields["job_id"] = spec.job_id
    for name in SECRET_FIELDS:
        if getattr(spec, name) is not None:
            fields[name] = getattr(spec, name)
    return json.dumps(fields, separators=(",", ":"), sort_keys=True)


def entrypoint(spec: JobSpec, controls: dict | None = None) -> str:
    """`python -m jobs.cli run --job-id ID --spec-json '{...}' [run controls] -- INPUT... OUTPUT`: the
    job's driver. `controls` are `veil run`'s options that are not spec fields (approve,
    auto_approve_below, retry_failed, allow_spec_change): True becomes the bare flag, None/False nothing."""
    # `python -m` rather than the `veil` script: the working_dir copy of the code is first on sys.path,
    # and the script may not exist where veil is not installed (--pip).
    args = ["python", "-m", "jobs.cli", "run", "--job-id", spec.job_id, "--spec-json", spec_json(spec)]
    for name, value in (controls or {}).items():
        if name not in RUN_CONTROLS:
            raise ValueError(f"not a run control: {name!r} (spec fields go in the spec)")
        if value is True:
            args.append("--" + name.replace("_", "-"))
        elif value is not None and value is not False:
            args += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join([*args, "--", *spec.inputs, spec.output])  # `--`: a path may start with a dash


# --- submit, follow, inspect, cancel ---------------------------------------------------------------


def submit(address: str | None, spec: JobSpec, controls: dict | None = None, pip: bool = False,
           pip_extra: str | None = "gpu", env_vars: dict[str, str] | None = None) -> tuple[str, str]:
    """Submit the job `spec` (`veil run` with the run `controls`, see entrypoint) to the cluster;
    returns (job id, submission id). Submitting a job id again resumes it as the next attempt, a
    new Ray job; while an attempt still runs it is refused."""
    from ray.job_submission import JobStatus

    job_id, output = spec.job_id, spec.output
    command = entrypoint(spec, controls)
    if is_local(output):
        print(f"note: {output} is a path on the cluster's nodes, not on this machine", file=sys.stderr)
    client = _client(address)
    earlier = retry_no_agent(lambda: submissions(client, job_id))
    for info in earlier:
        if not JobStatus(info.status).is_terminal():
            raise SpecError(f"job-id: {job_id} is already {JobStatus(info.status).value} on this cluster as "
                            f"{info.submission_id} (veil cancel {job_id} ...)")
    attempt = max((_attempt(info) for info in earlier), default=0) + 1
    sid = submission_id(job_id, attempt)
    if attempt > 1:
        # Ray says an attempt STOPPED once it has signalled the driver, which may still be exiting
        # (writing `cancelled`, releasing its lease): the next attempt's driver waits for the lease
        env_vars = {"VEIL_LEASE_WAIT_S": str(RESUME_LEASE_WAIT_S), **(env_vars or {})}
    env = runtime_env(pip, pip_extra, env_vars)
    retry_no_agent(lambda: client.submit_job(  # a head's first seconds: no job agent yet
        entrypoint=command,
        submission_id=sid,
        runtime_env=env,
        metadata={"veil_job_id": job_id, "veil_output": output, "veil_attempt": str(attempt)},
    ))
    return job_id, sid


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds") if ms else None


def ray_job_info(address: str, job_id: str) -> dict:
    """The Ray side of a submitted job: status (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED), message,
    submission id, start/end times (ISO, UTC). Raises RayJobNotFound when the cluster has no such job."""
    try:
        info = latest_submission(_client(address), job_id)
    except RayJobNotFound as exc:
        raise RayJobNotFound(f"{exc} at {address}") from None
    return {
        "submission_id": info.submission_id,
        "attempt": _attempt(info),
        "ray_job_id": info.job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "error_type": info.error_type,
        "start_time": _iso(info.start_time),
        "end_time": _iso(info.end_time),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
        "metadata": dict(info.metadata or {}),
    }


def _wait_terminal(client, sid: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while True:
        status = JobStatus(client.get_job_status(sid))
        if status.is_terminal() or time.monotonic() > deadline:
            return status.value
        time.sleep(0.5)


def follow(address: str | None, job_id: str, out=None) -> int:
    """Print the logs of the job's latest attempt as they come until it ends; returns its exit status
    (see EXIT_CODES)."""
    out = out or sys.stdout
    client = _client(address)
    sid = latest_submission(client, job_id).submission_id
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(sid):
            out.write(chunk)
            out.flush()
            printed += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:  # the websocket dropped: poll instead, the job goes on regardless
        print(f"(log stream lost: {exc}; polling)", file=sys.stderr)
    status = _wait_terminal(client, sid, timeout=float("inf"))
    rest = client.get_job_logs(sid)[printed:]
    if rest:
        out.write(rest)
        out.flush()
    info = client.get_job_info(sid)
    code = EXIT_CODES.get(status, 1)
    if status == "FAILED" and isinstance(getattr(info, "driver_exit_code", None), int) and info.driver_exit_code > 0:
        code = info.driver_exit_code
    print(f"ray job {sid}: {status}" + (f" ({info.message})" if info.message else ""), file=out)
    return code


def cluster_errors() -> tuple[type[BaseException], ...]:
    """What talking to a cluster raises: unreachable, refused by Ray (RuntimeError), or a cluster with
    token auth and no token here."""
    from ray.exceptions import AuthenticationError

    return ConnectionError, RuntimeError, AuthenticationError


def mark_cancelled(job_root: str, job_id: str, description: str, storage_options: dict | None = None) -> dict:
    """Set OUTPUT/JOB_ID/job.json to `cancelled` (a minimal one when the job never wrote it)."""
    try:
        doc = load_report(job_root, storage_options)
    except FileNotFoundError:
        doc = {"job_id": job_id, "created_at": now_iso()}
    doc.update(status="cancelled", description=description, finished_at=now_iso())
    write_atomic(join(job_root, "job.json"), json.dumps(doc, indent=2, default=str).encode(), storage_options)
    return doc


def cancel(address: str | None, job_id: str, output: str | None = None, storage_options: dict | None = None,
           timeout: float = 60.0) -> int:
    """Stop the Ray job, wait until its driver is gone (so it cannot overwrite job.json afterwards),
    then mark job.json cancelled. Returns 0 when cancelled, 1 when there was nothing to cancel."""
    client = _client(address)
    try:
        info = latest_submission(client, job_id)
    except RayJobNotFound as exc:
        print(f"veil cancel: {exc} at {address}", file=sys.stderr)
        return 1
    sid = info.submission_id
    output = output or (info.metadata or {}).get("veil_output")
    if not output:
        raise SpecError("output: give --output, the job's OUTPUT")
    status = info.status.value if hasattr(info.status, "value") else str(info.status)
    if status in ("SUCCEEDED", "FAILED"):
        print(f"veil cancel: job {job_id} already ended: {status}", file=sys.stderr)
        return 1
    client.stop_job(sid)
    status = _wait_terminal(client, sid, timeout)
    if status != "STOPPED":  # it ended on its own before the stop arrived, or is somehow still running
        print(f"veil cancel: job {job_id} is {status}, not stopped", file=sys.stderr)
        return 1
    mark_cancelled(join(output, job_id), job_id, f"cancelled: Ray job {sid} stopped ({status})", storage_options)
    print(f"job {job_id}: cancelled (Ray job {sid}: {status})")
    return 0
