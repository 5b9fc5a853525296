"""`veil run`: one job from end to end, on local Ray or the cluster named by RAY_ADDRESS.

Everything that can be refused is refused before Ray starts: the spec, the classes and models,
the pricing file, the inputs (they must exist) and the output (it must not sit inside an input).

The life of a job (status in job.json): new -> [awaiting_approval ->] queued -> processing ->
done | failed | cancelled. Re-running a job id resumes it: items already finished in the
manifest are skipped (failed ones too, unless retry_failed), and its credits count once.
"""

from __future__ import annotations

import _thread
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jobs.lease import JobLease, lease_wait
from jobs.pipeline import (
    RemoteLedger,
    archive_options,
    archive_password,
    build_dataset,
    plan_resources,
    ray_session,
    repack_archives,
)
from jobs.plan_stream import PlanStream
from jobs.pricing import Pricing, load_pricing
from jobs.progress import JobProgress
from jobs.quote import quote_stream
from jobs.report import JobReport, Totals, now_iso, try_load_report
from jobs.shard_seal import Sealed, ShardSealer, load_sealed, manifest_totals
from jobs.spec import JobSpec, SpecError, spec_changes
from jobs.webhook import post_report
from models.fetch import prepared_weights
from operators.archive_tools import RAR_TOOL_HINT, rar_tool_missing
from operators.budget import Billing
from operators.input_lists import is_list_input
from operators.listing import iter_sources
from operators.manifest import read_table
from operators.plan import Plan, PlanTodo, iter_plan, plan_root, plan_todo, shard_items, wave_items, write_plan
from operators.repack import members_by_archive
from operators.resume import ResumeState, drop_duplicates, latest_rows, resume_state
from operators.rows import FailureCause
from operators.sources import check_output_outside_inputs
from operators.storage import is_no_space, join

if TYPE_CHECKING:
    import ray.data


def run_job(
    spec: JobSpec,
    log=print,
    approve: bool = False,
    auto_approve_below: float | None = None,
    retry_failed: bool = False,
    bar: bool | None = False,
    allow_spec_change: bool = False,
) -> dict:
    """Run (or resume) the job; returns the final job report (the content of job.json).

    A job quoted at or over the auto-approve limit (`auto_approve_below`, else the pricing
    table's) is not run without `approve`: it is left `awaiting_approval` with its quote.
    Progress: a bar on stdout with `bar` (None: when stdout is a terminal), else a line through `log`
    every 10 s. One run of a job id at a time (jobs/lease.py: JobBusy otherwise); a resume whose
    options would change what items become is refused unless `allow_spec_change`."""
    check_run_options(spec, auto_approve_below)
    classes, models = spec.resolve_models()
    pricing = load_pricing(spec.pricing)
    check_output_outside_inputs([i for i in spec.inputs if not is_list_input(i)], spec.output, spec.storage_options)
    job_root = join(spec.output, spec.job_id)
    lease = JobLease(job_root, spec.storage_options).acquire(spec.job_id, wait_s=lease_wait())
    try:
        return _run_leased(spec, log, approve, auto_approve_below, retry_failed, allow_spec_change, classes, models,
                           pricing, job_root, lease, bar)
    finally:
        lease.release()


