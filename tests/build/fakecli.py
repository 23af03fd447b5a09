"""Run the reprobuild CLI with a test runner (``python -m tests.build.fakecli ARGS``)."""

from __future__ import annotations

import os
import sys

from reprobuild import cli
from reprobuild.commands import common
from tests.build.bwrap import BwrapRunner
from tests.build.fakes import FakeRunner, NullRunner

if __name__ == "__main__":
    # REPROBUILD_TEST_RUNNER=bwrap checks the mount layout in a real empty root.
    kind = os.environ.get("REPROBUILD_TEST_RUNNER", "fake")
    runners = {"bwrap": BwrapRunner, "fake": FakeRunner, "null": NullRunner}
    runner = runners[kind]
    common.start_runner = lambda *, debug=False: runner()  # type: ignore[assignment,abstract]
    sys.exit(cli.main(sys.argv[1:]))
