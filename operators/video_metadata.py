"""A video's metadata JSON (`--save-metadata`, method `detect`): the photos' Celantur-style
document, with the boxes grouped per frame.

A photo's `metadata/<rel>.json` has `file`, `source`, `width`, `height` and `detections` (id,
type, detail, score, bbox, is_anonymised, model). A video's has the same header plus
`frame_count`, `fps`, `duration_s`, and `frames`: one entry per frame with boxes (frame index,
its presentation time in seconds, and its detections in the photos' shape plus `track_id`).
Frames with no box have no entry. Masks are not made for videos (the boxes per frame are here).
"""

from __future__ import annotations


def video_metadata(row: dict, image_row: dict, det_rows: list[dict], times: list[list[float]]) -> dict:
    """The document for a video: `det_rows` are its manifest detection rows (operators/video.py
    manifest_rows), `times` [frame, seconds] pairs of the frames that have boxes."""
    at = {int(frame): float(t) for frame, t in times if t is not None}
    fps = image_row.get("fps") or 0.0
    frames: dict[int, list[dict]] = {}
    for d in det_rows:
        entries = frames.setdefault(int(d["frame"]), [])
        entries.append({
            "id": len(entries),  # per frame, as a photo's ids
            "type": d["class"],
            "detail": d["detail"],
            "score": round(float(d["score"]), 4),
            "bbox": {"topLeftX": round(d["x1"], 1), "topLeftY": round(d["y1"], 1),
                     "width": round(d["x2"] - d["x1"], 1), "height": round(d["y2"] - d["y1"], 1)},
            "is_anonymised": bool(d["is_anonymised"]),
            "model": d["model"],
            "track_id": d["track_id"],
        })
    return {
        "file": str(row["rel_path"]),
        "source": str(row["source_url"]) + (f"#{row['member']}" if row["member"] else ""),
        "width": int(image_row["width"]),
        "height": int(image_row["height"]),
        "frame_count": int(image_row["frames"] or 0),
        "fps": fps,
        "duration_s": image_row.get("duration_s"),
        "frames": [
            # a frame the decoder gave no time (rare) gets index / fps
            {"frame": k, "time_s": at.get(k, round(k / fps, 4) if fps else None), "detections": dets}
            for k, dets in sorted(frames.items())
        ],
    }
