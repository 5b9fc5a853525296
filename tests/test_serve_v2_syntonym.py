"""`veil serve`, Celantur v2 and Syntonym, over real HTTP: expiring upload/download URLs (signed by the
service, or presigned on the moto S3 server), a zip of real photos run as a job, credits per API
key, and a real callback receiver. Faces only (the default of Syntonym's model_config).
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import cv2
import httpx
import numpy as np
import pytest
import schemathesis
import serve_helpers
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from serve_helpers import SECRET, face_and_rest_diff, running, signin, wait_done, wait_for, write_users, zip_of

from jobs.api.auth import Auth
from jobs.api.links import Links
from jobs.api.service import ServiceConfig

face_photo = serve_helpers.face_photo  # fixtures, found by pytest under their own names
webhook_receiver = serve_helpers.webhook_receiver
base, alice = serve_helpers.base, serve_helpers.alice

MAX_UPLOAD = 2**20
API_KEYS = {
    "key-dave-0123456789abcdef": {"user": "dave", "credits": 10},
    "key-erin-0123456789abcdef": {"user": "erin", "credits": 2},  # less than a zip of 3 photos
    "key-fred-0123456789abcdef": {"user": "fred", "credits": 100, "auto_approve_below": 5},
}
DAVE, ERIN, FRED = (list(API_KEYS)[i] for i in range(3))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """Local storage: links are the service's own signed URLs. Yields (base URL, storage folder)."""
    root = tmp_path_factory.mktemp("serve2")
    config = ServiceConfig(storage=str(root / "storage"), users_file=str(write_users(root / "users.yaml", API_KEYS)),
                           max_upload_bytes=MAX_UPLOAD, webhook_hosts=("127.0.0.1",), warm_classes=("face",))
    with running(config) as url:
        yield url, root / "storage"


def syntonym(base: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"{base}/syntonym", headers={"x-api-key": key}, timeout=120)


def v2_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"code": code, "message": response.json()["message"]}


def syntonym_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error" and body["error_code"] == code and body["message"], body


def resigned(url: str, expires: int) -> str:
    """`url` with another expiry, signed with the server's own key (as if the server had made it)."""
    parts = urlsplit(url)
    signature = Links(Auth(secret=SECRET.encode()).link_key).signature("PUT", parts.path, expires)
    return f"{parts.scheme}://{parts.netloc}{parts.path}?expires={expires}&signature={signature}"


# --- Celantur v2 ---


