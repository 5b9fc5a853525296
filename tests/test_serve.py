"""`veil serve` over real HTTP: uvicorn on 127.0.0.1, real photos, real models, a real webhook receiver.

Most calls ask for faces only (the fastest model set). The server runs in a thread of the test
process, so its log records are visible to caplog (the secrets check).
"""

from __future__ import annotations

import base64
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import cv2
import httpx
import numpy as np
import pytest
import schemathesis
import serve_helpers
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from serve_helpers import MAX_UPLOAD, PASSWORDS, face_and_rest_diff, running, signin, wait_done, write_users

from jobs.api.pool import BACKGROUND, WAITING, PriorityPool
from jobs.api.service import ServiceConfig

face_photo = serve_helpers.face_photo  # fixtures, found by pytest under their own names
webhook_receiver = serve_helpers.webhook_receiver
base, alice = serve_helpers.base, serve_helpers.alice


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The service with a temp storage and a users file; yields (base URL, storage folder)."""
    root = tmp_path_factory.mktemp("serve")
    config = ServiceConfig(storage=str(root / "storage"), users_file=str(write_users(root / "users.yaml")),
                           max_upload_bytes=MAX_UPLOAD, webhook_hosts=("127.0.0.1",), warm_classes=("face",))
    with running(config) as url:
        yield url, root / "storage"


@pytest.fixture(scope="module")
def bob(base) -> httpx.Client:
    with httpx.Client(base_url=base, headers={"Authorization": "Bearer " + signin(base, "bob")}, timeout=120) as c:
        yield c


# --- authentication ---


def test_signin_and_token_expiry(base):
    bad = httpx.post(f"{base}/v1/signin", json={"username": "alice", "password": "wrong"})
    assert bad.status_code == 401 and "message" in bad.json()
    assert httpx.post(f"{base}/v1/signin", json={"username": "nobody", "password": "x"}).status_code == 401
    assert httpx.get(f"{base}/v1/list").json() == {"message": "Unauthorized"}

    token = signin(base, "alice")
    assert httpx.get(f"{base}/v1/list", headers={"Authorization": token}).status_code == 200
    assert httpx.get(f"{base}/v1/list", headers={"Authorization": "Bearer " + token}).status_code == 200
    claims, sig = token.rsplit(".", 1)
    forged = claims + "." + ("A" if sig[0] != "A" else "B") + sig[1:]
    assert httpx.get(f"{base}/v1/list", headers={"Authorization": forged}).status_code == 401

    short = signin(base, "shorty")  # token_ttl_s: 2 in the users file
    assert httpx.get(f"{base}/v1/list", headers={"Authorization": short}).status_code == 200
    time.sleep(3.1)
    expired = httpx.get(f"{base}/v1/list", headers={"Authorization": short})
    assert expired.status_code == 401 and "expired" in expired.json()["message"]


# --- Celantur v1 ---


def test_v1_upload_status_and_outputs(alice, face_photo):
    data, ann = face_photo
    r = alice.post("/v1/file", params={"face": "True", "save-mask": "all", "name": "family.jpg"}, content=data,
                   headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    task = r.json()
    assert len(task["id"]) == 32 and task["task_status"] in ("queued", "processing", "done")
    assert task["name"] == "family.jpg" and task["parameters"]["face"] is True
    assert task["parameters"]["save-mask"] == "all"
    assert "owner" not in task and "file" not in task

    task = wait_done(alice, f"/v1/file/{task['id']}/status")
    assert task["task_status"] == "done" and task["failure_cause"] is None
    assert task["detections"]["face"] >= len(ann["boxes"]) - 1 and task["detections_count"] >= 1
    assert set(task["outputs"]) == {"anonymized", "binary-mask", "instance-mask", "metadata", "original"}

    anonymized = alice.get(f"/v1/file/{task['id']}/anonymized")
    assert anonymized.headers["content-type"] == "image/jpeg" and anonymized.content[:3] == b"\xff\xd8\xff"
    faces, rest = face_and_rest_diff(data, anonymized.content, ann["boxes"])
    # re-encoding this photo at quality 90 alone moves pixels by ~3.5 (max over channels): that is the noise floor
    assert rest < 6, f"pixels away from faces changed more than JPEG re-encoding noise (mean diff {rest:.1f})"
    assert faces > 2 * rest, f"faces barely changed (mean diff {faces:.1f}, elsewhere {rest:.1f})"

    mask = cv2.imdecode(np.frombuffer(alice.get(f"/v1/file/{task['id']}/binary-mask").content, np.uint8),
                        cv2.IMREAD_UNCHANGED)
    assert mask.shape == (ann["height"], ann["width"])
    x1, y1, x2, y2 = ann["boxes"][0]["xyxy"]
    assert mask[(y1 + y2) // 2, (x1 + x2) // 2] == 255 and mask[0, 0] == 0
    instance = alice.get(f"/v1/file/{task['id']}/instance-mask")
    assert instance.status_code == 200 and instance.content[:4] == b"\x89PNG"

    metadata = alice.get(f"/v1/file/{task['id']}/metadata").json()
    assert (metadata["width"], metadata["height"]) == (ann["width"], ann["height"])
    assert len(metadata["detections"]) == task["detections_count"]
    assert metadata["source"].startswith("tasks/")  # the upload's name, not the server's storage path
    assert alice.get(f"/v1/file/{task['id']}/original").content == data


def test_v1_masks_only_when_asked_and_list_paging(alice, bob, face_photo):
    data, _ = face_photo
    ids = []
    for _ in range(3):
        r = bob.post("/v1/file?face=true&method=detect", content=data, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    page1 = bob.get("/v1/list", params={"page": 1, "limit": 2}).json()
    page2 = bob.get("/v1/list", params={"page": 2, "limit": 2}).json()
    assert (page1["total_item_count"], page1["total_page_count"]) == (3, 2)
    assert len(page1["items"]) == 2 and len(page2["items"]) == 1
    assert {i["id"] for i in page1["items"] + page2["items"]} == set(ids)
    assert all(i["id"] not in ids for i in alice.get("/v1/list?limit=1000").json()["items"])  # per user
    assert alice.get(f"/v1/file/{ids[0]}/status").status_code == 404  # someone else's task
    assert bob.get("/v1/list?limit=0").status_code == 422

    done = wait_done(bob, f"/v1/file/{ids[0]}/status")
    assert done["task_status"] == "done" and done["anonymization_method"] == "detect"
    # method detect writes masks and metadata, no image (as in a job)
    missing = bob.get(f"/v1/file/{ids[0]}/anonymized")
    assert missing.status_code == 404 and "message" in missing.json()
    plain = alice.post("/v1/file?face=true", content=data, headers={"Content-Type": "image/jpeg"}).json()
    plain = wait_done(alice, f"/v1/file/{plain['id']}/status")
    assert "binary-mask" not in plain["outputs"]
    assert alice.get(f"/v1/file/{plain['id']}/binary-mask").status_code == 404


def test_png_declared_as_jpeg_fails_with_content_type_error(alice, face_photo):
    data, _ = face_photo
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    r = alice.post("/task?face=true", content=png, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json()["task_status"] == "failed" and r.json()["failure_cause"] == "CONTENT_TYPE_ERROR"
    ok = alice.post("/task?face=true", content=png, headers={"Content-Type": "image/png"}).json()
    assert ok["task_status"] == "done" and ok["format"] == "png"
    assert alice.get(f"/task/{ok['id']}/anonymized").headers["content-type"] == "image/png"


# --- Celantur container ---


def test_container_sync_async_and_delete(alice, face_photo):
    data, _ = face_photo
    sync = alice.post("/task", params={"face": "true", "no-object-tracking": "true", "keep_bit_rate": "false"},
                      content=data, headers={"Content-Type": "image/jpeg"})
    assert sync.status_code == 200, sync.text
    task = sync.json()
    assert task["task_status"] == "done" and task["detections"]["face"] >= 1
    assert task["video_options"] == {"no-object-tracking": True, "keep-bit-rate": False}
    assert alice.get(f"/task/{task['id']}").json()["task_status"] == "done"
    assert alice.get(f"/task/{task['id']}/anonymized").content[:3] == b"\xff\xd8\xff"
    assert alice.get(f"/v1/file/{task['id']}/status").status_code == 404  # each API sees its own tasks

    queued = alice.post("/task?face=true", content=data, headers={"Content-Type": "image/jpeg", "x-is-async": "true"})
    assert queued.status_code == 200 and queued.json()["task_status"] in ("queued", "processing")
    done = wait_done(alice, f"/task/{queued.json()['id']}")
    assert done["task_status"] == "done" and done["detections_count"] >= 1

    deleted = alice.delete(f"/task/{task['id']}")
    assert deleted.status_code == 200 and deleted.json()["task_status"] == "deleted"
    assert alice.get(f"/task/{task['id']}").status_code == 404
    gone = alice.delete("/task/lists").json()
    assert done["id"] in gone["deleted"]
    assert alice.get(f"/task/{done['id']}").status_code == 404
    assert alice.post("/task?face=true", content=data,
                      headers={"Content-Type": "image/jpeg", "x-is-async": "maybe"}).status_code == 422


def test_container_takes_a_video_with_its_flags(alice):
    """A video POSTed to the container's /task runs as a job's video does: the output is a video
    with every frame, /metadata has the boxes frame by frame; `no-object-tracking` turns tracking
    off (no track ids), `keep-bit-rate` encodes at the source's bit rate instead of CRF 23."""
    import io

    import av
    from video_media import clip_paths

    data = clip_paths()["carphone_pristine.mp4"].read_bytes()  # a face in a car, 120 frames, ~1.2 Mbit/s
    mp4 = {"Content-Type": "video/mp4"}

    def run(**flags) -> tuple[dict, bytes, dict]:
        r = alice.post("/task", params={"face": "true", "face-threshold": "0.5", **flags}, content=data, headers=mp4)
        assert r.status_code == 200, r.text
        task = r.json()
        assert (task["task_status"], task["frames"], task["detections"]["face"] >= 1) == ("done", 120, True), task
        video = alice.get(f"/task/{task['id']}/anonymized")
        assert video.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(video.content)) as c:
            assert sum(1 for _ in c.decode(video=0)) == 120
        return task, video.content, alice.get(f"/task/{task['id']}/metadata").json()

    plain, plain_out, meta = run(**{"no-object-tracking": "true"})
    assert plain["video_options"] == {"no-object-tracking": True}
    assert (meta["frame_count"], meta["width"], meta["height"]) == (120, 176, 144)
    first = meta["frames"][0]
    assert first["frame"] == 0 and first["time_s"] == 0.0 and first["detections"][0]["type"] == "face"
    assert all(d["track_id"] is None for f in meta["frames"] for d in f["detections"])  # no tracking
    assert meta["frames"][-1]["time_s"] == pytest.approx(meta["frames"][-1]["frame"] / meta["fps"], abs=0.01)

    tracked, kept_out, meta = run(**{"keep-bit-rate": "true"})
    assert len({f["frame"] for f in meta["frames"]}) == 120  # tracking: the face is boxed on every frame
    assert all(d["track_id"] is not None for f in meta["frames"] for d in f["detections"])
    bit_rate = len(kept_out) * 8 / 4.0  # 120 frames at 29.97 fps
    assert 0.7 < bit_rate / 1_171_868 < 1.3 and len(kept_out) > 2 * len(plain_out)  # the source's, not CRF 23's

    refused = alice.post("/task?face=true&save-mask=all", content=data, headers=mp4)
    assert refused.status_code == 422 and "save-mask" in refused.text
    # Celantur's cloud API (v1, v2) takes images: a video there is refused by its type
    assert alice.post("/v1/file?face=true", content=data, headers=mp4).status_code == 415


