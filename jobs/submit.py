"""`veil submit` and `veil cancel`: the same `veil run` on a remote Ray cluster, through the Ray Jobs API.

    veil submit --address http://HEAD:8265 [--wait] [--job-id ID] -- run INPUT... OUTPUT [options]
    veil cancel JOB_ID --address http://HEAD:8265 [--output OUTPUT]

The job's code travels with the submission (runtime_env working_dir = this repository, or the three
packages when veil is installed from a wheel); its Python packages come from the cluster's image, or
from `--pip` (a virtualenv per node, built from veil's own requirements). The Ray submission id is
`veil-<JOB_ID>`, so a job is found again by the job id that names its output folder.
"""

from __future__ import annotations

import argparse
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
from jobs.spec import SpecError, build_spec, new_job_id
from operators.storage import is_local, join, write_atomic

SUBMISSION_PREFIX = "veil-"
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


def _run_args_job_id(run_args: list[str]) -> str | None:
    for i, arg in enumerate(run_args):
        if arg in ("--job-id", "--job_id") and i + 1 < len(run_args):
            return run_args[i + 1]
        for flag in ("--job-id=", "--job_id="):
            if arg.startswith(flag):
                return arg[len(flag):]
    return None


def prepare_run(command: list[str], job_id: str | None) -> tuple[list[str], str, str]:
    """(run arguments with --job-id, job id, output) from `run INPUT... OUTPUT [options]`.

    The arguments are parsed and validated here, with `veil run`'s own parser and JobSpec, so a bad
    option is refused before anything reaches the cluster."""
    from jobs.cli import build_parser, spec_fields

    if command[:1] == ["--"]:
        command = command[1:]
    if command[:1] != ["run"]:
        raise SpecError("give the command to run after --, e.g. veil submit --address URL -- run INPUT... OUTPUT")
    run_args = command[1:]
    given = _run_args_job_id(run_args)
    if given and job_id and given != job_id:
        raise SpecError(f"--job-id: {job_id!r} for submit but {given!r} for run")
    job_id = given or job_id or new_job_id()
    if not given:
        run_args = [*run_args, "--job-id", job_id]
    args = build_parser().parse_args(["run", *run_args])
    if len(args.paths) < 2:
        raise SpecError("run: give at least one INPUT and the OUTPUT")
    try:
        spec = build_spec(spec_fields(args, args.paths[:-1], args.paths[-1]))
    except OSError as exc:  # --spec FILE missing here
        raise SpecError(f"spec: {exc}") from None
    return run_args, spec.job_id, spec.output


def entrypoint(run_args: list[str]) -> str:
    # `python -m` rather than the `veil` script: the working_dir copy of the code is first on sys.path,
    # and the script may not exist where veil is not installed (--pip).
    return shlex.join(["python", "-m", "jobs.cli", "run", *run_args])


# --- submit, follow, inspect, cancel ---------------------------------------------------------------


def submit(address: str | None, command: list[str], job_id: str | None = None, pip: bool = False,
           pip_extra: str | None = "gpu", env_vars: dict[str, str] | None = None) -> tuple[str, str]:
    """Submit `run ...` to the cluster; returns (job id, submission id). Submitting a job id again
    resumes it as the next attempt, a new Ray job; while an attempt still runs it is refused."""
    from ray.job_submission import JobStatus

    run_args, job_id, output = prepare_run(command, job_id)
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
    env = runtime_env(pip, pip_extra, env_vars)
    retry_no_agent(lambda: client.submit_job(  # a head's first seconds: no job agent yet
        entrypoint=entrypoint(run_args),
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


# --- command line ----------------------------------------------------------------------------------


def _env_var(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--env takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def _cluster_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import AuthenticationError

    # unreachable, refused by Ray (RuntimeError), or a cluster with token auth and no token here
    return ConnectionError, RuntimeError, AuthenticationError


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        return _submit_and_follow(args)
    except _cluster_errors() as exc:
        print(f"veil submit: {exc}", file=sys.stderr)
        return 1


def _submit_and_follow(args: argparse.Namespace) -> int:
    extra = None if args.pip_extra == "none" else args.pip_extra
    job_id, sid = submit(args.address, args.run_command, args.job_id, args.pip, extra, dict(args.env or []))
    print(f"submission id: {sid}")
    print(f"job id: {job_id}")
    if not args.wait:
        addr = f" --address {args.address}" if args.address else ""
        print(f"follow: ray job logs -f {sid}{addr}")
        print(f"cancel: veil cancel {job_id}{addr}")
        return 0
    try:
        return follow(args.address, job_id)
    except KeyboardInterrupt:  # stop following, not the job
        print(f"\nstopped following; the job goes on (veil cancel {job_id} to stop it)", file=sys.stderr)
        return 130


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        return cancel(args.address, args.job_id, args.output, dict(args.storage_option or []))
    except _cluster_errors() as exc:
        print(f"veil cancel: {exc}", file=sys.stderr)
        return 1


def add_submit_commands(sub) -> None:
    """Register `submit` and `cancel` on the `veil` subparsers."""
    from jobs.cli import _opt, _storage_option

    address_help = ("the cluster's dashboard, e.g. http://head:8265 "
                    "(default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")
    p = sub.add_parser("submit", help="run a job on a remote Ray cluster (Ray Jobs API)",
                       usage="veil submit --address URL [--wait] [--job-id ID] -- run INPUT... OUTPUT [options]")
    p.add_argument("--address", help=address_help)
    p.add_argument("--wait", action="store_true",
                   help="follow the logs until the job ends; exit 0 succeeded, 1 failed (or the job's own "
                        "code, e.g. 2 for refused options), 3 stopped")
    _opt(p, "--job-id", help="job id (default: the run's --job-id, else generated); Ray submission id veil-ID")
    p.add_argument("--pip", action=argparse.BooleanOptionalAction, default=False,
                   help="install veil's Python requirements in a virtualenv on each node (default: no, "
                        "the cluster's image has them, see cluster/Dockerfile)")
    _opt(p, "--pip-extra", choices=["cpu", "gpu", "none"], default="gpu",
         help="with --pip: which ONNX Runtime (default gpu, which also runs on CPU)")
    p.add_argument("--env", type=_env_var, action="append", metavar="KEY=VALUE",
                   help="environment variable for the job's processes (repeatable)")
    # not `command`: the subparsers already store the subcommand's name there
    p.add_argument("run_command", nargs=argparse.REMAINDER, metavar="-- run ...",
                   help="-- run INPUT... OUTPUT [veil run options]")
    p.set_defaults(func=cmd_submit)

    c = sub.add_parser("cancel", help="stop a submitted job and mark its job.json cancelled")
    c.add_argument("job_id", help="the job id (Ray submission id veil-JOB_ID)")
    c.add_argument("--address", help=address_help)
    c.add_argument("--output", help="the job's OUTPUT (default: the one it was submitted with)")
    _opt(c, "--storage-option", type=_storage_option, action="append", dest="storage_option",
         metavar="KEY=VALUE", help="fsspec option for a remote OUTPUT, e.g. endpoint_url=http://127.0.0.1:9000")
    c.set_defaults(func=cmd_cancel)

