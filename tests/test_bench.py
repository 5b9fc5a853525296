"""`veil bench` produces every figure it promises (speed itself is measured by hand, not asserted)."""

from __future__ import annotations

import json

from jobs.bench import format_bench, run_bench


def test_bench_reports_all_runs(photos, ray_local, tmp_path):
    folder, _ = photos("faces", 4)
    result = run_bench(str(folder), {"face": True}, str(tmp_path / "bench.json"), peer=False)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ratios"] == result["ratios"]
    for run in ("pipeline", "bare", "codec"):
        assert result[run]["img_s"] > 0
    assert result["pipeline"]["detections"]["face"] >= 10
    assert result["pipeline"]["peak_rss_mb"]["total"] > 0
    assert set(result["pipeline"]["stage_ms_per_item"]) >= {"t_decode_ms", "t_detect_ms", "t_write_ms"}
    assert "pipeline/bare" in format_bench(result)
