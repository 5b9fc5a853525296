"""A video item: decode -> detect -> track -> anonymize -> encode, frame by frame, in one pass.

Videos run inside the detection actors (jobs/pipeline.py hands them over): a video's frames
never travel through Ray's object store, and its detector is the photos' one (same profile,
classes, thresholds). Frames are streamed: at most the tracker's look-ahead (`max_gap` + 2
frames) is held. The output keeps the container, codec family, size, frame rate, timestamps
and display rotation; audio, subtitle and data streams are copied packet for packet (data
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
from dataclasses import dataclass, field

import av
import cv2
import numpy as np

from models.detections import CLASSES, Detections
from operators.anonymize import AnonymizeOptions, anonymize, draw_debug
from operators.orientation import upright
from operators.rows import FailureCause, Status, failure_cause
from operators.storage import filesystem, is_local, join
from operators.tracking import IoUTracker
from operators.video_io import (
    DEFAULT_CRF,
    MUXERS,
    VideoDefect,
    VideoInfo,
    add_video_output,
    first_frame_rotation,
    open_container,
    open_source,
    probe,
)

# display rotation (counterclockwise) -> the EXIF orientation that shows the frame upright
ROTATION_TO_EXIF = {0: 1, 90: 8, 180: 3, 270: 6}


# 360 video is 2:1 from 3840x1920 (most 360 cameras' 4K) up; dashcams are 16:9 or 4:3
VIDEO_PANORAMA_MIN_WIDTH = 1920
LOW_FACTOR = 0.6  # with tracking, boxes down to this fraction of the class threshold may continue a track


def low_detector(detector, factor: float = LOW_FACTOR):
    """The job's detector with every threshold times `factor`, sharing its loaded models (None for
    a detector without a profile, e.g. a test's stand-in)."""
    from operators.detect import Detector

    if not hasattr(detector, "profile") or factor >= 1:
        return None
    profile = detector.profile.model_copy(deep=True)
    for plan in profile.classes.values():
        plan.thresholds = [t.model_copy(update={"score": t.score * factor}) for t in plan.thresholds]
    return Detector([], detector.classes, profile.model_dump(), format=detector.format,
                    adapters=list(detector.adapters.values()))


def confident(detector, dets: Detections, stored_scale: float) -> np.ndarray:
    """Per box, whether it passes the job's own threshold for its class and size."""
    keep = np.zeros(len(dets), bool)
    sizes = np.maximum(dets.boxes[:, 2] - dets.boxes[:, 0], dets.boxes[:, 3] - dets.boxes[:, 1]) * stored_scale
    for k, name in enumerate(CLASSES):
        mine = dets.classes == k
        if mine.any() and name in detector.profile.classes:
            keep[mine] = dets.scores[mine] >= detector.profile.classes[name].threshold_for(sizes[mine])
    return keep


@dataclass
class VideoOptions:
    job_root: str
    anonymize: AnonymizeOptions = field(default_factory=AnonymizeOptions)
    crf: int = DEFAULT_CRF
    keep_bit_rate: bool = False
    tracking: bool = True
    max_gap: int = 5  # frames a track may be missed and still be filled in
    detect_every: int = 1
    det_max_side: int = 2048
    strip_metadata: str = "none"
    debug: bool = False
    storage_options: dict | None = None


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
    bytes_out, dets (rows of frame, track, class, score, x1, y1, x2, y2, model, anonymised) and timings."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    data = row.get("data") or None
    result = {"status": "done", "failure_cause": "", "error": "", "frames": 0, "output_url": None, "bytes_out": 0,
              "dets": [], "info": {}}
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
    keep = [s for s in container.streams if s is not vin and s.type in ("audio", "subtitle")
            or (s.type == "data" and options.strip_metadata == "none")]
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
        if span:
            container.seek(int(span[0] * av.time_base), backward=True)
        copies = {}
        for s in keep:
            try:
                copies[s.index] = out.add_stream_from_template(s)
            except Exception:  # a stream this container cannot hold: dropped, the video still goes out
                continue
        frames = _FrameLoop(detector, info, options, out, vout, result)
        try:
            for packet in container.demux(vin, *[s for s in keep if s.index in copies]):
                if packet.stream.index == vin.index:
                    for frame in packet.decode():
                        if _inside(span, frame.time):
                            frames.push(frame)
                elif packet.dts is not None and _inside(span, packet.pts and float(packet.pts * packet.time_base)):
                    packet.stream = copies[packet.stream.index]
                    out.mux(packet)
        except av.error.FFmpegError as exc:  # damage: what was decoded so far is still written
            defect = f"decoding stopped after {frames.count} frames: {exc}"
        frames.finish()
        for packet in vout.encode(None):
            out.mux(packet)
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


