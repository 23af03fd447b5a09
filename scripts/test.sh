#!/bin/sh
# The project's test command: installs what the tests need, lints, type-checks, tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow" -x).
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check reprobuild sandbox tests scripts
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
