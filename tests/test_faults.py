"""Exactly once, under faults: real Ray workers killed with SIGKILL mid-job, a real S3 endpoint
behind a fault-injecting proxy, a real full disk (a 1 MiB tmpfs), a local Ray killed under its
driver, and a second run of a running job. Every job ends with exactly one manifest row per item
(and one detections row per detection), or is refused / ends `failed` with its cause.

Jobs use the fast face setting at 512 px, so that the faults, not the models, take the time."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from fault_proxy import FaultProxy

from jobs.job_store import JobBusy
from jobs.run import run_job
from jobs.spec import SpecError, build_spec

FAST = {"face": True, "detect_models": "centerface-int8", "det_max_side": 512}
DETECTOR = "ray::MapWorker(MapBatches(_RayDetector))"


def spec_for(inputs, output, job_id: str, **extra):
    return build_spec({"inputs": [str(i) for i in inputs], "output": str(output), "job_id": job_id, **FAST, **extra})


def manifest_rows(job_root: str, fs=None) -> tuple[list[dict], list[dict]]:
    """(images rows, detections rows), read straight from the part files."""
    tables = {}
    for table in ("images", "detections"):
        if fs is None:
            parts = sorted(Path(job_root, "manifest", table).glob("part-*.parquet"))
            tables[table] = [r for p in parts for r in pq.read_table(p).to_pylist()]
        else:
            parts = fs.glob(f"{job_root}/manifest/{table}/part-*.parquet")
            tables[table] = [r for p in parts for r in pq.read_table(io.BytesIO(fs.cat_file(p))).to_pylist()]
    return tables["images"], tables["detections"]


def assert_exactly_once(job_root: str, n_items: int, fs=None, statuses=("done",)) -> list[dict]:
    images, dets = manifest_rows(job_root, fs)
    ids = Counter(r["item_id"] for r in images)
    assert len(images) == n_items and len(ids) == n_items, (len(images), ids.most_common(3))
    assert {r["status"] for r in images} <= set(statuses), Counter(r["status"] for r in images)
    per_item = Counter(d["item_id"] for d in dets)
    assert per_item == Counter({r["item_id"]: r["n_face"] for r in images if r["n_face"]}), "detection rows"
    assert len({(d["item_id"], d["det_id"]) for d in dets}) == len(dets)
    return images


def our_workers(title: str) -> list[psutil.Process]:
    """Ray worker processes of this test session's local Ray (our descendants) by process title."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(title):
                found.append(p)
        except psutil.Error:
            continue
    return found


class KillOnce(threading.Thread):
    """kill -9 our Ray workers titled `title` once `ready()` holds (those running it at that moment)."""

    def __init__(self, title: str, ready=lambda: True, timeout: float = 300):
        super().__init__(daemon=True)
        self.title, self.ready, self.deadline = title, ready, time.monotonic() + timeout
        self.killed: list[int] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set() and time.monotonic() < self.deadline:
            if self.ready():
                for p in our_workers(self.title):  # every one running it now: the one that wrote, too
                    try:
                        p.kill()
                        self.killed.append(p.pid)
                    except psutil.Error:
                        continue
                if self.killed:
                    return
            time.sleep(0.01)


@pytest.fixture
def street(photos):
    """24 WIDER photos (16 rows per block, 8 per write batch: a write task writes two parts)."""
    folder, _ = photos("wider", 24)
    return folder


def _parts(job_root: Path) -> int:
    return len(list((job_root / "manifest" / "images").glob("part-*.parquet")))


# --- worker kills ---


def test_killed_write_worker_leaves_no_duplicate_rows(ray_local, photos, tmp_path):
    """Issue 18 item 9: a write worker killed after it wrote a part: Ray retries the task, which
    writes the same parts again (named after their items), so the first run ends with one row
    per item and the report counts each once. Detection batches of 16 make each write task two
    batches of 8, two parts: the kill lands while the task writes its second."""
    street, _ = photos("wider", 32)
    out = tmp_path / "out"
    killer = KillOnce("ray::MapBatches(write_by_shard)", ready=lambda: _parts(out / "w") >= 1)
    doc = run_job(spec_for([street], out, "w", batch_size=16), log=lambda *_: None)
    killer.done.set()
    assert killer.killed, "no write worker was killed"
    assert doc["status"] == "done" and doc["totals"]["items"] == 32 and doc["totals"]["done"] == 32
    images = assert_exactly_once(str(out / "w"), 32)
    assert doc["totals"]["detections"]["face"] == sum(r["n_face"] for r in images)
    from jobs.analytics import connect, overview  # what the notebook and `veil report --html` count

    seen = overview(connect(str(out / "w")))
    assert (seen["images"], seen["detections"]) == (32, sum(r["n_face"] for r in images)), seen


