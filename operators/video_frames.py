"""The frame loop of one video (or segment): detect -> track -> anonymize -> encode, frame by frame.

operators/video.py demuxes and decodes; each decoded frame is pushed here. The tracker decides a
frame's boxes only `lookahead` frames later (it fills a gap once it sees the track again), so
that many frames are held, never more. A segment also pushes *context* frames: the last
`lookahead` frames before its span and the first `lookahead` after it (operators/video.py decodes
them). They are detected and tracked, never anonymized nor encoded, so a track crosses the cut
as in a whole run (a face missed on the frames next to a cut is still filled in).
Time per stage (decode is what operators/video.py measures around it) goes to `stage_ms` for
`veil bench VIDEO`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import av
import cv2
import numpy as np

from models.detections import CLASSES, Detections
from operators.anonymize import AnonymizeOptions, anonymize, draw_debug
from operators.orientation import upright
from operators.tracking import IoUTracker
from operators.video_io import DEFAULT_CRF


@dataclass
class VideoOptions:
    """What the video stage does to each video (the JobSpec's share, jobs/stage_options.py)."""
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


# display rotation (counterclockwise) -> the EXIF orientation that shows the frame upright
ROTATION_TO_EXIF = {0: 1, 90: 8, 180: 3, 270: 6}
STAGES = ("decode", "detect", "track", "blur", "encode")

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
    return Detector([], detector.classes, profile.model_dump(), tiling=detector.tiling,
                    adapters=list(detector.adapters.values()))


def confident(detector, dets: Detections, stored_scale: float) -> np.ndarray:
    """Per box, whether it passes the job's own threshold for its class and size."""
    keep = np.zeros(len(dets), bool)
    sizes = np.maximum(dets.boxes[:, 2] - dets.boxes[:, 0], dets.boxes[:, 3] - dets.boxes[:, 1]) * stored_scale
    for k, name in enumerate(CLASSES):
        mine = dets.class_ids == k
        if mine.any() and name in detector.profile.classes:
            keep[mine] = dets.scores[mine] >= detector.profile.classes[name].threshold_for(sizes[mine])
    return keep


class FrameLoop:
    """Frames in (`push`), anonymized frames out to the encoder `lookahead` frames later; context
    frames (a segment's neighbours) only feed the tracker."""

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
        self.seen = 0  # frames pushed, context included: the tracker's frame numbers
        self.count = 0  # frames written: the output's frame numbers
        self.last = Detections.empty()  # without tracking, --detect-every N holds the last boxes
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def push(self, frame: av.VideoFrame, context: bool = False) -> None:
        """Add the next decoded frame; a `context` frame is detected and tracked, not written."""
        idx, out_idx = self.seen, None if context else self.count
        self.seen += 1
        self.count += not context
        rgb = frame.to_ndarray(format="rgb24")  # counted as decoding (operators/video.py)
        t0 = time.perf_counter()
        dets, sure = self._detect(rgb) if idx % self.options.detect_every == 0 else (None, None)
        t1 = time.perf_counter()
        if self.tracker is not None:
            self.tracker.update(idx, dets if dets is not None else Detections.empty(), sure)
        else:
            self.last = dets if dets is not None else self.last
        self.seconds["detect"] += t1 - t0
        self.seconds["track"] += time.perf_counter() - t1
        self.pending.append((idx, out_idx, frame, rgb, dets))
        while self.pending and self.pending[0][0] <= idx - self.lookahead:
            self._emit(*self.pending.popleft())

    def finish(self) -> None:
        while self.pending:
            self._emit(*self.pending.popleft())
        t0 = time.perf_counter()
        for packet in self.vout.encode(None):
            self.out.mux(packet)
        self.seconds["encode"] += time.perf_counter() - t0

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

    def _emit(self, idx: int, out_idx: int | None, frame: av.VideoFrame, rgb: np.ndarray,
              dets: Detections | None) -> None:
        t0 = time.perf_counter()
        if self.tracker is not None:
            boxes, ids = self.tracker.final_boxes(idx)
            self.tracker.forget(idx - 1)
        else:
            boxes = dets if dets is not None else self.last
            ids = np.full(len(boxes), -1, np.int64)
        t1 = time.perf_counter()
        self.seconds["track"] += t1 - t0
        if out_idx is None:  # context: seen by the tracker only
            return
        img = rgb
        anonymised = np.zeros(len(boxes), bool)
        if len(boxes):
            done = anonymize(rgb, boxes, self.options.anonymize)
            img = draw_debug(done.image, boxes) if self.options.debug else done.image
            anonymised = done.anonymised & (self.options.anonymize.method != "detect")
            # the metadata JSON's per-frame time (operators/video_metadata.py)
            self.result["times"].append([out_idx, None if frame.time is None else round(float(frame.time), 4)])
        for j, b in enumerate(boxes.boxes):
            self.result["dets"].append([out_idx, int(ids[j]), int(boxes.class_ids[j]),
                                        round(float(boxes.scores[j]), 4), *(round(float(v), 1) for v in b),
                                        boxes.models[j], bool(anonymised[j])])
        t2 = time.perf_counter()
        out_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        out_frame.pts, out_frame.time_base = frame.pts, frame.time_base
        for packet in self.vout.encode(out_frame):
            self.out.mux(packet)
        self.seconds["blur"] += t2 - t1
        self.seconds["encode"] += time.perf_counter() - t2


def _is_panorama(detector, info, orientation: int) -> bool:
    """Whether the video's frames wrap around at the seam (equirectangular 360 video): the
    detector's format says so, or with `auto` the upright frame is 2:1 and at least
    VIDEO_PANORAMA_MIN_WIDTH wide. The detector then handles the seam as for photos."""
    tiling = getattr(detector, "format", "auto")
    if tiling != "auto":
        return tiling == "panorama"
    w, h = (info.height, info.width) if orientation in (5, 6, 7, 8) else (info.width, info.height)
    return w == 2 * h and w >= VIDEO_PANORAMA_MIN_WIDTH
