"""`veil serve --ray-address`: Syntonym jobs run as `veil run` on a real Ray cluster (conftest's `ray_head`,
through its Jobs API), with two replicas on one storage; a cluster that cannot be reached; and image
tasks that a stopped replica left queued, taken up by the next one.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import serve_helpers
from serve_helpers import face_and_rest_diff, free_port, running, signin, wait_done, wait_for, write_users, zip_of

from jobs.api.ray_jobs import service_spec
from jobs.api.service import ServiceConfig
from jobs.api.syntonym import ModelConfig, spec_fields
from jobs.cli import build_parser
from jobs.cli import spec_fields as cli_fields
from jobs.spec import build_spec
from jobs.submit import entrypoint, ray_job_info
from operators.manifest import read_table
from operators.resume import latest_rows

face_photo = serve_helpers.face_photo  # fixtures, found by pytest under their own names
webhook_receiver = serve_helpers.webhook_receiver

VEIL = [sys.executable, "-m", "jobs.cli"]
DAVE = "key-dave-0123456789abcdef"
FRED = "key-fred-0123456789abcdef"


@contextmanager
def veil_serve(log: Path, *args: str) -> Iterator[str]:
    """`veil serve ARGS` on a free port, as a user starts it; its output goes to `log`. Stopped on exit."""
    port = free_port()
    # Ray's client takes RAY_ADDRESS over --ray-address: the flag under test must be the only address
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    with open(log, "w") as out:
        proc = subprocess.Popen([*VEIL, "serve", "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def syntonym(base: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"{base}/syntonym", headers={"x-api-key": key}, timeout=120)


def test_syntonym_job_runs_on_ray_and_is_settled_once_by_either_replica(ray_head, tmp_path, photos,
                                                                        webhook_receiver):
    folder, chosen = photos("faces", 3)
    storage = tmp_path / "storage"
    users = write_users(tmp_path / "users.yaml", {DAVE: {"user": "dave", "credits": 10}})
    hook_url, received = webhook_receiver
    common = ["--storage", str(storage), "--users", str(users), "--warm", "", "--webhook-host", "127.0.0.1",
              "--ray-address", ray_head, "--requeue-after", "30"]
    with (veil_serve(tmp_path / "a.log", *common) as a, veil_serve(tmp_path / "b.log", *common) as b,
          syntonym(a, DAVE) as on_a, syntonym(b, DAVE) as on_b):
        session = on_a.post("/create_upload_session", json={"file_names": ["street.zip"],
                                                            "model_config": {"blur_threshold": 0.2}})
        assert session.status_code == 200, session.text
        job_id, (target,) = session.json()["job_id"], session.json()["upload_urls"]
        # the callback is registered on one replica, the job submitted by the other
        assert on_b.post("/notify_on_job_status", json={"job_id": job_id, "callback_url": hook_url + "/done"}
                         ).json()["registered"]
        quoted = httpx.put(target["upload_url"], content=zip_of(folder, chosen), timeout=60)
        assert quoted.status_code == 200 and quoted.json()["job_status"] == "awaiting_approval", quoted.text
        assert quoted.json()["job_quoted_credit_cost"] == 3.0

        approved = on_a.post(f"/approve_job/{job_id}")
        assert approved.status_code == 200 and approved.json()["job_status"] == "queued", approved.text
        assert on_b.post(f"/approve_job/{job_id}").status_code == 202
        info = ray_job_info(ray_head, job_id)  # a real veil job on the cluster, found by its job id
        assert info["submission_id"] == f"veil-{job_id}" and info["metadata"]["veil_job_id"] == job_id

        result = wait_for(lambda: on_b.get(f"/get_job_result/{job_id}").json(),
                          lambda d: d["job_status"] in ("done", "failed", "cancelled"), timeout=240, every=1.0)
        assert result["job_status"] == "done", (result, (tmp_path / "a.log").read_text()[-3000:])
        ended = wait_for(lambda: ray_job_info(ray_head, job_id), lambda i: i["status"] not in ("PENDING", "RUNNING"),
                         timeout=60, every=0.5)  # its driver exits a moment after it wrote job.json done
        assert ended["status"] == "SUCCEEDED", ended
        doc = json.loads((storage / "jobs" / job_id / "job.json").read_text())
        assert "resources" in doc and doc["totals"]["done"] == 3  # run_job's own report: it ran as `veil run`

        tasks = {t["file_name"]: t for t in result["tasks"]}
        assert tasks["street.zip/cam/readme.txt"]["task_status"] == "skipped"
        for im in chosen:
            task = tasks[f"street.zip/cam/{Path(im['file']).name}"]
            assert task["task_status"] == "done" and task["credit_cost"] == 1.0
            got = httpx.get(task["download_url"])
            assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
            faces, rest = face_and_rest_diff((folder / Path(im["file"]).name).read_bytes(), got.content, im["boxes"])
            assert faces > 2 * rest, im["file"]
        rows = latest_rows(read_table(str(storage / "jobs" / job_id), "images")).to_pylist()
        assert sorted((r["rel_path"], r["status"], r["credits"] if r["status"] == "done" else 0.0) for r in rows) == \
            sorted([(f"street.zip/cam/{Path(im['file']).name}", "done", 1.0) for im in chosen]
                   + [("street.zip/cam/readme.txt", "skipped", 0.0)])

        # charged once, whoever asks and however often
        for client in (on_a, on_b, on_a, on_b):
            assert client.get(f"/get_job_result/{job_id}").json()["job_total_credit_cost"] == 3.0
            assert client.post(f"/approve_job/{job_id}").status_code == 202
        for client in (on_a, on_b):
            assert client.get("/get_credit_balance").json() == {"credits": 10.0, "used": 3.0, "reserved": 0.0,
                                                                 "available": 7.0}
        (entry,) = storage.glob(f"credits/*/{job_id}.json")
        assert json.loads(entry.read_text())["state"] == "charged"
        assert [p.name for p in (storage / "jobs" / job_id).glob("settled-*")] == ["settled-1"]

        hooks = wait_for(lambda: list(received), lambda r: len(r) >= 1, timeout=30)
        time.sleep(5)  # two watcher rounds of each replica: nobody calls back a second time
        assert len(received) == 1, received
        assert hooks[0]["path"] == "/done" and hooks[0]["body"]["job_id"] == job_id
        assert hooks[0]["body"]["job_status"] == "done" and hooks[0]["body"]["job_total_credit_cost"] == 3.0
        assert len(hooks[0]["body"]["tasks"]) == 4

        deleted = on_b.delete(f"/delete_job/{job_id}")
        assert deleted.status_code == 200 and deleted.json()["job_status"] == "deleted"
        assert on_a.get(f"/get_job_result/{job_id}").json()["job_status"] == "deleted"
        assert on_a.get("/get_credit_balance").json()["used"] == 3.0
    assert "POST /syntonym/approve_job" in (tmp_path / "a.log").read_text()  # the access log of the real CLI


def test_ray_job_stopped_ends_cancelled_uncharged_and_approve_resumes_it(ray_head, tmp_path, photos):
    from ray.job_submission import JobSubmissionClient

    folder, chosen = photos("faces", 2)
    storage = tmp_path / "storage"
    users = write_users(tmp_path / "users.yaml", {DAVE: {"user": "dave", "credits": 10}})
    config = ServiceConfig(storage=str(storage), users_file=str(users), ray_address=ray_head)
    with running(config) as url, syntonym(url, DAVE) as dave:
        job = dave.post("/create_upload_session", json={"file_names": ["two.zip"]}).json()
        job_id = job["job_id"]
        httpx.put(job["upload_urls"][0]["upload_url"], content=zip_of(folder, chosen)).raise_for_status()
        assert dave.post(f"/approve_job/{job_id}").status_code == 200
        # stopped at once: usually before its driver wrote anything, so the service ends it from Ray's status
        JobSubmissionClient(ray_head).stop_job(f"veil-{job_id}")
        stopped = wait_for(lambda: dave.get(f"/get_job_result/{job_id}").json(),
                           lambda d: d["job_status"] in ("done", "failed", "cancelled"), timeout=120, every=0.5)
        assert stopped["job_status"] == "cancelled", stopped
        assert dave.get("/get_credit_balance").json()["reserved"] == 2.0  # kept for the resume, nothing charged

        assert dave.post(f"/approve_job/{job_id}").status_code == 200  # resumed: attempt 2, a new Ray job
        result = wait_for(lambda: dave.get(f"/get_job_result/{job_id}").json(),
                          lambda d: d["job_status"] in ("done", "failed", "cancelled"), timeout=180, every=1.0)
        info = ray_job_info(ray_head, job_id)
        assert result["job_status"] == "done" and result["job_total_credit_cost"] == 2.0, (
            result["job_status_description"], info["message"],
            JobSubmissionClient(ray_head).get_job_logs(info["submission_id"])[-3000:])
        assert dave.get("/get_credit_balance").json() == {"credits": 10.0, "used": 2.0, "reserved": 0.0,
                                                          "available": 8.0}
    record = json.loads((storage / "jobs" / job_id / "ray.json").read_text())
    assert record["attempt"] == 2 and record["submission_id"] == f"veil-{job_id}-2"
    assert sorted(p.name for p in (storage / "jobs" / job_id).glob("settled-*")) == ["settled-1", "settled-2"]


def test_unreachable_cluster_leaves_the_job_failed_and_its_reservation_kept(tmp_path, face_photo, webhook_receiver):
    data, _ = face_photo
    hook_url, received = webhook_receiver
    users = write_users(tmp_path / "users.yaml", {FRED: {"user": "fred", "credits": 10, "auto_approve_below": 5}})
    config = ServiceConfig(storage=str(tmp_path / "storage"), users_file=str(users), webhook_hosts=("127.0.0.1",),
                           ray_address=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with running(config) as url, syntonym(url, FRED) as fred:
        job = fred.post("/direct_upload/street.jpg", content=data).json()  # auto-approved: submitted at once
        assert job["job_status"] == "failed" and "not submitted to the Ray cluster" in job["job_status_description"]
        fred.post("/notify_on_job_status", json={"job_id": job["job_id"], "callback_url": hook_url})
        assert fred.get("/get_credit_balance").json() == {"credits": 10.0, "used": 0.0, "reserved": 1.0,
                                                          "available": 9.0}
        again = fred.post(f"/approve_job/{job['job_id']}")  # tries again: still refused, still reserved once
        assert again.status_code == 200 and again.json()["job_status"] == "failed"
        assert fred.get("/get_credit_balance").json()["reserved"] == 1.0
        hooks = wait_for(lambda: list(received), lambda r: len(r) >= 1, timeout=30)
        assert hooks[0]["body"]["job_status"] == "failed"


def test_the_submitted_command_makes_the_same_spec_through_veil_runs_parser():
    fields = spec_fields("blur", ModelConfig(enable_lp=True, blur_threshold=0.3, slicing=True, mask_blur=0.5))
    options = {"endpoint_url": "http://127.0.0.1:9000", "key": "k", "client_kwargs": {"region_name": "us-east-1"},
               "anon": False}
    spec = build_spec({**fields, "inputs": ["s3://b/uploads/j"], "output": "s3://b/jobs", "job_id": "a" * 32,
                       "storage_options": options})
    command = shlex.split(entrypoint(service_spec(spec, ServiceConfig(max_pixels=10**6)), {"approve": True}))
    assert command[:4] == ["python", "-m", "jobs.cli", "run"] and "--approve" in command  # what the driver runs
    args = build_parser().parse_args(command[3:])
    assert args.approve and args.job_id == spec.job_id and args.paths == [*spec.inputs, spec.output]
    again = build_spec(cli_fields(args, args.paths[:-1], args.paths[-1]))
    assert again.model_dump() == {**spec.model_dump(), "max_pixels": 10**6}  # the service's tighter limit


def test_tasks_left_queued_by_a_stopped_replica_are_requeued_by_the_next(tmp_path, face_photo):
    data, ann = face_photo
    storage = tmp_path / "storage"
    config = ServiceConfig(storage=str(storage), users_file=str(write_users(tmp_path / "users.yaml")), workers=1,
                           warm_classes=("face",), requeue_after_s=1)

    def status(task_id: str) -> str:
        return json.loads((storage / "tasks" / task_id / "task.json").read_text())["task_status"]

    with running(config) as url:
        headers = {"Authorization": signin(url, "alice"), "Content-Type": "image/jpeg", "x-is-async": "true"}
        # enough that some are still queued when the replica stops, however fast it is
        ids = [httpx.post(f"{url}/task?face=true", content=data, headers=headers).json()["id"] for _ in range(16)]
    # stopped with one worker: the waiting tasks were dropped; the one in progress ends by itself
    wait_for(lambda: [status(i) for i in ids], lambda s: "processing" not in s, timeout=60)
    left = [i for i in ids if status(i) == "queued"]
    assert left, [status(i) for i in ids]
    time.sleep(1.5)  # older than requeue_after_s

    with running(config) as url, httpx.Client(base_url=url, headers={"Authorization": signin(url, "alice")},
                                              timeout=60) as alice:
        for task_id in ids:
            done = wait_done(alice, f"/task/{task_id}")
            assert done["task_status"] == "done" and done["detections"]["face"] >= len(ann["boxes"]) - 1, done
            assert done.get("requeued", 0) == (1 if task_id in left else 0)
        time.sleep(2)  # more sweeps: a task done is never taken up again
        assert all(alice.get(f"/task/{i}").json().get("requeued", 0) <= 1 for i in ids)
