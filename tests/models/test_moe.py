"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE; decomp_jax.models.mlp) against transformers'
PyTorch classes on tiny random checkpoints where tokens of one batch go to different experts: logits with
both dispatches, greedy generation, the router's load-balancing loss; every method on the stacked experts'
kernels (one factor set per expert, factored == merged); LoRA on the experts in PEFT's format both ways."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decomp_jax as dj
from decomp_jax.core.methods import get
from decomp_jax.errors import ConfigError
from decomp_jax.models import convert
from decomp_jax.models.families import UnsupportedConfigError, read_hf_config
from decomp_jax.models.generation import generate
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, stack_layers
from decomp_jax.models.mlp import load_balancing_loss, router_logits
from helpers import adam_losses, batch, loaded_models, max_diff_valid, random_torch_lm, torch_greedy, torch_lm_logits  # noqa: E402

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB, LENGTH = 96, 12
ROWS = dict(length=LENGTH, vocab=VOCAB, left=3, right=2)
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    # a dense layer among the sparse ones, and the shared expert
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                         norm_topk_prob=True, head_dim=16)),
}
EXPERTS = r"mlp/experts/(gate_up_proj|down_proj)$"


def torch_model(case, folder):
    cls, extra = CASES[case]  # transformers starts experts and routers at zero or tiny: drawn too
    return random_torch_lm(cls, {**BASE, **extra}, folder, also=("experts", "gate"))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return loaded_models(tmp_path_factory, torch_model)


def _apply(config):
    model = LlamaForCausalLM(config)
    return lambda p, i, m: model.apply({"params": p}, i, m)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_pytorch_with_both_dispatches(case, loaded):
    pair = loaded(case)
    config = pair["config"]
    assert config.model_type == case and config.num_experts == 4
    ids, mask = batch(**ROWS)
    ref = torch_lm_logits(pair["torch"], ids, mask)
    ours = _apply(config)(pair["params"], ids, mask)
    _, picked = jax.lax.top_k(router_logits(LlamaForCausalLM(config).apply(
        {"params": pair["params"]}, ids, mask, mutable=["intermediates"])[1])[0], 2)
    assert len(np.unique(np.asarray(picked))) == 4  # the batch's tokens go to every expert
    for dispatch in ("dense", "ragged"):
        got = _apply(dataclasses.replace(config, moe_dispatch=dispatch))(pair["params"], ids, mask)
        diff = max_diff_valid(got, ref, mask)
        print(f"{case} {dispatch}: max |logits - transformers| = {diff:.2e} (largest logit {np.abs(ref).max():.2f})")
        assert diff <= TOL
    if all(config.sparse_layers):  # the scanned stack: the same logits
        scanned = dataclasses.replace(config, scan_layers=True, remat=True)
        assert max_diff_valid(_apply(scanned)(stack_layers(pair["params"]), ids, mask), ours, mask) <= 1e-5
    else:
        with pytest.raises(ValueError, match="scan_layers needs every decoder layer alike"):
            dataclasses.replace(config, scan_layers=True)


@pytest.mark.parametrize("case", ["qwen3_moe"] + [pytest.param(c, marks=pytest.mark.slow) for c in ("mixtral", "qwen2_moe")])
def test_greedy_generation_matches_pytorch(case, loaded):
    pair = loaded(case)
    ids, mask = batch(**ROWS, seed=1)
    ids, mask = ids[:2], mask[:2]
    ours = np.asarray(generate(LlamaForCausalLM(pair["config"]), pair["params"], ids, mask, max_new_tokens=12))
    ref = torch_greedy(pair["torch"], ids, mask, 12)
    np.testing.assert_array_equal(ours[:, LENGTH:], ref[:, LENGTH:])


def test_load_balancing_loss_matches_transformers(loaded):
    pair = loaded("qwen2_moe")
    ids, mask = batch(**ROWS)
    _, state = LlamaForCausalLM(pair["config"]).apply({"params": pair["params"]}, ids, mask, mutable=["intermediates"])
    logits = router_logits(state["intermediates"])
    assert len(logits) == 2  # the two sparse layers of three
    ours = float(load_balancing_loss(logits, 2, mask))
    with torch.no_grad():
        ref = float(pair["torch"](input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                  output_router_logits=True).aux_loss)
    print(f"load-balancing loss: ours {ours:.6f}, transformers {ref:.6f}")
    assert ours == pytest.approx(ref, abs=1e-5)


