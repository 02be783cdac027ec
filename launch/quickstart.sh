#!/usr/bin/env bash
# Quick start on a fresh machine with Python 3.11: creates .venv, installs what the job needs, runs it.
#   bash launch/quickstart.sh demo   # the main job: `flare demo` on the embedded default
#   bash launch/quickstart.sh test   # lint + the test suite (CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
case "$job" in
  demo)
    .venv/bin/python -m pip install -q -e .
    exec .venv/bin/flare demo "${@:2}"
    ;;
  test)
    .venv/bin/python -m pip install -q -e ".[test]"
    .venv/bin/ruff check .
    # two pytest-xdist workers (FLARE_TEST_WORKERS): the suite is compile-bound and one process
    # keeps about one core busy; a file's tests share a worker (and its module fixtures)
    exec .venv/bin/python -m pytest -q -n "${FLARE_TEST_WORKERS:-2}" --dist loadfile tests "${@:2}"
    ;;
  *)
    echo "usage: bash launch/quickstart.sh demo|test" >&2
    exit 2
    ;;
esac