def test_v2_upload_url_expiry_status_urls_downloads_webhook(alice, service, face_photo, webhook_receiver):
    base, storage = service
    data, ann = face_photo
    hook_url, received = webhook_receiver
    r = alice.post("/v2/task", params={"face": "true", "save-mask": "binary", "name": "street.jpg",
                                       "webhook": hook_url + "/v2", "web-auth-header-name": "X-Hook",
                                       "web-auth-header-value": "v2-hook-secret"})
    assert r.status_code == 200, r.text
    task = r.json()
    assert task["task_status"] == "new" and task["name"] == "street.jpg" and task["parameters"]["face"] is True
    upload = task["upload_url"]
    assert upload.startswith(f"{base}/v2/upload/{task['id']}?") and task["upload_expires_at"]

    expired = resigned(upload, int(time.time()) - 1)  # a genuine signature whose time is up
    v2_error(httpx.put(expired, content=data), 403, "SIGNATURE_EXPIRED")
    sig = parse_qs(urlsplit(upload).query)["signature"][0]
    v2_error(httpx.put(upload.replace(sig, ("A" if sig[0] != "A" else "B") + sig[1:]), content=data),
             403, "SIGNATURE_INVALID")
    later = int(parse_qs(urlsplit(upload).query)["expires"][0]) + 3600  # a longer life under the old signature
    v2_error(httpx.put(upload.replace(f"expires={later - 3600}", f"expires={later}"), content=data),
             403, "SIGNATURE_INVALID")
    v2_error(httpx.put(upload.replace(task["id"], "0" * 32), content=data), 403, "SIGNATURE_INVALID")
    assert alice.get(f"/v2/task/{task['id']}/status").json()["task_status"] == "new"

    put = httpx.put(upload, content=data, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert put.status_code == 200, put.text
    assert put.json()["task_status"] in ("queued", "processing", "done")
    v2_error(httpx.put(upload, content=data), 409, "CONFLICT")  # one upload per task

    done = wait_done(alice, f"/v2/task/{task['id']}/status")
    assert done["task_status"] == "done" and done["detections"]["face"] >= len(ann["boxes"]) - 1
    assert done["urls_expire_at"] and "upload_url" not in done
    anonymized = httpx.get(done["anonymized_url"])
    assert anonymized.headers["content-type"] == "image/jpeg"
    faces, rest = face_and_rest_diff(data, anonymized.content, ann["boxes"])
    assert faces > 2 * rest
    mask = cv2.imdecode(np.frombuffer(httpx.get(done["binary_mask_url"]).content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (ann["height"], ann["width"]) and mask.max() == 255
    assert httpx.get(done["original_url"]).content == data
    v2_error(httpx.get(done["anonymized_url"].replace("images/image.jpg", "original/image.jpg")), 403,
             "SIGNATURE_INVALID")  # a link opens the one object it names
    v2_error(httpx.get(done["anonymized_url"].split("?")[0]), 403, "SIGNATURE_INVALID")

    # the webhook's header value waited in task.json sealed (the task may run on another replica)
    hook = wait_for(lambda: list(received), lambda r: len(r) >= 1, timeout=30)
    assert hook[0]["headers"]["X-Hook"] == "v2-hook-secret" and hook[0]["body"]["task_status"] == "done"
    assert "v2-hook-secret" not in (storage / "tasks" / task["id"] / "task.json").read_text()
    assert "sealed_header_value" not in done

    listed = alice.get("/v2/task", params={"limit": 100}).json()
    assert task["id"] in [i["id"] for i in listed["items"]]
    assert alice.get(f"/v1/file/{task['id']}/status").status_code == 404  # each API sees its own tasks
    v2_error(httpx.get(f"{base}/v2/task"), 401, "UNAUTHORIZED")
    v2_error(alice.post("/v2/task", params={"quality": "101"}), 422, "PARAMETER_ERROR_FORMAT")
    v2_error(alice.get(f"/v2/task/{'f' * 32}/status"), 404, "NOT_FOUND")


def test_v2_wrong_content_fails_content_type_error_and_is_deleted(alice, service, face_photo):
    _, storage = service
    data, _ = face_photo
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    for body, declared in ((b"plain text, not a photo", ""), (png, "image/jpeg")):
        task = alice.post("/v2/task?face=true").json()
        r = httpx.put(task["upload_url"], content=body, headers={"Content-Type": declared} if declared else {})
        assert r.status_code == 200, r.text
        failed = alice.get(f"/v2/task/{task['id']}/status").json()
        assert failed["task_status"] == "failed" and failed["failure_cause"] == "CONTENT_TYPE_ERROR", failed
        assert not list((storage / "tasks" / task["id"]).rglob("original/*"))  # the upload is gone

    # an upload window that closes with nothing uploaded (its end moved into the past, as time would)
    task = alice.post("/v2/task?face=true").json()
    doc_path = storage / "tasks" / task["id"] / "task.json"
    doc_path.write_text(json.dumps({**json.loads(doc_path.read_text()), "upload_expires": int(time.time()) - 1}))
    gone = alice.get(f"/v2/task/{task['id']}/status").json()
    assert gone["task_status"] == "failed" and gone["failure_cause"] == "TASK_FILE_DOESNT_EXIST"


def test_v2_presigned_s3_urls(tmp_path, s3_endpoint, s3fs_client, face_photo):
    """--storage s3://...: upload and downloads are presigned S3 URLs; a status poll finds the upload."""
    data, ann = face_photo
    s3fs_client.mkdir("veil-v2")
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    config = ServiceConfig(storage="s3://veil-v2/service", storage_options=options,
                           users_file=str(write_users(tmp_path / "users.yaml")), max_upload_bytes=MAX_UPLOAD)
    with running(config) as url, httpx.Client(base_url=url, headers={"Authorization": signin(url, "bob")},
                                              timeout=120) as bob:
        task = bob.post("/v2/task?face=true").json()
        assert task["upload_url"].startswith(s3_endpoint + "/veil-v2/service/tasks/")
        assert httpx.put(task["upload_url"], content=data).status_code == 200  # straight to the bucket
        done = wait_done(bob, f"/v2/task/{task['id']}/status")
        assert done["task_status"] == "done" and done["detections"]["face"] >= 1, (done["failure_cause"], done["error"])
        assert done["anonymized_url"].startswith(s3_endpoint)
        faces, rest = face_and_rest_diff(data, httpx.get(done["anonymized_url"]).content, ann["boxes"])
        assert faces > 2 * rest

        bad = bob.post("/v2/task?face=true").json()
        httpx.put(bad["upload_url"], content=b"%PDF-1.4 not an image", headers={"Content-Type": "image/jpeg"})
        failed = bob.get(f"/v2/task/{bad['id']}/status").json()
        assert failed["failure_cause"] == "CONTENT_TYPE_ERROR"
        s3fs_client.invalidate_cache()
        assert not s3fs_client.exists(f"veil-v2/service/tasks/{bad['id']}/original/upload")


# --- Syntonym ---


def test_syntonym_zip_session_approve_result_credits_once_callback_delete(base, service, photos, webhook_receiver):
    _, storage = service
    folder, chosen = photos("faces", 3)
    hook_url, received = webhook_receiver
    with syntonym(base, DAVE) as dave:
        session = dave.post("/create_upload_session", json={
            "file_names": ["street.zip"], "model": "blur",
            "model_config": {"blur_face": True, "enable_lp": False, "blur_threshold": 0.2, "mask_blur": True}})
        assert session.status_code == 200, session.text
        job = session.json()
        job_id, (target,) = job["job_id"], job["upload_urls"]
        assert job["job_status"] == "new" and target["file_name"] == "street.zip" and target["method"] == "PUT"
        assert dave.post("/notify_on_job_status", json={"job_id": job_id, "callback_url": hook_url + "/done"}
                         ).json()["registered"]

        early = dave.post(f"/approve_job/{job_id}")
        assert early.status_code == 302 and early.headers["location"].endswith(f"/get_job_result/{job_id}")

        put = httpx.put(target["upload_url"], content=zip_of(folder, chosen), timeout=60)
        assert put.status_code == 200, put.text
        quoted = put.json()
        assert quoted["job_status"] == "awaiting_approval" and quoted["job_quoted_credit_cost"] == 3.0

        assert dave.post(f"/approve_job/{job_id}").status_code == 200
        assert dave.post(f"/approve_job/{job_id}").status_code == 202
        result = wait_for(lambda: dave.get(f"/get_job_result/{job_id}").json(),
                          lambda d: d["job_status"] in ("done", "failed"))
        assert result["job_status"] == "done", result
        assert result["job_total_credit_cost"] == 3.0
        tasks = {t["file_name"]: t for t in result["tasks"]}
        names = {f"street.zip/cam/{Path(im['file']).name}" for im in chosen}
        assert set(tasks) == names | {"street.zip/cam/readme.txt"}
        assert tasks["street.zip/cam/readme.txt"]["task_status"] == "skipped"
        assert tasks["street.zip/cam/readme.txt"]["download_url"] is None
        for im in chosen:
            task = tasks[f"street.zip/cam/{Path(im['file']).name}"]
            assert task["task_status"] == "done" and task["credit_cost"] == 1.0
            got = httpx.get(task["download_url"])
            assert got.headers["content-type"] == "image/jpeg"
            faces, rest = face_and_rest_diff((folder / Path(im["file"]).name).read_bytes(), got.content, im["boxes"])
            assert faces > 2 * rest, im["file"]
            assert str(storage) not in json.dumps(task)  # storage locations stay inside the service

        # charged once, after completion, whatever is called again
        for _ in range(2):
            assert dave.get(f"/get_job_result/{job_id}").json()["job_total_credit_cost"] == 3.0
            assert dave.post(f"/approve_job/{job_id}").status_code == 202
        assert dave.get("/get_credit_balance").json() == {"credits": 10.0, "used": 3.0, "reserved": 0.0,
                                                          "available": 7.0}

        hook = wait_for(lambda: list(received), lambda r: len(r) >= 1, timeout=30)
        assert hook[0]["path"] == "/done" and hook[0]["body"]["job_id"] == job_id
        assert hook[0]["body"]["job_status"] == "done" and len(hook[0]["body"]["tasks"]) == 4

        link = tasks[f"street.zip/cam/{Path(chosen[0]['file']).name}"]["download_url"]
        deleted = dave.delete(f"/delete_job/{job_id}")
        assert deleted.status_code == 200 and deleted.json()["job_status"] == "deleted"
        assert dave.get(f"/get_job_result/{job_id}").json()["job_status"] == "deleted"
        syntonym_error(httpx.get(link), 404, "NOT_FOUND")
        assert not (storage / "uploads" / job_id).exists()
        assert dave.get("/get_credit_balance").json()["used"] == 3.0  # what was charged stays charged


def test_syntonym_keys_balance_and_auto_approval(base, photos, face_photo):
    data, _ = face_photo
    folder, chosen = photos("faces", 3)
    syntonym_error(httpx.get(f"{base}/syntonym/get_credit_balance"), 401, "MISSING_API_KEY")
    with syntonym(base, "key-of-nobody") as nobody:
        syntonym_error(nobody.get("/get_credit_balance"), 401, "INVALID_API_KEY")
        syntonym_error(nobody.post("/direct_upload/a.jpg", content=data), 401, "INVALID_API_KEY")

    with syntonym(base, ERIN) as erin:  # 2 credits: a zip of 3 photos is refused at approval
        job = erin.post("/create_upload_session", json={"file_names": ["three.zip"]}).json()
        httpx.put(job["upload_urls"][0]["upload_url"], content=zip_of(folder, chosen)).raise_for_status()
        refused = erin.post(f"/approve_job/{job['job_id']}")
        syntonym_error(refused, 402, "INSUFFICIENT_CREDITS")
        assert "3" in refused.json()["message"] and "2" in refused.json()["message"]
        assert erin.get(f"/get_job_result/{job['job_id']}").json()["job_status"] == "awaiting_approval"
        assert erin.get("/get_credit_balance").json()["available"] == 2.0
        with syntonym(base, DAVE) as dave:  # another key's user never sees the job
            syntonym_error(dave.get(f"/get_job_result/{job['job_id']}"), 404, "NOT_FOUND")

        syntonym_error(erin.post("/direct_upload/a.jpg", params={"model": "swap"}, content=data), 422,
                       "INVALID_PARAMETER")
        syntonym_error(erin.post("/direct_upload/a.jpg", params={"model_config": '{"blur_faces": true}'},
                                 content=data), 422, "INVALID_PARAMETER")
        syntonym_error(erin.post("/direct_upload/a.jpg", content=b"not an image"), 415, "UNSUPPORTED_MEDIA_TYPE")
        syntonym_error(erin.post("/direct_upload/notes.txt", content=data), 422, "INVALID_PARAMETER")

    with syntonym(base, FRED) as fred:  # auto_approve_below 5: one image (1 credit) starts at once
        r = fred.post("/direct_upload/street.jpg", params={"model_config": json.dumps({"slicing": False})},
                      content=data)
        assert r.status_code == 200, r.text
        assert r.json()["job_status"] in ("queued", "processing", "done")
        assert fred.post(f"/approve_job/{r.json()['job_id']}").status_code == 201
        result = wait_for(lambda: fred.get(f"/get_job_result/{r.json()['job_id']}").json(),
                          lambda d: d["job_status"] in ("done", "failed"))
        assert [t["task_status"] for t in result["tasks"]] == ["done"] and result["job_total_credit_cost"] == 1.0
        assert httpx.get(result["tasks"][0]["download_url"]).content[:3] == b"\xff\xd8\xff"
        assert fred.get("/get_credit_balance").json()["used"] == 1.0


def test_syntonym_job_stopped_with_the_server_resumes_and_is_charged_once(tmp_path, photos):
    folder, chosen = photos("faces", 4)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # long enough to be stopped halfway on one worker
        for i in range(16):
            z.write(folder / Path(chosen[i % len(chosen)]["file"]).name, f"{i:02d}.jpg")
    users = write_users(tmp_path / "users.yaml", {DAVE: {"user": "dave", "credits": 100}})
    config = ServiceConfig(storage=str(tmp_path / "storage"), users_file=str(users), workers=1)
    with running(config) as url, syntonym(url, DAVE) as dave:
        job = dave.post("/create_upload_session", json={"file_names": ["long.zip"]}).json()
        httpx.put(job["upload_urls"][0]["upload_url"], content=buf.getvalue()).raise_for_status()
        job_id = job["job_id"]
        dave.post(f"/approve_job/{job_id}").raise_for_status()
        wait_for(lambda: dave.get(f"/get_job_result/{job_id}").json(), lambda d: d["job_status"] != "queued")
    job_json = tmp_path / "storage" / "jobs" / job_id / "job.json"
    stopped = wait_for(lambda: json.loads(job_json.read_text()), lambda d: d["status"] in ("cancelled", "done"))
    assert stopped["status"] in ("cancelled", "done"), stopped  # done only on a machine fast enough to finish

    with running(config) as url, syntonym(url, DAVE) as dave:
        again = dave.post(f"/approve_job/{job_id}")
        assert again.status_code == (200 if stopped["status"] == "cancelled" else 202), again.text
        result = wait_for(lambda: dave.get(f"/get_job_result/{job_id}").json(),
                          lambda d: d["job_status"] in ("done", "failed"))
        assert result["job_status"] == "done" and len(result["tasks"]) == 16
        assert {t["task_status"] for t in result["tasks"]} == {"done"}
        assert result["job_total_credit_cost"] == 16.0
        assert dave.get("/get_credit_balance").json()["used"] == 16.0


def test_openapi_lists_the_new_routes(base):
    paths = httpx.get(f"{base}/openapi.json").json()["paths"]
    for path in ("/v2/task", "/v2/task/{task_id}/status", "/v2/upload/{task_id}", "/syntonym/create_upload_session",
                 "/syntonym/direct_upload/{file_name}", "/syntonym/approve_job/{job_id}",
                 "/syntonym/get_job_result/{job_id}", "/syntonym/delete_job/{job_id}",
                 "/syntonym/notify_on_job_status", "/syntonym/get_credit_balance"):
        assert path in paths, path


# --- property-based: schemathesis over the new routes ---

schema = schemathesis.pytest.from_fixture("api_schema").include(path_regex=r"^/(v2|syntonym)/")


@pytest.fixture(scope="module")
def api_schema(base):
    config = SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False},
                                                      "stateful": {"enabled": False}}})
    return schemathesis.openapi.from_url(f"{base}/openapi.json", config=config)


