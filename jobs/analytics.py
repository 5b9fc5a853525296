"""Analytics over the manifest and job reports, with DuckDB: what notebooks/manifest_analytics.ipynb shows,
and `write_html_report` renders the same as one self-contained HTML page.

    con = connect("s3://anon/")          # an output root (all its jobs) or one job's folder
    class_counts(con)                     # -> [{"class": "face", "detections": 12, ...}, ...]
    plot_class_counts(class_counts(con))  # -> a matplotlib Figure

`connect` exposes three relations: `images` and `detections` (the Parquet manifest, every part of every
job, read where it lies: local files directly, remote ones through fsspec) and `jobs` (one row per
job.json). Columns added to the manifest or job.json later (per-stage CPU/GPU time, credits, cost) are
NULL where a job predates them, so the same queries run over old and new jobs alike. Query functions
return lists of plain dicts; plot functions build Figures without pyplot (Agg renders them; no display).
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import datetime

import pyarrow as pa

try:
    import duckdb
except ImportError as exc:  # an optional extra: say which
    raise ImportError("veil's analytics need DuckDB and matplotlib: pip install 'veil[analytics]'") from exc

from jobs.analytics_plots import (  # re-exported: the notebook takes everything from here
    plot_area_shares,
    plot_class_counts,
    plot_failure_causes,
    plot_job_costs,
    plot_prefix_counts,
    plot_score_histogram,
    plot_throughput,
    png,
    show,
)
from operators.manifest import DETECTIONS_SCHEMA, IMAGES_SCHEMA
from operators.storage import filesystem, is_local, write_atomic

CLASSES = ("face", "license_plate", "person", "vehicle")
# Manifest columns a job may lack (added after the first jobs were written): NULL when absent.
OPTIONAL_IMAGE_COLUMNS = {"credits": "DOUBLE", "cpu_prepare_ms": "DOUBLE", "cpu_detect_ms": "DOUBLE",
                          "cpu_write_ms": "DOUBLE", "gpu_detect_ms": "DOUBLE"}
JOBS_SCHEMA = pa.schema([
    ("job_id", pa.string()), ("status", pa.string()), ("description", pa.string()),
    ("created_at", pa.timestamp("s", tz="UTC")), ("started_at", pa.timestamp("s", tz="UTC")),
    ("finished_at", pa.timestamp("s", tz="UTC")), ("wall_s", pa.float64()), ("throughput_img_s", pa.float64()),
    ("items", pa.int64()), ("done", pa.int64()), ("failed", pa.int64()), ("skipped", pa.int64()),
    ("megapixels", pa.float64()), ("credits_total", pa.float64()), ("cost_total", pa.float64()),
    ("cost_cpu_s", pa.float64()), ("cost_gpu_s", pa.float64()), ("cost_per_1000_images", pa.float64()),
    ("currency", pa.string()),
])


# --- connecting ------------------------------------------------------------------------------------


def connect(root: str, storage_options: dict | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with `images`, `detections` and `jobs` over an output root or one job folder."""
    fs, path = filesystem(root, storage_options)
    path = path.rstrip("/")
    prefix = path if fs.exists(f"{path}/job.json") or fs.exists(f"{path}/manifest") else f"{path}/*"
    if not fs.glob(f"{prefix}/job.json") and not fs.glob(f"{prefix}/manifest/images/*.parquet"):
        raise FileNotFoundError(f"no manifest under {root} (neither */job.json nor */manifest/images/*.parquet); "
                                "set VEIL_OUTPUT_ROOT to a veil OUTPUT folder or one job's folder")
    con = duckdb.connect()
    if not is_local(root):
        con.register_filesystem(fs)  # DuckDB reads s3://... through s3fs, with the job's options

    def url(p: str) -> str:
        return p if is_local(root) else fs.unstrip_protocol(p)

    for table, schema in (("images", IMAGES_SCHEMA), ("detections", DETECTIONS_SCHEMA)):
        parts = sorted(url(p) for p in fs.glob(f"{prefix}/manifest/{table}/*.parquet"))
        if parts:
            # union_by_name: parts written before a column was added read it as NULL
            source = f"read_parquet({_sql_list(parts)}, union_by_name=true)"
            con.execute(f"CREATE VIEW {table}_raw AS SELECT * FROM {source}")
        else:
            con.register(f"{table}_raw", schema.empty_table())
    present = {r[0] for r in con.execute("DESCRIBE images_raw").fetchall()}
    extra = "".join(f", NULL::{t} AS {c}" for c, t in OPTIONAL_IMAGE_COLUMNS.items() if c not in present)
    con.execute(f"CREATE VIEW images AS SELECT *{extra} FROM images_raw")
    con.execute("CREATE VIEW detections AS SELECT * FROM detections_raw")
    docs = [json.loads(fs.cat_file(p)) for p in sorted(fs.glob(f"{prefix}/job.json"))]
    con.register("jobs_raw", pa.Table.from_pylist([_job_row(d) for d in docs], schema=JOBS_SCHEMA))
    con.execute("CREATE VIEW jobs AS SELECT * FROM jobs_raw")
    return con


