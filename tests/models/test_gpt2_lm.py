"""decomp_jax.models.gpt2's causal LM (GPT2LMHeadModel, tied head, KV-cache greedy generation) against
transformers' PyTorch GPT2LMHeadModel with the same weights, and adapters on it."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import decomp_jax as dj  # noqa: E402
from decomp_jax.models.hf import TRANSPOSED  # noqa: E402
from decomp_jax.core.inject import inject_quantized

TOL = 1e-4


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A random 2-layer GPT-2 LM saved by PyTorch and read back with load_gpt2_lm (weights of std 0.2, so
    that greedy decoding does not settle on one token at once), and a left-padded batch."""
    import transformers as tf

    from decomp_jax.models.gpt2 import load_gpt2_lm

    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=60, n_positions=32, initializer_range=0.2)
    torch.manual_seed(0)
    torch_model = tf.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2_lm")
    torch_model.save_pretrained(folder)
    model, params = load_gpt2_lm(str(folder))
    ids = np.random.default_rng(0).integers(1, 60, size=(3, 9)).astype("int64")
    mask = np.ones_like(ids)
    mask[1, :3], mask[2, :5] = 0, 0
    ids[mask == 0] = 0
    return {"torch": torch_model, "model": model, "params": params, "ids": ids, "mask": mask, "folder": str(folder)}


def _positions(mask):
    return np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)  # transformers' generate: left padding shifts nothing


def test_param_tree_is_pytorch_without_lm_head(lm):
    """The params are the PyTorch model's parameters (names through models.names.ARCHS["gpt2"]) less the
    tied lm_head."""
    from decomp_jax.models.names import torch_state_dict

    named = {k: tuple(v.shape) for k, v in lm["torch"].named_parameters()}  # (lm_head.weight is wte's: listed once)
    ours = {k: v.shape for k, v in torch_state_dict(lm["params"], "gpt2").items()}
    assert "lm_head" not in lm["params"] and ours == named
    assert lm["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (96, 32)  # (d_out, d_in)


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_pytorch(lm, padded):
    model, params = lm["model"], lm["params"]
    ids = lm["ids"] if padded else np.where(lm["mask"] > 0, lm["ids"], 7)
    mask = lm["mask"] if padded else np.ones_like(ids)
    positions = _positions(mask)
    with torch.no_grad():
        theirs = lm["torch"](input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                             position_ids=torch.as_tensor(positions)).logits.numpy()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask, positions))
    assert ours.dtype == np.float32 and ours.shape == (3, 9, 60)
    diff = np.abs(ours - theirs)[mask > 0].max()
    assert diff <= TOL, diff
    if not padded:  # default positions 0..L-1, as transformers' forward
        assert np.abs(np.asarray(model.apply({"params": params}, ids)) - theirs).max() <= TOL


def test_kv_cache_matches_the_full_forward(lm):
    """A prefill and one-token calls through the cache give the logits of one call on the whole sequence."""
    from decomp_jax.models.gpt2 import init_cache

    model, params = lm["model"], lm["params"]
    ids, mask = lm["ids"], lm["mask"]
    positions = _positions(mask)
    full = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask, positions))
    call = jax.jit(lambda ids, positions, cache, index: model.apply({"params": params}, ids, mask, positions,
                                                                   cache=cache, cache_index=index))
    logits, cache = call(ids[:, :6], positions[:, :6], init_cache(model.config, 3, 9), 0)
    steps = [np.asarray(logits)]
    for i in range(6, 9):  # (one compilation: the index is traced)
        logits, cache = call(ids[:, i:i + 1], positions[:, i:i + 1], cache, i)
        steps.append(np.asarray(logits))
    assert np.abs(np.concatenate(steps, axis=1) - full)[mask > 0].max() <= 1e-5


def test_greedy_generation_equals_pytorch(lm):
    """16 new tokens for left-padded prompts, token for token as transformers' generate(do_sample=False)."""
    from decomp_jax.models.gpt2 import greedy_generate

    model, params = lm["model"], lm["params"]
    ours = np.asarray(jax.jit(lambda p, i, m: greedy_generate(model, p, i, m, 16))(params, lm["ids"], lm["mask"]))
    with torch.no_grad():
        theirs = lm["torch"].generate(torch.as_tensor(lm["ids"]), attention_mask=torch.as_tensor(lm["mask"]),
                                      do_sample=False, max_new_tokens=16, pad_token_id=0).numpy()
    assert ours.shape == theirs.shape == (3, 25)
    np.testing.assert_array_equal(ours, theirs)
    assert len(set(ours[:, 9:].ravel())) > 3  # not one token repeated: the comparison sees the model


