"""CLI commands around a job's life: quote, approve, status, report, list, delete.

They read and write only the job's folder (job.json, manifest), so they work from any machine
that can reach the output, while the job runs elsewhere.
"""

from __future__ import annotations

import argparse
import json
import time

from jobs.cli.run import _opt, _storage_option, cancel_on_sigterm, print_outcome, spec_fields
from jobs.job_store import delete_job, list_jobs, load_job, report_table, status_line, syntonym_report

TERMINAL = ("done", "failed", "cancelled", "deleted", "awaiting_approval")


def _storage(args: argparse.Namespace) -> dict:
    return dict(args.storage_option or [])


def _add_output(p: argparse.ArgumentParser, required: bool = True) -> None:
    _opt(p, "--output", required=required, help="the output folder/URL the job writes under (OUTPUT/JOB_ID/)")
    _opt(p, "--storage-option", type=_storage_option, action="append", dest="storage_option",
         metavar="KEY=VALUE", help="fsspec option for a remote output, e.g. endpoint_url=http://127.0.0.1:9000")


def cmd_quote(args: argparse.Namespace) -> int:
    from jobs.pricing import load_pricing
    from jobs.quote import quote_stream, quote_text
    from jobs.report import JobReport
    from jobs.run import notify
    from jobs.spec import build_spec
    from jobs.stage_options import archive_options
    from operators.listing import iter_sources
    from operators.sources import check_output_outside_inputs
    from operators.storage import join

    spec = build_spec(spec_fields(args, args.inputs, args.output or "."))
    classes, _ = spec.resolve_models()
    pricing = load_pricing(spec.pricing)
    if args.output:
        check_output_outside_inputs(spec.inputs, spec.output, spec.storage_options)
    sources = iter_sources(spec.inputs, spec.storage_options)  # streamed, priced a chunk at a time
    quote = quote_stream(sources, pricing, classes, archive_options(spec), spec.storage_options)
    print(quote_text(quote))
    if args.json:
        print(json.dumps(quote, indent=2))
    if args.output:  # the job exists from now on, waiting for `veil approve`
        report = JobReport(join(spec.output, spec.job_id), spec.public_dict(), spec.storage_options)
        report.doc.update(quote=quote, classes=classes)
        report.set("awaiting_approval", f"quoted {quote['credits']:g} credits: `veil approve {spec.job_id} "
                   f"--output {spec.output}` starts it")
        notify(report, spec)
        print(f"job {spec.job_id} created in {spec.output}: awaiting approval")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from jobs.run import run_job
    from jobs.spec import SpecError, build_spec

    doc = load_job(args.output, args.job_id, _storage(args))
    if doc["status"] != "awaiting_approval":
        print(f"job {args.job_id} is {doc['status']}: nothing to approve")
        return 0 if doc["status"] in ("queued", "processing", "done") else 2
    fields = dict(doc["spec"])
    masked = [k for k, v in fields.get("storage_options", {}).items() if v == "***"]
    given = _storage(args)
    missing = [k for k in masked if k not in given]
    if missing:
        raise SpecError(f"storage-option: job.json does not keep secrets; give --storage-option "
                        f"{', '.join(k + '=...' for k in missing)} again")
    fields["storage_options"] = {**fields.get("storage_options", {}), **given}
    for key in ("archive_password", "web_auth_header_value"):
        if getattr(args, key, None):
            fields[key] = getattr(args, key)
    with cancel_on_sigterm():
        return print_outcome(run_job(build_spec(fields), approve=True, retry_failed=args.retry_failed))


def cmd_status(args: argparse.Namespace) -> int:
    while True:
        doc = load_job(args.output, args.job_id, _storage(args))
        line = status_line(doc)
        if args.address:
            line += " | " + _ray_status(args.address, args.job_id)
        gone = None
        if doc["status"] in ("queued", "processing"):  # a driver killed before it could say so
            from jobs.lease import no_live_run
            from operators.storage import join

            gone = no_live_run(join(args.output, args.job_id), _storage(args))
            line += f" | no live run: {gone}; the same `veil run` command resumes it" if gone else ""
        print(line, flush=True)
        if not args.follow or doc["status"] in TERMINAL or gone:
            return 0
        time.sleep(args.interval)


