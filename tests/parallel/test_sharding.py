"""decomp_jax.parallel.sharding: meshes, partition rules, factor specs for every method, train-state shardings,
placement; and (in subprocesses with 8 simulated CPU devices) training on meshes equal to one device."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import AbstractMesh, PartitionSpec as P

from decomp_jax import sharding as sh
from decomp_jax.core import methods
from decomp_jax.core.inject import adapted_layers
from decomp_jax.errors import ConfigError
import decomp_jax as dj

from conftest import REPO

MESH = AbstractMesh((2, 4), ("fsdp", "tensor"))  # specs only: no devices needed
SIZES = {"fsdp": 2, "tensor": 4}


def divisible(spec, shape, sizes=SIZES):
    assert len(spec) <= len(shape), (spec, shape)
    for dim, entry in zip(shape, spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        prod = int(np.prod([sizes[n] for n in names])) if names else 1
        if dim % prod:
            return False
    return True


# --- meshes -------------------------------------------------------------------------------------------

def test_make_mesh_sizes_and_errors():
    devices = jax.devices()[:1]
    mesh = sh.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    fake = list(range(8))  # sizes are checked before any device is used
    with pytest.raises(ConfigError, match=r"-1 on axes \['data', 'fsdp'\]"):
        sh.make_mesh({"data": -1, "fsdp": -1}, devices=fake)
    with pytest.raises(ConfigError, match="fixed axes hold 3 devices, which does not divide the 8"):
        sh.make_mesh({"data": -1, "tensor": 3}, devices=fake)
    with pytest.raises(ConfigError, match="needs 6 devices but 8 are available"):
        sh.make_mesh({"data": 2, "fsdp": 3}, devices=fake)
    with pytest.raises(ConfigError, match="size 0"):
        sh.make_mesh({"data": 0}, devices=fake)


# --- rules --------------------------------------------------------------------------------------------

def test_rules_first_match_divisibility_fallback_and_fsdp_threshold():
    params = {"a": {"kernel": jnp.zeros((64, 48))}, "b": {"kernel": jnp.zeros((6, 64))},
              "c": {"kernel": jnp.zeros((256, 128))}, "d": {"bias": jnp.zeros((8,))}}
    rules = [(r"^a/", ("fsdp", "tensor")), (r"kernel$", ("tensor", "fsdp")), (r"^a/kernel", P(None, None))]
    specs = flatten_dict(sh.base_specs(params, MESH, rules, fsdp_min_size=1000), sep="/")
    assert specs["a/kernel"] == P("fsdp", "tensor")  # the first match wins
    # b: 6 is not divisible by tensor=4, so that axis is replicated; small: no fsdp either
    assert specs["b/kernel"] == P(None, None)
    assert specs["c/kernel"] == P("tensor", "fsdp")
    assert specs["d/bias"] == P(None)  # no rule, small: replicated
    # no rule but large: FSDP on the largest divisible axis
    specs = flatten_dict(sh.base_specs({"e": jnp.zeros((30, 256))}, MESH, [], fsdp_min_size=1000), sep="/")
    assert specs["e"] == P(None, "fsdp")
    # axes of a rule that the mesh lacks are dropped; a misspelt one is an error naming the mesh axes
    data_mesh = AbstractMesh((8,), ("data",))
    assert sh.base_specs({"w": jnp.zeros((64, 64))}, data_mesh, [("w", ("fsdp", "tensor"))])["w"] == P(None, None)
    with pytest.raises(ConfigError, match="'tesnor' is neither an axis of the mesh"):
        sh.base_specs({"w": jnp.zeros((64, 64))}, MESH, [("w", ("fsdp", "tesnor"))])
    # logical names through logical_rules
    specs = sh.base_specs({"w": jnp.zeros((64, 64))}, MESH, [("w", ("embed", "mlp"))],
                          logical_rules=[("embed", "fsdp"), ("mlp", "tensor")], fsdp_min_size=1)
    assert specs["w"] == P("fsdp", "tensor")
    with pytest.raises(ConfigError, match="Unknown partition rules preset 'bertt'"):
        sh.resolve_rules("bertt")


def test_flax_boxed_params_are_read():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(64, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("fsdp", "tensor")))(x)
            return nn.Dense(32, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                         ("mlp", "embed")))(x)

    boxed = jax.eval_shape(Model().init, jax.random.PRNGKey(0), jnp.zeros((1, 32)))["params"]
    with nn.logical_axis_rules([("mlp", "tensor"), ("embed", "fsdp")]):
        specs = flatten_dict(sh.base_specs(boxed, MESH, fsdp_min_size=1), sep="/")
    assert specs["Dense_0/kernel"] == P("fsdp", "tensor")
    assert specs["Dense_1/kernel"] == P("tensor", "fsdp")
    assert specs["Dense_0/bias"] == P("fsdp")  # unboxed, large enough for fsdp_min_size=1


def _bert_shapes(tiny_bert):
    return jax.device_get(tiny_bert[1])


def _llama_base():
    from decomp_jax.models.llama import LlamaConfig, init_params

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def _gpt2_base():
    """A GPT-2-shaped tree (Conv1D kernels stored (d_out, d_in))."""
    e, v = 32, 64
    layer = {"attn": {"c_attn": {"kernel": (3 * e, e), "bias": (3 * e,)}, "c_proj": {"kernel": (e, e), "bias": (e,)}},
             "mlp": {"c_fc": {"kernel": (4 * e, e), "bias": (4 * e,)}, "c_proj": {"kernel": (e, 4 * e), "bias": (e,)}},
             "ln_1": {"scale": (e,), "bias": (e,)}}
    tree = {"transformer": {"wte": {"embedding": (v, e)}, "wpe": {"embedding": (16, e)}, "h": {"0": layer}}}
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree, is_leaf=lambda x: isinstance(x, tuple))


def test_presets_megatron_layout():
    bert = flatten_dict(sh.base_specs(jax.eval_shape(lambda: _bert_like()), MESH, "bert", fsdp_min_size=1), sep="/")
    assert bert["bert/encoder/layer/0/attention/self/query/kernel"] == P("fsdp", "tensor")
    assert bert["bert/encoder/layer/0/attention/output/dense/kernel"] == P("tensor", "fsdp")
    assert bert["bert/encoder/layer/0/intermediate/dense/kernel"] == P("fsdp", "tensor")
    assert bert["bert/encoder/layer/0/output/dense/kernel"] == P("tensor", "fsdp")
    assert bert["bert/embeddings/word_embeddings/embedding"] == P("tensor", "fsdp")
    llama = flatten_dict(sh.base_specs(_llama_base(), MESH, fsdp_min_size=1), sep="/")  # preset detected
    for name in ("q_proj", "k_proj", "v_proj"):
        assert llama[f"model/layers_0/self_attn/{name}/kernel"] == P("fsdp", "tensor")
    assert llama["model/layers_1/self_attn/o_proj/kernel"] == P("tensor", "fsdp")
    assert llama["model/layers_1/mlp/gate_proj/kernel"] == llama["model/layers_1/mlp/up_proj/kernel"] == P("fsdp", "tensor")
    assert llama["model/layers_1/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    assert llama["model/embed_tokens/embedding"] == P("tensor", "fsdp")
    assert llama["lm_head/kernel"] == P("fsdp", "tensor")
    gpt2 = flatten_dict(sh.base_specs(_gpt2_base(), MESH, fsdp_min_size=1), sep="/")
    assert gpt2["transformer/h/0/attn/c_attn/kernel"] == P("tensor", "fsdp")  # (d_out, d_in): output split
    assert gpt2["transformer/h/0/attn/c_proj/kernel"] == P("fsdp", "tensor")  # input split
    assert gpt2["transformer/wte/embedding"] == P("tensor", "fsdp")


def _bert_like():
    h, f = 32, 64
    layer = {"attention": {"self": {n: {"kernel": jnp.zeros((h, h)), "bias": jnp.zeros((h,))} for n in ("query", "key", "value")},
                           "output": {"dense": {"kernel": jnp.zeros((h, h)), "bias": jnp.zeros((h,))}}},
             "intermediate": {"dense": {"kernel": jnp.zeros((h, f)), "bias": jnp.zeros((f,))}},
             "output": {"dense": {"kernel": jnp.zeros((f, h)), "bias": jnp.zeros((h,))}}}
    return {"bert": {"embeddings": {"word_embeddings": {"embedding": jnp.zeros((100, h))}}, "encoder": {"layer": {"0": layer}}}}


# --- factor leaves: every method ----------------------------------------------------------------------

BERT_TARGETS = r"attention/self/(query|value)$|attention/output/dense$|intermediate/dense$|layer/\d+/output/dense$"
LLAMA_TARGETS = r"self_attn/(q_proj|k_proj|v_proj|o_proj)$|mlp/(gate_proj|up_proj|down_proj)$"


BOTTLENECK_ROLES = {"output": ("out", "out"), "parallel": ("in", "out"), "mh": ("in", "in")}


def _check_factor_specs(base, cfg, transposed=False):
    shapes = jax.eval_shape(lambda p: dj.inject(p, cfg, jax.random.PRNGKey(0)), base)
    specs = sh.param_specs(shapes, MESH, cfg=cfg, fsdp_min_size=1)
    flat_specs, flat_shapes = flatten_dict(specs), flatten_dict(shapes)
    assert set(flat_specs) == set(flat_shapes)
    for path, leaf in flat_shapes.items():
        assert divisible(flat_specs[path], leaf.shape), (path, flat_specs[path], leaf.shape)
    method = methods.get(cfg.method)
    checked = 0
    for path, _ in adapted_layers(shapes, cfg):
        k = tuple(flat_specs[path + ("kernel",)])
        k_in, k_out = (k[1], k[0]) if transposed else (k[0], k[1])
        assert k_in is not None or k_out is not None  # the presets shard every targeted kernel here
        f = {n: tuple(flat_specs[path + (n,)]) for n in method.factor_names}
        expected = {"lora_a": (k_in, None), "lora_b": (None, k_out), "scale_in": (k_in,), "scale_out": (k_out,),
                    "magnitude": (k_out,), "lora_e": (None,), "lora_g": (None, None), "u_r": (k_in, None),
                    "vt_r": (None, k_out), "adapter_u": (k_in, None), "adapter_v": (None, k_out), "dash_u": (k_in, None),
                    "dash_vt": (None, k_out), "dash": (None,), "down": (k_out, None), "up": (None, k_out),
                    "up_bias": (k_out,), "down_bias": (None,), "u": (k_in, None), "vt": (None, k_out), "sigma": (None,),
                    "sigma0": (None,), "delta": (None,), "s_r": (None,), "adapter_scaling": (None,), "ia3_l": (k_out,)}
        if cfg.method.startswith("bottleneck"):  # the layout follows the placement
            reads, writes = ({"in": k_in, "out": k_out}[r] for r in BOTTLENECK_ROLES[cfg.option("placement")])
            expected |= {"adapter_down": (reads, None), "adapter_up": (None, writes)}
        for name, spec in f.items():
            if name in expected:
                assert spec == expected[name], (cfg.method, path, name, spec, expected[name])
                checked += 1
    return checked


@pytest.mark.parametrize("method", methods.names())
def test_every_method_gets_valid_factor_specs_on_bert_and_llama(method, tiny_bert):
    bert_cfg = dj.AdapterConfig(method=method, targets=BERT_TARGETS, rank=4, train_extra="^classifier/")
    llama_cfg = dj.AdapterConfig(method=method, targets=LLAMA_TARGETS, rank=4)
    n = _check_factor_specs(tiny_bert[1], bert_cfg) + _check_factor_specs(_llama_base(), llama_cfg)
    assert n > 0 or method == "bitfit"  # (no factor leaves)
    if method.startswith("bottleneck"):
        for placement in ("parallel", "mh"):
            opts = {"placement": placement}
            assert _check_factor_specs(_llama_base(), llama_cfg.replace(options=opts)) > 0


@pytest.mark.parametrize("method", ["lora", "dora", "ssb", "houlsby"])
def test_transposed_gpt2_factor_specs(method):
    cfg = dj.AdapterConfig(method=method, targets=r"(c_attn|c_proj|c_fc)$", transposed=r"(c_attn|c_proj|c_fc)$", rank=4)
    assert _check_factor_specs(_gpt2_base(), cfg, transposed=True) > 0


def test_square_kernel_uses_the_declared_layout():
    # d_in == d_out: lora_a's first axis is d_in, lora_b's second d_out (not guessed from sizes)
    spec = sh.factor_spec("lora_a", (32, 32), P("fsdp", "tensor"), 32, 32)
    assert spec == P("fsdp", None)
    assert sh.factor_spec("lora_b", (32, 32), P("fsdp", "tensor"), 32, 32) == P(None, "tensor")
    assert sh.factor_spec("down", (32, 4), P("fsdp", "tensor"), 32, 32) == P("tensor", None)
    # an unknown factor name: by size where d_in != d_out, replicated where ambiguous
    assert sh.factor_spec("mystery", (32, 64), P("fsdp", "tensor"), 32, 64) == P("fsdp", "tensor")
    assert sh.factor_spec("mystery", (32,), P("fsdp", "tensor"), 32, 32) == P(None)


def test_prompt_methods_are_replicated():
    base = jax.device_get(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _llama_base()))
    for name in methods.names("prompt"):
        cfg = dj.AdapterConfig(method=name, options={"num_virtual_tokens": 4})
        shapes = jax.eval_shape(lambda p: dj.inject(p, cfg, jax.random.PRNGKey(0)), base)
        specs = flatten_dict(sh.param_specs(shapes, MESH, cfg=cfg, fsdp_min_size=1))
        prompt = {p: s for p, s in specs.items() if p[0] == name}
        assert prompt and all(s == P() for s in prompt.values())
        assert specs[("model", "layers_0", "self_attn", "q_proj", "kernel")] == P("fsdp", "tensor")


# --- train state, batch, placement --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "adalora", "lora_dash"])
def test_train_state_shardings_follow_the_trainable_leaves(method, tiny_bert):
    cfg = dj.AdapterConfig(method=method, targets=r"attention/self/(query|value)$", rank=4, train_extra="^classifier/",
                           options={"warmup_steps": 2, "dash_k": 2} if method == "lora_dash" else {})
    shapes = jax.eval_shape(lambda p: dj.inject(p, cfg, jax.random.PRNGKey(0)), tiny_bert[1])
    opt = dj.make_optimizer(1e-3, 10, grad_accum=2)
    schedule = dj.make_schedule(cfg, 10)
    state_sh, frozen_sh = sh.train_shardings(shapes, cfg, MESH, opt, schedule=schedule, fsdp_min_size=1)
    specs = flatten_dict(sh.param_specs(shapes, MESH, cfg=cfg, fsdp_min_size=1), sep="/")
    trainable = flatten_dict(state_sh.trainable, sep="/")
    assert {k: v.spec for k, v in trainable.items()} == {k: specs[k] for k in trainable}
    # every optimizer leaf shaped like a trainable leaf (Adam moments, MultiSteps' accumulated grads) follows it
    trainable_shapes, buffers, frozen_shapes = dj.partition(shapes, cfg)
    state_shapes = sh.state_shapes(trainable_shapes, opt, buffers=buffers, frozen=frozen_shapes, schedule=schedule)
    followed = 0
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(state_shapes.opt_state),
                                      jax.tree_util.tree_leaves(state_sh.opt_state)):
        suffix = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        if suffix in trainable:
            assert sharding.spec == trainable[suffix].spec
            followed += 1
        else:
            assert sharding.spec == P()
    assert followed == 3 * len(trainable)  # mu, nu, acc_grads
    if method == "adalora":  # the sensitivity EMAs follow their adapter leaf
        ipt = flatten_dict(state_sh.method_state["ipt"], sep="/")
        assert ipt and all(v.spec == specs[k] for k, v in ipt.items())
    if method == "lora_dash":
        buffers = flatten_dict(state_sh.buffers, sep="/")
        assert buffers and all(v.spec == specs[k] for k, v in buffers.items())
    frozen = flatten_dict(frozen_sh, sep="/")
    assert all(v.spec == specs[k] for k, v in frozen.items())
    assert state_sh.step.spec == P() and state_sh.rng.spec == P()


def test_batch_sharding_and_place_from_a_memmap(tmp_path):
    mesh = sh.make_mesh({"data": -1}, devices=jax.devices()[:1])
    big = AbstractMesh((2, 4), ("data", "fsdp"))
    assert sh.batch_spec((16, 8), big) == P(("data", "fsdp"))
    assert sh.batch_spec((6, 8), big) == P()  # eval remainders: replicated
    with pytest.raises(ConfigError, match="leading axis of 6, which the mesh's data=2 x fsdp=4 = 8 devices do not divide"):
        sh.batch_sharding({"x": np.zeros((6, 2))}, big, strict=True)
    from safetensors.numpy import save_file

    from decomp_jax.models.convert import read_safetensors

    values = {"w": np.arange(24, dtype=np.float32).reshape(4, 6), "b": np.ones((6,), np.float32)}
    save_file(values, str(tmp_path / "w.safetensors"))
    mapped = read_safetensors(str(tmp_path / "w.safetensors"))
    placed = sh.place(mapped, sh.param_shardings(mapped, mesh))
    for k, v in values.items():
        assert isinstance(placed[k], jax.Array)
        np.testing.assert_array_equal(np.asarray(placed[k]), v)


# --- 8 simulated devices ------------------------------------------------------------------------------

# the suite's XLA flags (tests/conftest.py: faster compiles; both sides of every comparison run in the same
# process, with the same flags) and 8 devices
XLA_FLAGS = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()


def _run_worker(*parts):
    env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "workers" / "sharding_worker.py"), *parts], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(*procs):
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return records


def _check_cases(records):
    cases = [r for r in records if "method" in r]
    for r in cases:
        print(f"{r['model']:6s} {r['method']:14s} {str(r['mesh']):28s} loss diff {r['loss_diff']:.1e} "
              f"adapter diff {r['adapter_diff']:.1e} (adapter max {r['adapter_max']:.2f}) {r['seconds']}s")
        assert r["loss_diff"] <= 1e-5 and r["adapter_diff"] <= 1e-5, r
        assert r["losses"][-1] < r["losses"][0], r  # it trained
    return cases


def test_long_row_settings_on_meshes_equal_one_device():
    """A scanned Llama with the MLP in tiles of positions and its layers as a remat segment, LoRA on data=8 and
    data=2 x fsdp=4: the per-step losses and adapters equal the single-device run's; on data=8 the compiled
    step gathers no more than the plain model's, nor does the per-token loss in chunks (the tiles run over
    positions, the batch stays split; tiles of flattened rows gathered the activations)."""
    records = _records(_run_worker("long_rows"))
    assert len(_check_cases(records)) == 2
    (gathers,) = [r["long_rows_gathers"] for r in records if "long_rows_gathers" in r]
    print("all-gathers in the data=8 step:", gathers)
    assert gathers["long"] == gathers["plain"] and gathers["loss_chunk"] == gathers["plain"], gathers


@pytest.mark.slow  # ~20 s of 8-device compiles beside the default mesh test
def test_lora_on_experts_on_an_expert_mesh_equals_one_device():
    """LoRA on a mixture's experts on data=2 x expert=2 x tensor=2: the experts and their factors split over
    "expert"; the per-step losses and the gradients equal the single-device run's."""
    records = _records(_run_worker("moe"))
    (moe,) = [r for r in records if r.get("model") == "llama-moe"]  # experts split over the mesh's "expert" axis
    (grads,) = [r["moe_gradients"] for r in records if "moe_gradients" in r]
    print(f"experts on {moe['mesh']}: loss diff {moe['loss_diff']:.1e}, gradients {grads:.1e} of their size, "
          f"adapter diff {moe['adapter_diff']:.1e} (max {moe['adapter_max']:.2f}), specs {moe['specs']}")
    assert any(spec.startswith("P('expert'") for spec in moe["specs"]), moe["specs"]
    # compared through the gradients, not the trained adapters: Adam's first updates are about lr * sign(g),
    # so summation-order noise in a gradient element near zero moves that element by O(lr)
    assert moe["loss_diff"] <= 1e-5 and grads <= 1e-5 and moe["losses"][-1] < moe["losses"][0], moe


