"""End to end against a real S3 endpoint: moto's server on 127.0.0.1, read and written with s3fs."""

from __future__ import annotations

import io

import pyarrow.parquet as pq

from jobs.run import run_job
from jobs.spec import build_spec


def test_s3_in_s3_out(s3_endpoint, s3fs_client, photos, ray_local):
    fs = s3fs_client
    fs.mkdir("raw")
    fs.mkdir("anon")
    folder, chosen = photos("faces", 3)
    for p in sorted(folder.iterdir()):
        fs.put_file(str(p), f"raw/batch-1/{p.name}")
    fs.pipe_file("raw/batch-1/broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")

    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    spec = build_spec({"inputs": ["s3://raw/"], "output": "s3://anon/", "job_id": "s3job", "storage_options": options})
    doc = run_job(spec)

    assert doc["status"] == "done" and doc["totals"]["done"] == 3 and doc["totals"]["failed"] == 1
    fs.invalidate_cache()
    written = sorted(fs.find("anon/s3job/images"))
    assert written == sorted(f"anon/s3job/images/batch-1/{p.name}" for p in folder.iterdir())
    parts = fs.glob("anon/s3job/manifest/images/part-*.parquet")
    rows = [r for p in parts for r in pq.read_table(io.BytesIO(fs.cat_file(p))).to_pylist()]
    assert {r["rel_path"]: r["status"] for r in rows}["batch-1/broken.jpg"] == "failed"
    assert all(r["source_url"].startswith("s3://raw/batch-1/") for r in rows)
    assert all(r["output_url"].startswith("s3://anon/s3job/images/") for r in rows if r["status"] == "done")
    assert sum(r["n_face"] for r in rows) >= 10  # the dlib faces set: 18 labelled faces in 4 photos
    anonymized = [r for r in rows if r["anonymized"]]
    assert anonymized and all(fs.size(r["output_url"]) == r["bytes_out"] for r in anonymized)
    assert fs.exists("anon/s3job/job.json")
