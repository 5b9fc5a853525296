"""The Ray Data pipeline: the only place where the operators meet Ray.

    listed sources -> prepare (CPU tasks) -> Detector (actor pool, GPUs where present)
                   -> write (CPU tasks) -> small stats rows streamed back to the driver

Weights are resolved once on the driver and put in the object store; each detection actor gets
the bytes from there, so workers need neither a shared disk nor network access.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import ray

from jobs.spec import JobSpec, SpecError
from jobs.stage_options import archive_options, archive_password, video_options, write_options  # noqa: F401 (run.py imports it here)
from models.catalog import ModelEntry
from models.runtime import backend_for
from operators.archives import expand_rows
from operators.budget import Billing, CreditLedger
from operators.detect import Detector
from operators.plan import Plan, expand_shard, slices
from operators.prepare import prepare_batch
from operators.repack import repack_archive
from operators.resume import drop_finished
from operators.shard_resume import write_by_shard
from operators.video import process_videos
from operators.video_frames import VideoOptions
from operators.video_segments import SegmentJoiner, split_rows
from operators.write import WriteOptions, write_batch

PREPARE_BATCH = 4  # items per read+prepare task batch: small, since each holds a detection copy
WRITE_BATCH = 8  # items per write task (and manifest part): small jobs show results sooner
# From about this many items on, 32 per write task: 4x fewer manifest parts and less per-task state
# in the driver (10,000 items: 93 s instead of 106, driver RSS +27 MiB instead of +48).
LARGE_JOB_ITEMS, LARGE_JOB_WRITE_BATCH = 1000, 32
ARCHIVE_BYTES_PER_ITEM = 256 * 1024  # for the estimate: archives are not listed before the job
EXPAND_ROWS_PER_BLOCK = 16
TASK_CPUS = 1  # one expand / prepare / write task (they stream: no need for more)


def expected_items(sources: list[dict] | Plan) -> int:
    """Items a job will have, roughly: each plain file, and an archive's size over 256 KiB."""
    if isinstance(sources, Plan):
        return sum(s.items - s.archives + max(s.archives, s.archive_bytes // ARCHIVE_BYTES_PER_ITEM)
                   for s in sources.shards)
    return sum(1 if s.get("kind") != "archive" else max(1, int(s.get("size") or 0) // ARCHIVE_BYTES_PER_ITEM)
               for s in sources)


def _quiet_ray_data() -> None:
    """Ray Data logs every operator's progress at INFO every few seconds when stderr is not a
    terminal; the job prints its own progress line (items, img/s) instead. Warnings still show."""
    import ray.data  # noqa: F401  (it sets up its loggers when first imported: set the level after)

    logging.getLogger("ray.data").setLevel(logging.WARNING)


@contextmanager
def ray_session(on_lost: Callable[[str], None] | None = None) -> Iterator[None]:
    """Join the cluster named by RAY_ADDRESS (or an already-initialised Ray); otherwise start a
    local Ray sized to this machine, watched (`on_lost`, see RayWatch), and shut it down afterwards."""
    _quiet_ray_data()
    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()
        return
    # address="local": a cluster left by `ray start` on this machine is not joined by accident
    ray.init(**local_ray_options())
    watch = RayWatch(on_lost) if on_lost else None
    try:
        yield
    finally:
        if watch:
            watch.stop.set()
        ray.shutdown()


class RayWatch(threading.Thread):
    """Watches the local Ray a job started (its gcs_server and raylet, children of this process).
    When one dies, Ray's core ends the driver process within 15-60 s, from C++, so no Python
    handler would record why: `on_lost(cause)` is called at once (within a second) instead."""

    def __init__(self, on_lost: Callable[[str], None], every: float = 1.0):
        super().__init__(name="veil-ray-watch", daemon=True)
        self.on_lost, self.every, self.stop = on_lost, every, threading.Event()
        self.procs = [(p, name) for p in psutil.Process().children(recursive=True) if (name := _ray_daemon(p))]
        self.start()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            for p, name in self.procs:
                try:
                    alive = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    alive = False
                if not alive and not self.stop.is_set():
                    self.on_lost(f"the local Ray stopped under the job: its {name} (pid {p.pid}) died")
                    return


def _ray_daemon(p: psutil.Process) -> str:
    try:
        name = p.name()
    except psutil.Error:
        name = ""
    return next((d for d in ("gcs_server", "raylet") if name.startswith(d)), "")


OBJECT_STORE_PER_CPU = 512 * 2**20


def local_ray_options(cpus: int | None = None) -> dict:
    """ray.init arguments of the local Ray a job starts on one machine.

    The object store is capped at 512 MiB per CPU (at least 1 GiB) instead of Ray's 30 % of RAM:
    the pipeline streams small blocks, and every page of the store a worker has read stays in
    that worker's RSS (shared, but counted), so a 7 GiB store let the detection actor's RSS grow
    with the job. Beyond the cap Ray Data waits (backpressure) or spills to disk; nothing fails."""
    cpus = cpus or os.cpu_count() or 1
    default = int(0.3 * psutil.virtual_memory().total)
    store = min(default, max(2**30, OBJECT_STORE_PER_CPU * cpus))
    return {"address": "local", "num_cpus": cpus, "object_store_memory": store, "include_dashboard": False,
            "logging_level": logging.WARNING}


@dataclass
class Resources:
    cpus: int
    gpus: int
    detect_actors: int
    threads_per_actor: int
    device: str
    cpus_per_actor: float = 1.0  # what each detection actor reserves from Ray's scheduler
    backend: str = "cpu"  # the inference backend of the actors (models.runtime.BACKENDS)
    memory_per_actor: int = 2**30  # bytes each detection actor asks Ray for


TASK_CPU_SHARE = 0.25  # of the CPUs left to the expand / prepare / write tasks on CPU jobs
MIN_TASK_CPUS = 3  # one of each: Ray Data stalls a stage that can never get a CPU


def actor_memory(backend: str, weights_bytes: int) -> int:
    """Bytes a detection actor asks Ray for. Measured without ORT's CPU arena: ~0.5 GiB for the
    face models, ~1 GiB for the five defaults; OpenVINO keeps kernels and buffers per input
    shape: up to 1.3 GiB for the face models on WIDER. Ray asks for 1.25x what is used."""
    base = 2**30 if backend.startswith("openvino") else 512 * 2**20
    return base + 10 * weights_bytes


def plan_resources(spec: JobSpec, weights_bytes: int = 0, batches: int | None = None) -> Resources:
    """Actor count and threads from the cluster's resources (overridable by the spec).

    On CPU: one single-threaded detection actor per CPU, as many as memory holds. Threads of
    one session wait for each other at every layer, and one preempted by a decode task stalls
    them all: on WIDER faces (CenterFace, 2 CPUs) 2 actors x 1 thread ran 14.1 img/s against
    10.5 for 1 x 2 threads. A quarter of the CPUs (at least 3) stays unreserved for the tasks;
    the actors reserve the rest between them, so Ray spreads them over the nodes (on a node of
    3 CPUs or fewer they reserve nothing and share the cores). `--detect-actors N` picks the
    count. `batches`: detection batches the job will have, when known (plain images, no
    archives): no more actors than that. Fewer actors than CPUs (memory, batches or the user
    chose) run CPUs/actors threads each. On GPU, one actor per GPU (`--detect-actors` when GPU
    nodes autoscale from zero and none are up yet)."""
    total = ray.cluster_resources()
    cpus, gpus = int(total.get("CPU", 1)), int(total.get("GPU", 0))
    device = spec.device if spec.device != "auto" else ("cuda" if gpus else "cpu")
    # Without a GPU the detection actors would wait for one forever; only a remote cluster whose
    # GPU nodes autoscale from zero (then --detect-actors says how many) may get one later.
    if device == "cuda" and not gpus and not (os.environ.get("RAY_ADDRESS") and spec.detect_actors):
        raise SpecError("device: cuda, but this Ray cluster has no GPU; use --device cpu or auto (on a cluster "
                        "whose GPU nodes autoscale from zero, give --detect-actors too)")
    backend = backend_for(device, spec.cpu_backend)
    memory = actor_memory(backend, weights_bytes)
    if device == "cuda":
        return Resources(cpus, gpus, spec.detect_actors or max(gpus, 1), 1, device, 0, backend, memory)
    node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=cpus)
    actors, threads, per_actor = cpu_actors(cpus, node_cpus, total.get("memory", 0), memory, spec.detect_actors,
                                            batches)
    return Resources(cpus, gpus, actors, threads, device, per_actor, backend, memory)


def cpu_actors(cpus: int, node_cpus: int, memory_total: float, memory_each: int,
               detect_actors: int | None = None, batches: int | None = None) -> tuple[int, int, float]:
    """(actors, threads each, CPUs each reserves) for a CPU job: plan_resources' rule."""
    fit = int(0.8 * memory_total // memory_each) if memory_total else cpus
    actors = detect_actors or max(1, min(cpus, fit, batches or cpus))
    threads = max(1, min(node_cpus, cpus // actors))  # 1 unless memory, batches or the user cap the actors
    task_cpus = max(MIN_TASK_CPUS, round(cpus * TASK_CPU_SHARE))
    # Rounded down (so the reservations never add up past the free CPUs) to what Ray accepts:
    # a fraction below 1 (in steps of 0.05) or a whole number.
    share = min(float(threads), max(0, cpus - task_cpus) / actors)
    per_actor = float(int(share)) if share >= 1 else int(20 * share) / 20
    return actors, threads, per_actor


class RemoteLedger:
    """The job's CreditLedger in one Ray actor: every prepare and write task reserves and gives
    back credits through it, one call at a time, so the cap holds across the whole cluster."""

    def __init__(self, cap: float | None, charged: float):
        self.actor = ray.remote(num_cpus=0)(CreditLedger).remote(cap, charged)

    def reserve(self, requests: list[tuple[str, float]]) -> list[bool]:
        return ray.get(self.actor.reserve.remote(requests))

    def release(self, requests: list[tuple[str, float]]) -> None:
        ray.get(self.actor.release.remote(requests))

    def state(self) -> dict:
        return ray.get(self.actor.state.remote())


class RemoteJoiner:
    """The job's SegmentJoiner in one Ray actor: the write tasks of a long video's segments meet there."""

    def __init__(self):
        self.actor = ray.remote(num_cpus=0)(SegmentJoiner).remote()

    def add(self, item_id: str, k: int, n: int, doc: str) -> list[str] | None:
        return ray.get(self.actor.add.remote(item_id, k, n, doc))


_FINISHED: dict[str, set] = {}  # per worker process: the resume set, fetched once


def _drop_finished(batch: dict, finished_ref) -> dict:
    """Resume: drop archive members finished by an earlier run (the set sits in the object store)."""
    if not isinstance(finished_ref, ray.ObjectRef):
        return drop_finished(batch, finished_ref)
    key = finished_ref.hex()
    if key not in _FINISHED:
        _FINISHED.clear()
        _FINISHED[key] = ray.get(finished_ref)
    return drop_finished(batch, _FINISHED[key])


class _RayDetector(Detector):
    """Detector whose weights arrive as object references (resolved once, when the actor starts)."""

    def __init__(self, model_refs: list, video: VideoOptions | None = None, **kwargs):
        super().__init__([(entry, ray.get(ref)) for entry, ref in model_refs], **kwargs)
        self.video = video

    def __call__(self, batch: dict) -> dict:
        # videos run whole here, frame by frame (operators/video.py); their rows then pass through
        return super().__call__(process_videos(self, batch, self.video) if self.video else batch)


def build_dataset(
    spec: JobSpec,
    sources: list[dict] | Plan,
    classes: list[str],
    models: dict[str, ModelEntry],
    weights: dict[str, bytes],
    job_root: str,
    res: Resources,
    billing: Billing | None = None,
    finished: set[str] | None = None,
) -> ray.data.Dataset:
    """`billing` prices items (and reserves credits when it holds a ledger); `finished`: item ids
    an earlier run of this job finished (resume), dropped after archive expansion. A Plan: the
    dataset holds one row per shard file, read on the workers (the driver never holds the items)."""
    model_refs = [(models[name].model_dump(), ray.put(weights[name])) for name in models]
    if isinstance(sources, Plan):
        shards = slices(sources)  # a few hundred plan rows per task: none holds a CPU for a whole shard
        ds = ray.data.from_items(shards, override_num_blocks=max(1, min(len(shards), 2000)))
        ds = ds.flat_map(expand_shard, num_cpus=TASK_CPUS, fn_kwargs={"options": archive_options(spec)})
    else:
        blocks = max(1, min(len(sources), res.cpus * 8, 2000))
        ds = ray.data.from_items(sources, override_num_blocks=blocks)
        # --- archive expand stage (issue 4): archives become one row per member, listed on workers ---
        ds = ds.flat_map(expand_rows, num_cpus=TASK_CPUS, fn_kwargs={"options": archive_options(spec)})
    # One archive expands into many rows inside one task; re-cut into small blocks (streaming,
    # no barrier) so that its members spread over all prepare tasks instead of one.
    ds = ds.repartition(target_num_rows_per_block=EXPAND_ROWS_PER_BLOCK)
    if finished:
        ds = ds.map_batches(_drop_finished, batch_format="numpy", num_cpus=TASK_CPUS,
                            fn_kwargs={"finished_ref": ray.put(finished)})
    ds = ds.map_batches(
        prepare_batch,
        num_cpus=TASK_CPUS,
        batch_size=PREPARE_BATCH,
        batch_format="numpy",
        fn_kwargs={
            "storage_options": spec.storage_options,
            "det_max_side": spec.det_max_side,
            "max_pixels": spec.max_pixels,
            "billing": billing,
        },
    )
    if spec.video_segment_seconds:  # long videos: one row per segment (operators/video_segments.py)
        ds = ds.map_batches(split_rows, batch_format="numpy", num_cpus=TASK_CPUS,
                            fn_kwargs={"seconds": spec.video_segment_seconds, "storage_options": spec.storage_options})
    # A video (or segment) is a whole actor's work: batches of one spread them over the actors
    # (CPU actors detect one image at a time anyway; listed videos only, not archive members).
    listed = sources.videos if isinstance(sources, Plan) else any(s.get("kind") == "video" for s in sources)
    videos = res.device != "cuda" and bool(listed)
    ds = ds.map_batches(
        _RayDetector,
        batch_size=1 if videos else spec.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=res.detect_actors),
        num_cpus=0 if res.device == "cuda" else res.cpus_per_actor,
        num_gpus=1 if res.device == "cuda" else 0,
        # The memory request reserves room for the sessions; being a different resource shape
        # from the prepare tasks, it also keeps Ray from fusing decoding into these actors.
        memory=res.memory_per_actor,
        fn_constructor_kwargs={
            "model_refs": model_refs,
            "classes": classes,
            "profile": spec.detection_profile().model_dump(),
            "backend": res.backend,
            "threads": res.threads_per_actor,
            "tiling": spec.detect_tiling(),
            "video": video_options(spec, job_root),
        },
    )
    options: WriteOptions = write_options(spec, job_root, ledger=billing.ledger if billing else None,
                                          segments=RemoteJoiner() if spec.video_segment_seconds else None)
    per_write = LARGE_JOB_WRITE_BATCH if expected_items(sources) >= LARGE_JOB_ITEMS else WRITE_BATCH
    writer = write_by_shard if isinstance(sources, Plan) else write_batch  # parts named after their shard
    return ds.map_batches(writer, batch_size=per_write, batch_format="numpy", num_cpus=TASK_CPUS,
                          fn_kwargs={"options": options})


def repack_archives(groups: dict[str, list[tuple[str, str]]], job_root: str, storage_options: dict) -> list[dict]:
    """One Ray task per input archive (they stream, so a task needs little memory)."""
    task = ray.remote(num_cpus=1)(repack_archive)
    return ray.get([task.remote(rel, members, job_root, storage_options) for rel, members in groups.items()])