@pytest.mark.slow
@pytest.mark.parametrize("title", ["ray::MapBatches(prepare_batch)", DETECTOR])
def test_killed_prepare_or_detect_worker(ray_local, street, tmp_path, title):
    """A prepare task's worker, or a detection actor, killed mid-job: Ray retries the task /
    restarts the actor and re-runs its batches; still one row per item."""
    out = tmp_path / "out"
    ready = (lambda: True) if "prepare" in title else (lambda: _parts(out / "k") >= 1)
    killer = KillOnce(title, ready=ready)
    doc = run_job(spec_for([street], out, "k"), log=lambda *_: None)
    killer.done.set()
    assert killer.killed, f"no {title} worker was killed"
    assert doc["status"] == "done" and doc["totals"]["done"] == 24
    assert_exactly_once(str(out / "k"), 24)


# --- a second run of a running job, and resumes that change the spec ---


def test_second_run_of_a_running_job_is_refused(ray_local, street, tmp_path):
    """Issue 18 item 10: while a job runs (here in a thread), `veil run` of the same id is refused
    at once (exit 2) whatever its options; the first run alone writes the manifest. A resume
    with options that change results is refused unless --allow-spec-change."""
    out = tmp_path / "out"
    result: dict = {}
    first = threading.Thread(target=lambda: result.update(run_job(spec_for([street], out, "dup"),
                                                                   log=lambda *_: None)))
    first.start()
    deadline = time.monotonic() + 60
    while not (out / "dup" / "lease.json").exists():
        assert time.monotonic() < deadline and first.is_alive()
        time.sleep(0.05)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    second = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(street), str(out), "--job-id", "dup",
                             "--face", "--face-threshold", "0.5"], capture_output=True, text=True, timeout=120,
                            env=env)
    running_still = first.is_alive()
    first.join(600)
    assert second.returncode == 2 and "job dup is running" in second.stderr, second.stderr[-2000:]
    assert running_still, "the first run ended before the second was refused: the test proved nothing"
    assert result["status"] == "done"
    assert_exactly_once(str(out / "dup"), 24)
    assert not (out / "dup" / "lease.json").exists()  # released at the end

    with pytest.raises(SpecError, match="^--face-threshold: differ from the earlier run"):
        run_job(spec_for([street], out, "dup", face_threshold=0.5), log=lambda *_: None)
    doc = run_job(spec_for([street], out, "dup", face_threshold=0.5), log=lambda *_: None, allow_spec_change=True)
    assert doc["status"] == "done" and doc["spec_changes"][-1]["options"] == ["--face-threshold"]
    assert_exactly_once(str(out / "dup"), 24)


def test_lease_rules_local(tmp_path):
    _lease_rules(str(tmp_path / "job"), {})


