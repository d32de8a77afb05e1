"""Data loading for fine-tuning: GLUE tasks, tokenization and deterministic batching."""

from decomp_jax.data.glue import (
    TASKS,
    Examples,
    TaskSpec,
    batches,
    get_task,
    load_examples,
    normalize_split,
    num_rows,
    read_tsv,
    steps_per_epoch,
    tokenize,
    train_batch,
)

__all__ = [
    "TASKS",
    "Examples",
    "TaskSpec",
    "batches",
    "get_task",
    "load_examples",
    "normalize_split",
    "num_rows",
    "read_tsv",
    "steps_per_epoch",
    "tokenize",
    "train_batch",
]
