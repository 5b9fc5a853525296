"""Exit 0 when this checkout is already installed in this Python with the extras asked for, as
`pip install -e '.[EXTRAS]'` left it (and pyproject.toml has not changed since); 1 otherwise, with why.

    python .ci/installed.py cpu,test
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAMP = "veil-run-tests.sha256"  # in veil's dist-info: pyproject.toml's hash when it was installed


def pyproject_hash() -> str:
    return hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()


def why_not(extras: list[str]) -> str:
    try:
        dist = metadata.distribution("veil")
    except metadata.PackageNotFoundError:
        return "veil is not installed"
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare virtualenv: pip's own copy
        from pip._vendor.packaging.requirements import Requirement
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    if url.rstrip("/") != REPO.as_uri():
        return f"veil is installed from {url or 'a wheel'}, not from this checkout"
    if (dist.read_text(STAMP) or "").strip() != pyproject_hash():
        return "pyproject.toml changed since veil was installed"
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ["", *extras]):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            return f"{req.name} is missing"
        if not req.specifier.contains(version, prereleases=True):
            return f"{req.name} {version} does not meet {req.specifier}"
    return ""


def main() -> int:
    if sys.argv[1:2] == ["--stamp"]:  # after a successful install
        dist = metadata.distribution("veil")
        (Path(dist._path) / STAMP).write_text(pyproject_hash() + "\n")
        return 0
    reason = why_not([e for e in (sys.argv[1] if len(sys.argv) > 1 else "").split(",") if e])
    print(reason or "up to date")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main())