def test_lease_rules_s3(s3_endpoint, s3fs_client):
    s3fs_client.mkdir("leases")
    _lease_rules("s3://leases/job", {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"},
                 s3fs_client)


def _lease_rules(root: str, opts: dict, fs=None) -> None:
    """Refused while held; taken over when not renewed for the TTL, or at once when its holder
    was on this machine and its pid is gone; of 8 runs racing for a free lease exactly one wins."""
    from jobs.lease import JobLease
    first = JobLease(root, opts).acquire("job")
    with pytest.raises(JobBusy, match="job job is running"):
        JobLease(root, opts).acquire("job")
    # a resumed Ray attempt waits for a predecessor that is still exiting (jobs.submit sets the wait)
    threading.Timer(1.0, first.release).start()
    t0 = time.monotonic()
    JobLease(root, opts).acquire("job", wait_s=30).release()
    assert 0.9 < time.monotonic() - t0 < 20

    def plant(**doc) -> None:
        data = json.dumps({"token": "x", "acquired": time.time(), "pid_started": 0, **doc}).encode()
        if fs is None:
            Path(root, "lease.json").write_bytes(data)
        else:
            fs.pipe_file(root.removeprefix("s3://") + "/lease.json", data)

    plant(host="another-machine", pid=1, renewed=time.time())  # alive elsewhere, as far as we know
    with pytest.raises(JobBusy):
        JobLease(root, opts).acquire("job")
    plant(host="another-machine", pid=1, renewed=time.time() - 1000)  # a driver that died elsewhere
    lease = JobLease(root, opts).acquire("job")
    assert "not renewed" in lease.took_over
    lease.release()
    gone = subprocess.Popen(["true"])
    gone.wait()
    import socket

    plant(host=socket.gethostname(), pid=gone.pid, renewed=time.time())  # a killed driver on this machine
    lease = JobLease(root, opts).acquire("job")
    assert "is gone" in lease.took_over
    assert lease.renew() and not lease.lost.is_set()
    lease.release()
    killed = subprocess.Popen(["sleep", "60"])
    killed.kill()  # SIGKILLed and not yet waited for: a zombie, as Ray's job stop leaves a driver
    time.sleep(0.2)
    assert psutil.Process(killed.pid).status() == psutil.STATUS_ZOMBIE
    plant(host=socket.gethostname(), pid=killed.pid, renewed=time.time(),
          pid_started=psutil.Process(killed.pid).create_time())
    lease = JobLease(root, opts).acquire("job")
    assert "is gone" in lease.took_over
    lease.release()
    killed.wait()

    winners, refused = [], []

    def contend() -> None:
        try:
            winners.append(JobLease(root, opts).acquire("job"))
        except JobBusy:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 7
    winners[0].release()


# --- a full disk, a local Ray that dies ---


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (we are root in the test sandbox); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_fails_the_job_then_resume_completes(ray_local, street, small_disk):
    """Issue 18 item 11: the output disk fills (ENOSPC) mid-job: the job ends `failed` with
    NO_SPACE (job.json written in the room it reserved), not `processing` for ever; once the
    disk has room the same command resumes it to one row per item."""
    spec = spec_for([street], small_disk, "full")
    with pytest.raises(Exception, match="No space left on device") as failure:
        run_job(spec, log=lambda *_: None)
    assert type(failure.value).__name__ == "JobFailed"  # one line from the CLI, not a traceback
    doc = json.loads((small_disk / "full" / "job.json").read_text())
    assert doc["status"] == "failed" and doc["failure_cause"] == "NO_SPACE", doc["description"]
    written = len(list((small_disk / "full" / "images").glob("*.jpg")))
    assert written < 24
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    doc = run_job(spec, log=lambda *_: None)
    assert doc["status"] == "done" and doc["totals"]["done"] == 24
    assert_exactly_once(str(small_disk / "full"), 24)
    assert len(list((small_disk / "full" / "images").glob("*.jpg"))) == 24


@pytest.mark.slow
def test_local_ray_killed_under_the_driver(ray_local, street, tmp_path):
    """Issue 18 item 11: the raylet of a `veil run`'s own local Ray killed mid-job: Ray's core ends
    the driver within seconds; job.json must say `failed` (RAY_LOST) first, and a resume finishes."""
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONUNBUFFERED": "1"}
    args = [str(street), str(out), "--job-id", "r", "--face", "--detect-models", "centerface-int8",
            "--det-max-side", "512"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _parts(out / "r") < 1 if (out / "r" / "manifest").exists() else True:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.1)
        raylets = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name().startswith("raylet")]
        assert raylets
        raylets[0].kill()
        proc.wait(120)
        doc = json.loads((out / "r" / "job.json").read_text())
        assert doc["status"] == "failed" and doc["failure_cause"] == "RAY_LOST", doc
        assert "raylet" in doc["description"]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(3)  # its workers may outlive it by ~2 s; the resume drops what they write anyway
    doc = run_job(spec_for([street], out, "r"), log=lambda *_: None)
    assert doc["status"] == "done" and doc["totals"]["done"] == 24
    assert_exactly_once(str(out / "r"), 24)


# --- S3 behind a fault-injecting proxy ---


@pytest.fixture
def s3_faults(s3_endpoint, s3fs_client, photos):
    """8 photos in s3://faultsrc/in/, and a proxy in front of the endpoint; yields (proxy, fs, names)."""
    fs = s3fs_client
    for bucket in ("faultsrc", "faultout"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    folder, _ = photos("wider", 8)
    names = sorted(p.name for p in folder.iterdir())
    for name in names:
        fs.put_file(str(folder / name), f"faultsrc/in/{name}")
    proxy = FaultProxy(s3_endpoint)
    yield proxy, fs, names
    proxy.close()


def _s3_spec(proxy: FaultProxy, job_id: str):
    # botocore's standard retries, 3 attempts (s3fs adds 5 tries of its own): a key that stays down
    # fails in seconds instead of a minute
    opts = {"endpoint_url": proxy.url, "key": "testing", "secret": "testing",
            "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"}}}
    return spec_for(["s3://faultsrc/in/"], "s3://faultout/", job_id, storage_options=opts)


