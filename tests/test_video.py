"""Videos (issue 21): real clips end to end on a local Ray, hostile videos, the tracker alone."""

from __future__ import annotations

import json
import shutil
import zipfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from video_media import clip_paths, decodes_cleanly

from jobs.run import run_job
from jobs.spec import build_spec
from models.detections import Detections
from operators.tracking import INTERPOLATED, IoUTracker

FACE_THRESHOLD = 0.5


# --- the tracker alone (no Ray, no model) ---

def _one(box, score=0.9) -> Detections:
    return Detections([box], [score], [0])


def test_tracker_fills_a_gap_by_interpolating():
    tracker = IoUTracker(max_gap=5)
    seen = {0: [10, 10, 30, 30], 1: [12, 10, 32, 30], 5: [20, 10, 40, 30]}  # missed on frames 2, 3, 4
    for f in range(8):
        tracker.update(f, _one(seen[f]) if f in seen else Detections.empty())
    ids = set()
    for f in range(6):
        boxes, track_ids = tracker.final_boxes(f)
        assert len(boxes) == 1, f"frame {f} has no box"
        ids.update(track_ids.tolist())
    assert ids == {0}
    boxes, _ = tracker.final_boxes(3)
    assert boxes.models == [INTERPOLATED]
    np.testing.assert_allclose(boxes.boxes[0], [12 + (20 - 12) * 2 / 4, 10, 32 + 8 * 2 / 4, 30])
    assert len(tracker.final_boxes(6)[0]) == 0  # nothing after the track's last sighting


def test_tracker_leaves_long_gaps_and_other_objects_apart():
    tracker = IoUTracker(max_gap=2)
    for f in range(10):
        dets = [[100, 100, 120, 120]]  # a second object, seen throughout
        if f in (0, 6):
            dets.append([10, 10, 30, 30])  # seen again after 5 missed frames: longer than max_gap
        tracker.update(f, Detections(dets, [0.9] * len(dets), [0] * len(dets)))
    assert len(tracker.final_boxes(3)[0]) == 1  # the gap is not filled
    _, first = tracker.final_boxes(0)
    _, later = tracker.final_boxes(6)
    assert len(set(first.tolist())) == 2 and set(first.tolist()) != set(later.tolist())
    tracker.forget(8)
    assert len(tracker.final_boxes(8)[0]) == 1


def test_low_boxes_continue_a_track_but_never_start_one():
    """ByteTrack's rule: a box under the threshold is kept only next to a confident one of its
    track, before it (reaching back) or after it."""
    tracker = IoUTracker(max_gap=3)
    scores = [0.4, 0.45, 0.9, 0.5, 0.4]  # confident on frame 2 only
    for f, score in enumerate(scores):
        dets = Detections([[10 + f, 10, 30 + f, 30], [200, 200, 220, 220]], [score, 0.4], [0, 0])
        tracker.update(f, dets, np.array([score >= 0.8, False]))
    for f in range(5):
        boxes, ids = tracker.final_boxes(f)
        assert len(boxes) == 1 and ids.tolist() == [0], f  # the lone low box at (200, 200) is dropped


# --- clips and hostile files ---

