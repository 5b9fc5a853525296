"""Anonymize + encode + write (CPU tasks): the last stage of an item, and its manifest rows.

An image with nothing to anonymize is written as its original bytes, unchanged and without a
full-resolution decode. Otherwise it is decoded at full resolution, anonymized, encoded in its
own format and its metadata copied over. Every row, done or failed, ends up in the manifest.
"""

from __future__ import annotations

import errno
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import cv2
import numpy as np

from models.detections import CLASSES, Detections
from models.runtime import release_freed_memory
from operators.anonymize import AnonymizeOptions, anonymize, draw_debug
from operators.codecs import (
    decode_full,
    encode,
    is_cmyk_jpeg,
    strip_jpeg_metadata,
    with_original_metadata,
    without_trailer,
)
from operators.manifest import DETECTIONS_SCHEMA, IMAGES_SCHEMA, batch_part_name, write_part
from operators.rows import FailureCause, Status
from operators.storage import is_no_space, join, write_atomic
from operators.video import manifest_rows as video_manifest_rows
from operators.video_metadata import video_metadata
from operators.video_segments import SegmentJoiner
from operators.video_segments import finish as finish_segments


@dataclass
class WriteOptions:
    job_id: str
    job_root: str  # OUTPUT/JOB_ID
    anonymize: AnonymizeOptions = field(default_factory=AnonymizeOptions)
    quality: int = 90
    compress_level: int = 5
    debug: bool = False  # draw boxes on the output
    score: bool = False  # with debug: write the scores too
    save_mask: str | None = None  # all | binary | instance
    mask_scale: int = 100  # percent of the image size
    save_metadata: bool = False  # metadata/<rel>.json (always with method detect)
    strip_metadata: str = "none"  # none | gps | all
    storage_options: dict | None = None
    ledger: Any = None  # the job's CreditLedger when --max-credits is set: failed items give credits back
    segments: Any = None  # the job's SegmentJoiner (a Ray actor): long videos' segments meet there

    @property
    def method(self) -> str:
        return self.anonymize.method


def write_batch(batch: dict[str, np.ndarray], options: WriteOptions) -> dict[str, np.ndarray]:
    """Writes the batch's images and its manifest parts; returns one small stats row per item.

    The detections part is written before the images part: an item counts as done once its
    images row exists, so a job killed in between redoes the item (resume drops the orphans).
    Both parts are named after the batch's items, so a retried task overwrites, never duplicates."""
    cpu0 = time.process_time()
    image_rows, det_rows, given_back = [], [], []
    for i in range(len(batch["item_id"])):
        row = {k: batch[k][i] for k in batch}
        if str(row.get("kind")) == "video" and row.get("video"):  # written by the detection actor
            written = write_video(row, options)
            if written is None:  # a segment of a video whose other segments are not all written yet
                continue
            image_row, video_dets = written
            image_rows.append(image_row)
            det_rows.extend(video_dets)
        else:
            image_row, dets, anonymised = write_item(row, options)
            image_rows.append(image_row)
            det_rows.extend(detection_rows(image_row, dets, anonymised))
        reserved = float(row.get("credits", 0.0) or 0.0)
        if image_row["status"] != "done" and reserved:
            given_back.append((image_row["item_id"], reserved))
    if given_back and options.ledger is not None:
        options.ledger.release(given_back)
    release_freed_memory()  # full-resolution frames were decoded and freed
    cpu_ms = (time.process_time() - cpu0) * 1e3 / max(len(image_rows), 1)
    for r in image_rows:
        r["cpu_write_ms"] = cpu_ms
    part = batch_part_name(r["item_id"] for r in image_rows)  # a retried task replaces its own parts
    if "plan_shard" in batch and len(batch["plan_shard"]):  # a planned job: one shard per batch, parts found by it
        part = f"part-{batch['plan_shard'][0]}-{part[len('part-'):]}"
    write_part(options.job_root, "detections", det_rows, DETECTIONS_SCHEMA, options.storage_options, part)
    write_part(options.job_root, "images", image_rows, IMAGES_SCHEMA, options.storage_options, part)
    stats = {
        "status": [r["status"] for r in image_rows],
        "failure_cause": [r["failure_cause"] or "" for r in image_rows],
        "anonymized": [r["anonymized"] for r in image_rows],
        "megapixels": [r["width"] * r["height"] / 1e6 for r in image_rows],
        "credits": [r["credits"] for r in image_rows],
        "cpu_ms": [r["cpu_prepare_ms"] + r["cpu_detect_ms"] + r["cpu_write_ms"] for r in image_rows],
        "gpu_ms": [r["gpu_detect_ms"] for r in image_rows],
        **{f"n_{c}": [r[f"n_{c}"] for r in image_rows] for c in CLASSES},
    }
    return {k: np.asarray(v) for k, v in stats.items()}