def _moved(params, cfg):
    """The adapter's trainable leaves moved off their init (so the adapter changes the outputs)."""
    moved = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
    return dj.combine(dj.partition(moved, cfg)[0], {}, dj.partition(params, cfg)[2])


@pytest.mark.parametrize("method", ["lora", "dora", pytest.param("ssb", marks=pytest.mark.slow),
                                    pytest.param("pissa", marks=pytest.mark.slow), pytest.param("ia3", marks=pytest.mark.slow)])
def test_methods_on_experts_factored_equals_merged(method, loaded):
    pair = loaded("qwen3_moe")
    config, base = pair["config"], pair["params"]
    cfg = dj.AdapterConfig(method=method, targets=r"self_attn/q_proj$|mlp/gate$|" + EXPERTS, rank=4, alpha=8)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    experts = params["model"]["layers_0"]["mlp"]["experts"]["down_proj"]
    assert all(np.shape(v)[0] == 4 for v in experts.values())  # one factor set per expert
    if method == "lora":
        assert np.shape(experts["lora_a"]) == (4, 24, 4) and np.shape(experts["lora_b"]) == (4, 4, 32)
        a = np.asarray(experts["lora_a"])
        assert not np.allclose(a[0], a[1])  # each expert draws its own factors
    ids, mask = batch(**ROWS)
    plain = np.asarray(_apply(config)(base, ids, mask))
    moved = _moved(params, cfg)
    for dispatch in ("dense", "ragged"):
        apply = _apply(dataclasses.replace(config, moe_dispatch=dispatch))
        assert max_diff_valid(dj.adapt(apply, cfg)(params, ids, mask), plain, mask) <= 1e-5  # a no-op at init
        factored = np.asarray(dj.adapt(apply, cfg)(moved, ids, mask))
        merged = np.asarray(dj.adapt(apply, cfg, mode="merged")(moved, ids, mask))
        print(f"{method} {dispatch}: adapted - plain {max_diff_valid(factored, plain, mask):.2e}, "
              f"factored - merged {max_diff_valid(factored, merged, mask):.2e}")
        assert max_diff_valid(factored, plain, mask) > 1e-2 and max_diff_valid(factored, merged, mask) <= 1e-5
    # scanned: the stacked (L, E, ...) factors equal the unrolled model's, stacked
    stacked = dj.inject(stack_layers(base), cfg, jax.random.PRNGKey(0))
    for x, y in zip(jax.tree.leaves(stack_layers(params)), jax.tree.leaves(stacked)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    if get(method).unmaterialize is not None:  # unmerge gives the adapted params back
        restored = dj.unmerge(dj.merge(moved, cfg), dj.partition(moved, cfg)[0], cfg)
        for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(moved)):
            np.testing.assert_allclose(x, y, atol=1e-5)


def test_lora_on_experts_trains_with_the_router_loss(loaded):
    pair = loaded("qwen3_moe")
    config, base = pair["config"], pair["params"]
    model = LlamaForCausalLM(config)
    cfg = dj.AdapterConfig(method="lora", targets=EXPERTS + "|mlp/gate$", rank=4, alpha=8, mpc="mpc_o")
    apply = dj.adapt(model.apply, cfg)
    ids = jnp.asarray(batch(**ROWS)[0])

    def loss(params, b, rng):
        logits, state = apply({"params": params}, b["ids"][:, :-1], mutable=["intermediates"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["ids"][:, 1:, None], -1)
        aux = load_balancing_loss(router_logits(state["intermediates"]), config.num_experts_per_tok)
        return jnp.mean(nll) + 0.01 * aux, {"router_aux": aux}

    parts = dj.partition(dj.inject(base, cfg, jax.random.PRNGKey(0)), cfg)
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.ndim, parts[0]["model"]["layers_0"]["mlp"]["experts"]))) == {3}
    losses, _, metrics = adam_losses(loss, cfg, parts, {"ids": ids}, 4, learning_rate=2e-2)
    print(f"LoRA on the experts and router (+ MPC over experts): losses {[round(x, 4) for x in losses]}, "
          f"router aux {float(metrics['router_aux']):.4f}")
    assert losses[-1] < losses[0] - 1e-3 and float(metrics["router_aux"]) > 0


