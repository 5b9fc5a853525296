"""The `veil` command line (console script `veil`, and `python -m jobs.cli` on a cluster).

Nothing outside this package imports it (tests/test_layering.py): the commands call into jobs,
operators and models, never the other way round. The names below are for the console script and tests.
"""

from jobs.cli.main import build_parser, main
from jobs.cli.run import EXIT_AWAITING_APPROVAL, spec_fields

__all__ = ["EXIT_AWAITING_APPROVAL", "build_parser", "main", "spec_fields"]