def _clip_with_audio(path: Path, frames: int = 30) -> None:
    """A small H.264 + AAC MP4 (moving grey gradient and a tone), made with PyAV."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=15)
        v.width, v.height, v.pix_fmt = 96, 64, "yuv420p"
        a = out.add_stream("aac", rate=16000)
        for i in range(frames):
            img = np.zeros((64, 96, 3), np.uint8)
            img[:] = (np.arange(96) * 2 + i * 4)[None, :, None] % 256
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        t = np.arange(16000 * frames // 15) / 16000
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        for k in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, k:k + 1024]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, k, Fraction(1, 16000)
            for p in a.encode(frame):
                out.mux(p)
        for s in (v, a):
            for p in s.encode(None):
                out.mux(p)


def _remux(src: Path, dst: Path) -> None:
    """The same packets in another container (Matroska: its index is not needed to read it)."""
    with av.open(str(src)) as a, av.open(str(dst), "w") as b:
        out = b.add_stream_from_template(a.streams.video[0])
        for p in a.demux(video=0):
            if p.dts is not None:
                p.stream = out
                b.mux(p)


def _frames(path: Path) -> tuple[list[np.ndarray], list[int]]:
    with av.open(str(path)) as c:
        frames = [(f.to_ndarray(format="rgb24"), f.pts) for f in c.decode(video=0)]
    return [f for f, _ in frames], [p for _, p in frames]


@pytest.fixture(scope="module")
def video_job(tmp_path_factory, shared_dir, ray_local):
    root = tmp_path_factory.mktemp("video")
    src = root / "in"
    src.mkdir()
    clips = clip_paths()
    for name, path in clips.items():
        shutil.copy(path, src / name)
    photo = next((shared_dir / "eval" / "wider").rglob("*.jpg"))
    shutil.copy(photo, src / "photo.jpg")
    with zipfile.ZipFile(src / "clips.zip", "w") as zf:
        zf.write(clips["carphone_pristine.mp4"], "inside/carphone.mp4")
    _clip_with_audio(src / "audio.mp4")
    data = clips["bikes.mp4"].read_bytes()
    (src / "truncated.mp4").write_bytes(data[: len(data) // 2])  # bikes.mp4's index is at its end: lost
    _remux(clips["bikes.mp4"], root / "bikes.mkv")
    data = (root / "bikes.mkv").read_bytes()
    (src / "truncated.mkv").write_bytes(data[: len(data) // 2])  # frames up to the cut still decode
    (src / "empty.mp4").write_bytes(b"")
    (src / "text.mp4").write_text("this is not a video")
    spec = build_spec({"inputs": [str(src)], "output": str(root / "out"), "job_id": "vid", "face": True,
                       "detect_models": ["centerface"], "face_threshold": FACE_THRESHOLD,
                       "video_segment_seconds": 3,  # bikes (10 s) runs as 3 segments, carphone (4 s) whole
                       "save_metadata": True})
    doc = run_job(spec)
    job = root / "out" / "vid"
    images = {r["rel_path"]: r for r in pq.read_table(job / "manifest/images").to_pylist()}
    dets = pq.read_table(job / "manifest/detections").to_pylist()
    return src, job, doc, images, dets


def test_videos_are_items_with_their_rows(video_job):
    src, job, doc, images, dets = video_job
    assert doc["status"] == "done"
    assert set(images) == {"carphone_pristine.mp4", "bikes.mp4", "photo.jpg", "clips.zip/inside/carphone.mp4",
                           "audio.mp4", "truncated.mp4", "truncated.mkv", "empty.mp4", "text.mp4"}
    for name in ("carphone_pristine.mp4", "bikes.mp4", "clips.zip/inside/carphone.mp4", "audio.mp4"):
        row = images[name]
        assert row["status"] == "done", row
        assert row["codec"] == "h264" and row["frames"] and row["duration_s"] > 0 and row["fps"] > 0
        assert row["credits"] > 0 and row["bytes_out"] > 0
        assert Path(row["output_url"]) == job / "images" / name
    assert images["carphone_pristine.mp4"]["frames"] == 120 and images["bikes.mp4"]["frames"] == 250
    assert images["photo.jpg"]["status"] == "done" and images["photo.jpg"]["frames"] is None
    # bikes.mp4 ran as segments (encoded without B-frames, so they join by stream copy), carphone whole
    with av.open(str(job / "images/bikes.mp4")) as b, av.open(str(job / "images/carphone_pristine.mp4")) as c:
        assert not b.streams.video[0].codec_context.has_b_frames and c.streams.video[0].codec_context.has_b_frames
    assert not [p for p in (job / "segments").rglob("*") if p.is_file()]  # the scratch segments are gone
    car = [d for d in dets if d["item_id"] == images["carphone_pristine.mp4"]["item_id"]]
    assert {d["frame"] for d in car} == set(range(120))  # the face is blurred on every frame
    assert all(d["track_id"] is not None for d in car) and images["carphone_pristine.mp4"]["n_face"] >= 1
    assert all(d["frame"] is None for d in dets if d["item_id"] == images["photo.jpg"]["item_id"])


def test_metadata_json_has_the_boxes_frame_by_frame(video_job):
    """--save-metadata: a video's metadata/<rel>.json has one entry per frame with boxes (index,
    presentation time, the photos' detection fields plus track_id), the same boxes as the manifest;
    bikes.mp4 ran as 3 segments, so its frames and times were renumbered when joined."""
    src, job, doc, images, dets = video_job
    for name in ("carphone_pristine.mp4", "bikes.mp4"):
        meta = json.loads((job / "metadata" / (name + ".json")).read_text())
        row = images[name]
        assert (meta["file"], meta["frame_count"], meta["width"]) == (name, row["frames"], row["width"])
        mine = [d for d in dets if d["item_id"] == row["item_id"]]
        assert sum(len(f["detections"]) for f in meta["frames"]) == len(mine)
        assert {f["frame"] for f in meta["frames"]} == {d["frame"] for d in mine}
        _, pts = _frames(job / "images" / name)
        with av.open(str(job / "images" / name)) as c:
            base = c.streams.video[0].time_base
        for f in meta["frames"]:
            assert f["time_s"] == pytest.approx(float(pts[f["frame"]] * base), abs=1e-3)
            assert all(d["track_id"] is not None and d["type"] == "face" for d in f["detections"])
    car = json.loads((job / "metadata/carphone_pristine.mp4.json").read_text())
    assert len(car["frames"]) == 120
    assert (job / "metadata/photo.jpg.json").exists()  # photos keep their own shape
    assert "detections" in json.loads((job / "metadata/photo.jpg.json").read_text())


def test_hostile_videos_fail_with_a_cause(video_job):
    src, job, doc, images, dets = video_job
    for name in ("truncated.mp4", "truncated.mkv", "empty.mp4", "text.mp4"):
        assert (images[name]["status"], images[name]["failure_cause"]) == ("failed", "VIDEO_DEFECT"), images[name]
    assert "0 bytes" in images["empty.mp4"]["error"]
    # the frames before the damage are still anonymized and written
    assert "not a readable video" in images["text.mp4"]["error"]
    cut = images["truncated.mkv"]
    assert cut["output_url"] and 0 < cut["frames"] < 250
    frames, _ = _frames(Path(cut["output_url"]))
    assert len(frames) == cut["frames"]


def test_output_keeps_frames_timestamps_and_audio(video_job):
    src, job, doc, images, dets = video_job
    for name in ("carphone_pristine.mp4", "bikes.mp4", "audio.mp4"):
        with av.open(str(src / name)) as a, av.open(str(job / "images" / name)) as b:
            va, vb = a.streams.video[0], b.streams.video[0]
            assert (vb.codec_context.name, vb.width, vb.height) == (va.codec_context.name, va.width, va.height)
            assert vb.average_rate == va.average_rate
            assert abs(float(b.duration - a.duration)) / 1e6 < 0.05
        _, pts_in = _frames(src / name)
        _, pts_out = _frames(job / "images" / name)
        assert pts_in == pts_out  # every frame, at its own timestamp: decodes cleanly to the end
        assert decodes_cleanly(job / "images" / name) == b"", name  # FFmpeg: not a word on stderr
    with av.open(str(src / "audio.mp4")) as a, av.open(str(job / "images/audio.mp4")) as b:
        packets_in = [bytes(p) for p in a.demux(audio=0) if p.size]
        packets_out = [bytes(p) for p in b.demux(audio=0) if p.size]
        assert packets_out == packets_in  # audio copied packet for packet


def test_faces_in_the_output_are_blurred(video_job):
    """CenterFace at the job's threshold finds the carphone face in every input frame; in the
    output the face's detail (variance of the Laplacian in the box's inner half) is gone on every frame,
    and pixels far from the face stay close to the input. (The blurred head is still a head:
    CenterFace finds it at a lower score, so its count is not the test.)"""
    import cv2

    from models.catalog import load_catalog
    from models.fetch import prepared_weights
    from models.profiles import for_entries
    from operators.detect import Detector

    entry = load_catalog()["centerface"]
    det = Detector([(entry.model_dump(), prepared_weights(entry))], ["face"],
                   for_entries([entry], ["face"], {"face": FACE_THRESHOLD}).model_dump(), "cpu", 1)
    src, job, doc, images, dets = video_job
    before, _ = _frames(src / "carphone_pristine.mp4")
    after, _ = _frames(job / "images/carphone_pristine.mp4")
    assert len(before) == len(after) == 120
    found = det.detect(before[::4])
    assert all(len(d) for d in found)
    for k, d in enumerate(found):
        b = d.boxes[np.argmax(d.scores)]
        cx, cy, hw, hh = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, (b[2] - b[0]) / 4, (b[3] - b[1]) / 4
        x1, y1, x2, y2 = int(cx - hw), int(cy - hh), int(cx + hw), int(cy + hh)  # the inner half: eyes, mouth

        def detail(img, x1=x1, y1=y1, x2=x2, y2=y2):
            return cv2.Laplacian(cv2.cvtColor(img[y1:y2, x1:x2], cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()

        assert detail(after[4 * k]) < 0.25 * detail(before[4 * k]), k
    corner = np.abs(before[60][:, :30].astype(int) - after[60][:, :30].astype(int)).mean()
    assert corner < 6  # re-encoded at CRF 23, not repainted
    assert json.loads((job / "job.json").read_text())["status"] == "done"


# --- one video through operators/video.py, with a stand-in detector (no Ray, no model) ---

class _Blinking:
    """Finds one 'face' at a fixed place, except on the frames in `misses` (counted per call)."""

    def __init__(self, misses: set[int]):
        self.misses, self.calls = misses, 0

    def detect(self, images, panoramas=None, scales=None) -> list[Detections]:
        n, self.calls = self.calls, self.calls + 1
        h, w = images[0].shape[:2]
        if n in self.misses:
            return [Detections.empty()]
        return [Detections([[w * 0.25, h * 0.25, w * 0.75, h * 0.75]], [0.9], [0])]


def _plain_clip(path: Path, frames: int = 20, rotation: int = 0) -> None:
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        if rotation:
            v.set_display_rotation(rotation)
        rng = np.random.default_rng(0)
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), np.uint8), format="rgb24")
            for p in v.encode(frame):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)


@pytest.mark.parametrize("tracking", [True, False])
def test_missed_frames_are_filled_only_with_tracking(tmp_path, tracking):
    from operators.video import process_video
    from operators.video_frames import VideoOptions

    _plain_clip(tmp_path / "c.mp4", rotation=90)
    result = process_video(_Blinking({4, 5, 6}), {"source_url": str(tmp_path / "c.mp4"), "rel_path": "c.mp4",
                                                  "member": ""},
                           VideoOptions(job_root=str(tmp_path / "out"), tracking=tracking))
    assert result["status"] == "done" and result["frames"] == 20, result
    frames = {d[0] for d in result["dets"]}
    assert frames == (set(range(20)) if tracking else set(range(20)) - {4, 5, 6})
    with av.open(result["output_url"]) as c:
        assert next(c.decode(video=0)).rotation == 90  # the display rotation is kept


def test_detect_every_runs_the_detector_on_every_nth_frame(tmp_path):
    from operators.video import process_video
    from operators.video_frames import VideoOptions

    _plain_clip(tmp_path / "c.mkv")
    det = _Blinking(set())
    result = process_video(det, {"source_url": str(tmp_path / "c.mkv"), "rel_path": "c.mkv", "member": ""},
                           VideoOptions(job_root=str(tmp_path / "out"), detect_every=4))
    assert det.calls == 5 and result["frames"] == 20
    # every frame: the last pass (frame 16) holds its boxes over the 3 frames no later pass looked at
    assert {d[0] for d in result["dets"]} == set(range(20))


def test_quote_prices_videos_from_their_header(tmp_path):
    from jobs.pricing import load_pricing
    from jobs.quote import quote_items
    from operators.archives import ArchiveOptions
    from operators.sources import list_sources

    shutil.copy(clip_paths()["carphone_pristine.mp4"], tmp_path / "a.mp4")
    (tmp_path / "bad.mp4").write_text("not a video")
    quote = quote_items(list_sources([str(tmp_path)]), load_pricing(None), ["face"], ArchiveOptions())
    assert (quote["videos"], quote["unreadable"]) == (1, 1)
    assert quote["credits"] == pytest.approx(max(10.0 * 4.004 / 60, 1.0))


def test_video_on_s3_is_listed_streamed_and_written(s3_endpoint, s3fs_client, tmp_path):
    """An S3 prefix: the video is listed as `video`, read through an fsspec file object (ranged
    reads), and its output put back to S3 whole."""
    from operators.sources import list_sources
    from operators.video import process_video
    from operators.video_frames import VideoOptions

    s3fs_client.mkdir("vids")
    s3fs_client.put_file(str(clip_paths()["carphone_pristine.mp4"]), "vids/in/car.mp4")
    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    rows = list_sources(["s3://vids/in/"], opts)
    assert [(r["rel_path"], r["kind"]) for r in rows] == [("car.mp4", "video")]
    result = process_video(_Blinking(set()), rows[0] | {"member": ""},
                           VideoOptions(job_root="s3://vids/out/job", storage_options=opts))
    assert result["status"] == "done" and result["frames"] == 120, result
    assert result["output_url"] == "s3://vids/out/job/images/car.mp4"
    s3fs_client.get_file("vids/out/job/images/car.mp4", str(tmp_path / "car.mp4"))
    assert len(_frames(tmp_path / "car.mp4")[0]) == 120


def test_segments_cut_at_keyframes_and_join_to_the_same_frames(tmp_path):
    """bikes.mp4 (keyframes at 0, 1.2, 3.04, 5.48, 7.48, 9.68 s) in 2 s segments, each run on its
    own and joined by stream copy: the same frames at the same timestamps as a one-piece run,
    the same boxes, and pixels that differ by encoding noise only."""
    from operators.video import process_video
    from operators.video_frames import VideoOptions
    from operators.video_segments import join_segments, keyframe_times, plan_segments

    src = str(clip_paths()["bikes.mp4"])
    keys = keyframe_times(src)
    spans = plan_segments(keys, 10.0, 2.0)
    assert len(spans) >= 3 and all(s in keys for s, _ in spans)
    options = VideoOptions(job_root=str(tmp_path / "whole"), tracking=False)
    whole = process_video(_Blinking(set()), {"source_url": src, "rel_path": "b.mp4", "member": ""}, options)
    parts, boxes = [], 0
    for k, span in enumerate(spans):
        options = VideoOptions(job_root=str(tmp_path / f"seg{k}"), tracking=False)
        part = process_video(_Blinking(set()), {"source_url": src, "rel_path": "b.mp4", "member": "", "segment": span},
                             options)
        assert part["status"] == "done", part
        parts.append(part["output_url"])
        boxes += len(part["dets"])
    join_segments(parts, str(tmp_path / "joined.mp4"))
    a, pts_a = _frames(Path(whole["output_url"]))
    b, pts_b = _frames(tmp_path / "joined.mp4")
    assert pts_a == pts_b and len(a) == 250 and boxes == len(whole["dets"]) == 250
    diff = np.mean([np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b, strict=True)])
    assert diff < 3, diff


class _MissesAt:
    """Finds one 'face' at a fixed place on every frame of a known clip but the frames in `misses`
    (frames are told apart by their pixels, so context frames a segment decodes count right)."""

    def __init__(self, frames: list[np.ndarray], misses: set[int]):
        self.index = {hash(f.tobytes()): k for k, f in enumerate(frames)}
        self.misses = misses

    def detect(self, images, panoramas=None, scales=None) -> list[Detections]:
        h, w = images[0].shape[:2]
        if self.index[hash(images[0].tobytes())] in self.misses:
            return [Detections.empty()]
        return [Detections([[w * 0.25, h * 0.25, w * 0.75, h * 0.75]], [0.9], [0])]


def test_tracking_crosses_segment_cuts(tmp_path):
    """A face missed on the 5 frames around a cut (bikes.mp4's keyframe at 3.04 s = frame 76) is
    filled in by a whole run's tracker; the segments see the frames next to their span as context
    (detected and tracked, not written), so the segmented run boxes the same frames with the same
    boxes, and each segment decodes no further than the frames its tracker needs."""
    from operators.video import process_video
    from operators.video_frames import VideoOptions
    from operators.video_segments import keyframe_times, plan_segments

    src = str(clip_paths()["bikes.mp4"])
    frames, _ = _frames(Path(src))
    spans = plan_segments(keyframe_times(src), 10.0, 2.0)
    assert spans[1][0] == pytest.approx(3.04)  # the first cut: frame 76
    misses = {74, 75, 76, 77, 78}
    row = {"source_url": src, "rel_path": "b.mp4", "member": ""}
    whole = process_video(_MissesAt(frames, misses), row, VideoOptions(job_root=str(tmp_path / "whole")))
    assert {d[0] for d in whole["dets"]} == set(range(250))  # the gap is filled
    seg_dets, offset = [], 0
    for k, span in enumerate(spans):
        det = _MissesAt(frames, misses)
        part = process_video(det, row | {"segment": span}, VideoOptions(job_root=str(tmp_path / f"s{k}")))
        assert part["status"] == "done", part
        seg_dets += [[d[0] + offset, *d[2:]] for d in part["dets"]]
        offset += part["frames"]
    assert offset == 250
    assert seg_dets == [[d[0], *d[2:]] for d in whole["dets"]]  # frame, class, score, box, model, anonymised


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotated_video_is_detected_upright_and_boxes_land_on_stored_pixels(tmp_path, rotation):
    """A phone stores portrait video turned, with a display rotation: the detector sees the frames
    upright (CenterFace finds the carphone face on every frame), and the boxes are mapped back to
    the stored (turned) pixels."""
    from models.catalog import load_catalog
    from models.fetch import prepared_weights
    from models.profiles import for_entries
    from operators.detect import Detector
    from operators.video import process_video
    from operators.video_frames import VideoOptions

    entry = load_catalog()["centerface"]
    det = Detector([(entry.model_dump(), prepared_weights(entry))], ["face"],
                   for_entries([entry], ["face"], {"face": FACE_THRESHOLD}).model_dump(), "cpu", 1)
    frames, _ = _frames(clip_paths()["carphone_pristine.mp4"])
    k = -1 if rotation == 90 else 1  # stored turned so that the display rotation turns it back
    with av.open(str(tmp_path / "r.mp4"), "w") as out:
        v = out.add_stream("libx264", rate=30)
        v.width, v.height, v.pix_fmt = 144, 176, "yuv420p"
        v.set_display_rotation(rotation)
        for f in frames[:30]:
            for p in v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(f, k)), format="rgb24")):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
    result = process_video(det, {"source_url": str(tmp_path / "r.mp4"), "rel_path": "r.mp4", "member": ""},
                           VideoOptions(job_root=str(tmp_path / "out"), tracking=False))
    assert result["info"]["rotation"] == rotation and {d[0] for d in result["dets"]} == set(range(30))
    x1, y1, x2, y2 = result["dets"][0][4:8]
    upright = [65, 35, 113, 97]  # the face in carphone's own pixels (176 x 144)
    expected = [144 - upright[3], upright[0], 144 - upright[1], upright[2]] if rotation == 90 else \
        [upright[1], 176 - upright[2], upright[3], 176 - upright[0]]
    assert np.abs(np.array([x1, y1, x2, y2]) - expected).max() < 6, ([x1, y1, x2, y2], expected)
    with av.open(result["output_url"]) as c:
        assert next(c.decode(video=0)).rotation % 360 == rotation


def test_driver_killed_mid_video_then_resume_writes_the_video_once(tmp_path):
    """kill -9 of a `veil run` (its driver and its own local Ray) while a segmented video's first
    segments are written; the rerun of the job id finishes with one row and one whole output."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from collections import Counter

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(clip_paths()["bikes.mp4"], src / "bikes.mp4")
    shutil.copy(clip_paths()["carphone_pristine.mp4"], src / "car.mp4")
    args = [sys.executable, "-m", "jobs.cli", "run", str(src), str(out), "--job-id", "k", "--face",
            "--detect-models", "centerface-int8", "--video-segment-seconds", "3"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, killed with it
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not [p for p in (out / "k" / "segments").rglob("*") if p.is_file()]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # a segment written, the video not joined yet
        proc.wait(60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (out / "k" / "images" / "bikes.mp4").exists()
    time.sleep(3)  # workers of the killed Ray may outlive it by ~2 s
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    rows = pq.read_table(out / "k" / "manifest" / "images").to_pylist()
    assert Counter(r["rel_path"] for r in rows) == {"bikes.mp4": 1, "car.mp4": 1}, rows
    bikes = next(r for r in rows if r["rel_path"] == "bikes.mp4")
    assert bikes["status"] == "done" and bikes["frames"] == 250
    with av.open(str(out / "k" / "images" / "bikes.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 250
    assert not [p for p in (out / "k" / "segments").rglob("*") if p.is_file()]
    assert json.loads((out / "k" / "job.json").read_text())["totals"]["done"] == 2


class _Recording:
    """Finds nothing; records the `panoramas` flags the video path asks for."""

    format = "auto"

    def __init__(self):
        self.panoramas: list[bool] = []

    def detect(self, images, panoramas=None, scales=None) -> list[Detections]:
        self.panoramas += list(panoramas or [])
        return [Detections.empty() for _ in images]


@pytest.mark.parametrize("size, panorama", [((1920, 960), True), ((1920, 1080), False), ((1280, 640), False)])
def test_360_video_frames_get_the_panorama_seam_handling(tmp_path, size, panorama):
    from operators.video import process_video
    from operators.video_frames import VideoOptions

    w, h = size
    with av.open(str(tmp_path / "c.mp4"), "w") as out:
        v = out.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        for p in [*v.encode(av.VideoFrame.from_ndarray(np.zeros((h, w, 3), np.uint8), format="rgb24")),
                  *v.encode(None)]:
            out.mux(p)
    det = _Recording()
    result = process_video(det, {"source_url": str(tmp_path / "c.mp4"), "rel_path": "c.mp4", "member": ""},
                           VideoOptions(job_root=str(tmp_path / "out"), tracking=False))
    assert result["status"] == "done" and det.panoramas == [panorama]
