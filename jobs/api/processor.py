"""Images (and the Celantur container's videos) in-process: the pipeline's own operators (prepare ->
detect -> write) without Ray.

A job runs these stages as Ray Data map_batches over many items; a synchronous API call has one
image and must answer in a second or so, so it runs the same functions here on a one-row batch
(the approach of `jobs/bench.py`'s bare loop). Model sessions are loaded once per server process
and shared by every request and worker thread (ONNX Runtime sessions are safe to run
concurrently); the per-request settings (classes, thresholds, tiling) make a fresh, cheap
`Detector` around them. A job made through the API (Syntonym) runs the pipeline's three batch
functions themselves on small batches (`run_batch`), so its manifest and job.json are a job's.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass

import numpy as np

from jobs.api.pool import BACKGROUND, PriorityPool
from jobs.pipeline import PREPARE_BATCH
from jobs.spec import JobSpec
from jobs.stage_options import video_options, write_options
from models.adapters import adapter_class
from models.catalog import ModelEntry
from models.detections import CLASSES, ROW_COLUMNS, Detections
from models.fetch import prepared_weights
from models.runtime import backend_for
from operators.budget import Billing
from operators.detect import Detector
from operators.items import kind_of
from operators.prepare import prepare_batch, prepare_item
from operators.resume import ResumeState
from operators.rows import Status
from operators.storage import join
from operators.video import process_videos
from operators.write import WriteOptions, write_batch, write_item, write_video

QUOTE_BYTES = 64 * 2**20  # the bytes a chunk of listed rows holds at most (solid archive members carry theirs)


@dataclass
class Processed:
    """What a task records about its image: the manifest row's essentials and the detections."""

    status: str  # done | failed
    failure_cause: str | None
    error: str | None
    format: str | None
    width: int
    height: int
    detections: Detections
    anonymised: np.ndarray  # per detection: whether its pixels were changed
    frames: int | None = None  # a video's: then `detections` holds every frame's boxes
    objects: dict[str, int] | None = None  # a video's: tracks per class (what counts() gives)

    def counts(self) -> dict[str, int]:
        if self.objects is not None:
            return self.objects
        return {c: int(np.sum(self.detections.class_ids == k)) for k, c in enumerate(CLASSES)}


class ImageProcessor:
    def __init__(self, device: str = "auto", threads: int | None = None, max_pixels: int = 100_000_000):
        self.backend = _pick_backend(device)
        self.threads = threads or os.cpu_count() or 1
        self.max_pixels = max_pixels  # a service answers many callers: a tighter bomb limit than a job's
        self._adapters: dict[str, object] = {}  # catalog name -> loaded model, for the process's life
        self._lock = threading.Lock()

    def detector(self, spec: JobSpec) -> Detector:
        """A Detector for the spec's classes, thresholds and tiling, around cached model sessions."""
        classes, models = spec.resolve_models()
        # The models themselves are the expensive part: loaded on first use, then shared.
        return Detector([], classes, spec.detection_profile().model_dump(), backend=self.backend, threads=self.threads,
                        tiling=spec.detect_tiling(), adapters=[self._adapter(e) for e in models.values()])

    def _adapter(self, entry: ModelEntry):
        with self._lock:  # one load per model even when the first requests arrive together
            if entry.name not in self._adapters:
                self._adapters[entry.name] = adapter_class(entry.adapter)(
                    entry, prepared_weights(entry), self.backend, self.threads)
            return self._adapters[entry.name]

    def warm_up(self, spec: JobSpec) -> None:
        """Load the spec's models now (at start-up) rather than in the first caller's request."""
        self.detector(spec)

    def process(self, spec: JobSpec, original_url: str, rel_path: str, task_root: str) -> Processed:
        """Read the original from the storage, detect, and write the outputs into `task_root`
        (images/, masks/, metadata/ as in a job's folder)."""
        row = {"item_id": os.path.basename(task_root), "source_url": original_url, "member": "", "rel_path": rel_path,
               "kind": kind_of(rel_path), "status": Status.UNDECIDED, "failure_cause": "", "error": ""}
        item = {**row, **prepare_item(row, spec.storage_options, spec.det_max_side,
                                      min(spec.max_pixels, self.max_pixels))}
        if item["kind"] == "video":
            return self._process_video(spec, item, task_root)
        if item["status"] == Status.PENDING:
            detected = self.detector(spec)(rows_batch([item]))
            item.update({key: detected[key][0] for key in ROW_COLUMNS})
        # metadata/ names the upload, not where the server keeps it
        item["source_url"] = join("tasks", os.path.basename(task_root), "original", rel_path)
        options = write_options(spec, task_root, job_id=os.path.basename(task_root),
                                save_metadata=True)  # /metadata always answers
        image_row, dets, anonymised = write_item(item, options)
        return Processed(image_row["status"], image_row["failure_cause"], image_row["error"], image_row["format"],
                         image_row["width"], image_row["height"], dets, anonymised)

    def _process_video(self, spec: JobSpec, item: dict, task_root: str) -> Processed:
        """A video (the Celantur container takes them) as a job's detection actor and write task run
        one: operators/video.py writes images/<file>, write_video its metadata JSON."""
        job_id = os.path.basename(task_root)
        batch = process_videos(self.detector(spec), rows_batch([item]), video_options(spec, task_root))
        row = {k: v[0] for k, v in batch.items()}
        row["source_url"] = join("tasks", job_id, "original", row["rel_path"])  # as for an image
        image_row, dets = write_video(row, write_options(spec, task_root, job_id=job_id, save_metadata=True))
        boxes = Detections([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets], [d["score"] for d in dets],
                           [CLASSES.index(d["class"]) for d in dets]) if dets else Detections.empty()
        return Processed(image_row["status"], image_row["failure_cause"], image_row["error"], image_row["format"],
                         image_row["width"], image_row["height"], boxes,
                         np.array([d["is_anonymised"] for d in dets], bool), frames=image_row["frames"] or 0,
                         objects={c: image_row[f"n_{c}"] for c in CLASSES})

    def run_batch(self, spec: JobSpec, rows: list[dict], options: WriteOptions, billing: Billing) -> dict:
        """The job pipeline's stages on a few listed rows (archive members included): prepare_batch,
        the Detector (a video whole, frame by frame, as in the pipeline's actors), write_batch (which
        writes the rows' manifest part). Returns write_batch's stats."""
        batch = prepare_batch(rows_batch(rows), spec.storage_options, spec.det_max_side,
                              min(spec.max_pixels, self.max_pixels), billing)
        detector = self.detector(spec)
        return write_batch(detector(process_videos(detector, batch, video_options(spec, options.job_root))), options)


