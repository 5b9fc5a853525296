"""Detect (an actor pool): run the job's models over the detection copies, in batches.

`Detector` loads each model once (from weights bytes handed to it, so workers need no disk or
network) and follows the job's profile (models/profiles.py): for each class, each member model
looks at the batch at its scale, with its tiles and vehicle crops (models/passes.py); a model run
serving several classes runs once; the members' findings are fused (mean or union), kept above
the class's size-aware thresholds, and mapped back to stored full-resolution pixels. Rows that
failed earlier pass through untouched.

The job's `format` chooses the tiles: `auto` (each catalog entry's own `passes.tiling`; images
recognised as 360-degree panoramas are handled as `panorama`), `whole` (no tiles), `panorama`
(wrap-around at the left/right seam, and square tiles for fixed-size models, see `_tile_grid`),
or Celantur's `{"number": [nx, ny], "overlap": [ox, oy]}` (that grid for every model).
"""

from __future__ import annotations

import re
import time

import numpy as np

from models.adapters import adapter_class
from models.catalog import ModelEntry
from models.detections import CLASSES, ROW_COLUMNS, Detections
from models.passes import (
    Overlap,
    View,
    combine_passes,
    grid_for,
    near,
    panorama_grid,
    run_views,
    seam_strip,
    tiled_views,
    unwrap_seam,
    vehicle_crop_views,
    wrap_seam,
)
from models.profiles import Profile
from models.runtime import release_freed_memory
from operators.codecs import jpeg_header_segments, png_chunks
from operators.orientation import boxes_to_stored
from operators.rows import FailureCause, Status

TILING_PRESETS = ("whole", "auto", "panorama")


