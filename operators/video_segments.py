"""Long videos in segments: cut points at keyframes, and the segments joined by stream copy.

A segment is [start, end) seconds of the source, both keyframe times, so each segment decodes on
its own (operators/video.py seeks to `start` and keeps the frames and audio packets inside the
span) and is encoded without B-frames, so the segments' packets can follow each other in one
file with their own timestamps (no re-encoding when joining). Tracking crosses a cut: a segment
also decodes the tracker's look-ahead of frames before and after its span as context (detected
and tracked, not written; operators/video_frames.py), so its boxes are a whole run's.

In a job: `split_rows` (after prepare) makes one row per segment; the detection actors run them
like videos; the write task that hands the last segment of a video to the `SegmentJoiner` joins
them (`finish`) and writes the video's one manifest row. A job killed before that redoes the
whole video (it has no row yet).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import av
import numpy as np

from operators.rows import FailureCause, Status
from operators.storage import filesystem, is_local, join
from operators.video_io import MUXERS, open_container, open_source


def keyframe_times(source_url: str, storage_options: dict | None = None, data: bytes | None = None) -> list[float]:
    """Presentation times (s) of the video stream's keyframes, no frame decoded: from the
    container's index where it has one (MP4: no packet read), else from the packets. Cut points
    only decide where each segment starts decoding: a segment keeps the frames whose time is in its
    span, so a cut that misses a keyframe costs decoding, never a frame."""
    with open_source(source_url, storage_options, data) as f, open_container(f) as container:
        v = container.streams.video[0]
        index = [e for e in (getattr(v, "index_entries", None) or ()) if e.is_keyframe and e.timestamp is not None]
        if len(index) >= 2:  # index times are decode times: shift them by the first keyframe's pts - dts
            first = next((p for p in container.demux(v) if p.pts is not None), None)
            shift = float((first.pts - first.dts) * v.time_base) if first is not None and first.dts is not None else 0
            return sorted(float(e.timestamp * v.time_base) + shift for e in index)
        times = [float(p.pts * p.time_base) for p in container.demux(v) if p.is_keyframe and p.pts is not None]
    return sorted(times)


def plan_segments(keyframes: list[float], duration: float, seconds: float) -> list[tuple[float, float]]:
    """[start, end) spans of about `seconds` each, cut at the first keyframe past each multiple
    (a video of one GOP, or shorter than 1.5 segments, stays whole)."""
    if seconds <= 0 or duration < 1.5 * seconds or len(keyframes) < 2:
        return [(0.0, float("inf"))]
    cuts, target = [], seconds
    for t in keyframes[1:]:
        if t >= target and duration - t >= seconds / 2:  # no stub of a segment at the end
            cuts.append(t)
            target = t + seconds
    bounds = [0.0, *cuts, float("inf")]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def join_segments(paths: list[str], out_path: str, muxer: str | None = None) -> int:
    """Concatenate segment files (same streams, in order) into `out_path` by stream copy; returns
    the packets written. Timestamps are kept: each segment already carries the source's."""
    written = 0
    with av.open(paths[0]) as first:
        out = av.open(out_path, "w", format=muxer)
        try:
            streams = [out.add_stream_from_template(s) for s in first.streams]
            for path in paths:
                with av.open(path) as seg:
                    for packet in seg.demux():
                        if packet.dts is None:
                            continue
                        packet.stream = streams[packet.stream.index]
                        out.mux(packet)
                        written += 1
        finally:
            out.close()
    return written


def split_rows(batch: dict[str, np.ndarray], seconds: float, storage_options: dict | None = None
               ) -> dict[str, np.ndarray]:
    """Ray Data map_batches after prepare: each pending video of at least 1.5 segments becomes one
    row per segment (its `video` JSON gains `segment`: [k, n, start, end]); the credits stay on
    segment 0, so the video is priced (and reserved) once. Other rows pass unchanged."""
    n = len(batch["item_id"])
    if seconds <= 0 or "video" not in batch:
        return batch
    take, videos, credits = [], [], []
    for i in range(n):
        spans = _spans(batch, i, seconds, storage_options)
        for k, (start, end) in enumerate(spans):
            take.append(i)
            doc = json.loads(batch["video"][i]) if batch["video"][i] else None
            if doc is not None and len(spans) > 1:
                doc["segment"] = [k, len(spans), start, None if end == float("inf") else end]
            videos.append(json.dumps(doc) if doc is not None else batch["video"][i])
            credits.append(float(batch["credits"][i]) if k == 0 else 0.0)
    if len(take) == n:
        return batch
    out = {key: np.asarray(value)[take] for key, value in batch.items()}
    out["video"] = np.array(videos, dtype=object)
    out["credits"] = np.asarray(credits)
    return out