def test_training_on_meshes_equals_one_device(tiny_model_dir, tmp_path):
    """lora, dora, adalora, lora_dash (BERT) on data=8, fsdp=8, data=2 x fsdp=4 and lora, prompt_tuning
    (Llama) on data=2 x tensor=4, one mesh each (every mesh used), two LoRA adapters in one batched step
    (shared and stacked batches): per-step losses and final adapters equal the single-device run; the
    frozen base under fsdp=8 holds 1/8 per device; experiment.run with train.mesh {data: 2, fsdp: 4} logs
    the losses and eval of the one-device run, as do two seeds trained together there (run_seeds). Two
    worker processes run side by side. (Marked slow: every method on every mesh, a quantized base on
    meshes.)"""
    from conftest import DATA

    runner = f"runner={tiny_model_dir},{DATA / 'glue' / 'SST-2'},{tmp_path}"
    records = _records(_run_worker("bytes", "quick0"), _run_worker("quick1", "batched", runner))
    cases = _check_cases(records)
    done = {(r["model"], r["method"]) for r in cases}
    assert {("bert", m) for m in ("lora", "dora", "adalora", "lora_dash")} <= done
    assert {("llama", "lora"), ("llama", "prompt_tuning")} <= done
    assert {json.dumps(r["mesh"], sort_keys=True) for r in cases if "-" not in r["model"]} == {
        '{"data": 8}', '{"fsdp": 8}', '{"data": 2, "fsdp": 4}', '{"data": 2, "tensor": 4}'}
    (size,) = [r for r in records if r.get("frozen_bytes")]
    print(f"frozen base under fsdp=8: {size['sharded_max_device_bytes']} of {size['sharded_replicated_bytes']} bytes "
          f"per device for the {size['sharded_leaves']} sharded leaves ({size['ratio_sharded']:.4f}); all leaves "
          f"{size['ratio_all']:.4f}")
    assert size["ratio_sharded"] == pytest.approx(1 / 8)
    assert size["ratio_all"] < 0.2
    batched = [r for r in records if r.get("batched")]  # two adapters in one batched step on a mesh
    assert sorted(r["batched"] for r in batched) == ["shared", "stacked"]
    for r in batched:
        print(f"batched {r['batched']} on {r['mesh']}: loss diff {r['loss_diff']:.1e}, adapter diff {r['adapter_diff']:.1e}")
        assert r["loss_diff"] <= 1e-5 and r["adapter_diff"] <= 1e-5, r
    (r,) = [r for r in records if r.get("runner")]
    print(f"runner on data=2 x fsdp=4: losses {r['losses']} (one device {r['ref_losses']}), eval {r['eval']}")
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=0, atol=1e-5)
    assert r["eval"] == r["ref_eval"]
    print(f"run_seeds on data=2 x fsdp=4: losses {r['seeds_losses']} (one device, apart: {r['seeds_ref_losses']})")
    np.testing.assert_allclose(r["seeds_losses"], r["seeds_ref_losses"], rtol=0, atol=1e-5)
    assert r["seeds_eval"] == r["seeds_ref_eval"] and r["seeds_losses"][0] != r["seeds_losses"][1]