class InProcessExecutor:
    """A job's items in this process (jobs.run.Executor's signature): the pipeline's stage functions
    (`ImageProcessor.run_batch`) on batches of PREPARE_BATCH rows, on the service's worker pool at
    background priority, at most `workers` batches in flight: synchronous callers still go first, and
    memory holds a few batches whatever the archive. `stopping` set: the next batch raises CancelledError."""

    def __init__(self, processor: ImageProcessor, pool: PriorityPool, workers: int,
                 rows: Callable[[JobSpec], Iterator[dict]], options: WriteOptions, billing: Billing,
                 stopping: threading.Event):
        self.processor, self.pool, self.workers, self.rows = processor, pool, workers, rows
        self.options, self.billing, self.stopping = options, billing, stopping

    def __call__(self, spec: JobSpec, resume: ResumeState) -> Iterator[dict]:
        in_flight: deque[Future] = deque()
        try:
            todo = (r for r in self.rows(spec) if r["item_id"] not in resume.finished)
            for batch in chunks(todo, PREPARE_BATCH, QUOTE_BYTES):
                if self.stopping.is_set():
                    raise CancelledError
                in_flight.append(self.pool.submit(BACKGROUND, self.processor.run_batch, spec, batch, self.options,
                                                  self.billing))
                while len(in_flight) >= self.workers:
                    yield self._result(in_flight.popleft())
            while in_flight:
                yield self._result(in_flight.popleft())
        finally:  # stopped or failed: batches not started never run
            for future in in_flight:
                future.cancel()

    def _result(self, future: Future) -> dict:
        """A batch's stats; CancelledError when the server stops before the batch started (the pool
        then never runs it, so waiting on it would hold the process open)."""
        while True:
            try:
                return future.result(timeout=1.0)
            except FuturesTimeout:
                if self.stopping.is_set():
                    future.cancel()


def chunks(rows: Iterable[dict], max_rows: int, max_bytes: int) -> Iterator[list[dict]]:
    """Lists of at most `max_rows` rows, cut early once the bytes the rows carry pass `max_bytes`."""
    chunk, size = [], 0
    for row in rows:
        chunk.append(row)
        size += len(row.get("data") or b"")
        if len(chunk) >= max_rows or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def rows_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """The columnar batch (as Ray Data hands it to the stages) holding `rows`, which share their keys."""
    batch = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if any(isinstance(v, (bytes, str)) or v is None for v in values):
            column = np.empty(len(values), dtype=object)  # never numpy's fixed-width strings: bytes stay bytes
            column[:] = values
            batch[key] = column
        else:
            batch[key] = np.asarray(values)
    return batch


def _pick_backend(device: str) -> str:
    """The inference backend (models.runtime.BACKENDS) for the service's --device."""
    if device == "auto":
        import onnxruntime as ort

        device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return backend_for(device)
