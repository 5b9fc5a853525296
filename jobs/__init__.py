"""Jobs: a job from end to end (spec, run, report, CLI). Depends on `operators` and `models`."""
