"""A video item: decode -> detect -> track -> anonymize -> encode, frame by frame, in one pass.

Videos run inside the detection actors (jobs/pipeline.py hands them over): a video's frames
never travel through Ray's object store, and its detector is the photos' one (same profile,
classes, thresholds). This module demuxes and decodes (a segment: its span plus context frames
on both sides); operators/video_frames.py detects, tracks, anonymizes and encodes each frame.
Frames are streamed: at most the tracker's look-ahead (`max_gap` + 2 frames) is held. The
output keeps the container, codec family, size, frame rate, timestamps and display rotation;
audio, subtitle and data streams are copied packet for packet (data
streams, which hold e.g. GPS tracks, are dropped with --strip-metadata).

A video that cannot be opened, or whose decoding breaks or ends short of its declared frames,
fails with VIDEO_DEFECT; the frames decoded before the damage are still anonymized and written.
The per-frame detections travel to the write stage in the row's `video` column (JSON), which
turns them into manifest rows with `frame` and `track_id` (`manifest_rows`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import deque

import av
import numpy as np

from models.detections import CLASSES
from operators.rows import FailureCause, Status, failure_cause
from operators.storage import filesystem, is_local, join
from operators.video_frames import FrameLoop, VideoOptions
from operators.video_io import (
    MUXERS,
    VideoDefect,
    VideoInfo,
    add_video_output,
    first_frame_rotation,
    open_container,
    open_source,
    probe,
)


def process_videos(detector, batch: dict[str, np.ndarray], options: VideoOptions) -> dict[str, np.ndarray]:
    """Run the batch's pending video rows to the end (output written); the rest is left as is.
    Each video row gets status, failure_cause, error and its `video` JSON (info, detections)."""
    kinds = batch.get("kind")
    todo = [i for i in range(len(batch["item_id"]))
            if kinds is not None and kinds[i] == "video" and batch["status"][i] == Status.PENDING]
    if not todo:
        return batch
    out = dict(batch)
    for key in ("status", "failure_cause", "error", "video"):
        out[key] = np.array(batch[key], dtype=object)
    for i in todo:
        row = {k: batch[k][i] for k in batch}
        segment = (json.loads(row["video"]) if row.get("video") else {}).get("segment")
        if segment:  # one piece of a long video (operators/video_segments.py): written to a scratch path
            k, _, start, end = segment
            ext = os.path.splitext(str(row["rel_path"]))[1]
            row.update(segment=(start, float("inf") if end is None else end),
                       output_rel=f"segments/{row['item_id']}/{k:05d}{ext}")
        result = process_video(detector, row, options)
        if segment:
            result["segment"] = segment
        out["status"][i], out["failure_cause"][i] = result.pop("status"), result.pop("failure_cause")
        out["error"][i] = result.pop("error")
        out["video"][i] = json.dumps(result, separators=(",", ":"))
    return out


def process_video(detector, row: dict, options: VideoOptions) -> dict:
    """Anonymize one video; returns status, failure_cause, error, info, frames, output_url,
    bytes_out, dets (rows of frame, track, class, score, x1, y1, x2, y2, model, anonymised), times
    ([frame, seconds] of the frames with boxes) and timings."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    data = row.get("data") or None
    result = {"status": "done", "failure_cause": "", "error": "", "frames": 0, "output_url": None, "bytes_out": 0,
              "dets": [], "times": [], "info": {}}
    try:
        src = open_source(str(row["source_url"]), options.storage_options, data if row.get("member") else None)
    except Exception as exc:  # vanished, unreachable: the row says so, the job goes on
        return result | {"status": "failed", "failure_cause": failure_cause(exc),
                         "error": f"read failed: {exc!r}"[:500]}
    with src:
        try:
            with open_container(src) as container:  # a first look: the rotation is on decoded frames only
                rotation = first_frame_rotation(container)
            src.seek(0)
            container = open_container(src)
        except VideoDefect as exc:
            return result | {"status": "failed", "failure_cause": FailureCause.VIDEO_DEFECT,
                             "error": f"{row['rel_path']}: {exc}"}
        with container:
            result["info"] = probe(container).as_dict()
            if rotation is not None:
                result["info"]["rotation"] = rotation
            try:
                _transcode(detector, container, row, options, result)
            except VideoDefect as exc:
                result.update(status="failed", failure_cause=FailureCause.VIDEO_DEFECT,
                              error=f"{row['rel_path']}: {exc}")
            except Exception as exc:  # one bad video must not take the actor's batch down
                result.update(status="failed", failure_cause=FailureCause.INTERNAL_ERROR,
                              error=f"video failed: {exc!r}"[:500])
    result["t_ms"] = (time.perf_counter() - t0) * 1e3
    result["cpu_ms"] = (time.process_time() - cpu0) * 1e3
    return result


