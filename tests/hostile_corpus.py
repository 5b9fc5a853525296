"""A folder of hostile and unusual input, made at test time by real tools (PIL, OpenCV, zipfile,
pyzipper, py7zr, os.symlink, os.mkfifo), and what a job must make of each entry.

`build(folder, photo)` writes the corpus under `folder` and returns {(path, member): (status,
cause)}: `path` relative to `folder`, `member` the archive member ("" for a plain file and for an
archive's own row). A job over the folder (faces only, --archive-depth 2, --archive-password pw)
must end `done` with exactly these rows. README "Reliability" lists the kinds.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import py7zr
import pyzipper
from PIL import Image

PASSWORD = "pw"
DONE, SKIPPED = ("done", ""), ("skipped", "")
MOTION_TRAILER = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(256)  # an MP4's start


def failed(cause: str) -> tuple[str, str]:
    return ("failed", cause)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bmp_declaring(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + bytes(16)


def jpeg_declaring(small_jpeg: bytes, width: int, height: int) -> bytes:
    """A tiny JPEG whose frame header (SOF0) is patched to declare width x height."""
    at = small_jpeg.index(b"\xff\xc0")
    return small_jpeg[:at + 5] + struct.pack(">HH", height, width) + small_jpeg[at + 9:]


def with_exif_orientation(photo: Image.Image, value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return _save(photo, "JPEG", exif=exif.tobytes(), quality=85)


def zip_bytes(members: list[tuple[str, bytes]], **kw) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", **kw) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def build(folder: Path, photo: bytes) -> dict[tuple[str, str], tuple[str, str]]:
    """Write the corpus under `folder` (created); return the expected row of every entry."""
    folder.mkdir(parents=True)
    rgb = Image.open(io.BytesIO(photo)).convert("RGB")
    small = rgb.resize((64, 48))
    small_jpeg = _save(small, "JPEG")
    files: dict[str, bytes] = {}
    want: dict[tuple[str, str], tuple[str, str]] = {}

    def add(name: str, data: bytes, verdict: tuple[str, str]) -> None:
        files[name] = data
        want[(name, "")] = verdict

    # --- valid images that must come out done ---
    add("photo.jpg", photo, DONE)
    add("trailer.jpg", photo + b"x" * 100, DONE)  # bytes after EOI (camera / editor trailers)
    add("trailer.png", _save(small, "PNG") + b"trailing data after IEND", DONE)
    add("motion_photo.jpg", small_jpeg + MOTION_TRAILER, DONE)  # a still, then a video after its EOI
    for w, h in ((5000, 1), (30000, 2), (2, 30000), (1, 4096)):  # extreme aspect ratios
        add(f"thin/{w}x{h}.png", _save(Image.new("RGB", (w, h), (90, 120, 150)), "PNG"), DONE)
    add("thin/4096x1.tiff", _save(Image.new("RGB", (4096, 1), (90, 120, 150)), "TIFF"), DONE)
    add("tiny/1x1.png", _save(Image.new("RGB", (1, 1)), "PNG"), DONE)
    add("tiny/1x1.jpg", _save(Image.new("RGB", (1, 1)), "JPEG"), DONE)
    add("modes/rgb16.png", cv2_png16(small), DONE)
    for mode in ("L", "LA", "P", "RGBA", "I;16", "1"):
        add(f"modes/{mode.replace(';', '_')}.png", _save(small.convert(mode), "PNG"), DONE)
    add("modes/gray.jpg", _save(rgb.convert("L"), "JPEG"), DONE)
    add("modes/cmyk.jpg", _save(rgb.convert("CMYK"), "JPEG", quality=92), DONE)
    add("modes/adobe_rgb.jpg", _save(rgb, "JPEG", keep_rgb=True, quality=92, icc_profile=srgb_icc()),
        DONE)  # stored as RGB (Adobe APP14, no colour transform), with an ICC profile
    add("modes/progressive.jpg", _save(rgb, "JPEG", progressive=True), DONE)
    add("modes/cmyk.tiff", _save(small.convert("CMYK"), "TIFF"), DONE)
    add("formats/photo.bmp", _save(small, "BMP"), DONE)
    add("formats/photo.webp", _save(small, "WEBP"), DONE)
    add("formats/photo.tif", _save(small, "TIFF", compression="tiff_deflate"), DONE)
    add("formats/UPPER.JPG", small_jpeg, DONE)
    for o in range(1, 9):
        add(f"exif/orientation_{o}.jpg", with_exif_orientation(rgb, o), DONE)
    add("exif/orientation_9.jpg", with_exif_orientation(small, 9), DONE)  # out of range: read as 1
    add("exif/broken.jpg", small_jpeg[:2] + b"\xff\xe1\x00\x0eExif\x00\x00II*\x00\xff\xff" + small_jpeg[2:], DONE)
    add("names/фото 日本 ñ.jpg", small_jpeg, DONE)
    add("names/name with  spaces .jpg", small_jpeg, DONE)
    add("names/" + "long" * 62 + ".jpg", small_jpeg, DONE)  # 252 bytes: at the file system's limit
    add("names/.hidden.jpg", small_jpeg, DONE)
    add("names/a/b/c/d/e/f/deep.jpg", small_jpeg, DONE)

    # --- bad images: failed alone, each with its cause ---
    add("bad/empty.jpg", b"", failed("IMAGE_DEFECT"))
    add("bad/png_named.jpg", _save(small, "PNG"), failed("CONTENT_TYPE_ERROR"))
    add("bad/text.jpg", b"this is not a photo", failed("CONTENT_TYPE_ERROR"))
    add("bad/gif_named.png", _save(small, "GIF"), failed("CONTENT_TYPE_ERROR"))
    add("bad/truncated.jpg", photo[: len(photo) // 2], failed("IMAGE_DEFECT"))
    add("bad/truncated.png", _save(small, "PNG")[:-40], failed("IMAGE_DEFECT"))
    add("bad/truncated.webp", _save(small, "WEBP")[:60], failed("IMAGE_DEFECT"))
    add("bad/header.jpg", b"\xff\xd8\xff\xe0" + os.urandom(64), failed("IMAGE_DEFECT"))
    add("bad/header.png", b"\x89PNG\r\n\x1a\n" + os.urandom(64), failed("IMAGE_DEFECT"))
    add("bad/header.bmp", b"BM" + bytes(30), failed("IMAGE_DEFECT"))
    add("bad/only_signature.tiff", b"II*\x00", failed("IMAGE_DEFECT"))
    add("bomb/20000x20000.png", _save(Image.new("1", (20000, 20000)), "PNG"), failed("TOO_LARGE"))
    add("bomb/declares_100000x100000.png", png_declaring(100000, 100000), failed("TOO_LARGE"))
    add("bomb/declares_100000x100000.bmp", bmp_declaring(100000, 100000), failed("TOO_LARGE"))
    add("bomb/declares_65000x65000.jpg", jpeg_declaring(small_jpeg, 65000, 65000), failed("TOO_LARGE"))
    add("frames/multipage.tiff", _save(small, "TIFF", save_all=True, append_images=[small.rotate(90)]),
        failed("MULTI_FRAME"))
    add("frames/animated.png", _save(small, "PNG", save_all=True, append_images=[small.rotate(90)]),
        failed("MULTI_FRAME"))
    add("frames/animated.webp", _save(small, "WEBP", save_all=True, append_images=[small.rotate(90)]),
        failed("MULTI_FRAME"))
    add("README.txt", b"not an image", SKIPPED)
    add("anim.gif", _save(small, "GIF"), SKIPPED)  # not a format veil reads: skipped by name

    # --- names and output paths ---
    add("names/a\nb.jpg", small_jpeg, failed("UNSAFE_PATH"))  # a control character
    add("clash/a/b.jpg", small_jpeg, DONE)
    add("clash/a\\b.jpg", small_jpeg, failed("OUTPUT_PATH_ERROR"))  # the same output path as a/b.jpg

    # --- archives ---
    add("zips/good.zip", zip_bytes([("cam/1.jpg", photo), ("cam/notes.txt", b"hello")]), None)
    want.pop(("zips/good.zip", ""))
    want[("zips/good.zip", "cam/1.jpg")], want[("zips/good.zip", "cam/notes.txt")] = DONE, SKIPPED
    add("zips/empty.zip", zip_bytes([]), SKIPPED)
    add("zips/zero_bytes.zip", b"", failed("ARCHIVE_ERROR"))
    add("zips/random.zip", os.urandom(2048), failed("ARCHIVE_ERROR"))
    add("zips/fake.7z", small_jpeg, failed("ARCHIVE_ERROR"))
    slip = zip_bytes([("../../evil.jpg", small_jpeg), ("/abs.jpg", small_jpeg), ("ok.jpg", small_jpeg)])
    add("zips/slip.zip", slip, None)
    want.pop(("zips/slip.zip", ""))
    want.update({("zips/slip.zip", "../../evil.jpg"): failed("UNSAFE_PATH"),
                 ("zips/slip.zip", "/abs.jpg"): failed("UNSAFE_PATH"), ("zips/slip.zip", "ok.jpg"): DONE})
    link = zipfile.ZipInfo("link.jpg")
    link.external_attr = (0o120777) << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(link, "../../etc/passwd")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the point
            z.writestr("dup.jpg", small_jpeg)
            z.writestr("dup.jpg", photo)
        z.writestr("x.jpg", small_jpeg)
        z.writestr("x.jpg/y.jpg", small_jpeg)  # needs a folder where x.jpg is written
        z.writestr("z" * 300 + ".jpg", small_jpeg)  # a name longer than the file system allows
        z.writestr("bomb.bmp", b"\0" * (4 << 20))  # 4 MiB of zeros: compression ratio ~1000
    add("zips/hostile.zip", buf.getvalue(), None)
    want.pop(("zips/hostile.zip", ""))
    want.update({("zips/hostile.zip", "link.jpg"): failed("UNSAFE_PATH"),
                 ("zips/hostile.zip", "dup.jpg"): DONE,  # the first of the two
                 ("zips/hostile.zip", "dup.jpg#2"): failed("OUTPUT_PATH_ERROR"),  # its own row and id
                 ("zips/hostile.zip", "x.jpg"): DONE, ("zips/hostile.zip", "x.jpg/y.jpg"): failed("OUTPUT_PATH_ERROR"),
                 ("zips/hostile.zip", "z" * 300 + ".jpg"): failed("OUTPUT_PATH_ERROR"),
                 ("zips/hostile.zip", "bomb.bmp"): failed("TOO_LARGE")})
    inner = zip_bytes([("in.jpg", small_jpeg)])
    add("zips/nested.zip", zip_bytes([("inner.zip", inner), ("empty.zip", zip_bytes([]))]), None)
    want.pop(("zips/nested.zip", ""))
    want.update({("zips/nested.zip", "inner.zip!/in.jpg"): DONE, ("zips/nested.zip", "empty.zip"): SKIPPED})
    add("zips/truncated.zip", zip_bytes([("1.jpg", small_jpeg), ("2.jpg", photo)])[:-400], None)
    want.pop(("zips/truncated.zip", ""))
    want.update({("zips/truncated.zip", "1.jpg"): DONE, ("zips/truncated.zip", "2.jpg"): failed("ARCHIVE_ERROR"),
                 ("zips/truncated.zip", ""): failed("ARCHIVE_ERROR")})
    buf = io.BytesIO()
    with pyzipper.AESZipFile(buf, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES) as z:
        z.setpassword(PASSWORD.encode())
        z.writestr("aes.jpg", small_jpeg)
    add("zips/aes.zip", buf.getvalue(), None)
    want[("zips/aes.zip", "aes.jpg")] = DONE
    del want[("zips/aes.zip", "")]
    add("zips/zipcrypto_other_password.zip", zipcrypto([("c.jpg", small_jpeg)], "other", folder.parent), None)
    want[("zips/zipcrypto_other_password.zip", "c.jpg")] = failed("ENCRYPTED")
    del want[("zips/zipcrypto_other_password.zip", "")]
    add("zips/wrong_password.7z", seven_zip([("s.jpg", small_jpeg)], password="other"), None)
    want[("zips/wrong_password.7z", "s.jpg")] = failed("ENCRYPTED")
    del want[("zips/wrong_password.7z", "")]
    add("zips/good.7z", seven_zip([("g.jpg", small_jpeg)]), None)
    want[("zips/good.7z", "g.jpg")] = DONE
    del want[("zips/good.7z", "")]

    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    # --- links and special files (an input folder holds more than regular files) ---
    os.symlink("photo.jpg", folder / "link_inside.jpg")
    want[("link_inside.jpg", "")] = DONE
    os.symlink("/etc/passwd", folder / "link_outside.jpg")
    want[("link_outside.jpg", "")] = failed("UNSAFE_PATH")
    os.symlink("missing.jpg", folder / "link_broken.jpg")
    want[("link_broken.jpg", "")] = failed("TASK_FILE_DOESNT_EXIST")
    os.symlink("loop_b.jpg", folder / "loop_a.jpg")
    os.symlink("loop_a.jpg", folder / "loop_b.jpg")
    want[("loop_a.jpg", "")] = want[("loop_b.jpg", "")] = failed("UNSAFE_PATH")
    os.symlink("thin", folder / "link_to_folder")
    want[("link_to_folder", "")] = SKIPPED
    os.symlink("..", folder / "link_to_parent")
    want[("link_to_parent", "")] = failed("UNSAFE_PATH")
    os.mkfifo(folder / "fifo.jpg")
    want[("fifo.jpg", "")] = SKIPPED
    return want


def srgb_icc() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def cv2_png16(img: Image.Image) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one; OpenCV can)."""
    import cv2

    arr = np.asarray(img)[:, :, ::-1].astype(np.uint16) * 257
    return cv2.imencode(".png", arr)[1].tobytes()


def zipcrypto(members: list[tuple[str, bytes]], password: str, scratch: Path) -> bytes:
    """A ZipCrypto-encrypted zip, by Info-ZIP's `zip -P` (Python's zipfile cannot encrypt)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        for name, data in members:
            (Path(tmp) / name).write_bytes(data)
        subprocess.run(["zip", "-q", "-P", password, "out.zip", *[n for n, _ in members]], cwd=tmp, check=True)
        return (Path(tmp) / "out.zip").read_bytes()


def seven_zip(members: list[tuple[str, bytes]], password: str | None = None) -> bytes:
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", password=password) as z:
        for name, data in members:
            z.writestr(data, name)
    return buf.getvalue()