class Detector:
    def __init__(
        self,
        models: list[tuple[dict, bytes]],
        classes: list[str],
        profile: dict,
        backend: str = "cpu",
        threads: int = 0,
        tiling: str | dict = "auto",  # the seed APIs' `format`
        adapters: list | None = None,
    ):
        """`models`: (catalog entry as a dict, prepared weights) pairs; `classes`: what to keep;
        `profile`: a resolved Profile as a dict (models/profiles.py: members, fusion, thresholds
        per class); `tiling`: whole | auto | panorama | {"number": [nx, ny], "overlap": [ox, oy]}
        (module doc); `adapters`: models already loaded (a service shares them), used as well."""
        if isinstance(tiling, str) and tiling not in TILING_PRESETS:
            raise ValueError(f"format (tiling) must be one of {TILING_PRESETS} or a tile grid, got {tiling!r}")
        self.tiling = tiling
        adapters = list(adapters or [])
        for entry_fields, weights in models:
            entry = ModelEntry(**entry_fields)
            adapters.append(adapter_class(entry.adapter)(entry, weights, backend, threads))
        self.adapters = {a.entry.name: a for a in adapters}
        self.profile = Profile.model_validate(profile)
        self.classes = list(classes)
        # Vehicles first: plate members crop around them or keep only plates near them.
        self.plans = sorted(((c, p) for c, p in self.profile.classes.items()
                             if c in self.classes or (c == "vehicle" and self._needs_vehicles())),
                            key=lambda cp: cp[0] != "vehicle")
        self.cuts = self._decode_cuts()
        self.on_gpu = backend == "cuda"

    def _needs_vehicles(self) -> bool:
        return any(m.vehicle_crops or m.near_vehicle is not None
                   for c, p in self.profile.classes.items() if c in self.classes for m in p.members)

    def _decode_cuts(self) -> dict[tuple, dict[str, float]]:
        """Per model run, the score each class is decoded down to: what can still reach the class's
        lowest threshold after fusion (with `mean` over n members, a member's s adds s / n)."""
        cuts: dict[tuple, dict[str, float]] = {}
        for cls, plan in self.plans:
            n = len(plan.members) if plan.fusion == "mean" else 1
            for m in plan.members:
                cut = max(m.min_score, plan.lowest() / n)
                run = cuts.setdefault(m.pass_key(), {})
                run[cls] = min(run.get(cls, 1.0), cut)
        return cuts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0, cpu0 = time.perf_counter(), time.process_time()
        todo = [i for i, s in enumerate(batch["status"]) if s == Status.PENDING]
        # A GPU gains from a batch; the CPU provider does not (one image at a time ran 8.7 img/s
        # against 5.2 in batches of 8 for the face models at 512 px, and peaked 200 MiB lower).
        step = max(len(todo), 1) if self.on_gpu else 1
        found: list[Detections | str] = []
        for k in range(0, len(todo), step):
            found += self._detect_part(batch, todo[k:k + step])
            release_freed_memory()
        per_item_ms = (time.perf_counter() - t0) * 1e3 / max(len(todo), 1)
        # compute cost: this process's CPU time (all ONNX Runtime threads), and the GPU held meanwhile
        cpu_ms = (time.process_time() - cpu0) * 1e3 / max(len(todo), 1)

        n = len(batch["item_id"])
        found_rows = [Detections.empty().to_row() for _ in range(n)]  # not detected here: none
        t_detect = np.zeros(n, dtype=np.float64)
        cpu_detect, gpu_detect = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.float64)
        status = np.array(batch["status"], dtype=object)
        cause, error = np.array(batch["failure_cause"], dtype=object), np.array(batch["error"], dtype=object)
        for i, dets in zip(todo, found, strict=True):
            if isinstance(dets, str):  # the detector raised on this image: it fails alone
                status[i], cause[i], error[i] = Status.FAILED, FailureCause.DETECTION_ERROR, dets
                continue
            det_h, det_w = int(batch["det_h"][i]), int(batch["det_w"][i])
            width, height = int(batch["width"][i]), int(batch["height"][i])
            orientation = int(batch["orientation"][i])
            found_rows[i] = to_stored_pixels(dets, det_w, det_h, width, height, orientation).to_row()
            t_detect[i] = per_item_ms
            cpu_detect[i] = cpu_ms
            gpu_detect[i] = per_item_ms if self.on_gpu else 0.0
        out = {k: v for k, v in batch.items() if k != "det"}  # the copy is not needed downstream
        out.update(status=status, failure_cause=cause, error=error)
        for key in ROW_COLUMNS:  # ragged per item: object columns of arrays / lists
            column = np.empty(n, dtype=object)
            column[:] = [r[key] for r in found_rows]
            out[key] = column
        out["t_detect_ms"] = t_detect
        out["cpu_detect_ms"] = cpu_detect
        out["gpu_detect_ms"] = gpu_detect
        return out

    def _detect_part(self, batch: dict[str, np.ndarray], part: list[int]) -> list[Detections | str]:
        """Detections per item of `part`, or the error (a str) for an item the models raised on.
        A GPU batch that raises is retried one image at a time, to find the culprit."""
        try:
            return self.detect([_det_image(batch, i) for i in part], [self._is_panorama(batch, i) for i in part],
                               [_stored_scale(batch, i) for i in part])
        except Exception as exc:
            if len(part) == 1:
                return [f"detection failed: {exc!r}"[:500]]
        return [d for i in part for d in self._detect_part(batch, [i])]

    def _is_panorama(self, batch: dict[str, np.ndarray], i: int) -> bool:
        """Whether item `i` wraps around at the seam: always with format panorama, with auto
        when the image says (or looks like) it is an equirectangular 360-degree panorama."""
        if self.tiling != "auto":
            return self.tiling == "panorama"
        width, height = int(batch["width"][i]), int(batch["height"][i])
        if int(batch["orientation"][i]) in (5, 6, 7, 8):  # the copy is upright: so is the seam
            width, height = height, width
        data = batch["data"][i] if "data" in batch else b""
        fmt = str(batch["format"][i]) if "format" in batch else ""
        return is_equirectangular(data or b"", fmt, width, height)

    def detect(self, images: list[np.ndarray], panoramas: list[bool] | None = None,
               stored_scales: list[float] | None = None) -> list[Detections]:
        """Detections per upright RGB image, in that image's pixels, fused and thresholded by the
        profile. Images flagged in `panoramas` are searched wrapped around their left/right seam;
        `stored_scales` (stored px per image px, default 1) size boxes for the size thresholds."""
        if not images:
            return []
        panoramas = panoramas or [self.tiling == "panorama"] * len(images)
        stored_scales = stored_scales or [1.0] * len(images)
        strips = [seam_strip(img.shape[1]) if pano else 0 for img, pano in zip(images, panoramas, strict=True)]
        widths = [img.shape[1] for img in images]
        images = [wrap_seam(img, s) if s else img for img, s in zip(images, strips, strict=True)]
        runs: dict[tuple, list[Detections]] = {}
        fused: dict[str, list[Detections]] = {}
        for cls, plan in self.plans:
            c = CLASSES.index(cls)
            per_member = []
            for m in plan.members:
                key = m.pass_key()
                if key not in runs:
                    runs[key] = self._run_member(m, images, fused.get("vehicle"), panoramas, self.cuts[key])
                mine = [d.select((d.class_ids == c) & (d.scores >= max(m.min_score, self.cuts[key][cls])))
                        for d in runs[key]]
                if m.near_vehicle is not None:
                    mine = [near(d, v, m.near_vehicle) for d, v in zip(mine, fused["vehicle"], strict=True)]
                per_member.append(mine)
            mode = "mean" if plan.fusion == "mean" else "max"
            fused[cls] = []
            for i in range(len(images)):
                dets = combine_passes([member[i] for member in per_member], mode)
                sizes = np.maximum(dets.boxes[:, 2] - dets.boxes[:, 0], dets.boxes[:, 3] - dets.boxes[:, 1])
                fused[cls].append(dets.select(dets.scores >= plan.threshold_for(sizes * stored_scales[i])))
        results = []
        for i, (width, strip) in enumerate(zip(widths, strips, strict=True)):
            dets = Detections.concat([fused[c][i] for c, _ in self.plans if c in self.classes])
            results.append(unwrap_seam(dets, width, strip) if strip else dets)
        return results

    def _run_member(self, member, images: list[np.ndarray], vehicles: list[Detections] | None,
                    panoramas: list[bool], cuts: dict[str, float]) -> list[Detections]:
        """One member's model over the batch (models/passes.py): the whole image at the member's
        scale (tiled when a fixed-size model would shrink it back), plus the catalog's tiles and,
        for plates, crops around vehicles, joined as a union."""
        adapter = self.adapters[member.model]
        cfg = adapter.entry.passes.model_copy(update={"tiling": member.tiling, "overlap": member.overlap})
        fixed = adapter.fixed_size
        side = fixed[1] if fixed else (adapter.entry.input_size or 640)
        views: list[View] = []
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            s = member.scale if member.max_side is None else min(member.scale, member.max_side / max(h, w))
            if fixed and s > 1:
                # A fixed-size model would shrink an upscaled frame right back: tile it instead.
                nx, ny = grid_for(round(w * s), round(h * s), side, cfg.overlap)
                views += tiled_views(i, w, h, nx, ny, cfg.overlap, 0, factor=s)
            else:
                views.append(View(i, (0, 0, w, h), s, 0))
            grid = self._tile_grid(cfg, w, h, side if fixed else None, panoramas[i])
            if grid:
                views += tiled_views(i, w, h, *grid, 1)
            if member.vehicle_crops and vehicles is not None:
                views += vehicle_crop_views(vehicles[i], w, h, side, cfg.crop_max_factor, 2, i)
        by_image: list[dict[int, list[Detections]]] = [{} for _ in images]
        for view, dets in run_views(adapter, images, views, cuts):
            by_image[view.image].setdefault(view.pass_id, []).append(dets)
        return [combine_passes([Detections.concat(v) for v in passes.values()] or [Detections.empty()], "max")
                for passes in by_image]

    def _tile_grid(self, cfg, width: int, height: int, model_side: int | None,
                   panorama: bool) -> tuple[int, int, Overlap] | None:
        """(nx, ny, overlap) of one model's tiles on one image, or None, from the job's format.

        A panorama keeps the catalog's grid; a fixed-size model that would see it whole (too
        small to tile, or `tiling: off`) gets a row of square tiles as tall as the image instead
        of the 2:1 frame letterboxed into a quarter of its input. Models that run at any size see
        the whole wrapped copy at its own size and aspect: tiles would add time, not pixels."""
        if self.tiling == "whole":
            return None
        if isinstance(self.tiling, dict):
            nx, ny = (int(v) for v in self.tiling["number"])
            ox, oy = (float(v) for v in self.tiling.get("overlap") or (cfg.overlap, cfg.overlap))
            return (nx, ny, (ox, oy)) if nx * ny > 1 else None
        grid = _grid(cfg.tiling, width, height, model_side, cfg.overlap)
        if grid is None and panorama and model_side is not None:
            grid = panorama_grid(width, height, cfg.overlap)
        return (*grid, cfg.overlap) if grid else None