# --- FaceBlurest ---


def test_faceblurest(base, face_photo):
    data, ann = face_photo
    auth = ("alice", PASSWORDS["alice"])
    r = httpx.post(f"{base}/faceblurest", auth=auth, timeout=120,
                   json={"base64_Photo_String": base64.b64encode(data).decode(), "photo_url": "NO"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["created"] and len(body["predictions"]) >= len(ann["boxes"]) - 1
    for p in body["predictions"]:
        box = p["boundingBox"]
        assert p["tagName"] == "Human Face" and 0 < p["probability"] <= 1
        assert 0 <= box["left"] <= 1 and 0 <= box["top"] <= 1 and 0 < box["width"] <= 1 and 0 < box["height"] <= 1
    # every labelled face's centre lies in a predicted box
    w, h = ann["width"], ann["height"]
    for lab in ann["boxes"]:
        cx, cy = (lab["xyxy"][0] + lab["xyxy"][2]) / 2 / w, (lab["xyxy"][1] + lab["xyxy"][3]) / 2 / h
        assert any(b["left"] <= cx <= b["left"] + b["width"] and b["top"] <= cy <= b["top"] + b["height"]
                   for b in (p["boundingBox"] for p in body["predictions"]))
    final = base64.b64decode(body["final_photo"])
    assert final[:3] == b"\xff\xd8\xff"
    faces, rest = face_and_rest_diff(data, final, ann["boxes"])
    assert faces > 2 * rest

    def error(resp, status, code):
        assert resp.status_code == status, resp.text
        assert resp.json()[0]["cd"] == code and resp.json()[0]["description"]

    payload = {"base64_Photo_String": base64.b64encode(data).decode(), "photo_url": "NO"}
    missing = httpx.post(f"{base}/faceblurest", json=payload)
    error(missing, 401, "1001")
    assert missing.headers["www-authenticate"].startswith("Basic")
    error(httpx.post(f"{base}/faceblurest", json=payload, auth=("alice", "nope")), 401, "1001")
    error(httpx.post(f"{base}/faceblurest", auth=auth, json={"base64_Photo_String": "%%%not base64",
                                                             "photo_url": "NO"}), 400, "1014")
    error(httpx.post(f"{base}/faceblurest", auth=auth, json={"base64_Photo_String": base64.b64encode(b"hello").decode(),
                                                             "photo_url": "NO"}), 400, "1014")
    error(httpx.post(f"{base}/faceblurest", auth=auth, content=b"{not json"), 400, "1014")
    big = base64.b64encode(b"\xff\xd8\xff" + bytes(MAX_UPLOAD + 10)).decode()
    error(httpx.post(f"{base}/faceblurest", auth=auth, json={"base64_Photo_String": big, "photo_url": "NO"}),
          413, "1013")
    # the server never fetches a URL unless started with --allow-url-fetch
    error(httpx.post(f"{base}/faceblurest", auth=auth, json={"photo_url": "http://127.0.0.1:9/x.jpg"}), 400, "1014")


def test_faceblurest_photo_url_only_when_allowed(tmp_path, face_photo):
    """--allow-url-fetch: the server fetches photo_url (here from a file server on 127.0.0.1)."""
    data, ann = face_photo
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "p.jpg").write_bytes(data)
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(tmp_path / "www")))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    config = ServiceConfig(storage=str(tmp_path / "storage"), users_file=str(write_users(tmp_path / "users.yaml")),
                           max_upload_bytes=MAX_UPLOAD, allow_url_fetch=True)
    try:
        with running(config) as url:
            auth = ("bob", PASSWORDS["bob"])
            photo_url = f"http://127.0.0.1:{files.server_address[1]}/p.jpg"
            r = httpx.post(f"{url}/faceblurest", auth=auth, json={"photo_url": photo_url}, timeout=120)
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"]) >= len(ann["boxes"]) - 1
            missing = httpx.post(f"{url}/faceblurest", auth=auth, json={"photo_url": photo_url + ".gone"})
            assert missing.status_code == 400 and missing.json()[0]["cd"] == "1014"
            ftp = httpx.post(f"{url}/faceblurest", auth=auth, json={"photo_url": "file:///etc/passwd"})
            assert ftp.status_code == 400 and ftp.json()[0]["cd"] == "1014"
    finally:
        files.shutdown()


