"""A quantized frozen base (decomp_jax.quant): NF4 against an independent NumPy reference of the published
codebook with blockwise absmax, int8 / fp8 error bounds, double quantization; a quantized BERT runs every
layer on its dequantized kernels (adapted or not) in factored execution, equal to the float model holding the
dequantized kernels; inject / merge / train over it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from decomp_jax import quant
from decomp_jax.core.inject import inject_quantized
from decomp_jax.models.hf import sequence_classifier_apply
import decomp_jax as dj

# the NF4 code values as QLoRA publishes them (bitsandbytes' NF4 table), typed in again here
CODEBOOK = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]


def nf4_reference(x, block):
    """NumPy NF4: per block of ``block`` values along the last axis, each value / absmax rounded to the
    nearest codebook entry (argmin of the distance), times absmax."""
    code = np.asarray(CODEBOOK, np.float64)
    blocks = np.asarray(x, np.float64).reshape(x.shape[:-1] + (-1, block))
    absmax = np.abs(blocks).max(-1, keepdims=True)
    unit = blocks / absmax
    nearest = code[np.abs(unit[..., None] - code).argmin(-1)]
    return (nearest * absmax).reshape(x.shape)


def test_nf4_matches_numpy_reference():
    x = np.random.default_rng(0).standard_normal((96, 128)).astype(np.float32) * 0.05
    q = quant.quantize(x, "nf4", 64, double_quant=False)
    assert q.shape == x.shape and q.codes.dtype == jnp.uint8 and q.codes.shape == (96, 64)
    np.testing.assert_allclose(np.asarray(q.dequantize()), nf4_reference(x, 64), atol=1e-7, rtol=1e-6)
    # bytes per parameter: 0.5 for the codes + 4 / 64 for the float32 scales; double quantization: 1 / 64 + 8 bytes
    # (offset, step) per group of scales
    assert q.nbytes / x.size == pytest.approx(0.5 + 4 / 64)
    dq = quant.quantize(x, "nf4", 64, double_quant=True)
    assert dq.codes.shape == q.codes.shape and dq.scales.shape == (1, 96 * 2)  # 192 block scales: one group
    assert dq.nbytes / x.size == pytest.approx(0.5 + 1 / 64 + 8 / x.size)
    err, err_dq = (np.abs(np.asarray(a.dequantize()) - x).mean() for a in (q, dq))
    assert err_dq < 1.02 * err  # the scales' own quantization costs under 2% more error
    rel = err / np.abs(x).mean()
    print(f"nf4 mean abs error / mean abs value: {rel:.4f} (double quant {err_dq / np.abs(x).mean():.4f})")
    assert 0.05 < rel < 0.15  # NF4 on Gaussian weights: about 10%


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_equals_bitsandbytes(double_quant):
    """bitsandbytes' quantize_4bit (CPU) on the same tensor: the same packed codes, byte for byte; without
    double quantization the same dequantized values; with it both quantize the block scales in 8 bits (theirs
    with their dynamic 8-bit map, ours int8 around the group's mean), so the values differ by the scales' error."""
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, state = functional.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    theirs = functional.dequantize_4bit(packed, state).numpy()
    ours = quant.quantize(x.numpy(), "nf4", 64, double_quant=double_quant)
    np.testing.assert_array_equal(np.asarray(ours.codes).reshape(-1), packed.numpy().reshape(-1))
    diff = np.abs(np.asarray(ours.dequantize()) - theirs).max()
    err_ours, err_theirs = (np.abs(v - x.numpy()).mean() for v in (np.asarray(ours.dequantize()), theirs))
    print(f"double_quant={double_quant}: max |ours - bitsandbytes| {diff:.2e}; mean error ours {err_ours:.3e}, "
          f"bitsandbytes {err_theirs:.3e}")
    if double_quant:
        assert err_ours <= 1.01 * err_theirs
    else:
        assert diff == 0.0


def test_q4_1_equals_llama_cpp():
    """``q4_1`` is llama.cpp's Q4_1 (the reference quantizer of the ``gguf`` package, on the rows of the
    ``(d_out, d_in)`` weight): the same codes, float16 steps and minima per block of 32 along ``d_in``, the
    same dequantized values; a stacked kernel quantizes layer by layer."""
    gguf = pytest.importorskip("gguf")
    kind = gguf.GGMLQuantizationType.Q4_1
    kernels = np.random.default_rng(2).standard_normal((2, 96, 40)).astype(np.float32) * 0.05  # (L, d_in, d_out)
    kernels[1, :32, 3] = 0.01  # a constant block: step 0
    q = quant.quantize(kernels, "q4_1", 32)
    assert q.shape == kernels.shape and q.codes.shape == (2, 40, 48) and q.nbytes == 2 * 40 * 3 * 20
    for layer in range(2):
        ref = gguf.quants.quantize(kernels[layer].T, kind).reshape(40, 3, 20)
        np.testing.assert_array_equal(np.asarray(q.scales[layer]), ref[..., 0:2].copy().view(np.float16)[..., 0])
        np.testing.assert_array_equal(np.asarray(q.mins[layer]), ref[..., 2:4].copy().view(np.float16)[..., 0])
        np.testing.assert_array_equal(np.asarray(q.codes[layer]), ref[..., 4:].reshape(40, 48))
        values = gguf.quants.dequantize(ref.reshape(40, 60), kind).reshape(40, 96).T
        np.testing.assert_array_equal(np.asarray(q.dequantize()[layer]), values)
    with pytest.raises(dj.ConfigError, match="along its second-to-last axis"):
        quant.quantize(kernels[:, :48], "q4_1", 32)


@pytest.mark.parametrize("kind, bound", [("int8", 0.5 / 127), ("fp8", 2.0 ** -4)])
def test_int8_and_fp8_error_bounds(kind, bound):
    x = np.random.default_rng(1).standard_normal((4, 3, 64)).astype(np.float32)
    q = quant.quantize(x, kind, 32)
    assert q.shape == x.shape
    blocks = np.abs(x).reshape(4, 3, 2, 32).max(-1, keepdims=True)
    err = np.abs(np.asarray(q.dequantize()) - x).reshape(4, 3, 2, 32) / blocks
    assert err.max() <= bound * 1.0001  # int8: half a step of absmax / 127; fp8 e4m3: 3 mantissa bits
    row = jax.tree.map(lambda c: c[1], q)  # a slice of the children (nn.scan's per-layer slice) is a slice
    assert row.shape == (3, 64)
    np.testing.assert_array_equal(np.asarray(row.dequantize()), np.asarray(q.dequantize())[1])


def test_quantize_refuses_blocks_that_do_not_fit():
    with pytest.raises(dj.ConfigError, match="block_size that divides 48"):
        quant.quantize(np.ones((4, 48)), "nf4", 64)
    with pytest.raises(dj.ConfigError, match="choose one of nf4, int8, fp8"):
        quant.quantize(np.ones((4, 64)), "int4")


CFG = dj.AdapterConfig(method="lora", targets=r"attention/self/(query|value)$", rank=4, alpha=8,
                       train_extra="classifier")


def _dequantized(params):
    return quant.dequantize_params(params)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_runs_factored_and_merges(kind, tiny_bert, tiny_batch):
    model, base = tiny_bert
    qbase = quant.quantize_params(base, kind, block_size=32, skip="classifier")
    flat = flatten_dict(qbase)
    quantized = [p for p, v in flat.items() if quant.is_quantized(v)]
    assert len(quantized) == 2 * 6 + 1 and ("classifier", "kernel") not in quantized  # 6 per layer, the pooler
    apply = sequence_classifier_apply(model)
    params = dj.inject(qbase, CFG, jax.random.PRNGKey(0))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, CFG))
    assert all(not quant.is_quantized(v) for v in jax.tree_util.tree_leaves(trainable, is_leaf=quant.is_quantized))
    trained = dj.combine(jax.tree.map(lambda v: v + 0.1, trainable), frozen)
    got = np.asarray(jax.jit(dj.adapt(apply, CFG))(trained, tiny_batch))
    # the same adapter over the float model holding the dequantized kernels
    want = np.asarray(dj.adapt(apply, CFG)(_dequantized(trained), tiny_batch))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    merged = dj.merge(trained, CFG)
    assert not any(quant.is_quantized(v) for v in jax.tree_util.tree_leaves(merged, is_leaf=quant.is_quantized))
    np.testing.assert_allclose(np.asarray(apply(merged, tiny_batch)), want, atol=1e-5, rtol=0)
    # quantization moves the logits (the test is sensitive), and a train step over the quantized base works
    assert np.abs(np.asarray(apply(base, tiny_batch)) - np.asarray(apply(_dequantized(qbase), tiny_batch))).max() > 1e-4
    run = dj.adapt(apply, CFG)

    def loss(tr, frozen):
        logits = run(dj.combine(tr, frozen), tiny_batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tiny_batch["labels"]).mean()

    grad = jax.jit(jax.grad(loss))
    grads = grad(trainable, frozen)  # equal to those over the float dequantized base
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads,
                 grad(trainable, _dequantized(frozen)))
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 1e-4


def test_stored_bytes_of_a_quantized_bert(tiny_bert):
    model, base = tiny_bert
    q = quant.quantize_params(base, "nf4", block_size=32, double_quant=True)
    kernels = [v for p, v in flatten_dict(base).items() if p[-1] == "kernel" and np.shape(v)[-1] % 32 == 0]
    before = sum(np.size(k) * 4 for k in kernels)
    after = sum(v.nbytes for v in flatten_dict(q).values() if quant.is_quantized(v))
    assert after / before == pytest.approx((0.5 + 1 / 32) / 4, rel=0.1)
    assert quant.stored_bytes(q) < quant.stored_bytes(base)


@pytest.mark.parametrize("name", [pytest.param("dora", marks=pytest.mark.slow), "pissa", pytest.param("ssb", marks=pytest.mark.slow),
                                  pytest.param("houlsby", marks=pytest.mark.slow)])
def test_methods_over_a_quantized_scanned_llama(name):
    """Every layer of a scanned Llama (stacked kernels sliced by nn.scan, quantized children sliced with them)
    runs on its dequantized kernel: the adapted model equals the same adapter over the float model holding the
    dequantized kernels. PiSSA keeps its residual quantized (QLoRA-style): at init it is the base up to the
    quantization error of K_res, which is smaller than that of K."""
    from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_params, stack_layers

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, scan_layers=True)
    base = stack_layers(init_params(dataclasses_replace(config, scan_layers=False), jax.random.PRNGKey(0)))
    qbase = quant.quantize_params(base, "nf4", block_size=16)
    q_proj = qbase["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert quant.is_quantized(q_proj) and q_proj.shape == (2, 32, 32) and q_proj.codes.shape == (2, 32, 16)
    cfg = dj.AdapterConfig(method=name, targets=r"self_attn/(q_proj|v_proj)$|mlp/down_proj$", rank=4, stacked="layers")
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 64)
    model = LlamaForCausalLM(config)
    if dj.methods.get(name).residual is None:
        params = dj.inject(qbase, cfg, jax.random.PRNGKey(2))
    else:  # the residual of the float kernel, then quantized
        params = quant.quantize_params(dj.inject(base, cfg, jax.random.PRNGKey(2)), "nf4", block_size=16)
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    params = dj.combine(jax.tree.map(lambda v: v + 0.05 * jnp.cos(jnp.arange(v.size).reshape(v.shape)), trainable),
                        frozen)
    run = jax.jit(dj.adapt(model.apply, cfg))
    got, want = run({"params": params}, ids), run({"params": quant.dequantize_params(params)}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    if dj.methods.get(name).mergeable:
        merged = dj.merge(params, cfg)
        np.testing.assert_allclose(np.asarray(jax.jit(model.apply)({"params": merged}, ids)), np.asarray(want),
                                   atol=1e-5, rtol=0)
    if name == "pissa":  # QLoRA-style: the residual of the float kernel, quantized; its error is smaller than K's
        with pytest.raises(dj.ConfigError, match="Inject into the float base, then quantize"):
            dj.inject(qbase, cfg.replace(targets="q_proj$"), jax.random.PRNGKey(2))
        fresh = quant.quantize_params(dj.inject(base, cfg, jax.random.PRNGKey(2)), "nf4", block_size=16)
        layer = fresh["model"]["layers"]["self_attn"]["q_proj"]
        assert quant.is_quantized(layer["kernel"])
        s = cfg.alpha / cfg.rank
        start = jax.vmap(lambda a, b: a @ b)(layer["lora_a"], layer["lora_b"]) * s
        k = np.asarray(base["model"]["layers"]["self_attn"]["q_proj"]["kernel"])
        err_res = np.abs(np.asarray(layer["kernel"].dequantize() + start) - k).mean()
        err_k = np.abs(np.asarray(q_proj.dequantize()) - k).mean()
        print(f"pissa: nf4 error of K_res + s a0 b0 {err_res:.2e} vs of K {err_k:.2e}")
        assert err_res < 0.9 * err_k


def dataclasses_replace(config, **kw):
    import dataclasses

    return dataclasses.replace(config, **kw)


def test_a_quantized_run_trains_restores_and_evaluates(tiny_model_dir, tmp_path):
    """``model.quantize: nf4`` in an experiment: the run trains over the quantized base, its checkpoint is tied
    to that base (fingerprint), and the restored run evaluates to the run's own metrics."""
    from conftest import DATA, REPO
    from decomp_jax.app.experiment import Task, load_config, run
    from decomp_jax.core.inject import partition
    from decomp_jax.app.runs import restore_run

    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name={tiny_model_dir}", f"data.path={DATA / 'glue' / 'SST-2'}", "data.max_train_samples=64",
        "data.max_eval_samples=16", "data.max_length=24", "adapter.method=dora", "adapter.rank=4", "train.steps=3",
        "train.batch_size=16", "train.learning_rate=0.02", f"train.output_dir={tmp_path}", "model.quantize=nf4",
        "model.quantize_block_size=32",
    ])
    record = run(cfg, progress=False)
    assert np.isfinite(record["eval"]["accuracy"])
    restored = restore_run(tmp_path)
    flat = flatten_dict(restored.params)
    assert sum(quant.is_quantized(v) for v in flat.values()) == 13 and not quant.is_quantized(flat[("classifier", "kernel")])
    task = Task(restored.cfg, need_train=False)
    trainable, buffers, frozen = partition(restored.params, restored.cfg.adapter)
    task.frozen = frozen
    assert task.evaluate(trainable, buffers) == record["eval"]
    with pytest.raises(dj.ConfigError, match="model.quantize='nf5' is unknown"):
        load_config(REPO / "configs" / "quickstart.yaml", ["model.quantize=nf5"])


