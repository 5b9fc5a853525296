"""Pricing, the credit ledger and resume bookkeeping, without Ray."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.pricing import PricingError, load_pricing
from operators.budget import Billing, CreditLedger
from operators.manifest import DETECTIONS_SCHEMA, IMAGES_SCHEMA, write_part
from operators.prepare import charge
from operators.resume import resume_state


def test_default_table_and_overrides(tmp_path):
    default = load_pricing()
    assert default.item_credits(4000, 3000, ["face"]) == 1.0
    table = tmp_path / "p.yaml"
    table.write_text("credits_per_megapixel: 0.5\ncredits_per_class: {person: 2}\nminimum_per_job: 10\n")
    p = load_pricing(str(table))
    assert p.item_credits(4000, 3000, ["face", "person"]) == pytest.approx(1 + 6 + 2)
    assert p.job_credits(3.0) == 10 and p.job_credits(12.5) == 12.5 and p.job_credits(0.0) == 0.0
    tiers = tmp_path / "t.json"
    tiers.write_text('{"credits_per_image": 0, "size_tiers": [{"max_megapixels": 2, "credits": 1},'
                     ' {"max_megapixels": 30, "credits": 3}]}')
    t = load_pricing(str(tiers))
    sizes = [(1600, 1200), (8000, 4000), (16000, 8000)]  # 1.9 MP, 32 MP (over the last tier), 128 MP
    assert [t.item_credits(w, h, []) for w, h in sizes] == [1, 3, 3]
    cost = default.compute_cost(cpu_s=3600, gpu_s=1800, images=1000)
    assert cost["total"] == pytest.approx(0.048 + 0.6) and cost["per_1000_images"] == pytest.approx(0.648)


@pytest.mark.parametrize(
    "text, field",
    [
        ("credits_per_image: -1\n", "credits_per_image"),
        ("credits_per_imge: 1\n", "credits_per_imge"),
        ("credits_per_class: {cat: 1}\n", "credits_per_class"),
        ("size_tiers: [{max_megapixels: 5, credits: 1}, {max_megapixels: 2, credits: 2}]\n", "size_tiers"),
        ("cpu_hour_price: lots\n", "cpu_hour_price"),
        ("- just a list\n", "mapping"),
    ],
)
def test_bad_pricing_file_is_refused_with_the_field_name(tmp_path, capsys, text, field):
    bad = tmp_path / "pricing.yaml"
    bad.write_text(text)
    with pytest.raises(PricingError, match=field):
        load_pricing(str(bad))
    # and the CLI refuses it before listing or starting anything
    assert main(["quote", str(tmp_path / "missing-input"), "--pricing", str(bad)]) == 2
    assert field in capsys.readouterr().err


def test_ledger_cap_holds_under_concurrent_reservations():
    ledger = CreditLedger(cap=100.0)
    granted = []

    def worker(n: int) -> None:
        for i in range(200):
            granted.extend(ok for ok in ledger.reserve([(f"{n}-{i}", 0.7)]) if ok)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 142 and ledger.reserved <= 100.0 + 1e-9  # floor(100 / 0.7)
    ledger.release([("x", 0.7)] * 2)
    assert ledger.reserve([("y", 1.4)]) == [True]
    assert CreditLedger(cap=5, charged=4.5).reserve([("a", 1.0), ("b", 0.5)]) == [False, True]


def test_charge_prices_pending_items_and_skips_what_the_cap_refuses():
    out = {"status": ["pending", "failed", "pending", "pending"], "width": [1000, 0, 2000, 1000],
           "height": [1000, 0, 1000, 1000], "credits": [0.0] * 4, "failure_cause": ["", "IMAGE_DEFECT", "", ""],
           "error": [""] * 4, "data": [b"x"] * 4, "det": [b"y"] * 4}
    pricing = load_pricing()
    pricing.credits_per_megapixel = 1.0
    charge(out, ["a", "b", "c", "d"], Billing(pricing, ["face"], CreditLedger(cap=4.5)))
    # a: 1 + 1 MP = 2 granted; c: 1 + 2 MP = 3 would make 5 > 4.5, refused; d: 2 more makes 4, granted
    assert out["status"] == ["pending", "failed", "skipped", "pending"]
    assert out["failure_cause"][2] == "BUDGET_EXCEEDED" and out["credits"] == [2.0, 0.0, 0.0, 2.0]
    assert out["data"][2] == b"" and out["det"][2] == b""


def _row(item: str, status: str, cause: str | None, credits: float, at: datetime) -> dict:
    return {"job_id": "j", "item_id": item, "source_url": f"/in/{item}.jpg", "member": "", "rel_path": f"{item}.jpg",
            "status": status, "failure_cause": cause, "credits": credits, "width": 10, "height": 10,
            "processed_at": at}


def test_resume_state_compacts_the_manifest_of_a_killed_job(tmp_path):
    root = str(tmp_path / "j")
    t0 = datetime(2026, 11, 25, tzinfo=timezone.utc)
    later = t0 + timedelta(seconds=5)
    # part 1: a done item, a failed one, one refused by the budget; part 2: a duplicate row of `a`
    # (the same item written twice) and its detections; part 3: detections whose images part is missing
    write_part(root, "images", [_row("a", "done", None, 1.0, t0), _row("b", "failed", "IMAGE_DEFECT", 0.0, t0),
                                _row("c", "skipped", "BUDGET_EXCEEDED", 0.0, t0)], IMAGES_SCHEMA, part="part-1.parquet")
    write_part(root, "detections", [{"job_id": "j", "item_id": "a", "det_id": 0, "class": "face"}],
               DETECTIONS_SCHEMA, part="part-1.parquet")
    write_part(root, "images", [_row("a", "done", None, 1.0, later), _row("d", "done", None, 1.0, later)],
               IMAGES_SCHEMA, part="part-2.parquet")
    write_part(root, "detections", [{"job_id": "j", "item_id": "a", "det_id": 0, "class": "face"},
                                    {"job_id": "j", "item_id": "d", "det_id": 0, "class": "face"}],
               DETECTIONS_SCHEMA, part="part-2.parquet")
    write_part(root, "detections", [{"job_id": "j", "item_id": "e", "det_id": 0, "class": "face"}],
               DETECTIONS_SCHEMA, part="part-3.parquet")

    state = resume_state(root, retry_failed=False)
    assert state.finished == {"a", "b", "d"} and state.charged == 2.0
    images = pq.read_table(tmp_path / "j/manifest/images").to_pylist()
    assert sorted((r["item_id"], r["status"]) for r in images) == [("a", "done"), ("b", "failed"), ("d", "done")]
    dets = pq.read_table(tmp_path / "j/manifest/detections").to_pylist()
    assert sorted(r["item_id"] for r in dets) == ["a", "d"]  # one set per done item, the orphan gone
    assert not (tmp_path / "j/manifest/detections/part-3.parquet").exists()

    again = resume_state(root, retry_failed=True)  # failed items are redone only when asked
    assert again.finished == {"a", "d"} and again.charged == 2.0
    assert sorted(r["item_id"] for r in pq.read_table(tmp_path / "j/manifest/images").to_pylist()) == ["a", "d"]