def _spans(batch: dict[str, np.ndarray], i: int, seconds: float, storage_options: dict | None) -> list:
    if batch["kind"][i] != "video" or batch["status"][i] != Status.PENDING or not batch["video"][i]:
        return [(0.0, float("inf"))]
    duration = float(json.loads(batch["video"][i])["info"].get("duration_s") or 0)
    if duration < 1.5 * seconds:
        return [(0.0, float("inf"))]
    try:
        data = batch["data"][i] if batch["member"][i] else None
        keys = keyframe_times(str(batch["source_url"][i]), storage_options, data or None)
    except Exception:  # the video's own run reports what is wrong with it; here it stays whole
        return [(0.0, float("inf"))]
    return plan_segments(keys, duration, seconds)


class SegmentJoiner:
    """Collects a video's segment results as their write tasks finish (one Ray actor per job, see
    jobs/pipeline.py; a plain object in tests): the task that hands in the last one gets them all
    and joins the video."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[int, str]] = {}

    def add(self, item_id: str, k: int, n: int, doc: str) -> list[str] | None:
        got = self.parts.setdefault(item_id, {})
        got[k] = doc
        if len(got) < n:
            return None
        del self.parts[item_id]
        return [got[j] for j in sorted(got)]


def finish(parts: list[str], rel_path: str, job_root: str, storage_options: dict | None) -> dict:
    """One video's result from its segments' (JSON, in order): the segments up to the first
    failed one (included: its frames before the damage) joined into images/<rel_path>, frames of
    the detections renumbered, times and credits summed; the first failure is the video's."""
    docs = [json.loads(p) for p in parts]
    failed = next((d for d in docs if d.get("status") != "done"), None)
    keep = docs[: docs.index(failed) + 1] if failed else docs
    paths = [d["output_url"] for d in keep if d.get("output_url")]
    merged = {"info": docs[0].get("info") or {}, "frames": 0, "dets": [], "times": [], "output_url": None,
              "bytes_out": 0,
              "t_ms": sum(d.get("t_ms") or 0 for d in docs), "cpu_ms": sum(d.get("cpu_ms") or 0 for d in docs),
              "credits": sum(d.get("credits") or 0 for d in docs), "segments": len(docs),
              "status": failed["status"] if failed else "done",
              "failure_cause": failed.get("failure_cause", "") if failed else "",
              "error": failed.get("error", "") if failed else ""}
    tracks = 0  # track ids restart in each segment: shifted to stay unique in the video
    for d in keep:
        dets = d.get("dets") or []
        merged["dets"] += [[det[0] + merged["frames"], det[1] + tracks if det[1] >= 0 else -1, *det[2:]]
                           for det in dets]
        merged["times"] += [[k + merged["frames"], t] for k, t in d.get("times") or []]
        merged["frames"] += int(d.get("frames") or 0)
        tracks += max((det[1] + 1 for det in dets), default=0)
    declared = int(merged["info"].get("frames") or 0)
    if not failed and declared and merged["frames"] < declared - 1:  # each segment only sees its own span
        merged.update(status="failed", failure_cause=FailureCause.VIDEO_DEFECT,
                      error=f"{rel_path}: truncated: {merged['frames']} "
                            f"of the {declared} frames the header declares could be decoded")
    if paths:
        merged.update(_join_to(paths, rel_path, job_root, storage_options))
    for d in docs:  # the segment files are scratch
        if d.get("output_url"):
            fs, path = filesystem(d["output_url"], storage_options)
            fs.rm(path)
    return merged


def _join_to(paths: list[str], rel_path: str, job_root: str, storage_options: dict | None) -> dict:
    from operators.video import upload

    tmp_dir = tempfile.mkdtemp(prefix="veil-join-")
    try:
        local = []
        for k, url in enumerate(paths):
            if is_local(url):
                local.append(url)
            else:
                fs, path = filesystem(url, storage_options)
                local.append(os.path.join(tmp_dir, f"{k}{os.path.splitext(rel_path)[1]}"))
                fs.get_file(path, local[-1])
        ext = os.path.splitext(rel_path.lower())[1]
        out = os.path.join(tmp_dir, "joined" + ext)
        join_segments(local, out, MUXERS.get(ext, "mp4"))
        url = join(job_root, "images", rel_path)
        upload(out, url, storage_options)
        return {"output_url": url, "bytes_out": os.path.getsize(out)}
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