@pytest.mark.slow  # 30 s (moved from the test above for the suite's budget)
def test_quantized_base_on_meshes_equals_one_device():
    """A quantized frozen base: lora over nf4 on data=2 x fsdp=2 x tensor=2, dora over q4_1 (stored
    transposed) on tensor=8 equal the one-device run; under tensor=8 each device holds 1/8 of a kernel's codes."""
    records = _records(_run_worker("quant"))
    done = {(r["model"], r["method"]) for r in _check_cases(records)}
    assert {("llama-nf4", "lora"), ("llama-q4_1", "dora")} <= done
    for r in (r for r in records if r.get("quantized_bytes")):
        print(f"{r['quantized_bytes']} base under tensor=8: {r['kernels']} kernels, each device holds at most "
              f"{r['max_codes_ratio']:.4f} of a kernel's codes")
        assert r["kernels"] == 8 and r["max_codes_ratio"] == pytest.approx(1 / 8)
    assert sum(1 for r in records if r.get("quantized_bytes")) == 2


@pytest.mark.slow  # 40 s
def test_commonsense_run_on_a_mesh_equals_one_device(tmp_path):
    """A decoder LLM fine-tune on data=2 x fsdp=2 x tensor=2, generation included: the per-step losses,
    the metrics and every greedy generation of evaluation equal the one-device run."""
    from conftest import tiny_llm

    class Factory:
        def mktemp(self, name):
            folder = tmp_path / name
            folder.mkdir()
            return folder

    model_dir = tiny_llm.__wrapped__(Factory())
    (r,) = [r for r in _records(_run_worker(f"lm_runner={model_dir},{tmp_path}")) if r.get("lm_runner")]
    np.testing.assert_allclose(r["mesh"]["losses"], r["plain"]["losses"], rtol=0, atol=1e-5)
    assert r["mesh"]["eval"] == r["plain"]["eval"]
    assert r["mesh"]["generations"] == r["plain"]["generations"]
    assert sum(len(texts) for texts in r["plain"]["generations"].values()) == 12