def test_a_scanned_quantized_step_keeps_no_dequantized_kernels():
    """The dequantized kernels are not residuals of the backward pass (recomputed there from the codes): over
    scanned layers the gradient step's temporaries are those of the float base's step, not all the layers'
    float kernels more (XLA's own memory analysis of the compiled step)."""
    from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_params, stack_layers

    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    base = stack_layers(init_params(config, jax.random.PRNGKey(0)))
    model = LlamaForCausalLM(dataclasses_replace(config, scan_layers=True))
    cfg = dj.AdapterConfig(method="lora", targets=r"self_attn/(q_proj|v_proj)$", rank=4, stacked="layers")
    run = dj.adapt(model.apply, cfg)
    ids = jnp.ones((1, 8), jnp.int32)
    temp = {}
    for kind in ("float32", "nf4"):
        params = dj.inject(base if kind == "float32" else quant.quantize_params(base, kind), cfg, jax.random.PRNGKey(1))
        trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
        loss = lambda t, f: jnp.mean(run({"params": dj.combine(t, f)}, ids))
        temp[kind] = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile().memory_analysis().temp_size_in_bytes
    kernels = sum(v.size * 4 for p, v in flatten_dict(base).items() if p[-1] == "kernel")
    print(f"train step temporaries: float32 base {temp['float32'] / 2**20:.2f} MiB, nf4 base {temp['nf4'] / 2**20:.2f} "
          f"MiB; all float kernels {kernels / 2**20:.2f} MiB")
    assert temp["nf4"] < temp["float32"] + kernels / 4  # at most one layer's dequantized kernels beside the float step's


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's handling of half-precision kernels")
def test_half_precision_bases_on_a_cpu_hold_what_the_note_says():
    """What ``tasks.base.half_base_note`` and the decoders guide tell CPU users, on XLA's own memory analysis
    of a scanned LoRA step: a float16 base halves the arguments and adds no temporaries; a bfloat16 base
    adds float32 copies of the kernels (XLA:CPU slices bfloat16 in float32). Should a jaxlib release change
    this, the note and the guide's table are out of date."""
    from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, cast_params, init_params, stack_layers

    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = stack_layers(init_params(config, jax.random.PRNGKey(0)))
    cfg = dj.AdapterConfig(method="lora", targets=r"(q_proj|v_proj|up_proj)$", rank=4, stacked="layers")
    run = dj.adapt(LlamaForCausalLM(dataclasses_replace(config, scan_layers=True, remat=True)).apply, cfg)
    ids = jnp.ones((1, 16), jnp.int32)
    memory = {}
    for dtype in ("float32", "float16", "bfloat16"):
        params = dj.inject(cast_params(base, dtype), cfg, jax.random.PRNGKey(1))
        trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
        loss = lambda t, f: jnp.mean(run({"params": dj.combine(t, f)}, ids))
        m = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile().memory_analysis()
        memory[dtype] = (m.argument_size_in_bytes, m.temp_size_in_bytes)
    kernels = sum(v.size * 4 for p, v in flatten_dict(base["model"]["layers"]).items() if p[-1] == "kernel")
    print({k: (a / 2**20, t / 2**20) for k, (a, t) in memory.items()}, "layer kernels", kernels / 2**20, "MiB")
    assert memory["float16"][0] < 0.6 * memory["float32"][0]
    assert memory["float16"][1] <= memory["float32"][1] + kernels / 8  # at most a layer's float32 kernels more
    assert memory["bfloat16"][1] >= memory["float32"][1] + 0.9 * kernels  # every layer's float32 kernels more