def _inside(span: tuple[float, float] | None, t: float | None) -> bool:
    """Whether time `t` (s) belongs to the segment `span` (everything does without one)."""
    return not span or t is None or span[0] - 1e-6 <= t < span[1] - 1e-6


class _FrameLoop:
    """Frames in, anonymized frames out to the encoder, `lookahead` frames later (the tracker
    fills a gap only once it sees the track again)."""

    def __init__(self, detector, info, options: VideoOptions, out, vout, result: dict):
        self.detector, self.info, self.options, self.out, self.vout, self.result = (
            detector, info, options, out, vout, result)
        self.orientation = ROTATION_TO_EXIF.get(info.rotation, 1)
        self.panorama = _is_panorama(detector, info, self.orientation)
        gap = max(options.max_gap, options.detect_every)
        self.tracker = IoUTracker(max_gap=gap, hold=options.detect_every - 1) if options.tracking else None
        # with tracking, one detection pass at the lowered thresholds; the job's own thresholds decide
        # which boxes start a track (ByteTrack's two stages)
        self.low = low_detector(detector) if options.tracking else None
        self.lookahead = gap + 2 if options.tracking else 0  # +1 for the gap's far end, +1 for smoothing
        self.pending: deque = deque()
        self.count = 0
        self.last = Detections.empty()  # without tracking, --detect-every N holds the last boxes

    def push(self, frame: av.VideoFrame) -> None:
        idx = self.count
        self.count += 1
        rgb = frame.to_ndarray(format="rgb24")
        dets, sure = self._detect(rgb) if idx % self.options.detect_every == 0 else (None, None)
        if self.tracker is not None:
            self.tracker.update(idx, dets if dets is not None else Detections.empty(), sure)
        else:
            self.last = dets if dets is not None else self.last
        self.pending.append((idx, frame, rgb, dets))
        while self.pending and self.pending[0][0] <= idx - self.lookahead:
            self._emit(*self.pending.popleft())

    def finish(self) -> None:
        while self.pending:
            self._emit(*self.pending.popleft())

    def _detect(self, rgb: np.ndarray) -> tuple[Detections, np.ndarray | None]:
        """The frame's boxes in stored pixels, and per box whether it passed the job's threshold."""
        from operators.detect import to_stored_pixels  # the actor has it loaded already

        h, w = rgb.shape[:2]
        scale = min(1.0, self.options.det_max_side / max(h, w))
        small = rgb if scale >= 1 else cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                  interpolation=cv2.INTER_AREA)
        det = np.ascontiguousarray(upright(small, self.orientation))
        scale = w / small.shape[1]
        found = (self.low or self.detector).detect([det], [self.panorama], [scale])[0]
        sure = confident(self.detector, found, scale) if self.low is not None else None
        return to_stored_pixels(found, det.shape[1], det.shape[0], w, h, self.orientation), sure

    def _emit(self, idx: int, frame: av.VideoFrame, rgb: np.ndarray, dets: Detections | None) -> None:
        if self.tracker is not None:
            boxes, ids = self.tracker.final_boxes(idx)
            self.tracker.forget(idx - 1)
        else:
            boxes = dets if dets is not None else self.last
            ids = np.full(len(boxes), -1, np.int64)
        img = rgb
        anonymised = np.zeros(len(boxes), bool)
        if len(boxes):
            done = anonymize(rgb, boxes, self.options.anonymize)
            img = draw_debug(done.image, boxes) if self.options.debug else done.image
            anonymised = done.anonymised & (self.options.anonymize.method != "detect")
        for j, b in enumerate(boxes.boxes):
            self.result["dets"].append([idx, int(ids[j]), int(boxes.classes[j]), round(float(boxes.scores[j]), 4),
                                        *(round(float(v), 1) for v in b), boxes.models[j], bool(anonymised[j])])
        out_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        out_frame.pts, out_frame.time_base = frame.pts, frame.time_base
        for packet in self.vout.encode(out_frame):
            self.out.mux(packet)


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


def _is_panorama(detector, info, orientation: int) -> bool:
    """Whether the video's frames wrap around at the seam (equirectangular 360 video): the
    detector's format says so, or with `auto` the upright frame is 2:1 and at least
    VIDEO_PANORAMA_MIN_WIDTH wide. The detector then handles the seam as for photos."""
    tiling = getattr(detector, "format", "auto")
    if tiling != "auto":
        return tiling == "panorama"
    w, h = (info.height, info.width) if orientation in (5, 6, 7, 8) else (info.width, info.height)
    return w == 2 * h and w >= VIDEO_PANORAMA_MIN_WIDTH