@schema.parametrize()
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_v2_and_syntonym_routes_never_answer_5xx(case, base):
    # a fresh user of its own for v2, and dave's key for Syntonym (fuzzed calls cannot approve his jobs: ids are random)
    response = case.call(headers={"Authorization": signin(base, "fuzz"), "x-api-key": DAVE}, timeout=120)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])


def test_syntonym_video_upload_is_anonymized_as_a_video(base):
    """A video uploaded to a Syntonym session runs through the same path as a photo (in-process here:
    processor.run_batch hands it to operators/video.py) and comes back a video with every frame."""
    import av
    from video_media import clip_paths

    clip = clip_paths()["carphone_pristine.mp4"]
    with syntonym(base, DAVE) as dave:
        job = dave.post("/create_upload_session", json={"file_names": ["car.mp4"]}).json()
        httpx.put(job["upload_urls"][0]["upload_url"], content=clip.read_bytes()).raise_for_status()
        assert dave.post(f"/approve_job/{job['job_id']}").status_code == 200
        result = wait_for(lambda: dave.get(f"/get_job_result/{job['job_id']}").json(),
                          lambda d: d["job_status"] in ("done", "failed"), timeout=180)
        assert result["job_status"] == "done" and [t["task_status"] for t in result["tasks"]] == ["done"], result
        body = httpx.get(result["tasks"][0]["download_url"]).content
    with av.open(io.BytesIO(body)) as out, av.open(str(clip)) as src:
        assert out.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in out.decode(video=0)) == sum(1 for _ in src.decode(video=0)) == 120
