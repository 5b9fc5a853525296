"""Detect (an actor pool): run the job's models over the detection copies, in batches.

`Detector` loads each model once (from weights bytes handed to it, so workers need no disk or
network), runs every model over the batch with the passes its catalog entry asks for (scales,
tiles, vehicle crops: models/passes.py), keeps each class above its threshold, merges
duplicates with NMS and maps boxes back to stored full-resolution pixels. Rows that failed
earlier pass through untouched.

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
from models.detections import CLASSES, Detections, merge_per_class
from models.passes import (
    Overlap,
    View,
    combine_passes,
    grid_for,
    panorama_grid,
    run_views,
    seam_strip,
    tiled_views,
    unwrap_seam,
    vehicle_crop_views,
    wrap_seam,
)
from models.runtime import release_freed_memory
from operators.codecs import jpeg_header_segments, png_chunks
from operators.orientation import boxes_to_stored

FORMAT_PRESETS = ("whole", "auto", "panorama")


class Detector:
    def __init__(
        self,
        models: list[tuple[dict, bytes]],
        classes: list[str],
        thresholds: dict[str, float],
        device: str = "cpu",
        threads: int = 0,
        format: str | dict = "auto",  # the seed APIs' name
        adapters: list | None = None,
    ):
        """`models`: (catalog entry as a dict, prepared weights) pairs; `classes`: what to keep;
        `format`: whole | auto | panorama | {"number": [nx, ny], "overlap": [ox, oy]} (module doc);
        `adapters`: models already loaded (a service shares them between requests), used as well."""
        if isinstance(format, str) and format not in FORMAT_PRESETS:
            raise ValueError(f"format must be one of {FORMAT_PRESETS} or a tile grid, got {format!r}")
        self.format = format
        self.adapters = list(adapters or [])
        for entry_fields, weights in models:
            entry = ModelEntry(**entry_fields)
            self.adapters.append(adapter_class(entry.adapter)(entry, weights, device, threads))
        # Vehicle models run first: the two-stage plate search crops around their vehicles.
        self.adapters_in_order = sorted(self.adapters, key=lambda a: "vehicle" not in a.entry.veil_classes)
        self.class_ids = np.array([CLASSES.index(c) for c in classes], dtype=np.int16)
        self.thresholds = thresholds
        self.min_scores = np.array([thresholds.get(c, 0.5) for c in CLASSES], dtype=np.float32)
        self.on_gpu = device == "cuda"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0, cpu0 = time.perf_counter(), time.process_time()
        todo = [i for i, s in enumerate(batch["status"]) if s == "pending"]
        # A GPU gains from a batch; the CPU provider does not (one image at a time ran 8.7 img/s
        # against 5.2 in batches of 8 for the face models at 512 px, and peaked 200 MiB lower).
        step = max(len(todo), 1) if self.on_gpu else 1
        found = []
        for k in range(0, len(todo), step):
            part = todo[k:k + step]
            found += self.detect([_det_image(batch, i) for i in part], [self._is_panorama(batch, i) for i in part])
            release_freed_memory()
        per_item_ms = (time.perf_counter() - t0) * 1e3 / max(len(todo), 1)
        # compute cost: this process's CPU time (all ONNX Runtime threads), and the GPU held meanwhile
        cpu_ms = (time.process_time() - cpu0) * 1e3 / max(len(todo), 1)

        n = len(batch["item_id"])
        detections = np.full(n, "", dtype=object)
        t_detect = np.zeros(n, dtype=np.float64)
        cpu_detect, gpu_detect = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.float64)
        for i, dets in zip(todo, found, strict=True):
            det_h, det_w = int(batch["det_h"][i]), int(batch["det_w"][i])
            width, height = int(batch["width"][i]), int(batch["height"][i])
            orientation = int(batch["orientation"][i])
            detections[i] = to_stored_pixels(dets, det_w, det_h, width, height, orientation).to_json()
            t_detect[i] = per_item_ms
            cpu_detect[i] = cpu_ms
            gpu_detect[i] = per_item_ms if self.on_gpu else 0.0
        out = {k: v for k, v in batch.items() if k != "det"}  # the copy is not needed downstream
        out["detections"] = detections
        out["t_detect_ms"] = t_detect
        out["cpu_detect_ms"] = cpu_detect
        out["gpu_detect_ms"] = gpu_detect
        return out

    def _is_panorama(self, batch: dict[str, np.ndarray], i: int) -> bool:
        """Whether item `i` wraps around at the seam: always with format panorama, with auto
        when the image says (or looks like) it is an equirectangular 360-degree panorama."""
        if self.format != "auto":
            return self.format == "panorama"
        width, height = int(batch["width"][i]), int(batch["height"][i])
        if int(batch["orientation"][i]) in (5, 6, 7, 8):  # the copy is upright: so is the seam
            width, height = height, width
        data = batch["data"][i] if "data" in batch else b""
        fmt = str(batch["format"][i]) if "format" in batch else ""
        return is_equirectangular(data or b"", fmt, width, height)

    def detect(self, images: list[np.ndarray], panoramas: list[bool] | None = None) -> list[Detections]:
        """Detections per upright RGB image, in that image's pixels, thresholded and merged.
        Images flagged in `panoramas` are searched wrapped around their left/right seam."""
        if not images:
            return []
        panoramas = panoramas or [self.format == "panorama"] * len(images)
        strips = [seam_strip(img.shape[1]) if pano else 0 for img, pano in zip(images, panoramas, strict=True)]
        widths = [img.shape[1] for img in images]
        images = [wrap_seam(img, s) if s else img for img, s in zip(images, strips, strict=True)]
        order = self.adapters_in_order
        per_image: list[list[Detections]] = [[] for _ in images]
        vehicles: list[Detections] | None = None
        for adapter in order:
            found = self._run_model(adapter, images, vehicles, panoramas)
            for i, dets in enumerate(found):
                per_image[i].append(dets)
            if "vehicle" in adapter.entry.veil_classes and vehicles is None:
                vid = CLASSES.index("vehicle")
                vehicles = [d.select((d.classes == vid) & (d.scores >= self.min_scores[vid])) for d in found]
        results = []
        for parts, width, strip in zip(per_image, widths, strips, strict=True):
            dets = self._fuse(parts)
            keep = np.isin(dets.classes, self.class_ids) & (dets.scores >= self.min_scores[dets.classes])
            dets = merge_per_class(dets.select(keep))
            results.append(unwrap_seam(dets, width, strip) if strip else dets)
        return results

    def _ensemble_size(self, cls: str) -> int:
        """How many models' scores are averaged for `cls` (1 = a plain union)."""
        serving = [a for a in self.adapters if cls in a.entry.veil_classes]
        return len(serving) if any(a.entry.passes.ensemble == "mean" for a in serving) else 1

    def _fuse(self, parts: list[Detections]) -> Detections:
        """Models' detections of one image: per class, averaged where an ensemble says `mean`
        (one model's confident mistake is diluted by the others), else an NMS union."""
        out = []
        for c, name in enumerate(CLASSES):
            of_class = [p.select(p.classes == c) for p in parts]
            of_class = [p for p, a in zip(of_class, self.adapters_in_order, strict=True)
                        if name in a.entry.veil_classes]
            if not of_class:
                continue
            mode = "mean" if self._ensemble_size(name) > 1 else "max"
            out.append(combine_passes(of_class, mode))
        return Detections.concat(out)

    def _run_model(self, adapter, images: list[np.ndarray], vehicles: list[Detections] | None,
                   panoramas: list[bool]) -> list[Detections]:
        """One model over the batch with its passes (models/passes.py): whole-image scales
        combined as the catalog says, then tiles and vehicle crops added as a union."""
        cfg = adapter.entry.passes
        scales = list(cfg.scales)
        # With averaging, a pass that saw an object at score s adds s / n: decode that low.
        n_avg = len(scales) if cfg.combine == "mean" else 1
        thresholds = {c: t / n_avg / self._ensemble_size(c) for c, t in self.thresholds.items()}
        fixed = adapter.fixed_size
        side = fixed[1] if fixed else (adapter.entry.input_size or 640)
        views: list[View] = []
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            for k, s in enumerate(scales):
                if fixed and s > 1:
                    # A fixed-size model would shrink an upscaled frame right back: tile it instead.
                    nx, ny = grid_for(round(w * s), round(h * s), side, cfg.overlap)
                    views += tiled_views(i, w, h, nx, ny, cfg.overlap, k, factor=s)
                else:
                    views.append(View(i, (0, 0, w, h), s, k))
            grid = self._tile_grid(cfg, w, h, side if fixed else None, panoramas[i])
            if grid:
                views += tiled_views(i, w, h, *grid, len(scales))
            if cfg.vehicle_crops and vehicles is not None:
                views += vehicle_crop_views(vehicles[i], w, h, side, cfg.crop_max_factor, len(scales) + 1, i)
        by_image: list[dict[int, list[Detections]]] = [{} for _ in images]
        for view, dets in run_views(adapter, images, views, thresholds):
            by_image[view.image].setdefault(view.pass_id, []).append(dets)
        out = []
        for passes in by_image:
            scaled = [Detections.concat(passes.get(k, [])) for k in range(len(scales))]
            merged = combine_passes(scaled, cfg.combine)
            extra = [Detections.concat(v) for k, v in passes.items() if k >= len(scales)]
            if extra:
                merged = combine_passes([merged, *extra], "max")
            out.append(merged)
        return out


    def _tile_grid(self, cfg, width: int, height: int, model_side: int | None,
                   panorama: bool) -> tuple[int, int, Overlap] | None:
        """(nx, ny, overlap) of one model's tiles on one image, or None, from the job's format.

        A panorama keeps the catalog's grid; a fixed-size model that would see it whole (too
        small to tile, or `tiling: off`) gets a row of square tiles as tall as the image instead
        of the 2:1 frame letterboxed into a quarter of its input. Models that run at any size see
        the whole wrapped copy at its own size and aspect: tiles would add time, not pixels."""
        if self.format == "whole":
            return None
        if isinstance(self.format, dict):
            nx, ny = (int(v) for v in self.format["number"])
            ox, oy = (float(v) for v in self.format.get("overlap") or (cfg.overlap, cfg.overlap))
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
    moved = Detections(boxes, dets.scores, dets.classes, dets.details, dets.models, dets.tiles, polygons)
    return moved.scaled(width / stored_w, height / stored_h).clipped(width, height)


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
