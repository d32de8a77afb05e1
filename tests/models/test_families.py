"""The decoder families (decomp_jax.models.families + our Linen decoder) against transformers' PyTorch
classes on tiny random checkpoints: logits with right and left padding past the sliding window, greedy
generation with the KV cache, LoRA in PEFT's format both ways, merged folders that transformers loads,
and config.json keys that are refused rather than dropped."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decomp_jax.core.inject import inject_quantized
from decomp_jax.models import convert
from decomp_jax.models.families import FAMILIES, UnsupportedConfigError, read_hf_config
from decomp_jax.models.generation import generate
from decomp_jax.models.hf import TARGET_PRESETS
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, stack_layers
import decomp_jax as dj
from helpers import batch, loaded_models, max_diff_valid, random_torch_lm, torch_greedy, torch_lm_logits  # noqa: E402

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB, LENGTH, WINDOW = 96, 12, 4
# the batch: row 0 full, row 1 left-padded by 3, row 2 right-padded by 2; 12 tokens, past the window of 4
ROWS = dict(length=LENGTH, vocab=VOCAB, left=3, right=2)
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
# family -> (transformers config class, extra config keys); sliding families get one layer past the window
CASES = {
    "llama": ("LlamaConfig", dict(attention_bias=True, rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW, rope_theta=20000.0)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2_sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "gemma": ("GemmaConfig", dict(hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(sliding_window=WINDOW, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                             rope_theta=100000.0, rope_local_base_freq=1000.0,
                                             rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # every second layer without a rotary embedding (NoPE), those layers sliding
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=WINDOW)),
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5, sliding_window=WINDOW)),
    # Phi-4-mini's shape of rope: longrope over 3/4 of each head; the 12-token batch passes the pretraining
    # length of 8, so the long factors apply (the short ones: test_longrope_switches_at_the_pretraining_length)
    "phi3_longrope": ("Phi3Config", dict(partial_rotary_factor=0.75, original_max_position_embeddings=8, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0, 1.3, 1.9], "long_factor": [1.5, 3.0, 7.0]})),
}
FAST = ["mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "smollm3", "phi3_longrope"]
PEFT_FAST = ["qwen3", "gemma3_text", "phi3_longrope"]
ALL_LINEAR = TARGET_PRESETS["llama"]["all_linear"]


def torch_model(case, folder):
    """A random PyTorch model of the case (norm weights and biases randomised too), saved to ``folder``."""
    cls, extra = CASES[case]
    return random_torch_lm(cls, {**BASE, **extra}, folder, norm_mean=0 if "gemma" in case else 1)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return loaded_models(tmp_path_factory, torch_model)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_pytorch(case, loaded):
    pair = loaded(case)
    config = pair["config"]
    assert config.model_type == FAMILIES[config.model_type].model_type == CASES[case][0][:-6].lower().replace(
        "gemma3text", "gemma3_text")
    ids, mask = batch(**ROWS)
    ours = LlamaForCausalLM(config).apply({"params": pair["params"]}, ids, mask)
    ref = torch_lm_logits(pair["torch"], ids, mask)
    diff = max_diff_valid(ours, ref, mask)
    print(f"{case}: max |logits - transformers| = {diff:.2e} (largest logit {np.abs(ref).max():.2f})")
    assert diff <= TOL
    if config.sliding_window is not None:  # the window matters on these 12 tokens
        unwindowed = dataclasses.replace(config, sliding_window=None, layer_types=None)
        assert max_diff_valid(LlamaForCausalLM(unwindowed).apply({"params": pair["params"]}, ids, mask), ref, mask) > 1e-3
    # the scanned stack gives the same logits
    scanned = dataclasses.replace(config, scan_layers=True, remat=True)
    stacked = LlamaForCausalLM(scanned).apply({"params": stack_layers(pair["params"])}, ids, mask)
    assert max_diff_valid(stacked, ours, mask) <= 1e-5


@pytest.mark.parametrize("case", FAST + [pytest.param(c, marks=pytest.mark.slow) for c in CASES if c not in FAST])
def test_greedy_generation_matches_pytorch(case, loaded):
    pair = loaded(case)
    ids, mask = batch(**ROWS, seed=1)
    ids, mask = ids[:2], mask[:2]  # full and left-padded prompts
    ours = np.asarray(generate(LlamaForCausalLM(pair["config"]), pair["params"], ids, mask, max_new_tokens=16))
    ref = torch_greedy(pair["torch"], ids, mask, 16)
    np.testing.assert_array_equal(ours[:, LENGTH:], ref[:, LENGTH:])


def _lm_loss(model, cfg):
    apply = dj.adapt(model.apply, cfg)

    def loss(params, batch, rng):
        logits = apply({"params": params}, batch["ids"][:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["ids"][:, 1:, None], -1)
        return jnp.mean(nll), {}

    return loss


def train_losses(model, params, cfg, ids, steps=4):
    trainable, buffers, frozen = dj.partition(params, cfg)
    opt = optax.adam(2e-2)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(3), buffers=buffers)
    step = dj.make_train_step(_lm_loss(model, cfg), opt, cfg)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, {"ids": ids})
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.parametrize("method", ["lora", pytest.param("dora", marks=pytest.mark.slow),
                                    pytest.param("ssb", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", PEFT_FAST + [pytest.param(c, marks=pytest.mark.slow) for c in CASES if c not in PEFT_FAST])
def test_methods_train_and_lora_goes_both_ways_with_peft(case, method, loaded, tmp_path):
    peft = pytest.importorskip("peft")
    pair = loaded(case)
    config, base = pair["config"], pair["params"]
    model = LlamaForCausalLM(config)
    cfg = dj.AdapterConfig(method=method, targets=ALL_LINEAR, rank=4, alpha=8)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    ids, mask = batch(**ROWS)
    apply = lambda p, i, m: model.apply({"params": p}, i, m)  # noqa: E731
    plain = np.asarray(apply(base, ids, mask))
    np.testing.assert_allclose(dj.adapt(apply, cfg)(params, ids, mask), plain, atol=1e-5)  # no-op at init
    losses = train_losses(model, params, cfg, jnp.asarray(ids))
    print(f"{case} {method}: losses {[round(x, 4) for x in losses]}")
    assert losses[-1] < losses[0] - 1e-3
    if method != "lora":
        return
    moved = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
    moved = dj.combine(dj.partition(moved, cfg)[0], {}, dj.partition(params, cfg)[2])
    factored = np.asarray(dj.adapt(apply, cfg)(moved, ids, mask))
    merged = np.asarray(dj.adapt(apply, cfg, mode="merged")(moved, ids, mask))
    assert max_diff_valid(factored, plain, mask) > 1e-2 and max_diff_valid(factored, merged, mask) <= 1e-5
    # ours -> PEFT on transformers' model
    dj.export_peft(moved, cfg, str(tmp_path / "ours"), base_model_name_or_path=pair["folder"], arch="llama")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(pair["torch"]), str(tmp_path / "ours")).eval()
    diff = max_diff_valid(torch_lm_logits(in_peft, ids, mask), factored, mask)
    print(f"{case}: our LoRA in PEFT, max diff {diff:.2e}")
    assert diff <= TOL
    # PEFT's own LoRA (made in PyTorch, random B) -> ours
    modules = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if config.fused_projections else \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(1)
    made = peft.get_peft_model(copy.deepcopy(pair["torch"]), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False)).eval()
    made.save_pretrained(str(tmp_path / "theirs"))
    back, back_cfg = dj.import_peft(str(tmp_path / "theirs"), base, arch="llama")
    ours = dj.adapt(apply, back_cfg)(back, ids, mask)
    diff = max_diff_valid(ours, torch_lm_logits(made, ids, mask), mask)
    print(f"{case}: PEFT's LoRA in ours, max diff {diff:.2e}")
    assert diff <= TOL
    # the merged model as an HF folder that transformers loads
    convert.save_converted(str(tmp_path / "merged"), config, dj.merge(moved, cfg))
    reloaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager").eval()
    assert type(reloaded).__name__ == FAMILIES[config.model_type].architecture
    assert max_diff_valid(torch_lm_logits(reloaded, ids, mask), factored, mask) <= TOL


# --- nothing ignored ------------------------------------------------------------------------------------

def hf_dict(case):
    cls, extra = CASES[case]
    return getattr(tf, cls)(**{**BASE, **extra}).to_dict()


@pytest.mark.parametrize("case", list(CASES))
def test_each_family_refuses_a_key_it_does_not_implement(case):
    data = hf_dict(case)
    config = LlamaConfig.from_hf_dict(data)
    assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config  # our written config reads back the same
    with pytest.raises(UnsupportedConfigError, match=r"key 'logits_scaling' .*not implemented by decomp_jax's"):
        LlamaConfig.from_hf_dict({**data, "logits_scaling": 0.5})
    with pytest.raises(UnsupportedConfigError, match=r"attention_dropout=0.1 .*must be 0"):
        LlamaConfig.from_hf_dict({**data, "attention_dropout": 0.1})
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling type 'proportional' is not (implemented|one of)"):
        LlamaConfig.from_hf_dict({**data, "rope_scaling": {"type": "proportional", "factor": 2.0}})


def test_unknown_model_types_and_keys_a_family_lacks_are_refused():
    granite = tf.GraniteConfig(**BASE, embedding_multiplier=12.0).to_dict()
    with pytest.raises(UnsupportedConfigError, match=r"model_type 'granite' is not supported.*supported: gemma, "):
        LlamaConfig.from_hf_dict(granite)
    # Granite's multipliers (or SmolLM3's NoPE layers) on a checkpoint that calls itself llama: refused by key
    with pytest.raises(UnsupportedConfigError, match=r"key 'embedding_multiplier'"):
        LlamaConfig.from_hf_dict({**granite, "model_type": "llama"})
    with pytest.raises(UnsupportedConfigError, match=r"key 'sliding_window' .* llama decoder"):
        LlamaConfig.from_hf_dict({**tf.LlamaConfig(**BASE).to_dict(), "sliding_window": 4})
    with pytest.raises(UnsupportedConfigError, match=r"key 'no_rope_layers'"):
        LlamaConfig.from_hf_dict({**tf.LlamaConfig(**BASE).to_dict(), "no_rope_layers": [1, 1, 0]})
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling type 'proportional' is not implemented"):
        LlamaConfig.from_hf_dict({**hf_dict("qwen3"), "rope_scaling": {"rope_type": "proportional", "factor": 2.0}})
    with pytest.raises(UnsupportedConfigError, match=r"'longrope' needs original_max_position_embeddings"):
        LlamaConfig.from_hf_dict({**hf_dict("qwen3"), "rope_parameters": None, "rope_scaling": {
            "type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}})
    longrope = {"type": "longrope", "short_factor": [1.0] * 2, "long_factor": [1.0] * 2}
    with pytest.raises(ValueError, match=r"long_factor: longrope needs one factor per rotary frequency, 2 here"):
        LlamaConfig.from_hf_dict({**hf_dict("phi3"), "rope_scaling": {**longrope, "long_factor": [1.0] * 3},
                                  "original_max_position_embeddings": 8})


def test_smollm3_nope_layers_apply_no_rotary_embedding(loaded):
    """SmolLM3's layers without a rotary embedding (here the middle one of three, also the sliding one):
    read from config.json, and they matter (the same weights with rotary everywhere give other logits)."""
    pair = loaded("smollm3")
    config = pair["config"]
    assert config.no_rope_layers == (1, 0, 1) and config.layer_types[1] == "sliding_attention"
    assert config.to_hf_dict()["no_rope_layers"] == [1, 0, 1]
    # without the lists, from the interval as transformers derives them: NoPE every 2nd layer, sliding there
    bare = {k: v for k, v in hf_dict("smollm3").items() if k not in ("no_rope_layers", "layer_types")}
    assert LlamaConfig.from_hf_dict(bare) == config
    unslid = LlamaConfig.from_hf_dict({**bare, "use_sliding_window": False})
    assert unslid.no_rope_layers == (1, 0, 1) and unslid.sliding_window is None and unslid.layer_types is None
    ids, mask = batch(**ROWS)
    ref = torch_lm_logits(pair["torch"], ids, mask)
    roped = dataclasses.replace(config, no_rope_layers=None)
    assert max_diff_valid(LlamaForCausalLM(roped).apply({"params": pair["params"]}, ids, mask), ref, mask) > 1e-3
    with pytest.raises(ValueError, match=r"no_rope_layers=\[1, 0\]: one 1 \(rotary embedding\) or 0"):
        dataclasses.replace(config, no_rope_layers=(1, 0))


def test_longrope_switches_at_the_pretraining_length(loaded):
    """Phi-3 longrope: a batch within the pretraining length (8 positions, the longest row exactly 8) takes
    the short factors, as transformers does; the same tokens in a batch that reaches past it take the long
    ones (so logits differ). Greedy decoding whose buffer passes 8 tokens after a 5-token prompt computes
    the whole buffer again at the switch, as transformers' Phi-3 does: the same tokens as its generate."""
    pair = loaded("phi3_longrope")
    ids, mask = batch(length=8, vocab=VOCAB, left=2, right=1)
    model = LlamaForCausalLM(pair["config"])
    ours = model.apply({"params": pair["params"]}, ids, mask)
    ref = torch_lm_logits(pair["torch"], ids, mask)
    assert max_diff_valid(ours, ref, mask) <= TOL
    longer = np.concatenate([ids, ids[:, :5]], axis=1)
    reached = model.apply({"params": pair["params"]}, longer, np.concatenate([mask, np.ones_like(mask[:, :5])], axis=1))
    assert max_diff_valid(reached[:, :8], ours, mask) > 1e-3
    prompt, prompt_mask = batch(length=5, vocab=VOCAB, left=2, right=1, seed=4)
    prompt, prompt_mask = prompt[:2], prompt_mask[:2]  # full and left-padded prompts
    expected = torch_greedy(pair["torch"], prompt, prompt_mask, 10)
    np.testing.assert_array_equal(np.asarray(generate(model, pair["params"], prompt, prompt_mask, max_new_tokens=10)),
                                  expected)