def test_full_queue_answers_503_and_keeps_nothing(tmp_path, face_photo):
    data, _ = face_photo
    config = ServiceConfig(storage=str(tmp_path / "storage"), users_file=str(write_users(tmp_path / "users.yaml")),
                           max_queue=0)
    with running(config) as url:
        headers = {"Authorization": signin(url, "bob"), "Content-Type": "image/jpeg"}
        busy = httpx.post(f"{url}/v1/file?face=true", content=data, headers=headers)
        assert busy.status_code == 503 and busy.headers["retry-after"] and "message" in busy.json()
        assert httpx.get(f"{url}/v1/list", headers=headers).json()["total_item_count"] == 0
        assert not list((tmp_path / "storage").rglob("image.jpg"))


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_priority_pool_serves_waiting_callers_first():
    pool, order, gate = PriorityPool(1), [], threading.Event()
    pool.submit(BACKGROUND, gate.wait)  # occupies the only worker
    time.sleep(0.1)
    done = [pool.submit(BACKGROUND, order.append, f"async-{i}") for i in range(3)]
    done.append(pool.submit(WAITING, order.append, "sync"))
    gate.set()
    for f in done:
        f.result(timeout=10)
    assert order == ["sync", "async-0", "async-1", "async-2"]
    failing = pool.submit(WAITING, lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    pool.shutdown()


# --- webhooks and secrets ---


def test_webhook_with_auth_header_and_no_secret_logged_or_stored(service, alice, face_photo, webhook_receiver,
                                                                  caplog):
    caplog.set_level("DEBUG")
    _, storage = service
    url, received = webhook_receiver
    data, _ = face_photo
    secret = "hook-secret-value-42"
    params = {"face": "true", "webhook": url + "/hooks/veil", "web-auth-header-name": "X-Hook-Token",
              "web-auth-header-value": secret}
    v1 = alice.post("/v1/file", params=params, content=data, headers={"Content-Type": "image/jpeg"}).json()
    sync = alice.post("/task", params=params, content=data, headers={"Content-Type": "image/jpeg"}).json()
    deadline = time.monotonic() + 60
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(received) == 2
    by_id = {r["body"]["id"]: r for r in received}
    for task in (v1, sync):
        hook = by_id[task["id"]]
        assert hook["path"] == "/hooks/veil" and hook["headers"]["X-Hook-Token"] == secret
        assert hook["body"]["task_status"] == "done" and hook["body"]["detections_count"] >= 1
    time.sleep(0.3)  # the outcome is written after the POST returns
    status = alice.get(f"/v1/file/{v1['id']}/status").json()
    assert status["webhook"]["status"] == "sent"

    refused = alice.post("/v1/file", params={"face": "true", "webhook": "http://example.com/hook"}, content=data,
                         headers={"Content-Type": "image/jpeg"})
    assert refused.status_code == 422 and refused.json()["message"].startswith("webhook:")

    token = alice.headers["Authorization"]
    stored = "".join(p.read_text() for p in storage.rglob("task.json"))
    assert secret not in stored and PASSWORDS["alice"] not in stored
    # everything the server side logged (the test's own HTTP client logs its URLs, query included)
    server_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert "POST /v1/file" in server_log
    assert secret not in server_log and token not in server_log and PASSWORDS["alice"] not in server_log


# --- limits, error shapes, paths ---


def test_limits_and_error_shapes(base, alice, face_photo):
    data, _ = face_photo
    jpeg = {"Content-Type": "image/jpeg"}
    too_big = alice.post("/v1/file?face=true", content=b"\xff\xd8\xff" + bytes(MAX_UPLOAD), headers=jpeg)
    assert too_big.status_code == 413 and "limit" in too_big.json()["message"]
    assert alice.post("/task?face=true", content=data, headers={"Content-Type": "image/gif"}).status_code == 415
    assert alice.post("/v1/file?face=true", content=data, headers={"Content-Type": "text/plain"}).json()["message"]

    for query, name in (("quality=101", "quality"), ("face-threshold=2", "face-threshold"), ("method=smudge", "method"),
                        ("ignores=[{", "ignores"), ("score=true", "score"), ("bogus=1", "bogus"),
                        ("face=true&face=false", "face"), ("mask_scale=-1", "mask-scale"),
                        ("webhook=ftp://x", "webhook")):
        r = alice.post(f"/v1/file?{query}", content=data, headers=jpeg)
        assert r.status_code == 422, (query, r.text)
        assert name in r.json()["message"], (query, r.json())  # as `veil run` words it
    ok = alice.post("/task?face_threshold=0.3&kernel_size_face=0.5&ignores=[]", content=data, headers=jpeg).json()
    assert ok["parameters"]["face-threshold"] == 0.3 and ok["parameters"]["kernel-size-face"] == 0.5
    assert alice.post("/v1/file?face=true", content=b"", headers=jpeg).status_code == 422

    assert httpx.post(f"{base}/task?face=true", content=data, headers=jpeg).status_code == 401
    assert httpx.delete(f"{base}/task/lists").json() == {"message": "Unauthorized"}
    assert alice.get("/no/such/route").json() == {"message": "Not Found"}


@pytest.mark.parametrize("path", [
    "/v1/file/..%2F..%2F..%2Fetc%2Fpasswd/original",
    "/v1/file/%2e%2e/original",
    "/v1/file/..%5C..%5Ctask.json/metadata",
    "/v1/file/0123456789abcdef0123456789abcdeg/status",
    "/v1/file/0123456789abcdef0123456789abcdef/anonymized",  # well-formed, unknown
    "/task/..%2Ftasks",
])
def test_path_parameters_never_become_paths(alice, path):
    r = alice.get(httpx.URL(str(alice.base_url).rstrip("/") + path))
    assert r.status_code == 404, r.text
    assert "message" in r.json()


def test_openapi_document(base):
    doc = httpx.get(f"{base}/openapi.json").json()
    for path in ("/v1/signin", "/v1/file", "/v1/file/{task_id}/status", "/v1/file/{task_id}/anonymized", "/v1/list",
                 "/task", "/task/{task_id}", "/task/lists", "/faceblurest"):
        assert path in doc["paths"], path
    names = {p["name"] for p in doc["paths"]["/v1/file"]["post"]["parameters"]}
    assert {"method", "face", "license-plate", "mask-scale", "save-mask", "ignores", "kernel-size-face",
            "face-anonymization-gradient-start", "webhook", "web-auth-header-name", "quality"} <= names
    assert "inputs" not in names and "models" not in names and "storage-options" not in names


# --- property-based: schemathesis over the OpenAPI document ---

schema = schemathesis.pytest.from_fixture("api_schema").include(path_regex=r"^/(v1/(file|list)|task)")


@pytest.fixture(scope="module")
def api_schema(base):
    # Fuzzing only (hypothesis, max_examples below): the coverage phase sends hundreds of requests,
    # many with a valid 1x1 photo that is then really processed with the default (face + plate) models.
    config = SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False},
                                                      "stateful": {"enabled": False}}})
    return schemathesis.openapi.from_url(f"{base}/openapi.json", config=config)