@pytest.mark.parametrize("case", ["qwen3_moe"] + [pytest.param(c, marks=pytest.mark.slow) for c in ("mixtral", "qwen2_moe")])
def test_lora_on_experts_goes_both_ways_with_peft(case, loaded, tmp_path):
    peft = pytest.importorskip("peft")
    if int(tf.__version__.split(".")[0]) < 5:  # constraints.txt pins transformers 5 (CI runs this)
        pytest.skip("PEFT's target_parameters adapts transformers 5's stacked experts; transformers 4 keeps one "
                    "nn.Linear per expert, a layout export_peft does not write")
    pair = loaded(case)
    config, base = pair["config"], pair["params"]
    apply = _apply(config)
    ids, mask = batch(**ROWS)
    cfg = dj.AdapterConfig(method="lora", targets=r"self_attn/v_proj$|" + EXPERTS, rank=2, alpha=4)
    moved = _moved(dj.inject(base, cfg, jax.random.PRNGKey(0)), cfg)
    factored = np.asarray(apply(dj.merge(moved, cfg), ids, mask))
    dj.export_peft(moved, cfg, str(tmp_path / "ours"), base_model_name_or_path=pair["folder"], arch="llama")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(pair["torch"]), str(tmp_path / "ours")).eval()
    diff = max_diff_valid(torch_lm_logits(in_peft, ids, mask), factored, mask)
    print(f"{case}: our LoRA on the experts in PEFT (target_parameters), max diff {diff:.2e}")
    assert max_diff_valid(factored, torch_lm_logits(pair["torch"], ids, mask), mask) > 1e-2 and diff <= TOL
    for parameters in (["gate_up_proj", "down_proj"], ["down_proj"]):  # PEFT's own LoRA -> ours
        torch.manual_seed(1)
        made = peft.get_peft_model(copy.deepcopy(pair["torch"]), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=parameters,
            init_lora_weights=False)).eval()
        made.save_pretrained(str(tmp_path / "theirs"))
        back, back_cfg = dj.import_peft(str(tmp_path / "theirs"), base, arch="llama")
        diff = max_diff_valid(dj.adapt(apply, back_cfg)(back, ids, mask), torch_lm_logits(made, ids, mask), mask)
        print(f"{case}: PEFT's LoRA on {parameters} in ours, max diff {diff:.2e}")
        assert diff <= TOL
    # the merged model as an HF folder (per-expert names) that transformers loads
    convert.save_converted(str(tmp_path / "merged"), config, dj.merge(moved, cfg))
    reloaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager").eval()
    assert max_diff_valid(torch_lm_logits(reloaded, ids, mask), factored, mask) <= TOL


def test_refusals_name_the_setting(loaded, tmp_path):
    data = getattr(tf, "MixtralConfig")(**{**BASE, **CASES["mixtral"][1]}).to_dict()
    with pytest.raises(UnsupportedConfigError, match="router_jitter_noise"):
        read_hf_config({**data, "router_jitter_noise": 0.1})
    qwen = getattr(tf, "Qwen3MoeConfig")(**{**BASE, **CASES["qwen3_moe"][1]}).to_dict()
    assert read_hf_config({**qwen, "num_local_experts": 4})["num_experts"] == 4
    with pytest.raises(UnsupportedConfigError, match="num_local_experts=6 and num_experts=4 disagree"):
        read_hf_config({**qwen, "num_experts": 4, "num_local_experts": 6})
    with pytest.raises(ValueError, match="num_experts_per_tok=5"):
        LlamaConfig(num_experts=4, num_experts_per_tok=5)
    pair = loaded("qwen3_moe")
    with pytest.raises(ConfigError, match="reallocates ranks across layers"):
        dj.inject(pair["params"], dj.AdapterConfig(method="adalora", targets=EXPERTS), jax.random.PRNGKey(0))
    cfg = dj.AdapterConfig(method="dora", targets=EXPERTS, rank=2)
    with pytest.raises(ConfigError, match="PEFT adapts expert parameters with LoRA only"):
        dj.export_peft(dj.inject(pair["params"], cfg, jax.random.PRNGKey(0)), cfg, str(tmp_path / "x"),
                       base_model_name_or_path=None, arch="llama")
    assert not (tmp_path / "x").exists()


