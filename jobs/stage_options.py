"""A JobSpec as the options of the stages that take options objects: ArchiveOptions (listing and
expanding archives), WriteOptions (anonymize, encode, write), VideoOptions (a video in the detector).
One place for the job pipeline (jobs/pipeline.py), the service's jobs and images
(jobs/api/service_jobs.py, processor.py), `veil quote` and `veil bench`, so a new spec field reaches
all of them at once."""

from __future__ import annotations

from jobs.spec import JobSpec
from operators.archives import ArchiveOptions
from operators.video_frames import VideoOptions
from operators.write import WriteOptions


def write_options(spec: JobSpec, job_root: str, **overrides) -> WriteOptions:
    """WriteOptions of the job `spec` writing under `job_root` (OUTPUT/JOB_ID); `overrides` replace
    fields (e.g. job_id, save_metadata, storage_options, ledger)."""
    fields = dict(
        job_id=spec.job_id,
        job_root=job_root,
        anonymize=spec.anonymize_options(),
        quality=spec.quality,
        compress_level=spec.compress_level,
        debug=spec.debug,
        score=spec.score,
        save_mask=spec.save_mask,
        mask_scale=spec.mask_scale,
        save_metadata=spec.save_metadata,
        strip_metadata=spec.strip_metadata,
        storage_options=spec.storage_options,
    )
    return WriteOptions(**{**fields, **overrides})


def archive_options(spec: JobSpec) -> ArchiveOptions:
    return ArchiveOptions(
        depth=spec.archive_depth,
        password=archive_password(spec),
        max_member_bytes=spec.max_member_bytes,
        max_archive_bytes=spec.max_archive_bytes,
        max_compression_ratio=spec.max_compression_ratio,
        storage_options=dict(spec.storage_options),
    )


def archive_password(spec: JobSpec) -> str:
    """--archive-password, else the first line of --archive-password-file (read on the driver)."""
    if spec.archive_password:
        return spec.archive_password
    if spec.archive_password_file:
        with open(spec.archive_password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    return ""


def video_options(spec: JobSpec, job_root: str) -> VideoOptions:
    return VideoOptions(job_root=job_root, anonymize=spec.anonymize_options(), crf=spec.crf,
                        keep_bit_rate=spec.keep_bit_rate, tracking=spec.tracking, detect_every=spec.detect_every,
                        det_max_side=spec.det_max_side, strip_metadata=spec.strip_metadata, debug=spec.debug,
                        storage_options=dict(spec.storage_options))