def _transcode(detector, container, row: dict, options: VideoOptions, result: dict) -> None:
    info = VideoInfo(**result["info"])
    vin = container.streams.video[0]
    # a QuickTime timecode track is not copied as packets (the muxer refuses them): the muxer
    # writes its own from the video stream's `timecode` tag
    timecode = next((s.metadata["timecode"] for s in container.streams if "timecode" in s.metadata), None)
    keep = [s for s in container.streams if s is not vin and s.type in ("audio", "subtitle")
            or (s.type == "data" and options.strip_metadata == "none" and "timecode" not in s.metadata)]
    detect_only = options.anonymize.method == "detect"
    ext = os.path.splitext(str(row["rel_path"]).lower())[1]
    tmp_dir = tempfile.mkdtemp(prefix="veil-video-")
    tmp = os.path.join(tmp_dir, "out" + ext)
    out = av.open(tmp, mode="w", format=MUXERS.get(ext, "mp4"))
    defect = ""
    try:
        if options.strip_metadata == "none":
            out.metadata.update(container.metadata)
        # one segment of a long video (operators/video_segments.py): [start, end) seconds, cut at keyframes
        span = row.get("segment")
        vout = add_video_output(out, vin, info, options.crf, options.keep_bit_rate, b_frames=not span)
        if timecode and options.strip_metadata == "none":
            vout.metadata["timecode"] = timecode
        copies = {}
        for s in keep:
            try:
                copies[s.index] = out.add_stream_from_template(s)
            except Exception:  # a stream this container cannot hold: dropped, the video still goes out
                continue
        frames = FrameLoop(detector, info, options, out, vout, result)
        t0 = time.perf_counter()
        try:
            _feed(container, vin, [s for s in keep if s.index in copies], span, frames, out, copies)
        except av.error.FFmpegError as exc:  # damage: what was decoded so far is still written
            defect = f"decoding stopped after {frames.count} frames: {exc}"
        frames.finish()
        seconds = frames.seconds  # decoding: the rest of the loop (demux, decode, to RGB, stream copy)
        seconds["decode"] = max(0.0, time.perf_counter() - t0 - sum(seconds.values()))
        result["stage_ms"] = {k: round(v * 1e3, 1) for k, v in seconds.items()}
    finally:
        out.close()
    try:
        if not defect and not span and info.frames and frames.count < info.frames - 1:
            defect = f"truncated: {frames.count} of the {info.frames} frames the header declares could be decoded"
        result["frames"] = frames.count
        if frames.count and not detect_only:
            url = join(options.job_root, row.get("output_rel") or f"images/{row['rel_path']}")
            upload(tmp, url, options.storage_options)
            result.update(output_url=url, bytes_out=os.path.getsize(tmp))
        elif not frames.count:
            defect = defect or "no frame could be decoded"
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if defect:
        raise VideoDefect(defect)