V4_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")), "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def _per_expert_adapter(case, pair, folder, parts, rank=2, alpha=4.0, seed=3):
    """``(folder, reference)``: a LoRA adapter as PEFT saved it on transformers 4, whose experts were one
    nn.Linear each (``...experts.{e}.w1.lora_A.weight``): PEFT's LoRA on the attention (and, for Qwen-MoE,
    on the shared expert and the dense layer, which the v4 names also match) plus random per-expert
    factors; ``reference``: the torch model with all of it merged (PEFT's merge, then each expert's
    ``(alpha / r) B @ A`` added to the stacked parameters by hand)."""
    import json

    from safetensors.numpy import load_file, save_file
    peft = pytest.importorskip("peft")
    owner, names = V4_NAMES[case]
    torch.manual_seed(seed)
    others = ["q_proj"] + ([n for n in names if n in parts] if case != "mixtral" else [])
    made = peft.get_peft_model(copy.deepcopy(pair["torch"]), peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=others, init_lora_weights=False))
    made.save_pretrained(folder)
    reference = made.merge_and_unload().eval()
    tensors = load_file(f"{folder}/adapter_model.safetensors")
    config = pair["config"]
    h, width = config.hidden_size, config.moe_intermediate_size or config.intermediate_size
    rng = np.random.default_rng(seed)
    for layer in (i for i in range(config.num_hidden_layers) if i not in (config.mlp_only_layers or ())):
        experts = reference.model.layers[layer].mlp.experts
        for e in range(config.num_experts):
            for name in parts:
                d_in, d_out = (width, h) if name == names[2] else (h, width)
                key = f"base_model.model.model.layers.{layer}.{owner}.experts.{e}.{name}.lora_"
                a, b = (rng.normal(0, 0.3, shape).astype(np.float32) for shape in ((rank, d_in), (d_out, rank)))
                tensors[key + "A.weight"], tensors[key + "B.weight"] = a, b
                with torch.no_grad():  # gate | up fused as transformers 5 stores them
                    target = experts.down_proj[e] if name == names[2] else experts.gate_up_proj[e][
                        slice(0, width) if name == names[0] else slice(width, 2 * width)]
                    target += torch.from_numpy(alpha / rank * b @ a)
    save_file(tensors, f"{folder}/adapter_model.safetensors")
    with open(f"{folder}/adapter_config.json") as f:
        saved = json.load(f)
    with open(f"{folder}/adapter_config.json", "w") as f:
        json.dump({**saved, "target_modules": sorted(set(others) | set(parts))}, f)
    return folder, reference


@pytest.mark.parametrize("case", ["mixtral", pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_peft_lora_saved_on_per_expert_modules_imports(case, loaded, tmp_path):
    """An adapter from transformers 4's per-expert layout reads onto the stacked experts (gate and up joined
    at twice the rank, B block-diagonal): its logits equal the torch model with every LoRA merged in, and
    for Mixtral PEFT's own conversion onto transformers 5 (PEFT 0.21 converts no Qwen-MoE config)."""
    peft = pytest.importorskip("peft")
    pair = loaded(case)
    apply = _apply(pair["config"])
    ids, mask = batch(**ROWS)
    names = V4_NAMES[case][1]
    folder, reference = _per_expert_adapter(case, pair, str(tmp_path / "v4"), names)
    ours, cfg = dj.import_peft(folder, pair["params"], arch="llama")
    logits = np.asarray(dj.adapt(apply, cfg)(ours, ids, mask))
    diff = max_diff_valid(logits, torch_lm_logits(reference, ids, mask), mask)
    moved = max_diff_valid(logits, torch_lm_logits(pair["torch"], ids, mask), mask)
    print(f"{case}: a per-expert (transformers 4) PEFT LoRA in ours, max diff {diff:.2e} from the merged torch model "
          f"(the adapter moves the logits by {moved:.2e})")
    assert diff <= TOL and moved > 1e-2
    assert cfg.for_layer("model/layers_0/mlp/experts/gate_up_proj").rank == 4  # gate and up joined
    if case == "mixtral":
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pair["torch"]), folder).eval()
        diff = max_diff_valid(logits, torch_lm_logits(theirs, ids, mask), mask)
        print(f"{case}: against PEFT's conversion, max diff {diff:.2e}")
        assert diff <= TOL
    # the gate and down alone (PEFT refuses to convert that: gate and up are fused on transformers 5); the up
    # projection's rows of the fused B are zeros, and the logits equal the merged reference again
    alone, reference = _per_expert_adapter(case, pair, str(tmp_path / "gate"), names[:1] + names[2:])
    ours, cfg = dj.import_peft(alone, pair["params"], arch="llama")
    layer = ours["model"]["layers_0"]["mlp"]["experts"]["gate_up_proj"]
    width = pair["config"].intermediate_size if case == "mixtral" else pair["config"].moe_intermediate_size
    assert layer["lora_b"].shape[-1] == 2 * width and not np.any(np.asarray(layer["lora_b"])[..., width:])
    diff = max_diff_valid(np.asarray(dj.adapt(apply, cfg)(ours, ids, mask)), torch_lm_logits(reference, ids, mask), mask)
    assert diff <= TOL, diff
