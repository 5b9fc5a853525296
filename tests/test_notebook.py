"""The analytics notebook, executed end to end with nbclient over the manifest of a real job, and the
same analytics as an HTML page and over S3."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import nbformat
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from jobs import analytics
from jobs.run import run_job
from jobs.spec import build_spec

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "manifest_analytics.ipynb"
OPTIONAL = ["cpu_prepare_ms", "cpu_detect_ms", "cpu_write_ms", "gpu_detect_ms"]


def _legacy_copy(job_root: Path, dest: Path) -> None:
    """The same job as one written before per-stage compute columns and job.json credits/cost existed."""
    for table in ("images", "detections"):
        (dest / "manifest" / table).mkdir(parents=True)
        for part in (job_root / "manifest" / table).glob("*.parquet"):
            t = pq.read_table(part)
            t = t.drop_columns([c for c in OPTIONAL if c in t.column_names])
            t = t.set_column(t.column_names.index("job_id"), "job_id", pc.replace_substring(t["job_id"], "nb1", "old"))
            pq.write_table(t, dest / "manifest" / table / part.name)
    doc = json.loads((job_root / "job.json").read_text())
    doc = {k: v for k, v in doc.items() if k not in ("credits", "cost")} | {"job_id": "old"}
    (dest / "job.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def output_root(tmp_path_factory, shared_dir, eval_annotations, ray_local) -> Path:
    """OUTPUT with two jobs: `nb1`, run for real over 3 photos (two input folders) and a broken file,
    and `old`, its copy in the manifest's earlier shape."""
    root = tmp_path_factory.mktemp("analytics")
    images = eval_annotations("faces")["images"][:3]
    for folder, chosen in (("a", images[:2]), ("b", images[2:])):
        (root / "in" / folder).mkdir(parents=True)
        for im in chosen:
            shutil.copy2(shared_dir / "eval" / "faces" / im["file"], root / "in" / folder / Path(im["file"]).name)
    (root / "in" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    run_job(build_spec({"inputs": [str(root / "in")], "output": str(root / "out"), "job_id": "nb1", "face": True}))
    _legacy_copy(root / "out" / "nb1", root / "out" / "old")
    return root / "out"


def _detections(out: Path) -> Counter:
    t = pq.read_table(list((out).glob("*/manifest/detections/*.parquet")))
    return Counter(t["class"].to_pylist())


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _table(text: str) -> list[dict]:
    header, *lines = [line for line in text.splitlines() if line.strip()]
    return [dict(zip(header.split(), line.split(), strict=False)) for line in lines]


def test_notebook_runs_over_real_manifest(output_root):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "output_root" in params[0].source
    env = {"VEIL_OUTPUT_ROOT": str(output_root), "VEIL_STORAGE_OPTIONS": "{}", "MPLBACKEND": "Agg"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=180, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    cells = {c.metadata["tags"][0]: c for c in nb.cells if c.cell_type == "code" and c.metadata.get("tags")}

    overview = _table(_text(cells["overview"]))[0]
    assert overview["jobs"] == "2" and overview["images"] == "8" and overview["failed"] == "2"

    expected = _detections(output_root)
    assert expected["face"] > 0
    printed = {r["class"]: int(r["detections"]) for r in _table(_text(cells["classes"]))}
    assert printed == dict(expected)

    jobs = {r["job_id"]: r for r in _table(_text(cells["jobs"]))}
    assert set(jobs) == {"nb1", "old"} and jobs["old"]["cost"] == "-"  # old job: no cost in job.json
    doc = json.loads((output_root / "nb1" / "job.json").read_text())
    if "credits" in doc:
        assert float(jobs["nb1"]["credits"]) == pytest.approx(doc["credits"]["total"], rel=1e-3)

    prefixes = [r["prefix"] for r in _table(_text(cells["prefixes"]))]
    assert sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in prefixes) == ["a", "b"]
    assert "CONTENT_TYPE_ERROR" in _text(cells["failures"])
    for tag in ("jobs", "classes", "prefixes", "scores", "area", "failures", "throughput"):
        assert any("image/png" in o.get("data", {}) for o in cells[tag].outputs), tag


def test_notebook_without_an_output_root_says_what_to_set(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    saved = os.environ.get("VEIL_OUTPUT_ROOT")
    os.environ["VEIL_OUTPUT_ROOT"] = str(tmp_path / "nothing-here")
    try:
        with pytest.raises(CellExecutionError) as failed:
            NotebookClient(nb, timeout=180, kernel_name="python3",
                           resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        os.environ.pop("VEIL_OUTPUT_ROOT") if saved is None else os.environ.__setitem__("VEIL_OUTPUT_ROOT", saved)
    assert f"no manifest under {tmp_path / 'nothing-here'}" in str(failed.value)
    assert "set VEIL_OUTPUT_ROOT" in str(failed.value) and "Resource" not in str(failed.value)


def test_html_report(output_root, tmp_path):
    html_path = analytics.write_html_report(str(output_root / "nb1"), str(tmp_path / "report.html"))
    page = Path(html_path).read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 7 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "Detections per class" in page and "Failures" in page
    overview = _table(page.split("<pre>", 1)[1].split("</pre>", 1)[0])[0]
    assert overview["jobs"] == "1" and int(overview["detections"]) == _detections(output_root)["face"] // 2


def test_analytics_over_s3(output_root, s3_endpoint, s3fs_client):
    s3fs_client.mkdir("nb-out")
    s3fs_client.put(str(output_root / "nb1") + "/", "nb-out/nb1/", recursive=True)
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    con = analytics.connect("s3://nb-out/", options)
    counts = {r["class"]: r["detections"] for r in analytics.class_counts(con)}
    assert counts == {k: v // 2 for k, v in _detections(output_root).items()}
    assert analytics.job_costs(con)[0]["job_id"] == "nb1"
