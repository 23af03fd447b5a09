import sys

from reprobuild.cli import main

sys.exit(main())