def _ray_status(address: str, job_id: str) -> str:
    """The Ray Jobs view of a submitted job, or why it cannot be had (never a traceback)."""
    from jobs.submit import RayJobNotFound, ray_job_info

    try:
        info = ray_job_info(address, job_id)
    except RayJobNotFound:
        return f"ray: no submitted job veil-{job_id} at {address}"
    except Exception as exc:  # unreachable head, token auth refused: say so, keep job.json's view
        return f"ray: cannot ask {address}: {type(exc).__name__}: {exc}"
    return f"ray job {info.get('submission_id')}: {info.get('status')}" + (
        f" ({info['message']})" if info.get("message") else "")


def cmd_report(args: argparse.Namespace) -> int:
    doc = load_job(args.output, args.job_id, _storage(args))
    if args.html:
        from jobs.analytics import write_html_report

        write_html_report(doc["outputs"]["root"], args.html, storage_options=_storage(args))
        print(f"written: {args.html}")
    if args.format == "json":
        print(json.dumps(doc, indent=2, default=str))
    elif args.format == "syntonym":
        print(json.dumps(syntonym_report(doc, _storage(args)), indent=2, default=str))
    else:
        print(report_table(doc))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print(json.dumps(list_jobs(args.output, args.page, args.limit, _storage(args)), indent=2))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    doc = delete_job(args.output, args.job_id, args.keep_manifest, _storage(args))
    print(f"job {args.job_id}: {doc['status']} ({doc['description']})")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_lifecycle_commands(sub, add_job_options) -> None:
    q = sub.add_parser("quote", help="price a job from image headers, before anything runs")
    q.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, globs or fsspec URLs")
    add_job_options(q)
    _opt(q, "--output", help="also create the job in OUTPUT/JOB_ID/, awaiting approval")
    _opt(q, "--json", action="store_true", help="print the quote as JSON too")
    q.set_defaults(func=cmd_quote)

    a = sub.add_parser("approve", help="start a job that awaits approval")
    a.add_argument("job_id")
    _add_output(a)
    _opt(a, "--archive-password", help="password for encrypted archive members (not kept in job.json)")
    _opt(a, "--web-auth-header-value", help="the webhook header value (not kept in job.json)")
    _opt(a, "--retry-failed", action="store_true", help="also process failed items of an earlier run again")
    a.set_defaults(func=cmd_approve)

    st = sub.add_parser("status", help="status and progress of a job, from its job.json")
    st.add_argument("job_id")
    _add_output(st)
    _opt(st, "--address", help="Ray dashboard address of a submitted job, e.g. http://head:8265")
    _opt(st, "--follow", action="store_true", help="print again every --interval seconds until the job ends")
    _opt(st, "--interval", type=float, default=5.0, help="seconds between --follow prints (default 5)")
    st.set_defaults(func=cmd_status)

    r = sub.add_parser("report", help="the job report: table, json or Syntonym's JobReport shape")
    r.add_argument("job_id")
    _add_output(r)
    _opt(r, "--format", choices=["table", "json", "syntonym"], default="table", help="(default table)")
    _opt(r, "--html", help="also write the charts of the analytics notebook to this self-contained HTML file")
    r.set_defaults(func=cmd_report)

    ls = sub.add_parser("list", help="the jobs under OUTPUT, newest first (Celantur v1 list shape)")
    _add_output(ls)
    _opt(ls, "--page", type=_positive, default=1, help="page number, from 1 (default 1)")
    _opt(ls, "--limit", type=_positive, default=20, help="jobs per page (default 20)")
    ls.set_defaults(func=cmd_list)

    d = sub.add_parser("delete", help="remove a job's images, masks, metadata and manifest; status `deleted`")
    d.add_argument("job_id")
    _add_output(d)
    _opt(d, "--keep-manifest", action="store_true", help="keep the Parquet manifest for analytics")
    d.set_defaults(func=cmd_delete)
