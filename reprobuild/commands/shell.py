"""reprobuild shell: an interactive shell in exactly the sandbox a step would get."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from reprobuild.build import sandboxing
from reprobuild.build.plan import Node, Plan
from reprobuild.build.recipe import Step
from reprobuild.commands import common
from reprobuild.commands.common import (
    add_build_options,
    add_recipe,
    load,
    make_engine,
    print_failures,
)
from reprobuild.errors import BuildError, RecipeError
from reprobuild.store import canon
from reprobuild.store.store import Store, StoreEntry
from sandbox.spec import Runner, SandboxResult

HELP = "open a shell in the sandbox of a step, with its inputs (as nix develop does)"
SHELLS = ("sh", "bash", "dash", "ash")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser, targets="step")
    add_build_options(parser)
    parser.add_argument("--command", "-c", nargs=argparse.REMAINDER, default=None,
                        help="run this argv instead of a shell (first word as in builder)")


def shell_argv(step: Step) -> list[str]:
    """A shell from the builder: ``busybox sh ...`` -> busybox sh; ``sh ...`` -> sh."""
    first = step.builder[0]
    if len(step.builder) > 1 and step.builder[1] in SHELLS:
        return [first, step.builder[1]]
    if os.path.basename(first) in SHELLS:
        return [first]
    raise RecipeError(f"cannot tell which shell step {step.name} has ({first})",
                      hint="pass --command PROGRAM [ARGS...]")


def run(args: argparse.Namespace) -> int:
    recipe, store, full = load(args, [args.target])
    node = full.nodes[args.target]
    if not isinstance(node.what, Step):
        kind = "an image" if node.derivation.kind == "image" else "a source"
        raise RecipeError(f"{recipe.path}: {args.target} is {kind}, not a step",
                          hint="shell opens the sandbox of a step ([steps.NAME]); steps: "
                               + (", ".join(sorted(recipe.steps)) or "(none)"))
    argv = args.command or shell_argv(node.what)
    runner = common.start_runner(debug=args.debug)  # before any thread exists
    engine = make_engine(args, store)
    engine.runner = runner
    try:
        deps = Plan(recipe, list(node.deps), full.nodes)
        report = engine.build(deps)
        if not report.ok:
            print_failures(report)
            return 1
        with store.session():  # gc waits while the shell's directories exist
            result = _run_shell(args, recipe.epoch, full, node, report.entries, store,
                                runner, argv, engine.options.cores)
    finally:
        engine.close()
    if result.returncode is None:
        raise BuildError(f"the shell was killed by signal {result.signal}")
    return result.returncode


def _run_shell(args: argparse.Namespace, epoch: int, full: Plan, node: Node,
               entries: Mapping[str, StoreEntry], store: Store, runner: Runner,
               argv: list[str], cores: int) -> SandboxResult:
    build_dir = store.new_build_dir("shell")
    try:
        os.makedirs(os.path.join(build_dir, "build"))
        os.makedirs(os.path.join(build_dir, "output"))
        inputs = {name: (full.nodes[name], entries[name].path)
                  for name in node.derivation.inputs}
        spec = sandboxing.step_spec(node, inputs, os.path.join(build_dir, "build"),
                                    os.path.join(build_dir, "output"), epoch=epoch,
                                    cores=cores, debug=args.debug, argv=argv,
                                    interactive=True)
        with sandboxing.sandbox_errors():
            return runner.run(spec, log_fd=1)
    finally:
        canon.remove_tree(build_dir)
