"""Which of the project's modules may import which (read with ast, nothing is imported or run).

An import inside a function counts like one at the top; one under `if TYPE_CHECKING:` does not (it
never runs) for the layers, but does for cycles: a part that names its owner's type in a hint reaches
back into it (hand it its collaborators, or a Protocol of what it uses, instead). `from a.b import c`
is an import of a.b.c when that is a module, else of a.b; a package
is its __init__, imported when an import names it (`import models`, `from models.adapters import x`).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "operators", "models")
# the modules that talk to Ray: the pipeline's assembly and progress, the Jobs API client, the submission,
# the service's Ray jobs, the sealing of plan shards
MAX_LINES = 420  # "modules under ~400 lines": past it, split by responsibility (tests may be longer)
RAY_ALLOWED = {"jobs.pipeline", "jobs.progress", "jobs.ray_client", "jobs.shard_seal", "jobs.submit",
               "jobs.api.ray_jobs"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict, hints: bool = False) -> set[str]:
    """Every module `name` imports: the project's (in `known`) and others' (their top name, e.g. ray);
    with `hints`, those under `if TYPE_CHECKING:` too."""
    tree = ast.parse(path.read_text())
    hidden = set() if hints else {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per dot after the first
                base = ".".join([*package.split(".")[:len(package.split(".")) + 1 - node.level], base]).strip(".")
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    return {m if m in known else m.split(".")[0] for m in out} - {name}


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}
WITH_HINTS = {name: imports(name, path, modules(), hints=True) for name, path in modules().items()}


def importers(target) -> set[str]:
    return {name for name, deps in GRAPH.items() if any(target(d) for d in deps)}


def in_cli(module: str) -> bool:
    return module == "jobs.cli" or module.startswith("jobs.cli.")


def test_layers():
    assert {m for m in importers(in_cli) if not in_cli(m)} == set()  # the CLI is the top: nothing imports it
    assert {m for m in importers(lambda d: d.split(".")[0] == "jobs") if not m.startswith("jobs")} == set()
    assert {m for m in importers(lambda d: d.split(".")[0] == "operators") if m.startswith("models")} == set()
    assert importers(lambda d: d == "ray") == RAY_ALLOWED


def assert_no_cycle(graph: dict[str, set[str]]) -> None:
    project = {name: {d for d in deps if d in graph} for name, deps in graph.items()}
    try:
        graphlib.TopologicalSorter(project).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_no_import_cycles():
    assert_no_cycle(GRAPH)


def test_no_import_cycles_through_type_hints():
    assert_no_cycle(WITH_HINTS)


def test_modules_stay_small():
    assert {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES} == {}
