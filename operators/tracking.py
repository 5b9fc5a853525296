"""A small IoU tracker for video: links per-frame detections into tracks, fills short gaps.

A detector misses a face now and then (motion blur, a turned head, a frame where the score dips
under the threshold); in a video one unblurred frame shows the face. The tracker links boxes
of one class frame to frame by IoU (greedy, best pair first) and, once a track is found again
after missing up to `max_gap` frames, the frames in between get a box interpolated linearly
between the two sightings. Boxes of a track are smoothed over +-1 frame (mean of the boxes
seen), which steadies the blurred area. A frame's boxes are final only once the tracker has
seen `max_gap` frames past it (`final_boxes`): the caller keeps that many frames in hand.

Boxes under the class threshold (down to a fraction of it, see operators/video.py) may be given
as not `confident`, as ByteTrack does: such a box never starts a track, but continues one a
confident box started, and a new track reaches back over the frames before it (up to
`max_gap`) through such boxes. A face whose score hovers around the threshold is then blurred
on every frame, not on every other one.

No Ray, no model: plain numpy, so it is unit-tested alone (tests/test_video.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.detections import Detections, box_iou

INTERPOLATED = "tracker"  # the `model` of a box the tracker filled in (no detector saw it there)


@dataclass
class Track:
    track_id: int
    cls: int
    seen: dict[int, tuple[np.ndarray, float, str, str]] = field(default_factory=dict)  # frame -> box, score...
    last_frame: int = -1

    def last_box(self) -> np.ndarray:
        return self.seen[self.last_frame][0]


class IoUTracker:
    def __init__(self, iou: float = 0.2, max_gap: int = 5, smooth: bool = True, hold: int = 0):
        """`iou`: least overlap to continue a track; `max_gap`: most frames in a row a track may
        be missed and still be filled in; `smooth`: average each box with its neighbours'."""
        self.iou, self.max_gap, self.smooth = iou, max_gap, smooth
        # frames a track's last box is kept past its last sighting: with --detect-every N the frames
        # after the last detection pass (N - 1) have no later sighting to interpolate towards
        self.hold = hold
        self.tracks: list[Track] = []
        self.low: dict[int, Detections] = {}  # recent frames' low boxes that continued no track
        self.next_id = 0
        self.frame = -1

    def update(self, frame: int, dets: Detections, confident: np.ndarray | None = None) -> np.ndarray:
        """Add frame `frame`'s detections (frames in increasing order); returns their track ids
        (-1: a low box that continued no track). `confident`: per box, whether it passed the class
        threshold (default all)."""
        self.frame = frame
        confident = np.ones(len(dets), bool) if confident is None else np.asarray(confident, bool)
        ids = np.full(len(dets), -1, dtype=np.int64)
        live = [t for t in self.tracks if frame - t.last_frame <= self.max_gap + 1]
        for stage in (confident, ~confident):  # confident boxes first, then low ones (ByteTrack)
            live = self._match(frame, dets, np.flatnonzero(stage), live, ids)
        for d in np.flatnonzero((ids < 0) & confident):
            track = Track(self.next_id, int(dets.class_ids[d]))
            self.next_id += 1
            self.tracks.append(track)
            self._add(track, frame, dets, d)
            ids[d] = track.track_id
            self._reach_back(track, frame)
        low = (ids < 0) & ~confident
        self.low[frame] = dets.select(low)
        for f in [f for f in self.low if f < frame - self.max_gap - 1]:
            del self.low[f]
        return ids

    def _match(self, frame: int, dets: Detections, idx: np.ndarray, live: list[Track], ids: np.ndarray) -> list[Track]:
        """Greedy IoU matching (the best pair first) of boxes `idx` to tracks `live`, within a class;
        sets `ids`, returns the tracks left unmatched."""
        if not len(idx) or not live:
            return live
        iou = box_iou(dets.boxes[idx], np.stack([t.last_box() for t in live]))
        iou = np.where(dets.class_ids[idx][:, None] == np.array([t.cls for t in live])[None, :], iou, 0.0)
        taken = set()
        while iou.max() >= self.iou:
            d, t = np.unravel_index(int(np.argmax(iou)), iou.shape)
            ids[idx[d]] = live[t].track_id
            self._add(live[t], frame, dets, idx[d])
            taken.add(t)
            iou[d, :], iou[:, t] = 0.0, 0.0
        return [t for k, t in enumerate(live) if k not in taken]

    def _reach_back(self, track: Track, frame: int) -> None:
        """A new track takes the low boxes that lead up to it, frame by frame backwards."""
        box = track.seen[frame][0]
        for f in range(frame - 1, frame - self.max_gap - 2, -1):
            low = self.low.get(f)
            if low is None or not len(low):
                return
            iou = np.where(low.class_ids == track.cls, box_iou(box[None], low.boxes)[0], 0.0)
            best = int(np.argmax(iou))
            if iou[best] < self.iou:
                return
            track.seen[f] = (low.boxes[best].copy(), float(low.scores[best]), low.details[best], low.models[best])
            box = low.boxes[best]
            self.low[f] = low.select(np.arange(len(low)) != best)

    @staticmethod
    def _add(track: Track, frame: int, dets: Detections, d: int) -> None:
        track.seen[frame] = (dets.boxes[d].copy(), float(dets.scores[d]), dets.details[d], dets.models[d])
        track.last_frame = frame

    def final_boxes(self, frame: int) -> tuple[Detections, np.ndarray]:
        """Boxes of `frame` (detected, or interpolated across a gap) and their track ids. Call once
        `max_gap` + 1 later frames were given to `update` (or at the end of the video)."""
        boxes, scores, classes, details, models, ids = [], [], [], [], [], []
        for t in self.tracks:
            got = self._box_at(t, frame)
            if got is None:
                continue
            box, score, detail, model = got
            boxes.append(box)
            scores.append(score)
            classes.append(t.cls)
            details.append(detail)
            models.append(model)
            ids.append(t.track_id)
        if not boxes:
            return Detections.empty(), np.zeros(0, np.int64)
        return Detections(np.stack(boxes), scores, classes, details, models), np.asarray(ids, np.int64)

    def _box_at(self, t: Track, frame: int) -> tuple[np.ndarray, float, str, str] | None:
        if frame in t.seen:
            box, score, detail, model = t.seen[frame]
            if self.smooth:
                near = [t.seen[f][0] for f in (frame - 1, frame + 1) if f in t.seen]
                if len(near) == 2:  # both neighbours: a steadier box, never a shifted one at a track's end
                    box = (box + near[0] + near[1]) / 3
            return box, score, detail, model
        before = [f for f in t.seen if f < frame]
        after = [f for f in t.seen if f > frame]
        if before and not after and frame - max(before) <= self.hold:
            box, score, detail, _ = t.seen[max(before)]
            return box, score, detail, INTERPOLATED
        if not before or not after:
            return None
        fa, fb = max(before), min(after)
        if fb - fa - 1 > self.max_gap:
            return None
        w = (frame - fa) / (fb - fa)
        box = (1 - w) * t.seen[fa][0] + w * t.seen[fb][0]
        return box, min(t.seen[fa][1], t.seen[fb][1]), t.seen[fa][2], INTERPOLATED

    def forget(self, before: int) -> None:
        """Drop what frames before `before` needed: memory stays bounded on long videos."""
        keep = []
        for t in self.tracks:
            # the latest sighting before `before` stays: it is the start of a gap still open
            old = sorted(f for f in t.seen if f < before)
            for f in old[:-2]:
                del t.seen[f]
            if t.last_frame >= before - self.max_gap - 2:
                keep.append(t)
        self.tracks = keep
