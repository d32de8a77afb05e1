"""Floor 1, data for fine-tuning: ``glue`` (GLUE tasks from TSV folders or the hub, tokenization,
deterministic fixed-shape batches) < ``lm`` (decoder prompts, tokenising with a response-only loss mask,
length buckets, batches) < ``commonsense``, ``math`` (their datasets and answer extraction).

May import: floor 0 (``errors``, ``guards``, ``quant``).
"""

from decomp_jax.data.glue import (
    TASKS, Examples, TaskSpec, batches, get_task, load_examples, normalize_split, num_rows, read_tsv, steps_per_epoch,
    tokenize, train_batch,
)



def check_train_size(num_examples: int, cfg) -> None:
    """Stop before the model loads when the training set of an experiment config cannot fill one batch."""
    if num_examples < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the {num_examples} training examples "
            f"(data.max_train_samples={cfg.data.max_train_samples}); lower train.batch_size or use more data."
        )


__all__ = [
    "TASKS",
    "check_train_size",
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

# Commonsense reasoning for decoder LLMs (LLM-Adapters setting). Names shared with the GLUE
# helpers (train_batch, steps_per_epoch, normalize_split) stay under `commonsense.`.
from decomp_jax.data import commonsense  # noqa: E402
from decomp_jax.data.commonsense import (  # noqa: E402
    COMMONSENSE_DATASETS,
    COMMONSENSE_MIXTURE,
    CommonsenseExample,
    eval_batches,
    extract_answer,
    load_commonsense,
    load_mixture,
    tokenize_prompts,
    tokenize_train,
)
from decomp_jax.errors import ConfigError

__all__ += [
    "commonsense",
    "COMMONSENSE_DATASETS",
    "COMMONSENSE_MIXTURE",
    "CommonsenseExample",
    "eval_batches",
    "extract_answer",
    "load_commonsense",
    "load_mixture",
    "tokenize_prompts",
    "tokenize_train",
]