def test_lora_on_c_attn_trains_and_factored_equals_merged(lm):
    """LoRA (dj.inject on c_attn, transposed Conv1D kernels) lowers the next-token loss in a few steps;
    factored execution equals the merged kernels, in the forward and in generation."""
    import optax

    from decomp_jax.models.gpt2 import greedy_generate

    model, base = lm["model"], lm["params"]
    cfg = dj.AdapterConfig(method="lora", targets=r"attn/c_attn$", transposed=TRANSPOSED["gpt2"], rank=4, alpha=8)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    ids, mask = jnp.asarray(lm["ids"]), jnp.asarray(lm["mask"])
    apply = dj.adapt(model.apply, cfg)

    def loss(trainable, frozen):
        logits = apply({"params": dj.combine(trainable, {}, frozen)}, ids, mask)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        keep = mask[:, 1:] * mask[:, :-1]
        return (nll * keep).sum() / keep.sum()

    trainable, _, frozen = dj.partition(params, cfg)
    opt = optax.adam(0.05)
    state = opt.init(trainable)

    @jax.jit
    def step(trainable, state):
        value, grads = jax.value_and_grad(loss)(trainable, frozen)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(trainable, updates), state, value

    losses = []
    for _ in range(5):
        trainable, state, value = step(trainable, state)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.1, losses
    params = dj.combine(trainable, {}, frozen)
    merged = dj.merge(params, cfg)
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, base)
    factored = np.asarray(apply({"params": params}, ids, mask))
    np.testing.assert_allclose(factored, np.asarray(model.apply({"params": merged}, ids, mask)), atol=2e-5)
    assert np.abs(factored - np.asarray(model.apply({"params": base}, ids, mask))).max() > 1e-2
    gen = jax.jit(lambda p, fn: greedy_generate(model, p, ids, mask, 6, apply_fn=fn), static_argnums=1)
    np.testing.assert_array_equal(np.asarray(gen(params, apply)), np.asarray(gen(merged, None)))


def test_load_refuses_a_classifier_folder(tmp_path):
    import transformers as tf

    from decomp_jax.models.gpt2 import load_gpt2_lm

    config = tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=16, num_labels=2, pad_token_id=0)
    tf.GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2ForSequenceClassification checkpoint; load it with load_gpt2_classifier"):
        load_gpt2_lm(str(tmp_path))


@pytest.mark.slow  # ~22 s; the scanned LM's methods run by default (test_every_method_on_the_scanned_lm_...)
def test_scanned_remat_model_and_chunked_response_loss_equal_the_unrolled_model(lm):
    """scan_layers + remat: the same logits, the same LoRA gradients (factors moved with stack_blocks) through the chunked per-token loss as the unrolled model's full logits give, and the
    same greedy tokens with the KV cache; stack_blocks and unstack_blocks are inverses."""
    import optax

    from decomp_jax.models.gpt2 import greedy_generate, load_gpt2_lm, stack_blocks, unstack_blocks

    model, base = lm["model"], lm["params"]
    scanned, stacked_base = load_gpt2_lm(lm["folder"], scan_layers=True, remat=True)
    assert stacked_base["transformer"]["layers"]["attn"]["c_attn"]["kernel"].shape == (2, 96, 32)
    ids, mask = jnp.asarray(lm["ids"]), jnp.asarray(lm["mask"])
    np.testing.assert_allclose(scanned.apply({"params": stacked_base}, ids, mask),
                               model.apply({"params": base}, ids, mask), atol=1e-5)
    cfg = dj.AdapterConfig(method="lora", targets=r"(attn/c_attn|mlp/c_fc)$", transposed=TRANSPOSED["gpt2"], rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    params = jax.tree.map(lambda x: x + 0.1 if x.ndim == 2 and x.shape[0] == 4 else x, params)  # lora_b != 0
    stacked = stack_blocks(params)
    assert jax.tree.map(jnp.shape, unstack_blocks(stacked)) == jax.tree.map(jnp.shape, params)
    at = jnp.broadcast_to(jnp.arange(8), (3, 8))
    keep = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)

    def full(p):
        logits = dj.adapt(model.apply, cfg)({"params": p}, ids, mask)
        return (optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]) * keep).sum()

    def chunked(p):
        nll = dj.adapt(scanned.apply, cfg)({"params": p}, ids, mask, logits_at=at, targets=ids[:, 1:], chunk=5)
        return (nll * keep).sum()

    want_value, want = jax.value_and_grad(full)(params)
    value, got = jax.value_and_grad(chunked)(stacked)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree_util.tree_leaves(stack_blocks(want))):
        np.testing.assert_allclose(g, w, atol=2e-5, err_msg=jax.tree_util.keystr(path))
    logits_at = scanned.apply({"params": stacked_base}, ids, mask, logits_at=at[:, :3])
    np.testing.assert_allclose(logits_at, model.apply({"params": base}, ids, mask)[:, :3], atol=1e-5)
    gen = lambda m, p: greedy_generate(m, p, ids, mask, 5)  # noqa: E731
    np.testing.assert_array_equal(gen(scanned, stacked_base), gen(model, base))


