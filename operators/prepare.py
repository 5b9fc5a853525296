"""Read + prepare (CPU tasks): fetch each item's bytes, check them, make the detection copy.

The detection copy is the upright image scaled so its longer side is at most `det_max_side`
(JPEGs use libjpeg's scaled decoding, which is much cheaper than decode-then-resize). Rows keep
the original bytes for the writer; no full-resolution frame leaves this stage.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
import warnings

import cv2
import numpy as np
from PIL import Image

from operators.budget import Billing
from operators.codecs import PNG_SIGNATURE, image_end
from operators.items import format_from_name, sniff_format
from operators.orientation import upright
from operators.rows import FailureCause, ItemFailure, Status, failure_cause
from operators.storage import read_bytes

DEFAULT_DET_MAX_SIDE = 2048
DEFAULT_MAX_PIXELS = 250_000_000  # a larger declared size is a decompression bomb: TOO_LARGE

Image.MAX_IMAGE_PIXELS = None  # we apply our own limit, before decoding, with a clear cause


def prepare_batch(
    batch: dict[str, np.ndarray],
    storage_options: dict | None = None,
    det_max_side: int = DEFAULT_DET_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    billing: Billing | None = None,
) -> dict[str, np.ndarray]:
    """Adds data, format, width, height, orientation, det (RGB bytes), det_w, det_h, status,
    failure_cause, error, credits and timings to a batch of listed items. With a ledger in
    `billing`, each readable image reserves its credits before it goes on to detection."""
    cpu0 = time.process_time()
    n = len(batch["item_id"])
    out: dict[str, list] = {k: [] for k in PREPARED_COLUMNS}
    for i in range(n):
        row = {k: batch[k][i] for k in batch}
        for key, value in prepare_item(row, storage_options, det_max_side, max_pixels).items():
            out[key].append(value)
    if billing is not None:
        charge(out, [str(x) for x in batch["item_id"]], billing)
    # CPU time of this worker process, shared evenly: the compute cost of the stage per item
    out["cpu_prepare_ms"] = [(time.process_time() - cpu0) * 1e3 / max(n, 1)] * n
    result = {k: np.asarray(v) for k, v in batch.items()}
    for key, values in out.items():
        result[key] = _column(values)
    return result


PREPARED_COLUMNS = (
    "data", "format", "width", "height", "orientation", "det", "det_w", "det_h",
    "status", "failure_cause", "error", "credits", "t_read_ms", "t_decode_ms", "cpu_prepare_ms",
    "video",  # a video's header (JSON, operators/video.py); "" for images
)


def charge(out: dict[str, list], item_ids: list[str], billing: Billing) -> None:
    """Price each readable image; with a ledger, reserve the credits and skip what the cap refuses
    (BUDGET_EXCEEDED: the item is not detected nor written, and costs nothing)."""
    pending = [i for i, s in enumerate(out["status"]) if s == Status.PENDING]
    for i in pending:
        video = json.loads(out["video"][i]) if out.get("video") and out["video"][i] else None
        out["credits"][i] = (billing.video_credits(video["info"]["duration_s"]) if video
                             else billing.credits(out["width"][i], out["height"][i]))
    if billing.ledger is None or not pending:
        return
    granted = billing.ledger.reserve([(item_ids[i], out["credits"][i]) for i in pending])
    for i, ok in zip(pending, granted, strict=True):
        if not ok:
            out["status"][i], out["failure_cause"][i] = Status.SKIPPED, FailureCause.BUDGET_EXCEEDED
            out["error"][i] = f"not processed: {out['credits'][i]} more credits would pass --max-credits"
            out["credits"][i], out["data"][i], out["det"][i] = 0.0, b"", b""


def prepare_item(row: dict, storage_options: dict | None, det_max_side: int, max_pixels: int) -> dict:
    result = dict.fromkeys(PREPARED_COLUMNS)
    result.update(data=b"", det=b"", format="", width=0, height=0, orientation=1, det_w=0, det_h=0,
                  status=Status.PENDING, failure_cause="", error="", credits=0.0, t_read_ms=0.0, t_decode_ms=0.0,
                  cpu_prepare_ms=0.0, video="")
    if str(row.get("status") or "") in (Status.FAILED, Status.SKIPPED):  # decided upstream (archive expand)
        result.update(status=str(row["status"]), failure_cause=str(row.get("failure_cause") or ""),
                      error=str(row.get("error") or ""))
        return result
    if row["kind"] == "video":
        return _prepare_video(row, result, storage_options)
    if row["kind"] != "image":
        result.update(status=Status.SKIPPED, error=f"not an image ({row['kind']})")
        return result
    t0 = time.perf_counter()
    try:
        data = fetch_item_bytes(row, storage_options)
    except Exception as exc:  # vanished, network, permissions: keep the job going, say what happened
        result.update(status=Status.FAILED, failure_cause=failure_cause(exc), error=_message(exc, "read failed"))
        return result
    t1 = time.perf_counter()
    result.update(data=data, t_read_ms=(t1 - t0) * 1e3)
    try:
        fmt, width, height, orientation = check_image(data, row["rel_path"], max_pixels)
        det = detection_copy(data, fmt, width, height, orientation, det_max_side)
    except Exception as exc:  # a decoder error on odd input fails this item, never its batch
        result.update(status=Status.FAILED, failure_cause=failure_cause(exc, FailureCause.IMAGE_DEFECT),
                      error=_message(exc, "cannot decode")[:500])
        return result
    result.update(format=fmt, width=width, height=height, orientation=orientation,
                  det=det.tobytes(), det_h=det.shape[0], det_w=det.shape[1],
                  t_decode_ms=(time.perf_counter() - t1) * 1e3)
    return result


def _prepare_video(row: dict, result: dict, storage_options: dict | None) -> dict:
    """A video's header only (size, duration for its price); its frames are read, streamed, by the
    detection actor (operators/video.py). An archive member's bytes are read here and carried."""
    from operators.video_io import VideoDefect, probe_source

    t0 = time.perf_counter()
    try:
        data = fetch_item_bytes(row, storage_options) if row.get("member") else None
        info = probe_source(str(row["source_url"]), storage_options, data)
    except VideoDefect as exc:
        return result | {"status": Status.FAILED, "failure_cause": FailureCause.VIDEO_DEFECT,
                         "error": f"{row['rel_path']}: {exc}"}
    except Exception as exc:  # vanished, network, permissions, an FFmpeg error on odd bytes: this item only
        return result | {"status": Status.FAILED, "failure_cause": failure_cause(exc, FailureCause.VIDEO_DEFECT),
                         "error": _message(exc, "video header")[:500]}
    return result | {"data": data or b"", "format": posixpath.splitext(str(row["rel_path"]).lower())[1][1:],
                     "width": info.width, "height": info.height, "t_read_ms": (time.perf_counter() - t0) * 1e3,
                     "video": json.dumps({"info": info.as_dict()})}