def write_item(row: dict, options: WriteOptions) -> tuple[dict, Detections, np.ndarray]:
    """Anonymize and write one item; returns its manifest row, its detections and, per
    detection, whether it was anonymised (False inside an ignored area or with method detect)."""
    dets = Detections.from_row(row)
    image_row = _image_row(row, options)
    if row["status"] != Status.PENDING:
        return image_row, Detections.empty(), np.zeros(0, bool)
    t0 = time.perf_counter()
    data: bytes = row["data"]
    detect_only = options.method == "detect"
    try:
        anonymised = np.ones(len(dets), dtype=bool)
        masks = options.save_mask is not None or detect_only
        if len(dets) and (not detect_only or masks or options.debug):
            result = anonymize(decode_full(data), dets, options.anonymize, masks=masks)
            anonymised = result.anonymised & (not detect_only)
            frame = draw_debug(result.image, dets, options.score) if options.debug else result.image
            out = None
            if not detect_only and not anonymised.any() and not options.debug:
                out = _stripped(data, row["format"], options.strip_metadata)  # all inside ignores
            elif not detect_only:
                out = encode(frame, row["format"], options.quality, options.compress_level,
                             cmyk=frame.ndim == 3 and frame.shape[2] == 4 and is_cmyk_jpeg(data))
                out = with_original_metadata(out, data, row["format"], options.strip_metadata)
            _write_masks(row, result, options)
        else:  # nothing to change: the original bytes, untouched (metadata stripped if asked)
            out = None if detect_only else _stripped(data, row["format"], options.strip_metadata)
            if detect_only:
                anonymised[:] = False
        t1 = time.perf_counter()
        output_url = None
        if out is not None:
            output_url = join(options.job_root, "images", row["rel_path"])
            write_atomic(output_url, out, options.storage_options)
        if options.save_metadata or detect_only:
            _write_metadata(row, dets, anonymised, options)
    except Exception as exc:  # one bad image must not take its block down with it
        if is_no_space(exc):  # a full disk is the job's fault: it fails, and a resume redoes the items
            raise
        image_row.update(status="failed", **_write_failure(exc))
        return image_row, Detections.empty(), np.zeros(0, bool)
    image_row.update(
        status="done",
        failure_cause=None,
        output_url=output_url,
        bytes_out=len(out) if out is not None else 0,
        anonymized=bool(anonymised.any()),
        credits=float(row.get("credits", 0.0) or 0.0),
        t_anonymize_ms=(t1 - t0) * 1e3,
        t_write_ms=(time.perf_counter() - t1) * 1e3,
        **{f"n_{c}": int(np.sum(dets.class_ids == k)) for k, c in enumerate(CLASSES)},
    )
    return image_row, dets, anonymised


PATH_ERRNOS = {
    errno.ENAMETOOLONG: "a name in the output path is too long for the output file system",
    errno.ENOTDIR: "a file stands where the output path needs a folder",
    errno.EEXIST: "a file stands where the output path needs a folder",
    errno.EISDIR: "a folder stands where the output file would be written",
}


def _write_failure(exc: Exception) -> dict:
    """failure_cause and error of an item whose write raised: the output path's own problems
    (too long, a file/folder clash) are OUTPUT_PATH_ERROR, the rest INTERNAL_ERROR."""
    why = PATH_ERRNOS.get(getattr(exc, "errno", None)) if isinstance(exc, OSError) else None
    if why:
        return {"failure_cause": FailureCause.OUTPUT_PATH_ERROR, "error": f"{why}: {exc.filename!r}"[:1000]}
    return {"failure_cause": FailureCause.INTERNAL_ERROR, "error": f"write failed: {exc!r}"}


def _stripped(data: bytes, fmt: str, strip: str) -> bytes:
    data = without_trailer(data, fmt)
    return strip_jpeg_metadata(data, strip) if fmt == "jpeg" and strip != "none" else data


def _write_masks(row: dict, result, options: WriteOptions) -> None:
    kinds = {"all": ("binary", "instance"), "binary": ("binary",), "instance": ("instance",)}
    for kind in kinds.get(options.save_mask or ("all" if options.method == "detect" else ""), ()):
        mask = result.binary if kind == "binary" else result.instance[:, :, ::-1]  # RGB -> BGR for cv2
        if options.mask_scale < 100:
            h, w = mask.shape[:2]
            size = (max(1, round(w * options.mask_scale / 100)), max(1, round(h * options.mask_scale / 100)))
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        url = join(options.job_root, "masks", kind, row["rel_path"] + ".png")
        write_atomic(url, encode(mask, "png", compress_level=options.compress_level), options.storage_options)


