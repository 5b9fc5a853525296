#!/usr/bin/env bash
# The README's test command, and CI's (.ci/run runs it as it is): installs what the suite needs where it
# is missing, then runs the suite. Run it again at will: what is there already is not installed twice.
#
#   ./run-tests.sh [--dry-run] [pytest arguments]
#
# 1. The Debian packages of .ci/apt-packages.txt whose command is not on PATH (archive tools: unar, 7z,
#    bsdtar, zip), with apt-get, through sudo when not root.
# 2. veil with its cpu and test extras into this Python (`pip install -e '.[cpu,test]'`), unless this
#    checkout is installed already with everything it requires. PYTHON picks the interpreter (python3).
# 3. The model weights (`veil models fetch`, checked against their sha256, downloaded when missing).
# 4. `ruff check .`, then `python -m pytest`.
# --dry-run says what steps 1-3 would install and runs nothing.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
PYTHON=${PYTHON:-python3}
say() { echo "run-tests: $*"; }
run() {  # a step that installs something: printed, and only printed in a dry run
  if [ $dry = 1 ]; then say "would run: $*"; else say "running: $*"; "$@"; fi
}

# 1. Debian packages
missing=()
while read -r pkg cmd _; do
  if [ -z "$pkg" ] || [ "${pkg:0:1}" = "#" ]; then continue; fi
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done < .ci/apt-packages.txt
if [ ${#missing[@]} -eq 0 ]; then
  say "Debian packages: present ($(grep -v '^#' .ci/apt-packages.txt | awk 'NF {print $2}' | paste -sd' '))"
else
  say "Debian packages to install (their commands are not on PATH): ${missing[*]}"
  if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here: install ${missing[*]} (Debian names) with this system's package manager"; exit 1
  fi
  if [ "$(id -u)" = 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo); say "not root: using sudo for apt-get (it may ask for your password)"
  else
    say "not root and no sudo: as root, run apt-get install ${missing[*]}"; exit 1
  fi
  run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# 2. veil and its Python requirements
if reason=$("$PYTHON" .ci/installed.py cpu,test 2>&1); then
  say "Python packages: up to date ($("$PYTHON" -c 'import sys; print(sys.prefix)'))"
else
  say "Python packages: veil[cpu,test] to install into $("$PYTHON" -c 'import sys; print(sys.prefix)') ($reason)"
  run "$PYTHON" -m pip install -q -e '.[cpu,test]'
  if [ $dry = 0 ]; then "$PYTHON" .ci/installed.py --stamp; fi
fi

# 3. model weights, before the clock of any test starts
run "$PYTHON" -m jobs.cli models fetch
if [ $dry = 1 ]; then exit 0; fi

# 4. lint, then the suite
say "running: ruff check . && python -m pytest $*"
"$PYTHON" -m ruff check .
exec "$PYTHON" -m pytest "$@"
