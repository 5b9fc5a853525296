"""`veil demo`: a real job on sample photos that the install itself provides.

scikit-image ships a few public-domain photographs (the astronaut Eileen Collins, the
cameraman, ...); they are copied into a folder and anonymized with the default settings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SAMPLES = ("astronaut.png", "camera.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")


def gather_samples(folder: Path) -> list[Path]:
    try:
        import skimage
    except ImportError:
        raise SystemExit("veil demo needs scikit-image: pip install 'veil[demo]'") from None
    data_dir = Path(skimage.__file__).parent / "data"
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SAMPLES:
        src = data_dir / name
        if src.exists():
            copied.append(Path(shutil.copy2(src, folder / name)))
    if not copied:
        raise SystemExit(f"no sample photos found in {data_dir}")
    return copied


def run_demo(output: str | None = None) -> int:
    from jobs.report import summary_text
    from jobs.run import run_job
    from jobs.spec import build_spec

    base = Path.home() / ".cache" / "veil" / "demo"
    samples = gather_samples(base / "input")
    out = Path(output) if output else base / "output"
    print(f"veil demo: {len(samples)} sample photos in {base / 'input'}")
    # a new job id each time: the same id would resume the last demo and find nothing left to do
    doc = run_job(build_spec({"inputs": [str(base / "input")], "output": str(out)}), bar=None)
    print(summary_text(doc))
    print(f"anonymized images: {doc['outputs']['images']}")
    return 0 if doc["status"] == "done" else 1