def _grid(tiling: str, width: int, height: int, model_side: int | None,
          overlap: float) -> tuple[int, int] | None:
    """The tile grid for an image, or None: `NxM` always; `auto` only for fixed-size models on
    images well over their input (a 640 model shrinks a 1280 px frame 2x, halving small objects)."""
    if tiling == "off":
        return None
    if tiling != "auto":
        nx, ny = (int(v) for v in tiling.split("x"))
        return (nx, ny) if nx * ny > 1 else None
    if model_side is None or max(width, height) <= 1.25 * model_side:
        return None
    return grid_for(width, height, model_side, overlap)


def to_stored_pixels(dets: Detections, det_w: int, det_h: int, width: int, height: int,
                     orientation: int) -> Detections:
    """Boxes on the upright detection copy -> boxes on the stored full-resolution image."""
    if len(dets) == 0:
        return dets
    rotated = orientation in (5, 6, 7, 8)
    stored_w, stored_h = (det_h, det_w) if rotated else (det_w, det_h)  # the copy before turning upright
    boxes = boxes_to_stored(dets.boxes, orientation, stored_w, stored_h)
    # Outline points travel as degenerate boxes through the same orientation mapping.
    polygons = [
        boxes_to_stored(np.asarray(p, np.float32).reshape(-1, 2)[:, [0, 1, 0, 1]], orientation, stored_w, stored_h)[
            :, :2
        ].reshape(-1).tolist()
        if p
        else []
        for p in dets.polygons
    ]
    moved = Detections(boxes, dets.scores, dets.class_ids, dets.details, dets.models, dets.tiles, polygons)
    return moved.scaled(width / stored_w, height / stored_h).clipped(width, height)


