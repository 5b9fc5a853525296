"""Encode an anonymized frame in the input's format and carry the original's metadata over.

JPEG: the original's APPn segments (EXIF, XMP incl. GPano panorama tags, ICC profile) and
comments replace the encoder's own header, so the output keeps orientation, GPS (unless the
user strips it later) and colour profile.
"""

from __future__ import annotations

import cv2
import numpy as np

DECODE_FLAGS = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION  # stored pixels, all channels
EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "webp": ".webp", "tiff": ".tiff"}


def decode_full(data: bytes) -> np.ndarray:
    """Stored pixels: BGR(A) or grey, as OpenCV decodes them; a CMYK JPEG stays CMYK (H x W x 4,
    through PIL), so that it is written back as CMYK with its own colour profile."""
    if is_cmyk_jpeg(data):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("CMYK"))
    img = cv2.imdecode(np.frombuffer(data, np.uint8), DECODE_FLAGS)
    if img is None:
        raise ValueError("the image data cannot be decoded")
    return img


def is_cmyk_jpeg(data: bytes) -> bool:
    """Whether a JPEG's frame header (SOFn) declares 4 components (CMYK or YCCK)."""
    if data[:2] != b"\xff\xd8":
        return False
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..15 (not DHT/JPG/DAC)
            return pos + 9 < len(data) and data[pos + 9] == 4
        if marker == 0xDA:
            return False
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return False


def encode(image: np.ndarray, fmt: str, quality: int = 90, compress_level: int = 5, cmyk: bool = False) -> bytes:
    """`image` in `fmt`; `cmyk`: a 4-channel image is CMYK (from a CMYK JPEG), not BGRA."""
    if fmt == "jpeg" and cmyk and image.ndim == 3 and image.shape[2] == 4:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image), "CMYK").save(buf, "JPEG", quality=quality)
        return buf.getvalue()
    params: list[int] = []
    if fmt == "jpeg":
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == "png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, compress_level]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, max(1, quality)]
    ok, buf = cv2.imencode(EXTENSIONS[fmt], image, params)
    if not ok:
        raise ValueError(f"cannot encode as {fmt}")
    return buf.tobytes()


def image_end(data: bytes, fmt: str) -> int | None:
    """Where a JPEG's or PNG's image data ends (just past EOI / IEND), or None when it never
    does (a truncated file); len(data) for other formats. What follows is a trailer: a camera's
    or editor's extra bytes, a motion photo's video, an MPO's second picture."""
    if fmt == "jpeg":
        # the EOI after the first scan (an EXIF thumbnail's EOI sits before it, in APP1; scan
        # data never holds FF D9, since an FF byte there is followed by 00 or a restart marker)
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            if data[pos + 1] == 0xFF:
                pos += 1
            elif data[pos + 1] == 0xDA:
                eoi = data.find(b"\xff\xd9", pos)
                return eoi + 2 if eoi > 0 else None
            else:
                pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        return None
    if fmt == "png":
        pos = len(PNG_SIGNATURE)
        while pos + 8 <= len(data):
            length = int.from_bytes(data[pos:pos + 4], "big")
            if data[pos + 4:pos + 8] == b"IEND":
                return min(pos + 12 + length, len(data))
            pos += 12 + length
        return None
    return len(data)


def without_trailer(data: bytes, fmt: str) -> bytes:
    """The image without what follows its end marker: a trailer was never looked at by the
    models (a motion photo's video can show faces), so it never reaches the output."""
    end = image_end(data, fmt)
    return data[:end] if end is not None and end < len(data) else data


def jpeg_header_segments(data: bytes) -> list[bytes]:
    """The APP0..APP15 and COM segments of a JPEG, in order, each with its marker."""
    segments, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            segments.append(data[pos:pos + 2 + length])
        elif marker == 0xDA:  # start of scan: the header is over
            break
        pos += 2 + length
    return segments


def with_jpeg_metadata(encoded: bytes, original: bytes) -> bytes:
    """`encoded` with its own APPn/COM segments replaced by those of `original`, except Adobe's
    APP14: it says how the encoder stored colour (YCbCr, RGB, CMYK, YCCK), so the encoder's own
    is kept and the original's dropped (an RGB or CMYK original's APP14 on our YCbCr re-encode
    makes every decoder garble the colours)."""
    kept = [s for s in jpeg_header_segments(original) if not _is_adobe(s)]
    if not kept:
        return encoded
    own = jpeg_header_segments(encoded)
    body_start = 2 + sum(len(s) for s in own)  # cv2 and PIL write SOI then their APPn first
    return b"\xff\xd8" + b"".join(kept + [s for s in own if _is_adobe(s)]) + encoded[body_start:]


def _is_adobe(segment: bytes) -> bool:
    return segment[1] == 0xEE and segment[4:9] == b"Adobe"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_METADATA_CHUNKS = {b"iCCP", b"sRGB", b"gAMA", b"cHRM", b"pHYs", b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"}
GPS_IFD = 0x8825


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk bytes) for each chunk of a PNG."""
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        chunks.append((kind, data[pos:pos + 12 + length]))
        pos += 12 + length
        if kind == b"IEND":
            break
    return chunks


def with_png_metadata(encoded: bytes, original: bytes) -> bytes:
    """`encoded` with the original's metadata chunks (ICC, EXIF, XMP text, ...) put back before IDAT."""
    kept = [c for kind, c in png_chunks(original) if kind in PNG_METADATA_CHUNKS]
    if not kept:
        return encoded
    own = png_chunks(encoded)
    head = [c for kind, c in own if kind == b"IHDR"]
    rest = [c for kind, c in own if kind != b"IHDR" and kind not in PNG_METADATA_CHUNKS]
    return PNG_SIGNATURE + b"".join(head + kept + rest)


def with_original_metadata(encoded: bytes, original: bytes, fmt: str, strip: str = "none") -> bytes:
    """The re-encoded image carrying the original's metadata, less what `strip` removes."""
    if fmt == "jpeg":
        return strip_jpeg_metadata(with_jpeg_metadata(encoded, original), strip)
    if fmt == "png" and strip != "all":
        return with_png_metadata(encoded, original)
    return encoded


def strip_jpeg_metadata(data: bytes, strip: str) -> bytes:
    """Remove GPS tags (`gps`) or EXIF/XMP/IPTC/comments (`all`; the ICC profile stays: it is
    colour, not personal data) from a JPEG without touching its pixels."""
    if strip == "none":
        return data
    segments = jpeg_header_segments(data)
    body = data[2 + sum(len(s) for s in segments):] if _segments_contiguous(data, segments) else None
    if body is None:
        return data
    kept = []
    for seg in segments:
        marker, payload = seg[1], seg[4:]
        if strip == "all" and (marker in (0xE1, 0xED, 0xFE)):
            continue
        if strip == "gps" and marker == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            seg = _exif_without_gps(seg)
        kept.append(seg)
    return b"\xff\xd8" + b"".join(kept) + body


def _segments_contiguous(data: bytes, segments: list[bytes]) -> bool:
    pos = 2
    for seg in segments:
        if data[pos:pos + len(seg)] != seg:
            return False
        pos += len(seg)
    return True


def _exif_without_gps(segment: bytes) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif.load(segment[4:])
    if GPS_IFD not in exif:
        return segment
    del exif[GPS_IFD]
    payload = exif.tobytes()
    if not payload.startswith(b"Exif\x00\x00"):
        payload = b"Exif\x00\x00" + payload
    return b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
