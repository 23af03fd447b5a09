"""Run one command in an unprivileged, hermetic Linux sandbox. Never imports reprobuild."""
