"""One place turns a JobSpec into stage options (jobs/stage_options.py): every WriteOptions and
ArchiveOptions field that a JobSpec field sets comes from the spec, for every caller."""

from __future__ import annotations

import dataclasses

from jobs.spec import build_spec
from jobs.stage_options import archive_options, write_options


def test_write_options_take_every_output_field_of_the_spec():
    spec = build_spec({"inputs": ["in"], "output": "out", "job_id": "j", "quality": 70, "compress_level": 2,
                       "debug": True, "score": True, "save_mask": "binary", "mask_scale": 50, "save_metadata": True,
                       "strip_metadata": "gps", "method": "pixelate", "storage_options": {"anon": True}})
    options = write_options(spec, "out/j")
    from_spec = [f.name for f in dataclasses.fields(options) if f.name in type(spec).model_fields]
    assert len(from_spec) >= 9 and all(getattr(options, n) == getattr(spec, n) for n in from_spec), from_spec
    assert (options.job_root, options.method, options.anonymize) == ("out/j", "pixelate", spec.anonymize_options())
    assert write_options(spec, "r", job_id="t", save_metadata=False).save_metadata is False  # callers' overrides


def test_archive_options_take_the_archive_fields():
    spec = build_spec({"inputs": ["in"], "output": "out", "archive_depth": 2, "archive_password": "pw",
                       "max_member_bytes": 10, "max_archive_bytes": 20, "max_compression_ratio": 5.0})
    options = archive_options(spec)
    assert (options.depth, options.password, options.max_member_bytes, options.max_archive_bytes,
            options.max_compression_ratio) == (2, "pw", 10, 20, 5.0)