def _stored_scale(batch: dict[str, np.ndarray], i: int) -> float:
    """Stored-image pixels per detection-copy pixel (the copy may be scaled down)."""
    return max(int(batch["width"][i]), int(batch["height"][i])) / max(int(batch["det_w"][i]), int(batch["det_h"][i]))


def _det_image(batch: dict[str, np.ndarray], i: int) -> np.ndarray:
    h, w = int(batch["det_h"][i]), int(batch["det_w"][i])
    return np.frombuffer(batch["det"][i], dtype=np.uint8).reshape(h, w, 3)


XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"  # APP1 payload prefix of the standard XMP packet
XMP_PNG = b"XML:com.adobe.xmp\x00"  # iTXt keyword of the XMP packet
# GPano as an attribute (GPano:ProjectionType="equirectangular") or an element (<GPano:...>...</...>)
GPANO_EQUIRECTANGULAR = re.compile(rb"GPano:ProjectionType\s*(?:=\s*[\"']|>)\s*equirectangular", re.IGNORECASE)
PANORAMA_MIN_WIDTH = 4000  # 2:1 images narrower than this are rarely 360-degree captures


def is_equirectangular(data: bytes, fmt: str, width: int, height: int) -> bool:
    """Whether an image is an equirectangular 360-degree panorama: its XMP says so (Google's
    GPano ProjectionType, written by 360 cameras and stitchers); without that tag, whether it is
    2:1 and at least 4000 px wide (`width`, `height`: the upright image's)."""
    xmp = xmp_packet(data, fmt)
    if xmp is not None and b"ProjectionType" in xmp:
        return GPANO_EQUIRECTANGULAR.search(xmp) is not None
    return width == 2 * height and width >= PANORAMA_MIN_WIDTH


def xmp_packet(data: bytes, fmt: str) -> bytes | None:
    """The XMP packet of a JPEG (APP1) or PNG (iTXt), found with the codecs' header walkers."""
    if fmt == "jpeg":
        for seg in jpeg_header_segments(data):
            if seg[1] == 0xE1 and seg[4:].startswith(XMP_JPEG):
                return seg[4 + len(XMP_JPEG):]
    elif fmt == "png":
        for kind, chunk in png_chunks(data):
            if kind == b"iTXt" and chunk[8:].startswith(XMP_PNG):
                return chunk[8 + len(XMP_PNG):]
    return None