def _outputs(fs, job_id: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.find(f"faultout/{job_id}/images")}


def test_s3_faults_byte_identical_exactly_once(ray_local, s3_faults):
    """A quarter of the S3 requests answered 503 SlowDown, one in 7 reset (before or after the
    store saw it), one in 5 delayed: the job ends done, with outputs byte-identical to a run
    without faults and one row per item. Keys that stay unavailable end SOURCE_UNAVAILABLE (not
    INTERNAL_ERROR), and --retry-failed completes them once the store answers again."""
    proxy, fs, names = s3_faults
    clean = run_job(_s3_spec(proxy, "clean"), log=lambda *_: None)
    assert clean["status"] == "done" and clean["totals"]["done"] == 8
    reference = _outputs(fs, "clean")
    assert len(reference) == 8

    proxy.stats.clear()
    proxy.fail_every, proxy.reset_every, proxy.delay_every = 4, 7, 5
    doc = run_job(_s3_spec(proxy, "faulty"), log=lambda *_: None)
    faults = dict(proxy.stats)
    print("faults injected:", faults)
    assert faults["failed"] >= 10 and faults.get("reset_before", 0) + faults.get("reset_after", 0) >= 4
    assert doc["status"] == "done" and doc["totals"]["done"] == 8, doc["totals"]
    proxy.heal()
    assert _outputs(fs, "faulty") == reference
    assert_exactly_once("faultout/faulty", 8, fs)

    proxy.unavailable = tuple(f"in/{n}" for n in names[:2])
    doc = run_job(_s3_spec(proxy, "down"), log=lambda *_: None)
    assert doc["totals"]["failure_causes"] == {"SOURCE_UNAVAILABLE": 2}, doc["totals"]
    images = assert_exactly_once("faultout/down", 8, fs, statuses=("done", "failed"))
    assert {r["rel_path"] for r in images if r["status"] == "failed"} == set(names[:2])
    proxy.heal()
    doc = run_job(_s3_spec(proxy, "down"), log=lambda *_: None, retry_failed=True)
    assert doc["status"] == "done" and doc["totals"]["done"] == 8 and not doc["totals"]["failure_causes"]
    assert_exactly_once("faultout/down", 8, fs)
    assert _outputs(fs, "down") == reference


def test_status_tells_a_dead_driver_from_a_running_one(tmp_path, capsys):
    """job.json of a driver killed with SIGKILL still says `processing`: `veil status` adds that no
    live run holds the job (its lease is stale or gone), and `--follow` stops there."""
    import socket

    from jobs.cli import main
    from jobs.lease import JobLease
    from jobs.report import JobReport

    spec = spec_for([tmp_path], tmp_path / "out", "st")
    root = str(tmp_path / "out" / "st")
    JobReport(root, spec.public_dict(), None).set("processing", "3 of 9 items")
    with JobLease(root).acquire("st"):
        assert main(["status", "st", "--output", str(tmp_path / "out")]) == 0
        assert "no live run" not in capsys.readouterr().out
    gone = subprocess.Popen(["true"])
    gone.wait()
    Path(root, "lease.json").write_text(json.dumps({"token": "x", "host": socket.gethostname(), "pid": gone.pid,
                                                    "pid_started": 0, "acquired": 0, "renewed": time.time()}))
    assert main(["status", "st", "--output", str(tmp_path / "out"), "--follow"]) == 0
    assert "no live run: its driver (pid" in capsys.readouterr().out


def test_a_lease_whose_create_landed_unanswered_is_ours(tmp_path):
    """A create whose answer was lost (a connection reset after the store wrote it; the client
    retries, and the retry's condition fails on our own lease) must not refuse our own run, and a
    renewal that finds its own token after a failed swap keeps the lease."""
    from jobs.lease import JobLease

    lease = JobLease(str(tmp_path / "job"))
    assert lease._swap(lease._doc(), None)  # the write that landed; its answer "lost"
    try:
        assert lease.acquire("job") is lease  # before the fix: JobBusy, naming our own pid
        lease.version = "stale"  # as after a retried renewal whose first try landed
        assert lease.renew() and not lease.lost.is_set()
    finally:
        lease.release()