def _perturbed(params, cfg):
    """Non-initial values for the adapter's trainable leaves and buffers (LoRA-Dash's directions are zero until
    its warm-up ends)."""
    names = dj.methods.get(cfg.method).buffers
    mask = jax.tree_util.tree_map_with_path(lambda p, m: m or p[-1].key in names, dj.trainable_mask(params, cfg))
    return jax.tree.map(lambda x, m: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)) if m else x, params, mask,
                        is_leaf=quant.is_quantized)


DEFAULT_QUANT_METHODS = ("ia3", "liera", "sam_parser")  # a scaling method, LiERA (K * (1 + s AB)), an SVD rebuild


@pytest.mark.parametrize("name", [n if n in DEFAULT_QUANT_METHODS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in dj.methods.names() if dj.methods.get(n).kind != "prompt"])
def test_every_method_over_a_quantized_base(name, tiny_bert, tiny_batch):
    """Each method (non-initial factors) over an nf4 BERT equals the same adapter over the float model holding
    the dequantized kernels, in outputs and gradients (PiSSA/MiLoRA: their residual quantized, inject_quantized)."""
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method=name, targets=r"attention/self/(query|value)$|intermediate/dense$", rank=4,
                           train_extra="classifier")
    qbase, params = inject_quantized(base, cfg, jax.random.PRNGKey(0), "nf4", block_size=32)
    params = _perturbed(params, cfg)
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    run = dj.adapt(sequence_classifier_apply(model), cfg)
    loss = lambda t, f: jnp.sum(jnp.sin(run(dj.combine(t, f), tiny_batch)))
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    got, grads = value_and_grad(trainable, frozen)
    want, grads_float = value_and_grad(trainable, _dequantized(frozen))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, grads_float)
    assert sum(quant.is_quantized(v) for v in flatten_dict(frozen).values()) == 2 * 6 + 1
