"""Archives on a real S3 endpoint (moto server): member-level ranged reads, and a whole job."""

from __future__ import annotations

import os
import subprocess
import zipfile

import pytest
from conftest import SHARED, count_s3_get_bytes

from operators.archive_open import _CACHE
from operators.archives import ArchiveOptions, expand_archive, read_member
from operators.sources import list_sources

RAR = SHARED / "fixtures" / "rar"


@pytest.fixture
def bucket(s3fs_client, s3_endpoint, request):
    name = "arch-" + request.node.name.lower().replace("_", "-")[:40]
    s3fs_client.mkdir(name)
    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    return name, opts


def test_one_member_of_a_large_zip_is_a_small_ranged_read(photos, s3fs_client, bucket, tmp_path):
    name, opts = bucket
    folder, _ = photos("faces", 3)
    faces = sorted(folder.iterdir())
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(12):  # 12 x 2 MiB of incompressible filler around the photos
            z.writestr(f"filler/{i:02d}.bin", os.urandom(2 << 20))
            z.write(faces[i % 3], f"cam/{i:02d}.jpg")
    s3fs_client.put(str(archive), f"{name}/in/big.zip")
    size = archive.stat().st_size
    seen = count_s3_get_bytes(opts)
    _CACHE.clear()

    (row,) = list_sources([f"s3://{name}/in/big.zip"], opts)
    rows = {r["member"]: r for r in expand_archive(row, ArchiveOptions(storage_options=opts))}
    assert len(rows) == 24 and all(r["data"] == b"" for r in rows.values())
    listed = seen["bytes"]
    assert read_member(rows["cam/07.jpg"], opts) == faces[1].read_bytes()
    first = seen["bytes"] - listed  # opens the archive again in this "worker": central directory
    assert read_member(rows["cam/08.jpg"], opts) == faces[2].read_bytes()
    second = seen["bytes"] - listed - first  # the open archive is cached: one ranged GET
    print(
        f"archive {size} B: listing fetched {listed} B, first member {first} B, next member {second} B "
        f"(photo {faces[2].stat().st_size} B); {(seen['bytes']) / size:.4f} of the archive in all, "
        f"{seen['calls']} GETs"
    )
    assert listed < 0.01 * size
    assert first < 0.01 * size
    assert second < faces[2].stat().st_size + 2048


def test_rar_and_7z_from_s3(s3fs_client, bucket, photos, tmp_path):
    name, opts = bucket
    folder, _ = photos("faces", 2)
    seven = tmp_path / "s.7z"
    subprocess.run(["7z", "a", "-ms=off", "-bd", "-bso0", str(seven), "."], cwd=folder, check=True)
    for path in (seven, RAR / "komga-rar4-images.rar", RAR / "komga-rar4-solid-images.rar"):
        s3fs_client.put(str(path), f"{name}/in/{path.name}")
    _CACHE.clear()
    for src in list_sources([f"s3://{name}/in/"], opts):
        rows = expand_archive(src, ArchiveOptions(storage_options=opts))
        assert rows and all(r["status"] == "" for r in rows), rows
        for r in rows:
            assert read_member(r, opts)[:4] in (b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1", b"\x89PNG")


def test_job_over_mixed_input_on_s3(ray_local, s3fs_client, bucket, photos, tmp_path):
    from jobs.run import run_job
    from jobs.spec import build_spec
    from operators.manifest import read_table

    name, opts = bucket
    folder, _ = photos("faces", 2)
    faces = sorted(folder.iterdir())
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.write(faces[0], "cam/a.jpg")
        z.writestr("/abs.jpg", b"x")
    subprocess.run(["7z", "a", "-ms=on", "-bd", "-bso0", str(tmp_path / "s.7z"), "."], cwd=folder, check=True)
    s3fs_client.put(str(faces[1]), f"{name}/in/plain.jpg")
    s3fs_client.put(str(tmp_path / "d.zip"), f"{name}/in/d.zip")
    s3fs_client.put(str(tmp_path / "s.7z"), f"{name}/in/s.7z")
    s3fs_client.put(str(RAR / "komga-rar4-solid-images.rar"), f"{name}/in/r.rar")
    spec = build_spec(
        {
            "inputs": [f"s3://{name}/in/"],
            "output": f"s3://{name}/out/",
            "job_id": "s3mix",
            "face": True,
            "detect_actors": 1,
            "storage_options": opts,
            "repack": "zip",
        }
    )
    doc = run_job(spec, log=lambda *_: None)
    assert doc["status"] == "done"
    rows = read_table(f"s3://{name}/out/s3mix", "images", opts).to_pylist()
    got = {(r["rel_path"], r["member"]): (r["status"], r["failure_cause"] or "") for r in rows}
    assert got == {
        ("plain.jpg", ""): ("done", ""),
        ("d.zip/cam/a.jpg", "cam/a.jpg"): ("done", ""),
        ("d.zip", "/abs.jpg"): ("failed", "UNSAFE_PATH"),
        **{(f"s.7z/{p.name}", p.name): ("done", "") for p in faces},
        **{(f"r.rar/komga-{i}.png", f"komga-{i}.png"): ("done", "") for i in (1, 2, 3)},
    }
    assert s3fs_client.exists(f"{name}/out/s3mix/images/s.7z/{faces[0].name}")
    # archive in, archive out, on the object store too
    assert sorted(r["url"] for r in doc["repack"]) == [f"s3://{name}/out/s3mix/archives/{a}.zip"
                                                       for a in ("d", "r.rar", "s.7z")]
    with s3fs_client.open(f"{name}/out/s3mix/archives/s.7z.zip", "rb") as f, zipfile.ZipFile(f) as z:
        assert sorted(z.namelist()) == sorted(p.name for p in faces)
        assert z.read(faces[0].name) == s3fs_client.cat(f"{name}/out/s3mix/images/s.7z/{faces[0].name}")