def _sql_list(items: list[str]) -> str:
    return "[" + ", ".join("'" + s.replace("'", "''") + "'" for s in items) + "]"


def _ts(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _job_row(doc: dict) -> dict:
    """One flat row of job.json; `credits` and `cost` are optional objects."""
    totals = doc.get("totals") or {}
    credits = doc.get("credits") or {}
    cost = doc.get("cost") or {}
    return {
        "job_id": doc.get("job_id"), "status": doc.get("status"), "description": doc.get("description"),
        "created_at": _ts(doc.get("created_at")), "started_at": _ts(doc.get("started_at")),
        "finished_at": _ts(doc.get("finished_at")), "wall_s": doc.get("wall_s"),
        "throughput_img_s": doc.get("throughput_img_s"), "items": totals.get("items"), "done": totals.get("done"),
        "failed": totals.get("failed"), "skipped": totals.get("skipped"), "megapixels": totals.get("megapixels"),
        "credits_total": credits.get("total"), "cost_total": cost.get("total"), "cost_cpu_s": cost.get("cpu_s"),
        "cost_gpu_s": cost.get("gpu_s"), "cost_per_1000_images": cost.get("per_1000_images"),
        "currency": cost.get("currency"),
    }


def rows(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    """The result of a query as a list of dicts (column name -> Python value)."""
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


# --- queries ---------------------------------------------------------------------------------------


def overview(con: duckdb.DuckDBPyConnection) -> dict:
    return rows(con, """
        SELECT (SELECT count(*) FROM jobs) AS jobs, count(*) AS images,
               count(*) FILTER (status = 'done') AS done, count(*) FILTER (status = 'failed') AS failed,
               count(*) FILTER (status = 'skipped') AS skipped, count(*) FILTER (anonymized) AS anonymized,
               (SELECT count(*) FROM detections) AS detections
        FROM images""")[0]


def class_counts(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Detections per class: how many, how many anonymised, in how many images, and their scores."""
    return rows(con, """
        SELECT class, count(*) AS detections, count(*) FILTER (is_anonymised) AS anonymised,
               count(DISTINCT (job_id, item_id)) AS images,
               round(avg(score), 3) AS mean_score, round(quantile_cont(score, 0.5), 3) AS median_score
        FROM detections GROUP BY class ORDER BY detections DESC, class""")


def prefix_counts(con: duckdb.DuckDBPyConnection, limit: int = 50) -> list[dict]:
    """Images and detections per source prefix (the folder of the source file; an archive's members
    count under the archive's folder)."""
    per_class = ", ".join(f"sum(n_{c}) AS {c}" for c in CLASSES)
    return rows(con, f"""
        SELECT regexp_replace(source_url, '[^/]*$', '') AS prefix, count(*) AS images,
               count(*) FILTER (n_face + n_license_plate + n_person + n_vehicle > 0) AS with_detections,
               sum(n_face + n_license_plate + n_person + n_vehicle) AS detections, {per_class}
        FROM images GROUP BY prefix ORDER BY detections DESC, prefix LIMIT {int(limit)}""")


def score_histogram(con: duckdb.DuckDBPyConnection, bins: int = 20) -> list[dict]:
    """Detections per class and score bin [lo, lo + 1/bins)."""
    return rows(con, f"""
        SELECT class, least(floor(score * {bins}), {bins - 1}) / {bins} AS bin_lo,
               least(floor(score * {bins}), {bins - 1}) / {bins} + 1 / {bins} AS bin_hi, count(*) AS detections
        FROM detections GROUP BY ALL ORDER BY class, bin_lo""")


def _image_shares_sql() -> str:
    # Share of each done image's area that was anonymised: the anonymised boxes' area fractions summed
    # (overlaps count twice, so capped at 1; ellipses cover less than their box).
    return """
        SELECT i.job_id, i.item_id, least(1.0, coalesce(sum(d.area_frac) FILTER (d.is_anonymised), 0)) AS share
        FROM images i LEFT JOIN detections d ON d.job_id = i.job_id AND d.item_id = i.item_id
        WHERE i.status = 'done' GROUP BY i.job_id, i.item_id"""


def anonymized_area(con: duckdb.DuckDBPyConnection) -> dict:
    """Share of image area anonymised over done images: mean, median, p90, max, and how many images."""
    return rows(con, f"""
        SELECT count(*) AS images, count(*) FILTER (share > 0) AS anonymized_images,
               round(avg(share), 4) AS mean_share, round(quantile_cont(share, 0.5), 4) AS median_share,
               round(quantile_cont(share, 0.9), 4) AS p90_share, round(max(share), 4) AS max_share
        FROM ({_image_shares_sql()})""")[0]


def area_shares(con: duckdb.DuckDBPyConnection) -> list[float]:
    """The anonymised share of every done image that has one (for a histogram)."""
    return [r["share"] for r in rows(con, f"SELECT share FROM ({_image_shares_sql()}) WHERE share > 0")]


def failure_causes(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Failed and skipped items by cause, with one example error message."""
    return rows(con, """
        SELECT status, coalesce(failure_cause, '') AS cause, count(*) AS items, any_value(error) AS example
        FROM images WHERE status <> 'done' GROUP BY ALL ORDER BY items DESC, status, cause""")


def job_costs(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Per job: status, items, credits and compute cost. From job.json where it has them, else summed
    from the manifest (credits, per-stage CPU/GPU milliseconds) — NULL where neither has them."""
    return rows(con, """
        WITH m AS (
            SELECT job_id, count(*) AS items, count(*) FILTER (status = 'done') AS done,
                   sum(credits) AS credits,
                   sum(coalesce(cpu_prepare_ms, 0) + coalesce(cpu_detect_ms, 0) + coalesce(cpu_write_ms, 0))
                       FILTER (cpu_prepare_ms IS NOT NULL OR cpu_detect_ms IS NOT NULL) / 1000 AS cpu_s,
                   sum(gpu_detect_ms) / 1000 AS gpu_s,
                   min(processed_at) AS first_at, max(processed_at) AS last_at
            FROM images GROUP BY job_id)
        SELECT coalesce(j.job_id, m.job_id) AS job_id, j.status, coalesce(m.items, j.items) AS items,
               coalesce(m.done, j.done) AS done, round(coalesce(j.credits_total, m.credits), 3) AS credits,
               round(coalesce(j.cost_cpu_s, m.cpu_s), 3) AS cpu_s, round(coalesce(j.cost_gpu_s, m.gpu_s), 3) AS gpu_s,
               j.cost_total AS cost, j.cost_per_1000_images AS cost_per_1000_images, j.currency,
               j.wall_s, j.throughput_img_s
        FROM jobs j FULL OUTER JOIN m ON m.job_id = j.job_id
        ORDER BY coalesce(j.started_at, m.first_at), job_id""")


def throughput(con: duckdb.DuckDBPyConnection, buckets: int = 30) -> list[dict]:
    """Items finished per time bucket (by processed_at, all jobs together); the bucket width is
    chosen so the span is cut into about `buckets` pieces, whole seconds."""
    span = con.execute("SELECT epoch(max(processed_at)) - epoch(min(processed_at)) FROM images").fetchone()[0]
    if span is None:
        return []
    width = max(1, math.ceil(span / buckets))
    return rows(con, f"""
        SELECT to_timestamp(floor(epoch(processed_at) / {width}) * {width}) AS bucket_start,
               {width} AS bucket_s, count(*) AS items, round(count(*) / {width}, 3) AS items_per_s
        FROM images WHERE processed_at IS NOT NULL GROUP BY ALL ORDER BY bucket_start""")


# --- text and plots --------------------------------------------------------------------------------


def format_table(data: list[dict] | dict, columns: list[str] | None = None) -> str:
    """A plain-text table (one row per dict), columns aligned, None as '-'."""
    data = [data] if isinstance(data, dict) else data
    if not data:
        return "(none)"
    columns = columns or list(data[0])

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in data]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


# --- the whole report ------------------------------------------------------------------------------


def sections(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, object | None]]:
    """(title, text table, Figure or None) for every part of the report, in order."""
    classes = class_counts(con)
    return [
        ("Overview", format_table(overview(con)), None),
        ("Jobs: credits and compute", format_table(job_costs(con)), plot_job_costs(job_costs(con))),
        ("Detections per class", format_table(classes), plot_class_counts(classes)),
        ("Per source prefix", format_table(prefix_counts(con)), plot_prefix_counts(prefix_counts(con))),
        ("Scores", format_table(classes, ["class", "detections", "mean_score", "median_score"]),
         plot_score_histogram(score_histogram(con))),
        ("Anonymised area", format_table(anonymized_area(con)), plot_area_shares(area_shares(con))),
        ("Failures", format_table(failure_causes(con)), plot_failure_causes(failure_causes(con))),
        ("Throughput", format_table(throughput(con)), plot_throughput(throughput(con))),
    ]


def write_html_report(root: str, html_path: str, storage_options: dict | None = None,
                      title: str | None = None, output_options: dict | None = None) -> str:
    """Render the analytics of an output root (or one job folder) as one self-contained HTML page
    (tables as text, charts as base64 PNGs) at `html_path` (a path or fsspec URL); returns it."""
    con = connect(root, storage_options)
    title = title or f"veil analytics: {root}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
             "pre{background:#f6f6f6;padding:.6em;overflow-x:auto}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>Generated {datetime.now().astimezone().isoformat(timespec='seconds')}</p>"]
    for heading, table, fig in sections(con):
        parts.append(f"<h2>{html.escape(heading)}</h2><pre>{html.escape(table)}</pre>")
        if fig is not None:
            data = base64.b64encode(png(fig)).decode()
            parts.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    write_atomic(html_path, "\n".join(parts).encode(), output_options)
    return html_path


__all__ = [
    "anonymized_area", "area_shares", "class_counts", "connect", "failure_causes", "format_table", "job_costs",
    "overview", "plot_area_shares", "plot_class_counts", "plot_failure_causes", "plot_job_costs",
    "plot_prefix_counts", "plot_score_histogram", "plot_throughput", "prefix_counts", "rows", "score_histogram",
    "sections", "show", "throughput", "write_html_report",
]