def test_phi3_reads_longrope_as_transformers_does():
    """Phi-3's pretraining length is the one beside the rope settings (4096 when absent), whatever they say
    inside; the older type names su and yarn are longrope, other types are refused; the config we write
    keeps Phi-3's spelling (type and factors inside, the length beside), which transformers reads back."""
    factors = {"short_factor": [1.0, 1.3], "long_factor": [2.0, 3.0]}
    base = {**hf_dict("phi3"), "rope_parameters": None}
    inner = {"type": "longrope", **factors, "original_max_position_embeddings": 16}
    beside = LlamaConfig.from_hf_dict({**base, "rope_scaling": inner, "original_max_position_embeddings": 8})
    absent = LlamaConfig.from_hf_dict({**{k: v for k, v in base.items() if k != "original_max_position_embeddings"},
                                       "rope_scaling": inner})
    assert beside.rope_scaling["original_max_position_embeddings"] == 8
    assert absent.rope_scaling["original_max_position_embeddings"] == 4096
    for name in ("su", "yarn"):
        old = LlamaConfig.from_hf_dict({**base, "rope_scaling": {"type": name, **factors},
                                        "original_max_position_embeddings": 8})
        assert old.rope_type == "longrope" and old.rope_scaling == beside.rope_scaling
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling type 'linear' is not one of phi3's"):
        LlamaConfig.from_hf_dict({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    written = beside.to_hf_dict()
    assert written["rope_scaling"] == {"type": "longrope", **factors}
    assert written["original_max_position_embeddings"] == 8
    theirs = tf.Phi3Config.from_dict(written)
    assert theirs.rope_parameters["original_max_position_embeddings"] == 8
    assert theirs.rope_parameters["rope_type"] == "longrope"


def transformers5_spelling(data):
    """config.json as transformers 5 writes it: ``rope_parameters`` instead of rope_theta / rope_scaling
    (per layer type for Gemma 3)."""
    if "rope_parameters" in data:
        return dict(data)
    data = dict(data)
    theta, scaling = data.pop("rope_theta", 10000.0), data.pop("rope_scaling", None) or {}
    full = {"rope_theta": theta, "rope_type": "default", **scaling}
    if "partial_rotary_factor" in data:
        full["partial_rotary_factor"] = data.pop("partial_rotary_factor")
    if data["model_type"] == "gemma3_text":
        data["rope_parameters"] = {"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": data.pop("rope_local_base_freq")}}
    else:
        data["rope_parameters"] = full
    return data


def transformers4_spelling(data):
    """config.json as transformers 4 writes it: ``rope_theta`` + ``rope_scaling`` (+ Gemma 3's
    ``rope_local_base_freq``, Phi-3's ``partial_rotary_factor``)."""
    if "rope_parameters" not in data:
        return dict(data)
    data = dict(data)
    params = data.pop("rope_parameters")
    if data["model_type"] == "gemma3_text":
        data["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        params = params["full_attention"]
    params = dict(params)
    data["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        data["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    data["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
    return data


@pytest.mark.parametrize("case", list(CASES))
def test_transformers4_and_5_config_spellings_read_the_same(case):
    data = hf_dict(case)
    assert read_hf_config(transformers5_spelling(data)) == read_hf_config(transformers4_spelling(data))


def test_written_config_names_the_true_model_type(loaded, tmp_path):
    pair = loaded("qwen3")
    out = tmp_path / "conv"
    convert.convert(pair["folder"], str(out))
    import json

    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "qwen3" and written["architectures"] == ["Qwen3ForCausalLM"]
    again, params, _ = convert.load_hf(str(out))
    assert again == pair["config"]


# --- every method, a quantized base, sharding presets ------------------------------------------------

def moved(params, cfg, scale=0.05):
    """The adapter's leaves moved off their init (so factored/merged comparisons are not trivial)."""
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    trainable = jax.tree.map(lambda v: v + scale * jnp.cos(jnp.arange(v.size, dtype=v.dtype).reshape(v.shape)), trainable)
    return dj.combine(trainable, frozen)


OPTIONS = {"lora_dash": {"warmup_steps": 3, "dash_k": 4}}


# one method per kind of update (low-rank, weight-decomposed, scaling, SVD-initialised, bottleneck, stateful)
CORE = ("lora", "dora", "ssb", "ia3", "pissa", "houlsby", "adalora")


@pytest.mark.parametrize("case,which", [("phi3", "core")] + [pytest.param(c, "all", marks=pytest.mark.slow) for c in CASES])
def test_every_method_runs_factored_and_merged_on_each_family(case, which, loaded):
    """Every per-layer method on all linear layers (Phi-3: its fused qkv_proj and gate_up_proj kernels),
    scanned: factored execution equals the unrolled model's, and merged weights give the same logits."""
    pair = loaded(case)
    config, base = pair["config"], pair["params"]
    ids, mask = batch(**ROWS)
    scanned_model = LlamaForCausalLM(dataclasses.replace(config, scan_layers=True))
    for name in CORE if which == "core" else dj.methods.names():
        cfg = dj.AdapterConfig(method=name, targets=ALL_LINEAR, rank=4, options=OPTIONS.get(name, {}))
        params = moved(dj.inject(base, cfg, jax.random.PRNGKey(0)), cfg)
        want = np.asarray(jax.jit(dj.adapt(LlamaForCausalLM(config).apply, cfg))({"params": params}, ids, mask))
        stacked = stack_layers(params)
        got = np.asarray(jax.jit(dj.adapt(scanned_model.apply, cfg))({"params": stacked}, ids, mask))
        assert np.isfinite(want).all() and max_diff_valid(got, want, mask) <= 1e-5, name
        biased = config.attention_bias and config.mlp_bias
        if dj.methods.get(name).mergeable and not (name == "lora_bias" and not biased):
            # (lora_bias merges into layers with a bias only, as PEFT's)
            merged = jax.jit(scanned_model.apply)({"params": dj.merge(stacked, cfg)}, ids, mask)
            assert max_diff_valid(merged, want, mask) <= 1e-4, name


@pytest.mark.parametrize("case,name", [("gemma3_text", "lora")] + [
    pytest.param(c, n, marks=pytest.mark.slow) for c in CASES for n in ("lora", "dora") if (c, n) != ("gemma3_text", "lora")])
def test_lora_and_dora_over_a_quantized_base(case, name, loaded):
    """An NF4 base: every adapted and plain layer runs on its dequantized kernel (== the float model holding
    the dequantized kernels), and merging gives the same logits."""
    from decomp_jax import quant

    pair = loaded(case)
    config, base = pair["config"], pair["params"]
    model = LlamaForCausalLM(config)
    ids, mask = batch(**ROWS)
    cfg = dj.AdapterConfig(method=name, targets=ALL_LINEAR, rank=4)
    qbase, params = inject_quantized(base, cfg, jax.random.PRNGKey(0), "nf4", block_size=16)
    assert quant.is_quantized(qbase["model"]["layers_0"]["mlp"]["down_proj"]["kernel"])
    params = moved(params, cfg)
    run = jax.jit(dj.adapt(model.apply, cfg))
    got = np.asarray(run({"params": params}, ids, mask))
    want = np.asarray(run({"params": quant.dequantize_params(params)}, ids, mask))
    assert max_diff_valid(got, want, mask) <= 1e-5
    assert max_diff_valid(jax.jit(model.apply)({"params": dj.merge(params, cfg)}, ids, mask), want, mask) <= 1e-4


def test_sharding_preset_covers_every_family_kernel(loaded):
    """The llama preset is detected for every family and places each kernel, fused ones included."""
    from flax.traverse_util import flatten_dict
    from jax.sharding import PartitionSpec as P

    from decomp_jax import sharding as sh

    mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))  # specs only: no devices needed
    for case in CASES:
        params = loaded(case)["params"]
        specs = flatten_dict(sh.base_specs(params, mesh, fsdp_min_size=1), sep="/")
        layer = "model/layers_0"
        kernels = [k for k in specs if k.startswith(layer) and k.endswith("kernel")]
        assert kernels and all(specs[k] != P() for k in kernels), {k: specs[k] for k in kernels}
        assert specs[f"{layer}/self_attn/o_proj/kernel"] == specs[f"{layer}/mlp/down_proj/kernel"] == P("tensor", "fsdp")
        column = [k for k in kernels if not k.endswith(("o_proj/kernel", "down_proj/kernel"))]
        assert all(specs[k] == P("fsdp", "tensor") for k in column), case
        stacked = flatten_dict(sh.base_specs(stack_layers(params), mesh, fsdp_min_size=1), sep="/")  # scan_layers
        assert all(stacked[k.replace(layer, "model/layers")] == P(None, *specs[k]) for k in kernels), case
