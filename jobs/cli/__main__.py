"""`python -m jobs.cli ...`: the entrypoint of jobs submitted to a Ray cluster (jobs/submit.py)."""

import sys

from jobs.cli.main import main

sys.exit(main())