def _run_leased(spec: JobSpec, log, approve: bool, auto_approve_below: float | None, retry_failed: bool,
                allow_spec_change: bool, classes: list[str], models: dict, pricing: Pricing, job_root: str,
                lease: JobLease, bar: bool | None) -> dict:
    earlier = try_load_report(job_root, spec.storage_options)
    if earlier and earlier.get("status") == "deleted":
        raise SpecError(f"job-id: job {spec.job_id} was deleted; choose a new --job-id")
    changed = spec_changes(earlier.get("spec") or {}, spec.public_dict()) if earlier and earlier.get("started_at") \
        else []
    if changed and not allow_spec_change:
        raise SpecError(f"{', '.join(changed)}: differ from the earlier run of job {spec.job_id}, whose finished "
                        f"items are kept: the job would mix two specs. Give the same options, a new --job-id, or "
                        f"--allow-spec-change (finished items keep their results)")
    # listed into plan shards (OUTPUT/JOB_ID/plan/): the driver never holds every row
    limit = auto_approve_below if auto_approve_below is not None else pricing.auto_approve_below
    stream = None
    if earlier is None and (limit is None or approve):  # a first run starts on its first shard (plan_stream.py)
        stream = PlanStream(iter_sources, (spec.inputs, spec.storage_options), job_root, spec.storage_options,
                            shard_items())
        plan = Plan(plan_root(job_root))  # the shards come with the waves
    else:
        plan = write_plan(iter_sources(spec.inputs, spec.storage_options), job_root, spec.storage_options,
                          shard_items())
    if plan.has_rar and rar_tool_missing():  # said up front; each compressed member then fails with the same hint
        log(f"warning: {RAR_TOOL_HINT}")

    report = JobReport(job_root, spec.public_dict(), spec.storage_options, earlier=earlier)
    report.doc.update(classes=classes, models={n: e.source.model_dump(exclude_none=True) for n, e in models.items()})
    if limit is not None and not approve and not report.doc.get("approved_at"):
        quote = quote_stream(iter_plan(plan, spec.storage_options), pricing, classes, archive_options(spec),
                            spec.storage_options)
        report.doc["quote"] = quote
        if quote["credits"] >= limit:
            report.set("awaiting_approval", f"quoted {quote['credits']:g} credits, at or over the auto-approve "
                       f"limit of {limit:g}: run again with --approve, or `veil approve {spec.job_id}`")
            notify(report, spec, log)
            return report.doc
    report.doc["approved_at"] = report.doc.get("approved_at") or now_iso()

    # sealed shards (all their items final) are skipped unread; the rest of the manifest says what is finished
    sealed = load_sealed(plan, spec.storage_options, retry_failed) if earlier else Sealed()
    resume = resume_state(job_root, retry_failed, spec.storage_options, sealed.parts()) if earlier else ResumeState()
    resume.charged += sealed.totals.credits
    whole, plan = plan, plan.without(sealed.keys)
    todo = plan_todo(plan, resume.finished, spec.storage_options)
    weights = {name: prepared_weights(entry) for name, entry in models.items()}
    earlier_items = len(resume.finished) + sealed.totals.items
    note = f" ({earlier_items} finished earlier)" if earlier_items else ""
    files = f"{todo.files} files" if not stream else "files being listed"
    log(f"veil job {spec.job_id}: {files}{note}, classes {', '.join(classes)} -> {job_root}")
    report.set("queued", f"{files} to process{note}")

    report.reserve_room()  # so that a full disk still lets job.json say `failed` and why
    run_totals = Totals()
    started_at = now_iso()
    lost: list[str] = []

    def ray_lost(cause: str) -> None:
        """From RayWatch's thread: written now, since Ray's core may end this process any moment."""
        if report.ended:  # the job ended first (e.g. cancelled): that is its outcome
            return
        lost.append(cause)
        report.set("failed", f"{cause}; resume with the same command", finished_at=now_iso(),
                   failure_cause="RAY_LOST", totals=run_totals.as_dict())
        report.release_room()
        _thread.interrupt_main()  # the main thread stops waiting (a KeyboardInterrupt, handled below)

    executor = RayExecutor(plan, whole, todo, sealed, classes, models, weights, pricing, job_root, report, lease,
                           ray_lost, started_at, note, changed, log, bar, stream)
    try:
        execute(spec, report, pricing, executor, resume, run_totals, started_at, sealed=sealed,
                on_batch=executor.show_progress)
    except BaseException as exc:
        cause, description = job_failure(exc, lost)
        report.doc["totals"] = run_totals.as_dict()
        report.set("cancelled" if cause == "CANCELLED" else "failed", description, finished_at=now_iso(),
                   failure_cause=None if cause == "CANCELLED" else cause)
        report.release_room()
        notify(report, spec, log)
        if cause in ("RAY_LOST", "NO_SPACE"):
            raise JobFailed(description) from exc
        raise
    notify(report, spec, log)
    return report.doc


# An executor runs the items of a job that `resume` has not finished and yields the stats rows
# (operators/write.py's) of each written batch: RayExecutor here, the service's in-process one
# (jobs/api/service_jobs.py). One signature, so both jobs share execute().
Executor = Callable[[JobSpec, ResumeState], Iterator[dict]]


def execute(spec: JobSpec, report: JobReport, pricing: Pricing, executor: Executor, resume: ResumeState,
            run: Totals, started_at: str, sealed: Sealed | None = None,
            on_batch: Callable[[Totals], None] | None = None) -> None:
    """resume -> process -> finish: the items `resume` leaves through `executor`, counted into `run`
    as their stats come back (`on_batch(run)` after each: progress), then the job's totals, credits
    and cost from the manifest (finish). Whatever stops it is raised: the caller says how the job ended."""
    started = time.monotonic()
    for stats in executor(spec, resume):
        run.add(stats)
        if on_batch is not None:
            on_batch(run)
    finish(report, spec, pricing, run, time.monotonic() - started, started_at, sealed)


