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
    img = cv2.imdecode(np.frombuffer(data, np.uint8), DECODE_FLAGS)
    if img is None:
        raise ValueError("the image data cannot be decoded")
    return img


def encode(image: np.ndarray, fmt: str, quality: int = 90, compress_level: int = 5) -> bytes:
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
    """`encoded` with its own APPn/COM segments replaced by those of `original`."""
    kept = jpeg_header_segments(original)
    if not kept:
        return encoded
    own = jpeg_header_segments(encoded)
    body_start = 2 + sum(len(s) for s in own)  # cv2 writes SOI then its APP0 first
    return b"\xff\xd8" + b"".join(kept) + encoded[body_start:]
