"""The charts of jobs/analytics.py (the notebook and `veil report --html`): matplotlib Figures built
without pyplot (Agg renders them; no display, no global state), from the lists of dicts its queries return."""

from __future__ import annotations

import io
from datetime import timedelta

from models.detections import CLASSES  # the same four as the manifest's columns (jobs/analytics.py)


def _figure(title: str, width: float = 7.0, height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    return fig, ax


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_class_counts(data: list[dict]):
    fig, ax = _figure("Detections per class")
    if not data:
        _empty(ax, "detections")
        return fig
    x = range(len(data))
    ax.bar([i - 0.2 for i in x], [r["detections"] for r in data], width=0.4, label="detected")
    ax.bar([i + 0.2 for i in x], [r["anonymised"] for r in data], width=0.4, label="anonymised")
    ax.set_xticks(list(x), [r["class"] for r in data])
    ax.set_ylabel("detections")
    ax.legend()
    return fig


def plot_prefix_counts(data: list[dict], top: int = 15):
    data = data[:top]
    fig, ax = _figure(f"Detections per source prefix (top {top})", height=max(2.5, 0.35 * len(data) + 1))
    if not data:
        _empty(ax, "images")
        return fig
    left = [0] * len(data)
    labels = [_shorten(r["prefix"]) for r in data]
    for c in CLASSES:
        values = [r[c] or 0 for r in data]
        if any(values):
            ax.barh(labels, values, left=left, label=c)
            left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("detections")
    if any(left):
        ax.legend()
    return fig


def _shorten(text: str, n: int = 48) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def plot_score_histogram(data: list[dict]):
    fig, ax = _figure("Score distribution per class")
    if not data:
        _empty(ax, "detections")
        return fig
    for c in sorted({r["class"] for r in data}):
        sel = [r for r in data if r["class"] == c]
        ax.bar([r["bin_lo"] for r in sel], [r["detections"] for r in sel], align="edge", alpha=0.6, label=c,
               width=[r["bin_hi"] - r["bin_lo"] for r in sel])
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    ax.set_ylabel("detections")
    ax.legend()
    return fig


def plot_area_shares(shares: list[float]):
    fig, ax = _figure("Share of image area anonymised (images with any)")
    if not shares:
        _empty(ax, "anonymised images")
        return fig
    ax.hist(shares, bins=20, range=(0, max(shares)))
    ax.set_xlabel("anonymised area / image area")
    ax.set_ylabel("images")
    return fig


def plot_failure_causes(data: list[dict]):
    fig, ax = _figure("Items not done, by cause")
    if not data:
        _empty(ax, "failed or skipped items")
        return fig
    ax.barh([f"{r['status']}: {r['cause'] or '-'}" for r in data], [r["items"] for r in data])
    ax.invert_yaxis()
    ax.set_xlabel("items")
    return fig


def plot_job_costs(data: list[dict]):
    fig, ax = _figure("Credits and compute per job")
    if not data:
        _empty(ax, "jobs")
        return fig
    names = [_shorten(str(r["job_id"]), 24) for r in data]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [r["credits"] or 0 for r in data], width=0.4, label="credits")
    ax.set_ylabel("credits")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax2 = ax.twinx()
    ax2.bar([i + 0.2 for i in x], [(r["cpu_s"] or 0) + (r["gpu_s"] or 0) for r in data], width=0.4,
            color="tab:orange", label="CPU + GPU seconds")
    ax2.set_ylabel("compute seconds")
    fig.legend(loc="outside lower center", ncols=2)
    return fig


def plot_throughput(data: list[dict]):
    fig, ax = _figure("Throughput over time (all jobs)")
    if not data:
        _empty(ax, "processed items")
        return fig
    width = timedelta(seconds=data[0]["bucket_s"])
    ax.bar([r["bucket_start"] for r in data], [r["items_per_s"] for r in data], width=width, align="edge")
    ax.set_xlim(data[0]["bucket_start"] - width, data[-1]["bucket_start"] + 2 * width)
    ax.set_ylabel(f"items/s ({data[0]['bucket_s']} s buckets)")
    ax.set_xlabel("processed_at (UTC)")
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    return fig


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def show(fig) -> None:
    """Display a Figure in a notebook as a PNG (whatever matplotlib backend the kernel has)."""
    from IPython.display import Image, display

    display(Image(png(fig)))
