"""A newcomer's first hour: the README's two commands, the set-up the test command does, and what a run
says when a tool it needs at run time is missing."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
APT = [line.split() for line in (REPO / ".ci/apt-packages.txt").read_text().splitlines()
       if line.strip() and not line.startswith("#")]
RAR_TOOLS = ("unar", "lsar", "unrar", "bsdtar", "7z", "7za", "7zr")


def path_without(commands: tuple[str, ...] | list[str]) -> str:
    """A PATH with every command of this one but `commands`: a folder of links, readable by anyone (the
    archive tools cannot be uninstalled from a shared machine, so they are hidden instead)."""
    folder = Path(tempfile.mkdtemp(prefix="veil-path-"))  # not tmp_path: other users must reach it
    atexit.register(shutil.rmtree, folder, True)
    folder.chmod(0o755)
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            if entry.name not in commands and not (folder / entry.name).exists() and os.access(entry.path, os.X_OK):
                (folder / entry.name).symlink_to(entry.path)
    for name in commands:
        assert shutil.which(name, path=str(folder)) is None
    return str(folder)


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text()
    assert readme.index("```bash") < readme.index("\n## ")  # the first thing after the title
    demo, tests = _readme_commands()
    assert demo == "pip install -e '.[cpu,demo]' && veil demo"
    assert tests == "./run-tests.sh"
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [tests]  # CI runs exactly what the README tells a newcomer to run


def _dry_run(env_changes: dict[str, str], user: list[str] | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHON": sys.executable} | env_changes
    return subprocess.run([*(user or []), str(REPO / "run-tests.sh"), "--dry-run"], env=env, cwd="/",
                          capture_output=True, text=True, timeout=120)


def test_setup_installs_the_debian_tools_only_when_missing():
    packages = [pkg for pkg, _ in APT]
    assert {"unar", "p7zip-full", "libarchive-tools", "zip"} <= set(packages)
    present = _dry_run({})
    assert present.returncode == 0, present.stdout + present.stderr
    assert "Debian packages: present" in present.stdout and "apt-get" not in present.stdout
    assert "would run: " in present.stdout and "models fetch" in present.stdout

    missing = _dry_run({"PATH": path_without([cmd for _, cmd in APT])})
    assert missing.returncode == 0, missing.stdout + missing.stderr
    assert f"Debian packages to install (their commands are not on PATH): {' '.join(packages)}" in missing.stdout
    install = "apt-get install -y -qq --no-install-recommends " + " ".join(packages)
    if os.geteuid() == 0:  # CI is root: apt-get itself, no sudo
        assert f"would run: env DEBIAN_FRONTEND=noninteractive {install}" in missing.stdout, missing.stdout
    one = _dry_run({"PATH": path_without(["bsdtar"])})
    assert "Debian packages to install (their commands are not on PATH): libarchive-tools\n" in one.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to become another user")
def test_setup_as_a_user_without_root_says_how_to_install():
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = _dry_run({"PATH": path_without(["unar"]), "PYTHON": "/usr/bin/python3", "HOME": "/tmp"}, user)
    if shutil.which("sudo"):
        assert "not root: using sudo for apt-get" in r.stdout and "would run: sudo env" in r.stdout, r.stdout
    else:
        assert r.returncode == 1 and "not root and no sudo: as root, run apt-get install unar" in r.stdout, r.stdout


def test_a_compressed_rar_without_its_tools_names_the_package(tmp_path, shared_dir):
    """`veil run` on a RAR of compressed members where neither unar nor bsdtar is installed: a warning
    that names the packages, each member failed with the same hint, no traceback, the job done."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shared_dir / "fixtures/rar/ssokolow-rar4-images.cbr", src / "comic.cbr")
    env = os.environ | {"PATH": path_without(RAR_TOOLS), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # as in a new shell: a local Ray then turns token auth on, and says so
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(src), str(tmp_path / "out"), "--job-id", "rar",
                        "--face", "--detect-models", "centerface-int8"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "apt-get install unar" in r.stdout and "Traceback" not in r.stderr
    # Ray's routine lines stay off the user's screen
    assert "Token authentication is enabled" not in r.stderr and "constructor arguments" not in r.stderr, r.stderr
    rows = pq.read_table(tmp_path / "out/rar/manifest/images").to_pylist()
    assert sorted(row["member"] for row in rows) == ["testfile.jpg", "testfile.png"]
    for row in rows:
        assert (row["status"], row["failure_cause"]) == ("failed", "ARCHIVE_ERROR")
        assert "apt-get install unar" in row["error"] and "apt-get install libarchive-tools" in row["error"]


def test_run_help_is_in_sections_with_units_and_defaults(capsys):
    from jobs.cli import build_parser
    from jobs.cli.help import GROUPS, _default_text
    from jobs.spec import JobSpec

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: veil run INPUT... OUTPUT [options]\n")
    positions = [text.index(f"\n{title}:\n") for title in GROUPS]
    assert positions == sorted(positions)  # classes, anonymization, outputs, models, archives, jobs and billing
    run = parser._subparsers._group_actions[0].choices["run"]
    grouped = {a.dest: g.title for g in run._action_groups for a in g._group_actions}
    options = [a for a in run._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 50
    assert [a.dest for a in options if grouped[a.dest] not in GROUPS] == []  # every option has its section
    for a in options:
        default = _default_text(a.dest)
        if default is not None:  # the default JobSpec really applies, in the help
            assert "default" in a.help and default in a.help, (a.dest, a.help)
        if a.nargs != 0 and a.choices is None:
            assert a.metavar and a.metavar != a.dest.upper(), a.dest  # a unit or a kind, not FACE_THRESHOLD
    assert "--face-threshold 0..1" in text and "--det-max-side PX" in text and "--max-member-bytes BYTES" in text
    assert "--face_threshold" not in text  # one spelling shown, both accepted
    ns = parser.parse_args(["run", "a", "b", "--face_threshold", "0.3", "--max-member-bytes", "10"])
    assert ns.face_threshold == 0.3 and JobSpec.model_fields["face_threshold"].default is None  # the profile's
