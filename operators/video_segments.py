"""Long videos in segments: cut points at keyframes, and the segments joined by stream copy.

A segment is [start, end) seconds of the source, both keyframe times, so each segment decodes on
its own (operators/video.py seeks to `start` and keeps the frames and audio packets inside the
span) and is encoded without B-frames, so the segments' packets can follow each other in one
file with their own timestamps (no re-encoding when joining). Tracking does not cross a cut:
a face missed on the frames next to a cut is not filled in from the other side.

Status: the pieces, tested alone (tests/test_video.py); the pipeline does not yet split videos
into segment rows (that needs a join step once a video's last segment is written).
"""

from __future__ import annotations

import av

from operators.video_io import open_container, open_source


def keyframe_times(source_url: str, storage_options: dict | None = None, data: bytes | None = None) -> list[float]:
    """Presentation times (s) of the video stream's keyframes, from packets (no frame decoded;
    an MP4 reads its index, other containers are read through)."""
    with open_source(source_url, storage_options, data) as f, open_container(f) as container:
        v = container.streams.video[0]
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