def test_param_dtype_quantized_base_and_sharding_preset(lm):
    """param_dtype: init creates bfloat16 params; an NF4 base runs each Conv1D on its dequantized kernel;
    the gpt2 sharding preset places the unrolled and the stacked kernels."""
    from flax.traverse_util import flatten_dict
    from jax.sharding import PartitionSpec as P

    from decomp_jax import quant
    from decomp_jax import sharding as sh
    from decomp_jax.models.gpt2 import GPT2LMHeadModel, load_gpt2_lm

    model, base = lm["model"], lm["params"]
    ids, mask = jnp.asarray(lm["ids"]), jnp.asarray(lm["mask"])
    shapes = jax.eval_shape(lambda: GPT2LMHeadModel(model.config, param_dtype=jnp.bfloat16).init(
        jax.random.PRNGKey(0), ids))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    cfg = dj.AdapterConfig(method="lora", targets=r"attn/c_attn$", transposed=TRANSPOSED["gpt2"], rank=4)
    qbase, params = inject_quantized(base, cfg, jax.random.PRNGKey(0), "nf4", block_size=16)
    assert quant.is_quantized(qbase["transformer"]["h"]["1"]["mlp"]["c_proj"]["kernel"])
    run = jax.jit(dj.adapt(model.apply, cfg))
    got = run({"params": params}, ids, mask)
    np.testing.assert_allclose(got, run({"params": quant.dequantize_params(params)}, ids, mask), atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(model.apply({"params": base}, ids, mask))).max() > 1e-3  # NF4 is lossy
    mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
    _, stacked = load_gpt2_lm(lm["folder"], scan_layers=True)
    for tree, layer in ((base, "transformer/h/0"), (stacked, "transformer/layers")):
        specs = flatten_dict(sh.base_specs(tree, mesh, fsdp_min_size=1), sep="/")
        lead = (None,) if layer == "transformer/layers" else ()
        assert specs[f"{layer}/attn/c_attn/kernel"] == P(*lead, "tensor", "fsdp"), specs
        assert specs[f"{layer}/mlp/c_proj/kernel"] == P(*lead, "fsdp", "tensor"), specs


