"""Job lifecycle on a local Ray: budget cap, approval, webhooks, report, list, delete."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
import ray

from jobs.cli import EXIT_AWAITING_APPROVAL, main
from jobs.pipeline import MIN_TASK_CPUS, RemoteLedger, cpu_actors, expected_items
from jobs.run import run_job
from jobs.spec import build_spec


@pytest.fixture
def hook_server():
    """A real HTTP server on 127.0.0.1 that answers with the given codes in turn (then 200)."""
    seen: list[dict] = []
    codes: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 -- http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"headers": dict(self.headers), "doc": json.loads(body)})
            self.send_response(codes.pop(0) if codes else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", seen, codes
    server.shutdown()


def test_cpu_jobs_get_one_single_threaded_actor_per_cpu_within_memory():
    gib = 2**30
    assert cpu_actors(2, 2, 20 * gib, gib) == (2, 1, 0.0)  # a laptop: actors share the cores with the tasks
    assert cpu_actors(16, 16, 100 * gib, gib) == (16, 1, 0.75)  # 4 CPUs stay free for the tasks
    assert cpu_actors(16, 16, 10 * gib, 2 * gib) == (4, 4, 3.0)  # memory holds 4 actors, 4 threads each
    assert cpu_actors(8, 8, 100 * gib, gib, detect_actors=1) == (1, 8, 5.0)  # one actor: every thread
    assert cpu_actors(16, 16, 100 * gib, gib, batches=1) == (1, 16, 12.0)  # a 6-image job: one actor
    for cpus in range(1, 130):
        actors, threads, each = cpu_actors(cpus, cpus, 1000 * gib, gib)
        assert actors == cpus and threads == 1
        for n in (None, 1, 2, 3, 5, 7):
            actors, threads, each = cpu_actors(cpus, cpus, 1000 * gib, gib, detect_actors=n)
            assert actors * each <= max(0, cpus - MIN_TASK_CPUS), cpus  # the tasks always get their CPUs
            assert each < 1 or each == int(each), each  # Ray refuses fractions above 1


def test_expected_items_count_files_and_estimate_archives():
    files = [{"kind": "image", "size": 10**6}] * 3 + [{"kind": "other", "size": 5}]
    assert expected_items(files) == 4
    archives = [{"kind": "archive", "size": 2 * 10**9}, {"kind": "archive", "size": 0}]
    assert expected_items(files + archives) == 4 + 7629 + 1  # 2 GB over 256 KiB; an empty one counts 1


def test_the_ledger_cap_holds_for_parallel_ray_tasks(ray_local):
    ledger = RemoteLedger(cap=50.0, charged=10.0)

    @ray.remote(num_cpus=1)
    def spend(n: int) -> int:
        return sum(sum(ledger.reserve([(f"{n}-{i}", 0.3)])) for i in range(100))

    granted = sum(ray.get([spend.remote(n) for n in range(2)]))
    assert granted == 133 and ledger.state()["reserved"] <= 50.0  # floor(40 / 0.3)


def test_max_credits_is_never_exceeded_by_a_job(ray_local, photos, tmp_path):
    src, _ = photos("faces", 4)
    for p in list(src.iterdir()):  # 8 images, one credit each
        (src / f"copy-{p.name}").write_bytes(p.read_bytes())
    spec = build_spec({"inputs": [str(src)], "output": str(tmp_path / "out"), "job_id": "capped",
                       "max_credits": 3.5, "face": True})
    doc = run_job(spec, log=lambda *_: None)
    rows = pq.read_table(tmp_path / "out/capped/manifest/images").to_pylist()
    done = [r for r in rows if r["status"] == "done"]
    assert len(done) == 3 and sum(r["credits"] for r in rows) == 3.0
    assert sorted(r["failure_cause"] for r in rows if r["status"] == "skipped") == ["BUDGET_EXCEEDED"] * 5
    assert doc["status"] == "done" and "max-credits" in doc["description"] and doc["credits"]["total"] == 3.0
    assert not any((tmp_path / "out/capped/images" / r["rel_path"]).exists() for r in rows if r["status"] != "done")


def test_quote_approve_webhook_report_list_delete(ray_local, photos, tmp_path, hook_server, capsys):
    url, seen, codes = hook_server
    src, _ = photos("faces", 3)
    out = tmp_path / "out"
    codes.extend([500])  # the first post fails: the webhook retries
    secret = "Bearer s3cr3t-value"
    common = ["--face", "--webhook", url, "--web-auth-header-name", "X-Token", "--web-auth-header-value", secret]
    assert main(["run", str(src), str(out), "--job-id", "big", "--auto-approve-below", "2", *common]) == \
        EXIT_AWAITING_APPROVAL
    printed = capsys.readouterr().out
    assert "awaiting approval" in printed and "total" in printed
    doc = json.loads((out / "big/job.json").read_text())
    assert doc["status"] == "awaiting_approval" and doc["quote"]["credits"] == 3.0
    assert not (out / "big/manifest").exists()  # nothing ran
    assert [s["doc"]["status"] for s in seen] == ["awaiting_approval"] * 2  # 500, then sent
    assert all(s["headers"]["X-Token"] == secret for s in seen)
    assert doc["webhook"]["status"] == "sent" and doc["webhook"]["events"][0]["attempts"] == 2

    assert main(["approve", "big", "--output", str(out), "--web-auth-header-value", secret]) == 0
    doc = json.loads((out / "big/job.json").read_text())
    assert doc["status"] == "done" and doc["credits"]["total"] == 3.0 and doc["totals"]["done"] == 3
    assert doc["cost"]["cpu_s"] > 0 and doc["cost"]["per_1000_images"] > 0 and doc["approved_at"]
    assert all(doc["totals"]["cpu_s_by_stage"][k] > 0 for k in ("prepare", "detect", "write"))
    assert seen[-1]["doc"]["status"] == "done" and seen[-1]["doc"]["credits"]["total"] == 3.0
    stored = (out / "big/job.json").read_text()
    assert secret not in stored and "s3cr3t" not in stored and "s3cr3t" not in capsys.readouterr().out

    capsys.readouterr()
    assert main(["report", "big", "--output", str(out), "--format", "syntonym"]) == 0
    shaped = json.loads(capsys.readouterr().out)
    assert shaped["job_status"] == "done" and shaped["job_total_credit_cost"] == 3.0
    assert len(shaped["tasks"]) == 3 and all(t["output_location"] and t["credit_cost"] == 1.0
                                             for t in shaped["tasks"])

    html = tmp_path / "report.html"  # the analytics charts for people who do not open notebooks
    assert main(["report", "big", "--output", str(out), "--html", str(html)]) == 0
    assert html.read_text().count("data:image/png;base64,") >= 3

    for name in ("q1", "q2"):  # two more jobs, created by quote, to page through
        assert main(["quote", str(src), "--output", str(out), "--job-id", name, "--face"]) == 0
    capsys.readouterr()
    assert main(["list", "--output", str(out), "--limit", "2", "--page", "2"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (listed["total_item_count"], listed["total_page_count"], len(listed["items"])) == (3, 2, 1)

    assert main(["delete", "big", "--output", str(out), "--keep-manifest"]) == 0
    assert not (out / "big/images").exists() and (out / "big/manifest/images").is_dir()
    assert json.loads((out / "big/job.json").read_text())["status"] == "deleted"
    assert main(["run", str(src), str(out), "--job-id", "big", "--face"]) == 2  # a deleted id is not reused