@pytest.fixture(scope="module")
def fuzz_token(base) -> str:
    return signin(base, "fuzz")  # a user of its own: DELETE /task/lists cannot touch the other tests' tasks


@schema.parametrize()
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_v1_and_container_routes_never_answer_5xx(case, fuzz_token):
    # Webhooks only reach 127.0.0.1 on this server (webhook_hosts), so generated URLs go nowhere else.
    response = case.call(headers={"Authorization": fuzz_token}, timeout=120)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])


def test_rate_limit_per_credential_in_each_api_shape(tmp_path):
    from jobs.api.ratelimit import RateLimited, RateLimiter

    limiter = RateLimiter(per_minute=2)  # the bucket itself: 2 at once, then one every 30 s
    limiter.check("a", now=0.0)
    limiter.check("a", now=0.0)
    with pytest.raises(RateLimited) as refused:
        limiter.check("a", now=1.0)
    assert 28 < refused.value.retry_after <= 29
    limiter.check("b", now=1.0)  # another credential has its own bucket
    limiter.check("a", now=31.0)

    users = write_users(tmp_path / "users.yaml", {"k-rate": {"user": "alice"}})
    config = ServiceConfig(storage=str(tmp_path / "storage"), users_file=str(users), rate_limit_per_minute=2)
    with running(config) as base:
        token = signin(base, "bob")
        for expected in (200, 200, 429):
            r = httpx.get(f"{base}/v1/list", headers={"Authorization": token})
            assert r.status_code == expected
        assert "rate limit" in r.json()["message"] and int(r.headers["Retry-After"]) >= 1
        assert httpx.get(f"{base}/v2/task", headers={"Authorization": token}).json()["code"] == "RATE_LIMITED"
        basic = ("alice", PASSWORDS["alice"])
        codes = [httpx.post(f"{base}/faceblurest", json={}, auth=basic) for _ in range(3)]
        assert codes[-1].status_code == 429 and codes[-1].json()[0]["cd"] == "1029"
        key = {"x-api-key": "k-rate"}
        answers = [httpx.get(f"{base}/syntonym/get_credit_balance", headers=key) for _ in range(3)]
        assert answers[-1].status_code == 429 and answers[-1].json()["error_code"] == "RATE_LIMITED"