def test_commonsense_run_on_a_scanned_gpt2_exports_merged_and_peft(tiny_llm, tmp_path):
    """A GPT-2 folder as a decoder task's model (scan_layers + remat): LoRA trains and decodes; the
    merged folder loads in transformers' GPT2LMHeadModel and the PEFT export in PeftModel, both with the
    adapted logits; the PEFT folder imports back into a run with the same adapter."""
    import shutil

    import transformers as tf

    peft = pytest.importorskip("peft")
    from conftest import DATA, REPO
    from decomp_jax.models.causal_lm import unrolled_params
    from decomp_jax.app.experiment import load_config, run
    from decomp_jax.app.runs import export_merged, export_peft_run, import_peft_run, restore_run

    folder = tmp_path / "gpt2"
    tok = tf.AutoTokenizer.from_pretrained(tiny_llm)
    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=256, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    overrides = [f"model.name={folder}", f"data.path={DATA / 'commonsense'}", "data.datasets=boolq", "data.max_length=160",
                 "data.max_train_samples=8", "data.max_eval_samples=4", "data.max_new_tokens=4", "train.steps=3",
                 "train.batch_size=4", "train.eval_batch_size=4", "model.scan_layers=true", "train.remat=true",
                 "adapter.targets=(attn/c_attn|mlp/c_fc)$", "adapter.transposed=(c_attn|c_proj|c_fc)$",
                 "train.learning_rate=0.05"]
    record = run(load_config(REPO / "configs/commonsense/smollm2_lora_cpu.yaml",
                             overrides + [f"train.output_dir={tmp_path / 'run'}"]), progress=False)
    assert set(record["eval"]) >= {"boolq_accuracy", "accuracy"}
    restored = restore_run(tmp_path / "run")
    assert restored.model.scan_layers and "layers" in restored.params["transformer"]
    ids = np.asarray([[1, 40, 41, 42, 43, 44], [0, 0, 1, 45, 46, 47]])
    mask = (ids > 0).astype("int64")
    mask[:, 2] = 1
    positions = _positions(mask)
    adapted = np.asarray(dj.adapt(restored.model.apply, restored.cfg.adapter)({"params": restored.params}, ids, mask,
                                                                                positions))
    plain = np.asarray(restored.model.apply({"params": restored.base_params}, ids, mask, positions))
    assert np.abs(adapted - plain).max() > 1e-4
    valid = mask > 0

    export_merged(restored, tmp_path / "merged")
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "GPT2LMHeadModel"
    torch_mask = torch.tensor(mask)
    position_ids = torch.tensor(positions)
    with torch.no_grad():
        got = merged(torch.tensor(ids), attention_mask=torch_mask, position_ids=position_ids).logits.numpy()
    np.testing.assert_allclose(got[valid], adapted[valid], atol=TOL)

    export_peft_run(restored, tmp_path / "peft")
    base = tf.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base, tmp_path / "peft")(
            input_ids=torch.tensor(ids), attention_mask=torch_mask, position_ids=position_ids).logits.numpy()
    np.testing.assert_allclose(got[valid], adapted[valid], atol=TOL)

    cfg_path = tmp_path / "run" / "config.yaml"
    import_peft_run(tmp_path / "peft", cfg_path, tmp_path / "imported")
    back = restore_run(tmp_path / "imported")
    for a, b in zip(jax.tree.leaves(unrolled_params(back.model, back.params)),
                    jax.tree.leaves(unrolled_params(restored.model, restored.params))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    shutil.rmtree(tmp_path / "run")


@pytest.mark.parametrize("which", ["core", pytest.param("all", marks=pytest.mark.slow)])
def test_every_method_on_the_scanned_lm_equals_unrolled_and_merged(lm, which):
    """Each per-layer method on GPT-2's Conv1D layers (transposed kernels): the scanned model's factored
    logits equal the unrolled model's, and merging gives the same logits (every Conv1D has a bias, so
    lora_bias merges too)."""
    from test_families import CORE, OPTIONS, moved

    from decomp_jax.models.gpt2 import GPT2LMHeadModel, stack_blocks

    model, base = lm["model"], lm["params"]
    ids, mask = jnp.asarray(lm["ids"]), jnp.asarray(lm["mask"])
    scanned = GPT2LMHeadModel(model.config, scan_layers=True)
    valid = np.asarray(mask) > 0
    for name in CORE if which == "core" else dj.methods.names():
        cfg = dj.AdapterConfig(method=name, targets=r"(c_attn|c_proj|c_fc)$", transposed=TRANSPOSED["gpt2"], rank=4,
                               options=OPTIONS.get(name, {}))
        params = moved(dj.inject(base, cfg, jax.random.PRNGKey(0)), cfg)
        want = np.asarray(jax.jit(dj.adapt(model.apply, cfg))({"params": params}, ids, mask))
        stacked = stack_blocks(params)
        got = np.asarray(jax.jit(dj.adapt(scanned.apply, cfg))({"params": stacked}, ids, mask))
        assert np.isfinite(want).all() and np.abs(got - want)[valid].max() <= 1e-5, name
        if dj.methods.get(name).mergeable:
            merged = np.asarray(jax.jit(scanned.apply)({"params": dj.merge(stacked, cfg)}, ids, mask))
            assert np.abs(merged - want)[valid].max() <= 1e-4, name