def _feed(container, vin, copied: list, span: tuple[float, float] | None, frames: FrameLoop, out,
          copies: dict) -> None:
    """Demux and decode into `frames`, copying the other kept streams' packets to `out`. A
    segment ([start, end) s) seeks to the keyframe before its start minus the tracker's look-ahead,
    pushes the last `lookahead` frames before `start` and the first after `end` as context, and
    stops once every stream is past `end`."""
    context = frames.lookahead if span else 0
    if span:
        lead = (context + 1) / frames.info.fps if context and frames.info.fps else 0.0
        container.seek(int(max(0.0, span[0] - lead) * av.time_base), backward=True)
    before: deque = deque(maxlen=context)  # the frames before the span: the last `context` of them
    after, done = 0, set()
    for packet in container.demux(vin, *copied):
        if packet.stream.index == vin.index:
            for frame in packet.decode():
                if _inside(span, frame.time):
                    while before:
                        frames.push(before.popleft(), context=True)
                    frames.push(frame)
                elif frame.time < span[0]:
                    before.append(frame)
                else:
                    done.add(vin.index)
                    if after < context:
                        frames.push(frame, context=True)
                        after += 1
        elif packet.dts is not None:
            t = packet.pts and float(packet.pts * packet.time_base)
            if _inside(span, t):
                packet.stream = copies[packet.stream.index]
                out.mux(packet)
            elif t is not None and t >= span[1]:
                done.add(packet.stream.index)
        if span and after >= context and len(done) == 1 + len(copied):
            break  # every stream is past the segment: the rest of the file is the next segments'


def _inside(span: tuple[float, float] | None, t: float | None) -> bool:
    """Whether time `t` (s) belongs to the segment `span` (everything does without one)."""
    return not span or t is None or span[0] - 1e-6 <= t < span[1] - 1e-6


def upload(tmp: str, url: str, storage_options: dict | None) -> None:
    """Move the finished file to its output path whole (a reader never sees half a video)."""
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        part = path + ".veil-part"
        shutil.copyfile(tmp, part)
        os.replace(part, path)
    else:
        fs.put_file(tmp, path)


def manifest_rows(image_row: dict, video_json: str) -> tuple[dict, list[dict]]:
    """The video's images row (frames, duration, codec, fps, output) and its detection rows."""
    doc = json.loads(video_json) if video_json else {}
    info = doc.get("info") or {}
    image_row.update(
        frames=int(doc.get("frames") or 0) or None, duration_s=info.get("duration_s"), codec=info.get("codec"),
        fps=info.get("fps"), output_url=doc.get("output_url"), bytes_out=int(doc.get("bytes_out") or 0),
        width=int(info.get("width") or image_row["width"]), height=int(info.get("height") or image_row["height"]),
        format=image_row["format"] or None, t_detect_ms=float(doc.get("t_ms") or 0.0),
        cpu_detect_ms=float(doc.get("cpu_ms") or 0.0),
    )
    dets = doc.get("dets") or []
    tracks: dict[int, set] = {c: set() for c in range(len(CLASSES))}
    area = max(image_row["width"] * image_row["height"], 1)
    rows = []
    for j, (frame, track, cls, score, x1, y1, x2, y2, model, anonymised) in enumerate(dets):
        tracks[cls].add(track if track >= 0 else (frame, j))
        rows.append({
            "job_id": image_row["job_id"], "item_id": image_row["item_id"], "det_id": j, "class": CLASSES[cls],
            "detail": "", "score": score, "x1": x1, "y1": y1, "x2": x2, "y2": y2,
            "area_frac": (x2 - x1) * (y2 - y1) / area, "is_anonymised": anonymised, "model": model, "tile": -1,
            "frame": frame, "track_id": track if track >= 0 else None,
        })
    # n_<class>: objects (tracks) in the video, not boxes over all frames
    image_row.update({f"n_{c}": len(tracks[k]) for k, c in enumerate(CLASSES)},
                     anonymized=any(r["is_anonymised"] for r in rows))
    return image_row, rows
