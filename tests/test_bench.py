"""`veil bench` produces every figure it promises (speed itself is measured by hand, not asserted)."""

from __future__ import annotations

import json

from jobs.bench import format_bench, run_bench


def test_bench_reports_all_runs(photos, ray_local, tmp_path, shared_dir, eval_annotations):
    folder, chosen = photos("faces", 2)
    labels = tmp_path / "labels.json"  # ground truth of the two photos: the bench scores what it found
    labels.write_text(json.dumps({"images": chosen}))
    empty = tmp_path / "empty"  # COCO photos with no person or vehicle: nothing to anonymize
    empty.mkdir()
    for im in [im for im in eval_annotations("coco")["images"] if not im["boxes"]][:2]:
        (empty / im["file"].split("/")[-1]).write_bytes((shared_dir / "eval/coco" / im["file"]).read_bytes())
    result = run_bench(str(folder), {"face": True}, str(tmp_path / "bench.json"), peer=False, repeat=2,
                       pass_through_dir=str(empty), labels=str(labels))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ratios"] == result["ratios"]
    for run in ("pipeline", "bare", "codec"):
        assert result[run]["img_s"] > 0
    assert result["pipeline"]["detections"]["face"] >= 10
    assert result["pipeline"]["peak_rss_mb"]["total"] > 0
    assert set(result["pipeline"]["stage_ms_per_item"]) >= {"t_decode_ms", "t_detect_ms", "t_write_ms"}
    assert "pipeline/bare" in format_bench(result) and "pass-through/full" in format_bench(result)
    assert result["pipeline"]["items"] == 4 and result["pass_through"]["items"] == 4  # --repeat 2
    assert result["ratios"]["pass_through_write_stage_speedup"] > 1
    face = result["quality"]["pipeline"]["face"]  # faces/ photos: every labelled face is found (README)
    assert face["boxes"] == sum(len(im["boxes"]) for im in chosen) and face["recall"] >= 0.9
    assert "recall" in format_bench(result) and "_found" not in saved["pipeline"]


def test_bench_on_a_video_reports_frames_per_second_and_stages(ray_local, tmp_path):
    """`veil bench VIDEO`: the job end to end, the bare loop with its time per stage, the codec
    floor (deface is left out here: its speed is measured by hand, README "Video")."""
    from video_media import clip_paths

    from jobs.bench_video import format_video_bench, run_video_bench

    clip = str(clip_paths()["carphone_pristine.mp4"])
    result = run_video_bench(clip, {"face": True, "detect_models": ["centerface"]}, str(tmp_path / "b.json"),
                             peer=False)
    assert json.loads((tmp_path / "b.json").read_text())["ratios"] == result["ratios"]
    assert result["pipeline"]["status"] == result["bare"]["status"] == "done"
    assert result["pipeline"]["frames"] == result["bare"]["frames"] == 120
    assert all(result[run]["fps"] > 0 for run in ("pipeline", "bare", "codec"))
    stages = result["bare"]["stage_ms_per_frame"]
    assert set(stages) == {"decode", "detect", "track", "blur", "encode"} and stages["detect"] > 0
    assert result["bare"]["bound_by"] in stages and "bound by" in format_video_bench(result)
