"""`veil eval SET --sweep CLASS`: score thresholds chosen by a rule on half A, reported on half B.

The job runs once with the class kept down to a low floor (`--floor`, default 0.02); every
threshold of the grid is then applied offline to those detections (jobs/eval_scoring.py), so a
sweep costs one run. Offline equals a run at that threshold where detections merge by NMS (greedy
NMS keeps the same boxes above any threshold). Where members are averaged (`fusion: mean`, e.g.
the balanced profile's faces) each member is decoded down to floor / n instead of threshold / n,
so a weak member adds its share to the mean and offline scores can be slightly higher: confirm
a choice with a plain run of a profile holding it (`veil eval --models FILE --profile NAME`).
A profile member's own `min_score` (e.g. the plate members' 0.1 and 0.5) still cuts before
fusion: the floor does not reach under it.

The rule (`choose_thresholds`), on half A only, for a size-aware pair in the profiles' format
`[{"below": 20, "score": SMALL}, {"score": LARGE}]` (detection's longer side):

1. LARGE = the highest grid value whose recall on boxes >= 20 px reaches `target` (all
   detections held to it); if none does, the lowest value.
2. SMALL = the highest grid value that, with LARGE, keeps the all-sizes recall >= `target_all`;
   if none does, the lowest.

`reached` says whether the chosen pair meets each target on A. Ground-truth sizes and detection
sizes differ: a face just over 20 px is often found by a box just under it, so SMALL can cost
recall on faces >= 20 px (wider/: 0.954 -> 0.929 on A with SMALL 0.3); the second table shows it.

The figures of the chosen pair on half B are the ones to quote; A's show how far B drifts.
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs.eval_scoring import Thresholds, apply_thresholds, score_set, split_halves

DEFAULT_GRID: tuple[float, ...] = (0.02, 0.03, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7)
SMALL_BELOW = 20  # px, the detection's longer side: the profiles' size band


def size_aware(small: float, large: float, below: float = SMALL_BELOW) -> list[dict]:
    """Profile-format thresholds: `small` for detections under `below` px, `large` for the rest."""
    return [{"below": below, "score": small}, {"score": large}]


def sweep(annotations: dict, found: dict[str, list[dict]], cls: str, grid: Sequence[Thresholds]) -> list[dict]:
    """For each thresholds of `grid` (a number or size-aware rules): `cls`'s figures on
    `annotations` ({thresholds, detections, false_positives, buckets}) from the floor-run `found`."""
    return [{"thresholds": t, **score_set(annotations, apply_thresholds(found, cls, t), [cls])["classes"][cls]}
            for t in grid]


def choose_thresholds(annotations: dict, found: dict[str, list[dict]], cls: str,
                      values: Sequence[float] = DEFAULT_GRID, target: float = 0.95, target_all: float = 0.75,
                      below: float = SMALL_BELOW) -> dict:
    """The rule of the module doc: picked on half A, figures on A and B of the chosen pair."""
    halves = split_halves(annotations)
    values = sorted(set(values), reverse=True)  # highest first: the first that passes is taken

    def on_a(t: Thresholds) -> dict:
        return score_set(halves["A"], apply_thresholds(found, cls, t), [cls])["classes"][cls]["buckets"]

    large = next((t for t in values if _recall(on_a(t), ">=20") >= target), values[-1])
    small = next((t for t in values if _recall(on_a(size_aware(t, large, below)), "all") >= target_all), values[-1])
    chosen = size_aware(small, large, below)
    final = on_a(chosen)
    return {
        "class": cls,
        "rule": f"on half A: >= {below} px at the highest threshold with recall >= {target} on boxes >= 20 px; "
                f"< {below} px at the highest keeping all-sizes recall >= {target_all}",
        "targets": {">=20": target, "all": target_all},
        "reached": {">=20": _recall(final, ">=20") >= target, "all": _recall(final, "all") >= target_all},
        "thresholds": chosen,
        "A": sweep(halves["A"], found, cls, [chosen])[0],
        "B": sweep(halves["B"], found, cls, [chosen])[0],
    }


def run_sweep(annotations: dict, found: dict[str, list[dict]], cls: str, floor: float,
              values: Sequence[float] = DEFAULT_GRID, target: float = 0.95, target_all: float = 0.75,
              below: float = SMALL_BELOW) -> dict:
    """The whole sweep report: uniform thresholds on A and B, the chosen pair, and the < `below` px
    threshold swept with the chosen >= `below` px one."""
    values = sorted(v for v in set(values) if v >= floor)  # under the floor nothing was kept
    if not values:
        raise ValueError(f"no sweep threshold at or above the floor {floor}")
    halves = split_halves(annotations)
    chosen = choose_thresholds(annotations, found, cls, values, target, target_all, below)
    large = chosen["thresholds"][-1]["score"]
    small_grid = [size_aware(t, large, below) for t in values]
    return {
        "class": cls, "floor": floor, "grid": values, "below": below,
        "images": {h: len(part["images"]) for h, part in halves.items()},
        "uniform": {h: sweep(part, found, cls, values) for h, part in halves.items()},
        "small": {h: sweep(part, found, cls, small_grid) for h, part in halves.items()},
        "chosen": chosen,
    }


def format_sweep(report: dict) -> str:
    cls, below = report["class"], report["below"]
    head = f"{'recall all':>10} {'<20':>5} {'>=20':>5} | {'covered >=20':>12} | {'prec >=20':>9}"
    lines = [f"sweep {cls} (floor {report['floor']}, thresholds applied offline to one run): "
             f"half A {report['images']['A']} images, half B {report['images']['B']} images",
             f"  {'threshold':>20}   A: {head}   B: {head}"]
    for title, key in (("one threshold for all sizes", "uniform"),
                       (f"< {below} px swept, >= {below} px at the chosen one", "small")):
        lines.append(f"  {title}")
        for a, b in zip(report[key]["A"], report[key]["B"], strict=True):
            label = threshold_label(a["thresholds"], short=True)
            lines.append(f"  {label:>20}   A: {_cells(a['buckets'])}   B: {_cells(b['buckets'])}")
    ch = report["chosen"]
    missed = [k for k, ok in ch["reached"].items() if not ok]
    top = [r["score"] for r in ch["thresholds"]].count(max(report["grid"]))
    lines.append(f"  chosen ({ch['rule']}): thresholds {threshold_label(ch['thresholds'])}"
                 + (f"  [target not reached on A: {', '.join(missed)}]" if missed else "")
                 + ("  [the grid's highest: a higher one may pass too]" if top else ""))
    for h in ("A", "B"):
        lines.append(f"  {'half ' + h:>20}   {_cells(ch[h]['buckets'])}")
    return "\n".join(lines)


def threshold_label(t: Thresholds, short: bool = False) -> str:
    """A threshold as the table shows it (short) or as a profile's YAML takes it."""
    if isinstance(t, int | float):
        return f"{t:g}"
    if short:
        return ", ".join((f"<{r['below']:g}: " if "below" in r else "else ") + f"{r['score']:g}" for r in t)
    return "[" + ", ".join(("{" + (f"below: {r['below']:g}, " if "below" in r else "") + f"score: {r['score']:g}}}")
                           for r in t) + "]"


def _cells(b: dict) -> str:
    def f(key: str, field: str = "recall") -> str:
        v = (b.get(key) or {}).get(field)
        return "  -  " if v is None else f"{v:.3f}"

    return (f"{f('all'):>10} {f('<20')} {f('>=20')} | {f('>=20', 'covered_rate'):>12} | "
            f"{f('>=20', 'precision'):>9}")


def _recall(buckets: dict, key: str) -> float:
    """Recall of a bucket; a bucket without boxes has nothing to miss (1.0)."""
    b = buckets.get(key) or {}
    return 1.0 if not b.get("boxes") else b["recall"]