@dataclass
class RayExecutor:
    """A job's plan on Ray: a Ray session (local, or RAY_ADDRESS's cluster), one Ray Data pipeline per
    wave of shards (wave_batches); complete shards sealed as their stats arrive; --repack zip; then,
    the session ended, one manifest row per item (drop_duplicates)."""

    plan: Plan  # the shards to run (sealed ones left out)
    whole: Plan  # every shard (--repack reads every archive)
    todo: PlanTodo
    sealed: Sealed
    classes: list[str]
    models: dict
    weights: dict
    pricing: Pricing
    job_root: str
    report: JobReport
    lease: JobLease
    on_lost: Callable[[str], None]  # RayWatch's: Ray went away
    started_at: str
    note: str  # " (N finished earlier)"
    changed: list[str]  # options changed since the earlier run (--allow-spec-change)
    log: Callable[[str], None]
    bar: bool | None
    stream: PlanStream | None = None  # a first run's plan, shards arriving while the listing goes on
    progress: JobProgress | None = None
    started: float = field(default_factory=time.monotonic)

    def __call__(self, spec: JobSpec, resume: ResumeState) -> Iterator[dict]:
        plan, todo, report, job_root, stream = self.plan, self.todo, self.report, self.job_root, self.stream
        with ray_session(on_lost=self.on_lost):
            res = plan_resources(spec, sum(len(w) for w in self.weights.values()),  # archives: members unknown
                                 -(-todo.files // spec.batch_size) if not (plan.archives or stream) else None)
            report.doc["resources"] = res.__dict__
            ledger = RemoteLedger(spec.max_credits, resume.charged) if spec.max_credits is not None else None
            billing = Billing(self.pricing, self.classes, ledger)
            report.set("processing", f"0 items done{self.note}", started_at=self.started_at)
            sealer = ShardSealer(plan, job_root, todo.left, spec.storage_options)
            if todo.files or stream:
                # counted in items (archive members included), not files
                self.progress = progress = JobProgress(todo.archives, archive_options(spec), resume.finished,
                                                       bar=self.bar, log=self.log, plain=todo.plain)
                if stream:
                    progress.total = None  # known when the listing ends

                def build(wave: Plan) -> ray.data.Dataset:
                    sealer.add(wave)  # a streamed plan's shards arrive with their wave
                    if stream and stream.plan and not stream.plan.archives:
                        progress.total = stream.plan.items
                    return build_dataset(spec, wave, self.classes, self.models, self.weights, job_root, res,
                                         billing, resume.finished)
                try:
                    waves = stream.waves(wave_items()) if stream else plan.waves(wave_items())
                    for stats in wave_batches(waves, build):
                        if self.lease.lost.is_set():  # taken over as stale: another run owns the job now
                            raise LeaseLost(f"the lease of job {spec.job_id} was taken over by another run")
                        sealer.update(stats)
                        yield stats
                finally:
                    progress.close()
            self.sealed.add(sealer.close(ended=True))
            if stream:
                self.whole = stream.result()
                if self.whole.has_rar and rar_tool_missing():
                    self.log(f"warning: {RAR_TOOL_HINT}")
            if spec.repack == "zip":
                archives = plan_todo(self.whole, storage_options=spec.storage_options).all_archives
                report.doc["repack"] = repack(spec, archives, job_root)
        report.release_room()
        if self.changed:
            report.doc["spec_changes"] = [*report.doc.get("spec_changes", []),
                                          {"at": now_iso(), "options": self.changed}]
        # One row per item, whatever happened: a write task retried after its worker died rewrites its
        # parts under the same names, and writers of a killed earlier run may have finished items again.
        drop_duplicates(job_root, spec.storage_options, self.sealed.parts())

    def show_progress(self, run: Totals) -> None:
        if self.progress is not None:
            self.progress.update(run)
            self.report.progress(run, self.progress.total, self.started, self.note)


def wave_batches(waves: Iterable[Plan], build: Callable[[Plan], ray.data.Dataset]) -> Iterator[dict]:
    """The stats rows as written, one Dataset per wave of shards (Plan.waves: Ray Data's state in
    the driver is freed when each Dataset ends, instead of growing with the whole job)."""
    for wave in waves:
        yield from build(wave).iter_batches(batch_size=None, batch_format="numpy")


class LeaseLost(RuntimeError):
    pass


class JobFailed(RuntimeError):
    """The job ended `failed` for a cause job.json names (the CLI prints it, exit 1)."""


def job_failure(exc: BaseException, lost: list[str]) -> tuple[str, str]:
    """(cause, description) of a job that stopped on `exc`; `lost`: what RayWatch saw."""
    if lost:
        return "RAY_LOST", f"{lost[0]}; resume with the same command"
    if is_no_space(exc):
        return "NO_SPACE", ("the output storage is full (No space left on device): make room, then resume with the "
                            "same command (finished items are kept)")
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, or SIGTERM (Ray's handler: SystemExit)
        return "CANCELLED", "stopped by the user"
    return "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"[:2000]


def check_run_options(spec: JobSpec, auto_approve_below: float | None) -> None:
    """What the spec alone cannot check, refused before anything starts (SpecError names the option)."""
    if auto_approve_below is not None and not auto_approve_below >= 0:  # `not >=`: NaN too
        raise SpecError(f"auto-approve-below: must be a number of credits >= 0 (got {auto_approve_below:g})")
    try:
        archive_password(spec)  # read again on the driver when the job starts; here it must exist
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SpecError(f"archive-password-file: cannot read {spec.archive_password_file}: {reason}") from None


def finish(report: JobReport, spec: JobSpec, pricing: Pricing, run: Totals, wall: float, started_at: str,
           sealed: Sealed | None = None) -> None:
    """Totals, credits and cost from the manifest (so a resumed job counts each item once); with
    `sealed`, its shards' totals come from their markers and only the rest of the manifest is read."""
    if sealed is not None:
        totals = manifest_totals(report.doc["outputs"]["root"], spec.storage_options, sealed)
    else:
        images = read_table(report.doc["outputs"]["root"], "images", spec.storage_options, columns=Totals.COLUMNS)
        totals = Totals.from_manifest(latest_rows(images))
    credits = pricing.job_credits(totals.credits)
    if spec.max_credits is not None:
        credits = min(credits, spec.max_credits)  # the minimum per job never breaks the cap
    report.doc.update(
        totals=totals.as_dict(),
        credits={"total": credits, "items": round(totals.credits, 6), "minimum_per_job": pricing.minimum_per_job,
                 "max_credits": spec.max_credits},
        cost=pricing.compute_cost(totals.cpu_s, totals.gpu_s, totals.by_status.get("done", 0)),
        wall_s=round(wall, 3),
        throughput_img_s=round(run.items / wall, 3) if wall > 0 else 0.0,
    )
    report.doc["runs"].append({"started_at": started_at, "finished_at": now_iso(), "items": run.items,
                               "wall_s": round(wall, 3)})
    over = totals.by_cause.get(FailureCause.BUDGET_EXCEEDED, 0)
    description = (f"{over} items not processed: the --max-credits cap of {spec.max_credits:g} was reached "
                   f"(resume with a higher cap to process them)") if over else ""
    report.set("done", description, finished_at=now_iso())


def repack(spec: JobSpec, archive_rows: list[dict], job_root: str) -> list[dict]:
    """--repack zip: the done members of each input archive (this run's and earlier ones')."""
    archives = {s["source_url"]: s["rel_path"] for s in archive_rows if s["kind"] == "archive"}
    rows = latest_rows(read_table(job_root, "images", spec.storage_options))
    rows = rows.select(["source_url", "member", "rel_path", "status", "output_url"]).to_pylist()
    return repack_archives(members_by_archive(rows, archives), job_root, spec.storage_options)


def notify(report: JobReport, spec: JobSpec, log=print) -> None:
    """POST the report to the job's webhook (if any) and record the outcome in job.json."""
    if not spec.webhook:
        return
    outcome = post_report(spec.webhook, report.doc, spec.web_auth_header_name, spec.web_auth_header_value)
    hook = report.doc["webhook"]
    hook["status"] = outcome["status"]
    hook["events"] = [*hook.get("events", []), outcome][-20:]
    report.save()
    log(f"webhook {outcome['event']}: {outcome['status']} after {outcome['attempts']} attempt(s)"
        + (f" ({outcome['error']})" if outcome["error"] else ""))
