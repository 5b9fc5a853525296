"""The jobs kept under an output root: find, list, report and delete them.

Everything is read from the storage (`OUTPUT/JOB_ID/job.json` and the manifest), so any machine
that can read the output can answer; there is no database.
"""

from __future__ import annotations

import json
import math

from jobs.report import load_report, now_iso, try_load_report
from operators.manifest import read_table
from operators.resume import latest_rows
from operators.storage import filesystem, join, write_atomic

JOB_OUTPUTS = ("images", "masks", "metadata")


class JobNotFound(LookupError):
    """No job.json for that job id under that output."""


class JobBusy(RuntimeError):
    """The job is running; the request needs it stopped."""


def job_root_of(output: str, job_id: str) -> str:
    if not job_id or "/" in job_id or "\\" in job_id or job_id.strip(".") == "":
        raise JobNotFound(f"{job_id!r} is not a job id")
    return join(output, job_id)


def load_job(output: str, job_id: str, storage_options: dict | None = None) -> dict:
    """The job's job.json; FileNotFoundError naming the job when there is none."""
    doc = try_load_report(job_root_of(output, job_id), storage_options)
    if doc is None:
        raise JobNotFound(f"no job {job_id!r} under {output} (no {job_id}/job.json)")
    return doc


def list_jobs(output: str, page: int = 1, limit: int = 20, storage_options: dict | None = None) -> dict:
    """Celantur v1's list shape: {total_item_count, total_page_count, items}, newest job first."""
    if page < 1 or limit < 1:
        raise ValueError("page and limit must be >= 1")
    fs, root = filesystem(output, storage_options)
    found = fs.glob(root.rstrip("/") + "/*/job.json") if fs.exists(root) else []
    docs = []
    for path in found:
        try:
            docs.append(json.loads(fs.cat_file(path)))
        except (OSError, ValueError):
            continue  # a job.json being replaced right now, or not ours
    docs.sort(key=lambda d: (d.get("created_at") or "", d.get("job_id") or ""), reverse=True)
    items = [_list_item(d) for d in docs[(page - 1) * limit: page * limit]]
    return {"total_item_count": len(docs), "total_page_count": math.ceil(len(docs) / limit), "items": items}


def _list_item(doc: dict) -> dict:
    t = doc.get("totals") or {}
    return {
        "id": doc.get("job_id"),
        "job_id": doc.get("job_id"),
        "status": doc.get("status"),
        "task_status": doc.get("status"),
        "description": doc.get("description", ""),
        "created": doc.get("created_at"),
        "updated": doc.get("finished_at") or doc.get("started_at") or doc.get("created_at"),
        "items": t.get("items", 0),
        "done": t.get("done", 0),
        "failed": t.get("failed", 0),
        "credits": (doc.get("credits") or {}).get("total", 0.0),
    }


def syntonym_report(doc: dict, storage_options: dict | None = None) -> dict:
    """Syntonym's JobReport: the job, its credit cost and one task per item with its output."""
    images = latest_rows(read_table(doc["outputs"]["root"], "images", storage_options))
    rows = images.select(["item_id", "rel_path", "source_url", "member", "status", "failure_cause", "error",
                          "output_url", "credits"]).to_pylist()
    return {
        "job_id": doc["job_id"],
        "job_status": doc["status"],
        "job_status_description": doc.get("description", ""),
        "job_total_credit_cost": (doc.get("credits") or {}).get("total", 0.0),
        "tasks": [
            {
                "task_id": r["item_id"],
                "file_name": r["rel_path"],
                "source": r["source_url"] + (f"#{r['member']}" if r["member"] else ""),
                "task_status": r["status"],
                "failure_cause": r["failure_cause"],
                "error": r["error"],
                "output_location": r["output_url"],
                "credit_cost": r["credits"] if r["status"] == "done" else 0.0,
            }
            for r in rows
        ],
    }


def delete_job(output: str, job_id: str, keep_manifest: bool = False, storage_options: dict | None = None) -> dict:
    """Remove the job's images, masks and metadata (and manifest unless kept); status `deleted`."""
    root = job_root_of(output, job_id)
    doc = load_job(output, job_id, storage_options)
    if doc.get("status") in ("queued", "processing"):
        raise JobBusy(f"job {job_id} is {doc['status']}; cancel it before deleting it")
    fs, _ = filesystem(root, storage_options)
    removed = []
    for name in JOB_OUTPUTS + (() if keep_manifest else ("manifest",)):
        _, path = filesystem(join(root, name), storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
            removed.append(name)
    doc.update(status="deleted", description=f"removed {', '.join(removed) or 'nothing'}"
               + (" (manifest kept)" if keep_manifest else ""), deleted_at=now_iso())
    write_atomic(join(root, "job.json"), json.dumps(doc, indent=2, default=str).encode(), storage_options)
    return doc


def report_table(doc: dict) -> str:
    from jobs.report import summary_text

    lines = [summary_text(doc)]
    if doc.get("quote"):
        q = doc["quote"]
        lines.append(f"  quote      {q['credits']:g} credits for {q['images']} images, {q['megapixels']:.1f} MP")
    hook = doc.get("webhook") or {}
    if hook.get("status"):
        lines.append(f"  webhook    {hook['status']} ({len(hook.get('events', []))} posts)")
    return "\n".join(lines)


def status_line(doc: dict) -> str:
    t = doc.get("totals") or {}
    return (f"{doc['job_id']}: {doc['status']}" + (f" - {doc['description']}" if doc.get("description") else "")
            + f" [{t.get('done', 0)} done, {t.get('failed', 0)} failed, {t.get('skipped', 0)} skipped]")


__all__ = ["delete_job", "list_jobs", "load_job", "load_report", "report_table", "status_line", "syntonym_report"]
