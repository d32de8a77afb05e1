"""The tasks behind one interface (data, loss, evaluate, metric names, config checks):
``GlueTask`` for the GLUE tasks of encoder classifiers, ``GenerationTask`` for the decoder-LLM tasks
``commonsense`` and ``math``.

``TASKS`` maps the decoder-LLM ``data.task`` names to their classes (every other name is a GLUE task);
the experiment runner asks a task class for its metric names and its data checks, so adding a task
adds no branch to the runner. Floor 5: ``base`` (model loading and adapter injection every task
shares) < ``metrics`` < ``glue`` < ``generation`` < ``commonsense``, ``math``.

May import: floors 0-4.
"""

from decomp_jax.tasks.base import LM_TASK_NAMES
from decomp_jax.tasks.commonsense import CommonsenseTask, dataset_names
from decomp_jax.tasks.generation import GenerationTask
from decomp_jax.tasks.glue import GlueTask
from decomp_jax.tasks.math import MathTask

TASKS = {"commonsense": CommonsenseTask, "math": MathTask}
"""The decoder-LLM task classes by ``data.task`` name (every other name is a GLUE task: ``GlueTask``)."""

__all__ = ["LM_TASK_NAMES", "TASKS", "CommonsenseTask", "GenerationTask", "GlueTask", "MathTask", "dataset_names"]
