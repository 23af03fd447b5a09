"""One Dask task per derivation: what it carries, what it returns, what it runs.

A task is keyed by its derivation id (:func:`task_key`), so two clients that build the
same derivation at the same time share one task. It carries the node, the nodes of its
direct inputs and a recipe stripped to its path, directory and epoch: never the whole
plan, so submitting a graph is linear in its size. An import of a path or host source
carries the object the client put in the cache instead (the worker checks it against the
content hash in the derivation). Everything here pickles by reference to this module,
which does not import Dask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from reprobuild.build.plan import Node
from reprobuild.build.recipe import Recipe
from reprobuild.cache.layout import ObjectInfo

PLUGIN_NAME = "reprobuild"
KEY_PREFIX = "reprobuild-"
# The topic of the events a worker sends when it starts building a step (for progress).
STARTED_TOPIC = "reprobuild-started"
# Stands for the log file in a failure message; the client puts its own copy's path there.
LOG_MARK = "<LOG>"


def task_key(derivation_id: str) -> str:
    return KEY_PREFIX + derivation_id


def slim_recipe(recipe: Recipe) -> Recipe:
    """What a producer reads of the recipe: its path (for hints), directory and epoch."""
    return replace(recipe, sources={}, steps={}, images={})


@dataclass(frozen=True)
class StepTask:
    recipe: Recipe  # slim (see slim_recipe)
    node: Node
    inputs: tuple[Node, ...]  # the node's direct dependencies
    object: ObjectInfo | None = None  # an import: its object in the cache
    epoch: int = 0  # an import: the epoch its object was packed with


@dataclass(frozen=True)
class TaskResult:
    derivation_id: str
    hash: str
    worker: str
    built: bool  # False: the cache or the worker's store already had it


class RemoteBuildError(Exception):
    """A step failed on a worker: its message, hint and the end of its log.

    Plain string arguments, so it pickles back to the client whatever the error was.
    """

    def __init__(self, derivation_id: str, key: str, message: str, hint: str | None,
                 log: str, worker: str) -> None:
        super().__init__(derivation_id, key, message, hint, log, worker)
        self.derivation_id = derivation_id
        self.key = key
        self.message = message
        self.hint = hint
        self.log = log
        self.worker = worker

    def __str__(self) -> str:
        return self.message


class Builder(Protocol):
    def build(self, task: StepTask) -> TaskResult: ...


# The worker plugin of this process (`reprobuild worker` runs one Dask worker per
# process), set when the worker starts it.
_builder: list[Builder] = []


def install(builder: Builder) -> None:
    _builder[:] = [builder]


def run_task(task: StepTask, *_after: object) -> TaskResult:
    """The Dask task: build ``task`` with this worker's reprobuild plugin. ``_after`` are
    the results of the input tasks (only their order matters: the inputs come from the
    cache). Nothing here imports Dask: the client never has to load it for this."""
    if not _builder:
        raise RuntimeError("this Dask worker was not started by `reprobuild worker`")
    return _builder[0].build(task)
