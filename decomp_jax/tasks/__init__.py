"""The decoder-LLM tasks behind one interface (``GenerationTask``): ``commonsense`` and ``math``.

``TASKS`` maps ``data.task`` to its class; the experiment runner asks a task class for its metric
names and its data checks, so adding a task adds no branch to the runner. (The GLUE tasks of the
encoder models are ``experiment.Task``.)
"""

from decomp_jax.tasks.commonsense import CommonsenseTask, dataset_names
from decomp_jax.tasks.generation import GenerationTask
from decomp_jax.tasks.math import MathTask

TASKS = {"commonsense": CommonsenseTask, "math": MathTask}

__all__ = ["TASKS", "CommonsenseTask", "GenerationTask", "MathTask", "dataset_names"]
