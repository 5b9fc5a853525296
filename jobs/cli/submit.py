"""`veil submit` and `veil cancel` (jobs/submit.py does the work): the `-- run ...` given to submit is
parsed and checked here, with `veil run`'s own parser and JobSpec, so a bad option is refused before
anything reaches the cluster; what travels is the JobSpec itself (jobs.submit.entrypoint)."""

from __future__ import annotations

import argparse
import sys

from jobs.cli.run import _opt, _storage_option, parse_run, run_spec
from jobs.spec import JobSpec, SpecError
from jobs.submit import RUN_CONTROLS, cancel, cluster_errors, follow, submit


def submitted_run(command: list[str], job_id: str | None) -> tuple[JobSpec, dict]:
    """(JobSpec, run controls) of `run INPUT... OUTPUT [options]`, with submit's --job-id."""
    if command[:1] == ["--"]:
        command = command[1:]
    if command[:1] != ["run"]:
        raise SpecError("give the command to run after --, e.g. veil submit --address URL -- run INPUT... OUTPUT")
    args = parse_run(command[1:])
    if args.job_id and job_id and args.job_id != job_id:
        raise SpecError(f"--job-id: {job_id!r} for submit but {args.job_id!r} for run")
    if job_id and not args.job_id:
        args.job_id = job_id
    try:
        spec = run_spec(args)
    except OSError as exc:  # --spec FILE missing here
        raise SpecError(f"spec: {exc}") from None
    return spec, {name: getattr(args, name) for name in RUN_CONTROLS}


def _env_var(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--env takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        return _submit_and_follow(args)
    except cluster_errors() as exc:
        print(f"veil submit: {exc}", file=sys.stderr)
        return 1


def _submit_and_follow(args: argparse.Namespace) -> int:
    extra = None if args.pip_extra == "none" else args.pip_extra
    spec, controls = submitted_run(args.run_command, args.job_id)
    job_id, sid = submit(args.address, spec, controls, args.pip, extra, dict(args.env or []))
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
    except cluster_errors() as exc:
        print(f"veil cancel: {exc}", file=sys.stderr)
        return 1


def add_submit_commands(sub) -> None:
    """Register `submit` and `cancel` on the `veil` subparsers."""
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

