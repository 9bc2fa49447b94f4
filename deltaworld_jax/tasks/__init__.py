"""What the one trainer trains: one Task per model family (tasks/base.py says what a Task is).

`TASKS` maps `config.model.kind` to its Task class; `make_task(config)` builds the one a config names.
"""

from __future__ import annotations

from deltaworld_jax.tasks.base import Batch, Task  # noqa: F401
from deltaworld_jax.tasks.deltatok import DeltaTokTask
from deltaworld_jax.tasks.deltaworld import DeltaWorldTask
from deltaworld_jax.tasks.dinoworld import DINOWorldTask

TASKS: dict[str, type] = {
    "deltatok": DeltaTokTask,
    "deltaworld": DeltaWorldTask,
    "dinoworld": DINOWorldTask,
}


def task_class(config) -> type:
    """The Task class of `config.model.kind`; a ValueError naming the known kinds otherwise."""
    kind = config.model.get("kind", None)
    if kind not in TASKS:
        raise ValueError(f"Unknown config.model.kind {kind!r}; known: {sorted(TASKS)}")
    return TASKS[kind]


def make_task(config) -> Task:
    """The Task for `config.model.kind`."""
    return task_class(config)(config)
