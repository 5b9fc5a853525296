"""`veil run`: one job from end to end, on local Ray or the cluster named by RAY_ADDRESS.

Everything that can be refused is refused before Ray starts: the spec, the classes and models,
the inputs (they must exist) and the output (it must not sit inside an input).
"""

from __future__ import annotations

import time

from jobs.pipeline import build_dataset, plan_resources, ray_session
from jobs.report import JobReport, Totals, now_iso
from jobs.spec import JobSpec
from models.fetch import prepared_weights
from operators.sources import check_output_outside_inputs, list_sources
from operators.storage import join


def run_job(spec: JobSpec, log=print) -> dict:
    """Run the job; returns the final job report (the content of job.json)."""
    classes, models = spec.resolve_models()
    check_output_outside_inputs(spec.inputs, spec.output, spec.storage_options)
    sources = list_sources(spec.inputs, spec.storage_options)
    weights = {name: prepared_weights(entry) for name, entry in models.items()}

    job_root = join(spec.output, spec.job_id)
    report = JobReport(job_root, spec.model_dump(mode="json"), spec.storage_options)
    report.doc.update(classes=classes, models={n: e.source.model_dump(exclude_none=True) for n, e in models.items()})
    log(f"veil job {spec.job_id}: {len(sources)} files, classes {', '.join(classes)} -> {job_root}")
    report.set("processing", f"0 of {len(sources)} items", started_at=now_iso())

    totals = Totals()
    started = time.monotonic()
    try:
        with ray_session():
            res = plan_resources(spec)
            report.doc["resources"] = res.__dict__
            if sources:
                ds = build_dataset(spec, sources, classes, models, weights, job_root, res)
                for stats in ds.iter_batches(batch_size=256, batch_format="numpy"):
                    totals.add(stats)
                    report.progress(totals, len(sources), started)
    except BaseException as exc:
        report.doc["totals"] = totals.as_dict()
        report.set("failed", f"{type(exc).__name__}: {exc}"[:2000], finished_at=now_iso())
        raise
    wall = time.monotonic() - started
    report.doc.update(
        totals=totals.as_dict(),
        wall_s=round(wall, 3),
        throughput_img_s=round(totals.items / wall, 3) if wall > 0 else 0.0,
    )
    report.set("done", "", finished_at=now_iso())
    return report.doc
