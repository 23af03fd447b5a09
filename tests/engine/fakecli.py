"""Run the reprobuild CLI with the fake runner (``python -m tests.engine.fakecli ARGS``)."""

from __future__ import annotations

import sys

from reprobuild import cli
from reprobuild.commands import common
from tests.engine.fakes import FakeRunner

if __name__ == "__main__":
    common.start_runner = lambda *, debug=False: FakeRunner()  # type: ignore[assignment]
    sys.exit(cli.main(sys.argv[1:]))
