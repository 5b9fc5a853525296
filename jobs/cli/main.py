"""The `veil` command line: one parser whose subcommands are registered by the modules of this
package (run, tools, lifecycle, submit, serve), and the exit codes of the errors they raise."""

from __future__ import annotations

import argparse
import sys

from jobs.cli.lifecycle import add_lifecycle_commands
from jobs.cli.run import _add_job_options, add_run_commands
from jobs.cli.serve import add_serve_command
from jobs.cli.submit import add_submit_commands
from jobs.cli.tools import add_tool_commands
from jobs.job_store import JobBusy, JobNotFound
from jobs.pricing import PricingError
from jobs.spec import SpecError
from operators.sources import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description="Anonymize street-level imagery at scale.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_commands(sub)  # run, bench
    add_tool_commands(sub)  # demo, models, eval
    add_lifecycle_commands(sub, _add_job_options)  # quote, approve, status, report, list, delete
    add_submit_commands(sub)  # submit, cancel
    add_serve_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, InputError, PricingError, JobNotFound, JobBusy) as exc:
        print(f"veil {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"veil {args.command}: cancelled", file=sys.stderr)
        return 130
    except Exception as exc:
        from jobs.run import JobFailed  # here: `veil serve` and the lifecycle commands need not import run

        if not isinstance(exc, JobFailed):
            raise
        print(f"veil {args.command}: failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
