"""A JobSpec reaches the cluster whole: `veil submit` and the service (jobs/api/ray_jobs.py) send it
as `veil run --spec-json`, and every field comes back as it left, with or without a flag of its own."""

from __future__ import annotations

import shlex
import typing

import pytest

from jobs.cli.main import build_parser
from jobs.cli.run import run_spec
from jobs.cli.submit import submitted_run
from jobs.spec import JobSpec, SpecError, build_spec
from jobs.submit import entrypoint

# values a generic rule cannot guess (validated formats); every other field gets one from its type
KNOWN = {
    "inputs": ["s3://in/a", "in/b dir/", "-dash"], "output": "s3://out", "job_id": "job-1",
    "ignores": [{"topLeftX": 1, "topLeftY": 2, "width": 3, "height": 4}],
    "format": {"number": [2, 3], "overlap": [0.1, 0.2]}, "storage_options": {"key": "k", "client_kwargs": {"a": 1}},
    "webhook": "https://hooks.example/x", "web_auth_header_name": "Authorization", "score": True, "debug": True,
    "detect_models": ["centerface"], "profile": None,  # a profile and detect_models exclude each other
}


def _other(name: str, field) -> object:
    """A valid value of `field` other than its default."""
    if name in KNOWN:
        return KNOWN[name]
    kind, default = field.annotation, field.default
    if typing.get_origin(kind) is not typing.Literal:  # X | None: X
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
    if typing.get_origin(kind) is typing.Literal:
        return next(v for v in typing.get_args(kind) if v != default)
    if kind is bool:
        return not default
    if kind in (int, float):
        bounds = {k: getattr(m, k) for m in field.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
        start = default if default is not None else bounds.get("ge", bounds.get("gt", 0))
        for value in (kind(start + 1), kind(start - 1), start / 2):
            if (value >= bounds.get("ge", value) and value > bounds.get("gt", value - 1)
                    and value <= bounds.get("le", value) and value < bounds.get("lt", value + 1) and value != default):
                return value
    if kind is str:
        return "x" + name
    raise AssertionError(f"JobSpec.{name}: give it a value in KNOWN")


def every_field() -> JobSpec:
    fields = {name: _other(name, f) for name, f in JobSpec.model_fields.items()}
    spec = build_spec(fields)
    defaults = build_spec({"inputs": ["i"], "output": "o"})
    unchanged = [n for n in JobSpec.model_fields if n not in ("profile",) and getattr(spec, n) == getattr(defaults, n)]
    assert unchanged == [], "the round trip would not see these fields"
    return spec


def test_every_jobspec_field_reaches_veil_run_through_the_entrypoint():
    spec = every_field()
    command = shlex.split(entrypoint(spec, {"approve": True, "auto_approve_below": 5.0, "retry_failed": False}))
    assert command[:4] == ["python", "-m", "jobs.cli", "run"]
    args = build_parser().parse_args(command[3:])
    assert (args.approve, args.auto_approve_below, args.retry_failed) == (True, 5.0, False)
    again = run_spec(args)
    assert again == spec
    assert (again.archive_password, again.web_auth_header_value) == (spec.archive_password,
                                                                      spec.web_auth_header_value)  # secrets too


def test_entrypoint_refuses_a_spec_field_as_a_run_control():
    with pytest.raises(ValueError, match="not a run control"):
        entrypoint(every_field(), {"quality": 3})


def test_veil_submit_checks_the_run_here_and_sends_its_spec():
    spec, controls = submitted_run(["--", "run", "in/", "s3://out", "--face", "--quality", "70", "--approve"], "j1")
    assert (spec.inputs, spec.output, spec.job_id, spec.face, spec.quality) == (["in/"], "s3://out", "j1", True, 70)
    assert controls == {"approve": True, "auto_approve_below": None, "retry_failed": False, "allow_spec_change": False}
    with pytest.raises(SpecError, match="--job-id"):
        submitted_run(["run", "in/", "out", "--job-id", "a"], "b")
    with pytest.raises(SpecError, match="at least one INPUT .* and the OUTPUT"):
        submitted_run(["run", "out"], None)
    with pytest.raises(SystemExit):  # argparse: an unknown option is refused before anything is sent
        submitted_run(["run", "in/", "out", "--no-such-option"], None)


def test_flags_override_spec_json():
    args = build_parser().parse_args(["run", "a", "o", "--spec-json", '{"quality": 10, "bbox": true}',
                                      "--quality", "20"])
    assert (run_spec(args).quality, run_spec(args).bbox) == (20, True)
    with pytest.raises(SpecError, match="spec-json"):
        run_spec(build_parser().parse_args(["run", "in", "out", "--spec-json", "[1]"]))
