"""Anonymize + encode + write (CPU tasks): the last stage of an item, and its manifest rows.

An image with nothing to anonymize is written as its original bytes, unchanged and without a
full-resolution decode. Otherwise it is decoded at full resolution, anonymized, encoded in its
own format and its metadata copied over. Every row, done or failed, ends up in the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from models.detections import CLASSES, Detections
from operators.anonymize import DEFAULT_KERNELS, anonymize
from operators.codecs import decode_full, encode, with_jpeg_metadata
from operators.manifest import DETECTIONS_SCHEMA, IMAGES_SCHEMA, write_part
from operators.storage import join, write_atomic


@dataclass
class WriteOptions:
    job_id: str
    job_root: str  # OUTPUT/JOB_ID
    method: str = "blur"
    bbox: bool = False
    kernels: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KERNELS))
    quality: int = 90
    compress_level: int = 5
    storage_options: dict | None = None


def write_batch(batch: dict[str, np.ndarray], options: WriteOptions) -> dict[str, np.ndarray]:
    """Writes the batch's images and its manifest parts; returns one small stats row per item."""
    image_rows, det_rows = [], []
    for i in range(len(batch["item_id"])):
        row = {k: batch[k][i] for k in batch}
        image_row, dets = write_item(row, options)
        image_rows.append(image_row)
        det_rows.extend(detection_rows(image_row, dets))
    write_part(options.job_root, "images", image_rows, IMAGES_SCHEMA, options.storage_options)
    write_part(options.job_root, "detections", det_rows, DETECTIONS_SCHEMA, options.storage_options)
    stats = {
        "status": [r["status"] for r in image_rows],
        "failure_cause": [r["failure_cause"] or "" for r in image_rows],
        "anonymized": [r["anonymized"] for r in image_rows],
        "megapixels": [r["width"] * r["height"] / 1e6 for r in image_rows],
        **{f"n_{c}": [r[f"n_{c}"] for r in image_rows] for c in CLASSES},
    }
    return {k: np.asarray(v) for k, v in stats.items()}


def write_item(row: dict, options: WriteOptions) -> tuple[dict, Detections]:
    """Anonymize and write one item; returns its manifest row and its detections."""
    dets = Detections.from_json(row.get("detections"))
    image_row = _image_row(row, options)
    if row["status"] != "pending":
        return image_row, Detections.empty()
    t0 = time.perf_counter()
    data: bytes = row["data"]
    try:
        if len(dets) and options.method != "detect":
            frame = anonymize(decode_full(data), dets, options.method, options.bbox, options.kernels)
            out = encode(frame, row["format"], options.quality, options.compress_level)
            if row["format"] == "jpeg":
                out = with_jpeg_metadata(out, data)
        else:
            out = data  # nothing to change: the original bytes, untouched
        t1 = time.perf_counter()
        output_url = join(options.job_root, "images", row["rel_path"])
        if options.method != "detect":
            write_atomic(output_url, out, options.storage_options)
    except Exception as exc:  # one bad image must not take its block down with it
        image_row.update(status="failed", failure_cause="INTERNAL_ERROR", error=f"write failed: {exc!r}")
        return image_row, Detections.empty()
    image_row.update(
        status="done",
        failure_cause=None,
        output_url=output_url if options.method != "detect" else None,
        bytes_out=len(out) if options.method != "detect" else 0,
        anonymized=bool(len(dets)) and options.method != "detect",
        t_anonymize_ms=(t1 - t0) * 1e3,
        t_write_ms=(time.perf_counter() - t1) * 1e3,
        **{f"n_{c}": int(np.sum(dets.classes == k)) for k, c in enumerate(CLASSES)},
    )
    return image_row, dets


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
        "processed_at": datetime.now(timezone.utc),
    }


def detection_rows(image_row: dict, dets: Detections, anonymised: bool | None = None) -> list[dict]:
    area = max(image_row["width"] * image_row["height"], 1)
    flag = image_row["anonymized"] if anonymised is None else anonymised
    return [
        {
            "job_id": image_row["job_id"],
            "item_id": image_row["item_id"],
            "det_id": j,
            "class": CLASSES[dets.classes[j]],
            "detail": dets.details[j],
            "score": float(dets.scores[j]),
            "x1": float(b[0]), "y1": float(b[1]), "x2": float(b[2]), "y2": float(b[3]),
            "area_frac": float((b[2] - b[0]) * (b[3] - b[1]) / area),
            "is_anonymised": bool(flag),
            "model": dets.models[j],
            "tile": int(dets.tiles[j]),
        }
        for j, b in enumerate(dets.boxes)
    ]