@pytest.mark.slow
def test_every_method_on_every_mesh():
    """The full matrix: lora, dora, ssb, adalora, lora_dash, pissa, houlsby on BERT x (data=8, fsdp=8,
    data=2 x fsdp=4); lora, dora, ssb, pissa, houlsby, prompt_tuning on Llama x (data=2 x tensor=4,
    data=2 x fsdp=4) (a few minutes)."""
    cases = _check_cases(_records(_run_worker("bert"), _run_worker("llama")))
    assert len(cases) == 7 * 3 + 6 * 2


def test_runner_mesh_config_errors(tiny_model_dir, tmp_path):
    from decomp_jax.app.experiment import load_config

    from conftest import DATA

    def config(out, *extra):
        return load_config(REPO / "configs" / "quickstart.yaml", [
            f"model.name={tiny_model_dir}", f"data.path={DATA / 'glue' / 'SST-2'}", "data.max_train_samples=64",
            "data.max_eval_samples=16", "data.max_length=16", "adapter.rank=4", "train.steps=3", "train.log_every=1",
            "train.learning_rate=0.01", "train.batch_size=8", f"train.output_dir={tmp_path / out}", *extra])

    with pytest.raises(ConfigError, match="train.batch_size=8 is not divisible by the mesh's data x fsdp = 3"):
        config("bad", "train.mesh={data: 3}")
    with pytest.raises(ConfigError, match="model.partition_rules='bertt' is unknown"):
        config("bad", "model.partition_rules=bertt")
    # the runs themselves: on 8 devices in test_training_on_meshes_equals_one_device


def test_eval_step_with_a_mesh_and_explicit_shardings_still_work():
    mesh = sh.make_mesh({"data": -1}, devices=jax.devices()[:1])
    predict = lambda p, b: b["x"] @ p["w"]["kernel"]
    params = {"w": {"kernel": jnp.arange(6.0).reshape(3, 2)}}
    batch = {"x": np.ones((4, 3), np.float32)}
    plain = dj.make_eval_step(predict)(params, {}, batch)
    meshed = dj.make_eval_step(predict, mesh=mesh)(params, {}, batch)
    explicit = dj.make_eval_step(predict, batch_sharding=sh.batch_sharding(batch, mesh))(params, {}, batch)
    np.testing.assert_array_equal(np.asarray(meshed), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(plain))