def _write_metadata(row: dict, dets: Detections, anonymised: np.ndarray, options: WriteOptions) -> None:
    """Celantur-style per-image metadata: the image's size and each detection as a box."""
    doc = {
        "file": str(row["rel_path"]),
        "source": str(row["source_url"]) + (f"#{row['member']}" if row["member"] else ""),
        "width": int(row["width"]),
        "height": int(row["height"]),
        "detections": [
            {
                "id": j,
                "type": CLASSES[dets.class_ids[j]],
                "detail": dets.details[j],
                "score": round(float(dets.scores[j]), 4),
                "bbox": {"topLeftX": round(float(b[0]), 1), "topLeftY": round(float(b[1]), 1),
                         "width": round(float(b[2] - b[0]), 1), "height": round(float(b[3] - b[1]), 1)},
                "is_anonymised": bool(anonymised[j]),
                "model": dets.models[j],
            }
            for j, b in enumerate(dets.boxes)
        ],
    }
    url = join(options.job_root, "metadata", row["rel_path"] + ".json")
    write_atomic(url, json.dumps(doc, indent=1).encode(), options.storage_options)


def _image_row(row: dict, options: WriteOptions) -> dict:
    return {
        "job_id": options.job_id,
        "item_id": str(row["item_id"]),
        "source_url": str(row["source_url"]),
        "member": str(row["member"]),
        "rel_path": str(row["rel_path"]),
        "output_url": None,
        "status": str(row["status"]),
        "failure_cause": str(row["failure_cause"]) or None,
        "error": str(row["error"]) or None,
        "format": str(row["format"]) or None,
        "width": int(row["width"]),
        "height": int(row["height"]),
        "bytes_in": len(row["data"]) if row["data"] is not None else 0,
        "bytes_out": 0,
        **{f"n_{c}": 0 for c in CLASSES},
        "anonymized": False,
        "credits": 0.0,
        "t_read_ms": float(row["t_read_ms"]),
        "t_decode_ms": float(row["t_decode_ms"]),
        "t_detect_ms": float(row.get("t_detect_ms", 0.0)),
        "t_anonymize_ms": 0.0,
        "t_write_ms": 0.0,
        "cpu_prepare_ms": float(row.get("cpu_prepare_ms", 0.0)),
        "cpu_detect_ms": float(row.get("cpu_detect_ms", 0.0)),
        "cpu_write_ms": 0.0,
        "gpu_detect_ms": float(row.get("gpu_detect_ms", 0.0)),
        "processed_at": datetime.now(timezone.utc),
    }


def _video_result(row: dict, options: WriteOptions) -> tuple[dict | None, str]:
    """(row, video JSON) of a written video; for a segment (operators/video_segments.py) (None, "")
    until its video's last segment comes in, then the joined video's."""
    doc = json.loads(str(row["video"]))
    if not doc.get("segment"):
        return row, str(row["video"])
    k, n = doc["segment"][:2]
    doc.update(status=str(row["status"]), failure_cause=str(row["failure_cause"] or ""), error=str(row["error"] or ""),
               credits=float(row.get("credits", 0.0) or 0.0))
    parts = (options.segments or _LOCAL_JOINER).add(str(row["item_id"]), k, n, json.dumps(doc))
    if parts is None:
        return None, ""
    merged = finish_segments(parts, str(row["rel_path"]), options.job_root, options.storage_options)
    row = row | {key: merged[key] for key in ("status", "failure_cause", "error", "credits")}
    return row, json.dumps(merged)


def write_video(row: dict, options: WriteOptions) -> tuple[dict, list[dict]] | None:
    """A video the detection actor wrote (operators/video.py): its manifest rows, and its
    metadata JSON when asked; None for a segment until its video's last segment comes in."""
    row, video_json = _video_result(row, options)
    if row is None:
        return None
    image_row, dets = video_manifest_rows(_video_row(row, options), video_json)
    if (options.save_metadata or options.method == "detect") and image_row["frames"]:
        doc = video_metadata(row, image_row, dets, json.loads(video_json).get("times") or [])
        url = join(options.job_root, "metadata", row["rel_path"] + ".json")
        write_atomic(url, json.dumps(doc, indent=1).encode(), options.storage_options)
    return image_row, dets


_LOCAL_JOINER = SegmentJoiner()  # without Ray (tests): one process writes every segment


def _video_row(row: dict, options: WriteOptions) -> dict:
    """A video's images row before operators/video.py fills in what its run found."""
    image_row = _image_row(row, options)
    image_row.update(bytes_in=int(row.get("size") or 0) or image_row["bytes_in"],
                     credits=float(row.get("credits", 0.0) or 0.0) if row["status"] == "done" else 0.0)
    return image_row


def detection_rows(image_row: dict, dets: Detections, anonymised: np.ndarray) -> list[dict]:
    area = max(image_row["width"] * image_row["height"], 1)
    return [
        {
            "job_id": image_row["job_id"],
            "item_id": image_row["item_id"],
            "det_id": j,
            "class": CLASSES[dets.class_ids[j]],
            "detail": dets.details[j],
            "score": float(dets.scores[j]),
            "x1": float(b[0]), "y1": float(b[1]), "x2": float(b[2]), "y2": float(b[3]),
            "area_frac": float((b[2] - b[0]) * (b[3] - b[1]) / area),
            "is_anonymised": bool(anonymised[j]),
            "model": dets.models[j],
            "tile": int(dets.tiles[j]),
        }
        for j, b in enumerate(dets.boxes)
    ]