def _message(exc: BaseException, what: str) -> str:
    """An item's `error`: an ItemFailure's or a missing file's own message, else what failed and how."""
    return str(exc) if isinstance(exc, ItemFailure | FileNotFoundError) else f"{what}: {exc!r}"


def fetch_item_bytes(row: dict, storage_options: dict | None) -> bytes:
    """The item's encoded bytes: the file itself, or an archive member through operators.archives
    (carried in the row's `data` when expand already read it, else one ranged read)."""
    if row.get("member"):
        from operators.archives import read_member

        try:
            return read_member(row, storage_options)
        except FileNotFoundError:
            raise
        except Exception as exc:  # a corrupt member or archive fails alone, the rest goes on
            cause = failure_cause(exc, FailureCause.ARCHIVE_ERROR)
            detail = str(exc) if cause in (FailureCause.TOO_LARGE, FailureCause.ENCRYPTED) \
                else f"{type(exc).__name__}: {exc}"
            raise ItemFailure(cause, f"{row['rel_path']}: {detail}") from None
    return read_bytes(row["source_url"], storage_options)


def check_image(data: bytes, name: str, max_pixels: int) -> tuple[str, int, int, int]:
    """(format, width, height, EXIF orientation) from the header alone; ItemFailure if unusable.

    The pixel limit is checked on the declared size before anything is decoded: reading a PNG's
    EXIF through PIL loads the whole image, so orientation is read only once the size passed."""
    if not data:
        raise ItemFailure(FailureCause.IMAGE_DEFECT, f"{name}: empty file (0 bytes)")
    fmt = sniff_format(data)
    expected = format_from_name(name)
    if fmt is None:
        raise ItemFailure(FailureCause.CONTENT_TYPE_ERROR,
                          f"{name}: content is not a supported image ({data[:8]!r}...)")
    if expected and fmt != expected:
        raise ItemFailure(
            FailureCause.CONTENT_TYPE_ERROR, f"{name}: content is {fmt.upper()} but the name says {expected.upper()}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            width, height = img.size
    except Exception as exc:
        raise ItemFailure(FailureCause.IMAGE_DEFECT, f"{name}: unreadable header ({exc})") from None
    if width * height > max_pixels:
        raise ItemFailure(FailureCause.TOO_LARGE, f"{name}: {width}x{height} exceeds the {max_pixels} pixel limit")
    if width < 1 or height < 1:
        raise ItemFailure(FailureCause.IMAGE_DEFECT, f"{name}: declares {width}x{height} pixels")
    frames = _frame_count(img, data, fmt)
    if frames > 1:  # veil writes one frame: anonymizing the first and dropping the rest would lose content
        kind = "pages" if fmt == "tiff" else "frames"
        raise ItemFailure(FailureCause.MULTI_FRAME, f"{name}: {fmt.upper()} of {frames} {kind}; veil anonymizes "
                          "single-frame images only (split the pages/frames first)")
    return fmt, width, height, _orientation(img, data, fmt)


def _frame_count(img: Image.Image, data: bytes, fmt: str) -> int:
    """Pages of a TIFF (reduced-resolution thumbnails not counted), frames of an APNG or an
    animated WebP, from headers only (PIL walks the IFDs; acTL says the frame count)."""
    if fmt == "png":
        actl = next((c for kind, c in _png_header_chunks(data) if kind == b"acTL"), None)
        return int.from_bytes(actl[8:12], "big") if actl is not None and len(actl) >= 12 else 1
    try:
        n = int(getattr(img, "n_frames", 1) or 1)
        if fmt != "tiff" or n == 1:
            return n
        pages = 0
        for i in range(n):
            img.seek(i)
            pages += not int(img.tag_v2.get(254, 0)) & 1  # NewSubfileType bit 0: a thumbnail of a page
        img.seek(0)
        return pages
    except Exception as exc:  # a TIFF whose IFD chain is broken
        raise ItemFailure(FailureCause.IMAGE_DEFECT, f"unreadable page list ({exc})") from None


def _orientation(img: Image.Image, data: bytes, fmt: str) -> int:
    """EXIF orientation (1..8; 1 when absent or broken). A PNG's eXIf chunk is read from the
    chunk list itself: PIL's getexif() on a PNG decodes the whole image to look past IDAT."""
    try:
        if fmt == "png":
            exif_chunk = next((c for kind, c in _png_header_chunks(data, past_idat=True) if kind == b"eXIf"), None)
            if exif_chunk is None:
                return 1
            exif = Image.Exif()
            exif.load(b"Exif\x00\x00" + exif_chunk[8:-4])
            value = int(exif.get(0x0112, 1))
        elif fmt in ("jpeg", "tiff", "webp"):
            value = int(img.getexif().get(0x0112, 1))
        else:
            return 1
    except Exception:  # broken EXIF: the pixels are still good, show them as stored
        return 1
    return value if 1 <= value <= 8 else 1


def _png_header_chunks(data: bytes, past_idat: bool = False) -> list[tuple[bytes, bytes]]:
    """The PNG's chunks up to its first IDAT (or all of them, without their pixel data copied)."""
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"IEND" or (kind == b"IDAT" and not past_idat):
            break
        if kind not in (b"IDAT", b"fdAT"):
            chunks.append((kind, data[pos:pos + 12 + length]))
        pos += 12 + length
    return chunks


def detection_copy(data: bytes, fmt: str, width: int, height: int, orientation: int, max_side: int) -> np.ndarray:
    """Upright RGB uint8 copy with longer side <= max_side."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    if fmt == "jpeg":  # let libjpeg scale by 1/2, 1/4, 1/8 while decoding
        factor = 1
        while factor < 8 and max(width, height) / (factor * 2) >= max_side:
            factor *= 2
        flags = {1: flags, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None or img.size == 0:
        raise ItemFailure(FailureCause.IMAGE_DEFECT, "the image data cannot be decoded")
    if not _complete(data, fmt):
        raise ItemFailure(FailureCause.IMAGE_DEFECT, f"truncated {fmt.upper()} (no end marker)")
    scale = max_side / max(img.shape[:2])
    if scale < 1:  # a side never rounds to 0 (a 5000x1 strip stays 2048x1)
        img = cv2.resize(img, (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    return upright(img[:, :, ::-1], orientation)


def _complete(data: bytes, fmt: str) -> bool:
    """Whether the image data runs to its end marker (decoders fill a cut-off image with grey).
    Bytes after the marker (camera and editor trailers) are allowed: decoders stop at it."""
    return fmt not in ("jpeg", "png") or image_end(data, fmt) is not None


def _column(values: list) -> np.ndarray:
    if values and isinstance(values[0], (bytes, str)):
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr
    return np.asarray(values)
