"""Imports every module that registers a Task (see tasks.py). One line per model family."""
from deltaworld_jax.training import deltatok_task  # noqa: F401
from deltaworld_jax.training import world_tasks  # noqa: F401
