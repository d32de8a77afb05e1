"""Run by tests/parallel/test_sharding.py in a subprocess with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8, set before JAX is imported).

For each (model, method, mesh) case: 3 train steps (batch 8, length 8) through
``make_train_step(..., mesh=mesh)`` and the same steps on one device; prints one JSON line per case
with the largest per-step loss and final adapter differences, and one with the per-device bytes of
the frozen base under fsdp=8.
"""

import json
import os
import sys
import time

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), "set XLA_FLAGS first"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import decomp_jax as dj  # noqa: E402
from decomp_jax import sharding as sh  # noqa: E402
from decomp_jax.training.losses import classification_loss

STEPS, BATCH, LENGTH, LR = 3, 8, 8, 1e-2
BERT_METHODS = ("lora", "dora", "ssb", "adalora", "lora_dash", "pissa", "houlsby")
BERT_MESHES = ({"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 4})
LLAMA_METHODS = ("lora", "dora", "ssb", "pissa", "houlsby", "prompt_tuning")
LLAMA_MESHES = ({"data": 2, "tensor": 4}, {"data": 2, "fsdp": 4})
OPTIONS = {"adalora": {"t_init": 0.0, "t_final": 0.34, "interval": 1}, "lora_dash": {"warmup_steps": 2, "dash_k": 2},
           "prompt_tuning": {"num_virtual_tokens": 4}}


_CACHE = {}


def tiny_bert():
    if "bert" not in _CACHE:
        _CACHE["bert"] = _tiny_bert()
    return _CACHE["bert"]


def tiny_llama():
    if "llama" not in _CACHE:
        _CACHE["llama"] = _tiny_llama()
    return _CACHE["llama"]


def _tiny_bert():
    from transformers import BertConfig

    from conftest import flax_style_params
    from decomp_jax.models.bert import NativeSequenceClassifier

    config = BertConfig(vocab_size=128, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = NativeSequenceClassifier(config)
    # the base transformers' Flax classifier drew (the 1e-5 comparisons depend on the draw: flax_style_params)
    params = jax.device_get(flax_style_params(model.module, jax.random.PRNGKey(0)))
    from decomp_jax.models.hf import sequence_classifier_apply

    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1, 128, (BATCH, LENGTH)).astype(np.int32),
             "attention_mask": np.ones((BATCH, LENGTH), np.int32),
             "token_type_ids": np.zeros((BATCH, LENGTH), np.int32),
             "labels": rng.integers(0, 2, (BATCH,)).astype(np.int32)}
    return params, sequence_classifier_apply(model), batch


def _tiny_llama():
    from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_params

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
                         initializer_range=0.1)
    model = LlamaForCausalLM(config)
    params = init_params(config, jax.random.PRNGKey(0))
    ids = np.random.default_rng(1).integers(3, 128, (BATCH, LENGTH)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return jax.device_get(params), model.apply, batch


def _tiny_moe():
    from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_params

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
                         initializer_range=0.1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    params = init_params(config, jax.random.PRNGKey(0))
    ids = np.random.default_rng(1).integers(3, 128, (BATCH, LENGTH)).astype(np.int32)
    return jax.device_get(params), LlamaForCausalLM(config).apply, {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def moe_setup(method):
    """LoRA on the experts (split over the mesh's "expert" axis), the router and two attention projections."""
    base, apply, batch = _tiny_moe()
    cfg = dj.AdapterConfig(method=method, targets=r"self_attn/(q_proj|v_proj)$|mlp/(gate|experts/(gate_up_proj|down_proj))$",
                           rank=4)
    return base, cfg, _lm_loss(dj.adapt(apply, cfg)), batch


def moe_gradients():
    """The LoRA gradients of the MoE model on data=2 x expert=2 x tensor=2 against one device's, at factors
    moved off their init (lora_b = 0 makes half of them exactly 0 at init)."""
    from flax.traverse_util import flatten_dict

    base, cfg, loss_fn, batch = moe_setup("lora")
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x + 0.01 * np.cos(np.arange(x.size).reshape(x.shape)).astype(x.dtype), params)
    trainable, _, frozen = dj.partition(params, cfg)
    grad = jax.jit(jax.grad(lambda t, f: loss_fn(dj.combine(t, f), batch, None)[0]))
    ref = flatten_dict(grad(trainable, frozen))
    mesh = sh.make_mesh({"data": 2, "expert": 2, "tensor": 2})
    placed = jax.device_put(params, sh.param_shardings(params, mesh, "llama", cfg=cfg))
    got = flatten_dict(grad(*[dj.partition(placed, cfg)[i] for i in (0, 2)]))
    rel = max(float(np.abs(np.asarray(ref[k]) - np.asarray(got[k])).max() / np.abs(np.asarray(ref[k])).max()) for k in ref)
    print(json.dumps({"moe_gradients": rel}), flush=True)


def _lm_loss(run):
    def loss_fn(p, b, rng):
        logits = run({"params": p}, b["input_ids"], b["attention_mask"])[:, -b["input_ids"].shape[1]:]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), b["input_ids"][:, 1:])
        return jnp.mean(ce), {}

    return loss_fn


def long_rows_setup(method, **options):
    """A scanned, rematerialised 2-layer Llama with the MLP in tiles of 4 positions (rows of 8) and its layers
    as 1 segment (``options`` replace those), LoRA on q, v and the MLP."""
    import dataclasses

    from decomp_jax.models.llama import LlamaForCausalLM, stack_layers

    base, apply, batch = tiny_llama()
    config = dataclasses.replace(apply.__self__.config, num_hidden_layers=2, scan_layers=True, remat=True,
                                 **({"mlp_chunk": 4, "remat_segments": 1} | options))
    two = stack_layers({**base, "model": {**base["model"], "layers_1": base["model"]["layers_0"]}}, 2)
    cfg = dj.AdapterConfig(method=method, targets=r"self_attn/(q_proj|v_proj)$|mlp/(gate_proj|down_proj)$", rank=4,
                           dropout=0.0, stacked="layers")
    apply = dj.adapt(LlamaForCausalLM(config).apply, cfg)
    loss_fn = _lm_loss(apply)
    loss_fn.apply = apply
    return two, cfg, loss_fn, batch


def long_rows_gathers():
    """All-gathers in the compiled train step on data=8 with and without the long-row settings, and with the
    per-token loss in chunks: the tiles run over positions, so the batch stays split (nothing gathered)."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = sh.make_mesh({"data": 8})
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    counts = {}
    def chunked_loss(apply):  # the per-token loss through the head 8 positions at a time (train.loss_chunk)
        def loss_fn(p, b, rng):
            ids = b["input_ids"]
            at = jnp.broadcast_to(jnp.arange(ids.shape[1] - 1), (ids.shape[0], ids.shape[1] - 1))
            return jnp.mean(apply({"params": p}, ids[:, :-1], logits_at=at, targets=ids[:, 1:], chunk=8)), {}
        return loss_fn

    for label, options in (("plain", {"mlp_chunk": None, "remat_segments": None}), ("long", {}), ("loss_chunk", {})):
        base, cfg, loss_fn, batch = long_rows_setup("lora", **options)
        if label == "loss_chunk":
            loss_fn = chunked_loss(loss_fn.apply)
        trainable, buffers, frozen = dj.partition(dj.inject(base, cfg, jax.random.PRNGKey(0)), cfg)
        opt = dj.make_optimizer(LR, STEPS, warmup_ratio=0.0)
        state = dj.init_state(trainable, opt, jax.random.PRNGKey(1), buffers=buffers, frozen=frozen)
        step = dj.make_train_step(loss_fn, opt, cfg, state_sharding=replicated, frozen_sharding=replicated,
                                  batch_sharding=split)
        counts[label] = step.lower(state, frozen, batch).compile().as_text().count("all-gather(")
    print(json.dumps({"long_rows_gathers": counts}), flush=True)


def bert_setup(method):
    base, apply, batch = tiny_bert()
    targets = {"houlsby": r"layer/\d+/output/dense$", "lora_dash": r"attention/self/query$"}.get(
        method, r"attention/self/(query|value)$|intermediate/dense$")
    cfg = dj.AdapterConfig(method=method, targets=targets, rank=4, train_extra="^classifier/",
                           dropout=0.1 if method == "lora" else 0.0, options=OPTIONS.get(method, {}))
    run = dj.adapt(apply, cfg)

    def loss_fn(p, b, rng):
        return classification_loss(run(p, b, train=True, rng=rng), b["labels"]), {}

    return base, cfg, loss_fn, batch


def llama_setup(method):
    base, apply, batch = tiny_llama()
    targets = r"self_attn/o_proj$|mlp/down_proj$" if method == "houlsby" else \
        r"self_attn/(q_proj|v_proj|o_proj)$|mlp/(gate_proj|down_proj)$"
    cfg = dj.AdapterConfig(method=method, targets=targets, rank=4, dropout=0.0, options=OPTIONS.get(method, {}))
    return base, cfg, _lm_loss(dj.adapt(apply, cfg)), batch


def train(base, cfg, loss_fn, batch, mesh):
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    trainable, buffers, frozen = dj.partition(params, cfg)
    opt = dj.make_optimizer(LR, STEPS, warmup_ratio=0.0)
    schedule = dj.make_schedule(cfg, STEPS)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(1), buffers=buffers, schedule=schedule, frozen=frozen)
    step = dj.make_train_step(loss_fn, opt, cfg, schedule=schedule, mesh=mesh)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    adapter = jax.device_get(dj.combine(state.trainable, state.buffers or {}))
    specs = None
    if mesh is not None:
        leaves = jax.tree_util.tree_leaves(state.trainable)
        assert all(isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh.devices.size == 8
                   for x in leaves), "trainable leaves are not on the mesh"
        specs = sorted({str(x.sharding.spec) for x in leaves})
    return losses, adapter, specs


def compare(model, method, setup, meshes):
    base, cfg, loss_fn, batch = setup(method)
    ref_losses, ref_adapter, _ = train(base, cfg, loss_fn, batch, None)
    for shape in meshes:
        t0 = time.perf_counter()
        mesh = sh.make_mesh(shape)
        losses, adapter, specs = train(base, cfg, loss_fn, batch, mesh)
        loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
        adapter_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if np.size(a) else 0.0
                           for a, b in zip(jax.tree_util.tree_leaves(adapter), jax.tree_util.tree_leaves(ref_adapter)))
        moved = max(float(np.max(np.abs(np.asarray(a, np.float64)))) for a in jax.tree_util.tree_leaves(adapter))
        print(json.dumps({"model": model, "method": method, "mesh": shape, "losses": losses, "ref_losses": ref_losses,
                          "loss_diff": loss_diff, "adapter_diff": adapter_diff, "adapter_max": moved,
                          "specs": specs, "seconds": round(time.perf_counter() - t0, 2)}), flush=True)


def frozen_bytes():
    """Per-device bytes of the base params under fsdp=8 against replicated."""
    base, _, _ = tiny_bert()
    mesh = sh.make_mesh({"fsdp": 8})
    import tempfile

    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors.numpy import save_file

    from decomp_jax.models.convert import read_safetensors

    with tempfile.TemporaryDirectory() as folder:  # memory-mapped host arrays, as a checkpoint is read
        save_file({k: np.asarray(v) for k, v in flatten_dict(base, sep="/").items()}, f"{folder}/base.safetensors")
        mapped = read_safetensors(f"{folder}/base.safetensors")
        host = unflatten_dict({tuple(k.split("/")): v for k, v in mapped.items()})
        return _frozen_bytes(host, mesh)


def _frozen_bytes(host, mesh):
    shardings = sh.param_shardings(host, mesh)
    placed = sh.place(host, shardings)
    sharded = [(x, h) for x, h in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(host))
               if not x.sharding.is_fully_replicated]
    for x, h in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(host)):
        np.testing.assert_array_equal(np.asarray(x), h)
    per_device = sh.device_bytes([x for x, _ in sharded])
    total = sum(h.nbytes for _, h in sharded)
    all_total = sum(h.nbytes for h in jax.tree_util.tree_leaves(host))
    all_per_device = sh.device_bytes(placed)
    print(json.dumps({"frozen_bytes": True, "sharded_leaves": len(sharded), "leaves": len(jax.tree_util.tree_leaves(host)),
                      "sharded_replicated_bytes": total, "sharded_max_device_bytes": max(per_device.values()),
                      "ratio_sharded": max(per_device.values()) / total,
                      "all_replicated_bytes": all_total, "all_max_device_bytes": max(all_per_device.values()),
                      "ratio_all": max(all_per_device.values()) / all_total}), flush=True)


# the default suite: every mesh, the method families (low-rank, DoRA, the two stateful methods, prompts);
# the full matrix (ssb, pissa, houlsby too, every mesh) is test_every_method_on_every_mesh (slow)
QUICK0 = (("bert", "lora", {"data": 8}), ("bert", "dora", {"fsdp": 8}), ("bert", "lora_dash", {"data": 2, "fsdp": 4}),
          ("llama", "prompt_tuning", {"data": 2, "tensor": 4}))
QUICK1 = (("bert", "adalora", {"fsdp": 8}), ("llama", "lora", {"data": 2, "tensor": 4}))


def quantized():
    """A quantized frozen base on meshes: LoRA over nf4 (double quantization) on data=2 x fsdp=2 x tensor=2 and
    DoRA over q4_1 (stored transposed) on tensor=8 train to the one-device losses and adapters; under tensor=8
    the codes of every kernel are split (1/8 per device; these kernels are too small for FSDP) and place() puts
    back the same codes."""
    from decomp_jax import quant

    for kind, method, mesh in (("nf4", "lora", {"data": 2, "fsdp": 2, "tensor": 2}), ("q4_1", "dora", {"tensor": 8})):
        def setup(method, kind=kind):
            base, cfg, loss_fn, batch = llama_setup(method)
            return quant.quantize_params(base, kind, block_size=16), cfg, loss_fn, batch

        compare(f"llama-{kind}", method, setup, [mesh])
        qbase = setup(method)[0]
        tensor = sh.make_mesh({"tensor": 8})
        placed = sh.place(qbase, sh.param_shardings(qbase, tensor))
        kernels = [(q, h) for q, h in zip(jax.tree_util.tree_leaves(placed, is_leaf=quant.is_quantized),
                                          jax.tree_util.tree_leaves(qbase, is_leaf=quant.is_quantized))
                   if quant.is_quantized(h)]
        for q, h in kernels:
            np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(h.codes))
        ratios = [max(sh.device_bytes([q.codes]).values()) / np.asarray(h.codes).nbytes for q, h in kernels]
        print(json.dumps({"quantized_bytes": kind, "kernels": len(kernels), "max_codes_ratio": max(ratios)}), flush=True)


def batched_on_mesh():
    """Two LoRA adapters (two seeds) trained in one batched step on a mesh (make_train_step(..., mesh=,
    batched=)): "shared" on data=2 x fsdp=4, "stacked" (a batch each) on fsdp=8; per-step losses and final
    adapters equal the batched run on one device (itself equal to separate runs: tests/training/test_batched.py)."""
    base, cfg, loss_fn, batch = bert_setup("lora")
    opt = dj.make_optimizer(LR, STEPS, warmup_ratio=0.0)

    def states():
        out = []
        for seed in (0, 1):
            trainable, buffers, frozen = dj.partition(dj.inject(base, cfg, jax.random.PRNGKey(seed)), cfg)
            out.append(dj.init_state(trainable, opt, jax.random.PRNGKey(10 + seed), buffers=buffers, frozen=frozen))
        return dj.stack_states(out), frozen

    stacked = jax.tree.map(lambda x: np.stack([x, x[::-1]]), batch)
    for mode, data, shape in (("shared", batch, {"data": 2, "fsdp": 4}), ("stacked", stacked, {"fsdp": 8})):
        runs = {}
        for where, mesh in (("one", None), ("mesh", sh.make_mesh(shape))):
            state, frozen = states()
            step = dj.make_train_step(loss_fn, opt, cfg, mesh=mesh, batched=mode)
            losses = []
            for _ in range(STEPS):
                state, metrics = step(state, frozen, data)
                losses.append(np.asarray(metrics["loss"]).tolist())
            if mesh is not None:
                assert all(x.sharding.mesh.devices.size == 8 for x in jax.tree_util.tree_leaves(state.trainable))
            runs[where] = (np.asarray(losses), jax.tree_util.tree_leaves(jax.device_get(state.trainable)))
        adapter_diff = max(float(np.abs(a - b).max()) for a, b in zip(runs["one"][1], runs["mesh"][1]))
        print(json.dumps({"batched": mode, "mesh": shape, "losses": runs["mesh"][0].tolist(),
                          "loss_diff": float(np.abs(runs["one"][0] - runs["mesh"][0]).max()),
                          "adapter_diff": adapter_diff}), flush=True)


def runner(model_dir, data_dir, out_dir):
    """experiment.run and run_seeds with train.mesh {data: 2, fsdp: 4} against one device: losses and eval."""
    from decomp_jax.app.experiment import load_config, run, run_seeds

    def config(out, *extra):
        return load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.yaml"), [
            f"model.name={model_dir}", f"data.path={data_dir}", "data.max_train_samples=64", "data.max_eval_samples=16",
            "data.max_length=16", "adapter.rank=4", "train.steps=3", "train.log_every=1", "train.learning_rate=0.01",
            "train.batch_size=8", f"train.output_dir={out_dir}/{out}", *extra])

    t0 = time.perf_counter()
    plain = run(config("plain"), progress=False)
    meshed = run(config("mesh", "train.mesh={data: 2, fsdp: 4}"), progress=False)
    losses = lambda out: [json.loads(l)["loss"] for l in open(f"{out_dir}/{out}/metrics.jsonl") if '"loss"' in l]
    # two seeds in one batched step on the mesh (run_seeds) against their one-device runs
    plain1 = run(config("plain1", "train.seed=1"), progress=False)
    seeds = run_seeds([config(f"seeds{s}", "train.mesh={data: 2, fsdp: 4}", f"train.seed={s}") for s in (0, 1)],
                      progress=False)
    print(json.dumps({"runner": True, "losses": losses("mesh"), "ref_losses": losses("plain"), "eval": meshed["eval"],
                      "ref_eval": plain["eval"], "seeds_losses": [losses("seeds0"), losses("seeds1")],
                      "seeds_ref_losses": [losses("plain"), losses("plain1")], "seeds_eval": [r["eval"] for r in seeds],
                      "seeds_ref_eval": [plain["eval"], plain1["eval"]], "seconds": round(time.perf_counter() - t0, 2)}),
          flush=True)


def lm_runner(model_dir, out_dir):
    """A commonsense run of a tiny Llama on train.mesh {data: 2, fsdp: 2, tensor: 2} against one device:
    losses, metrics and the greedy generations of evaluation."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/: conftest, helpers
    from helpers import commonsense_config

    from decomp_jax.app.experiment import place_on_mesh, load_adapter, make_task, run
    from decomp_jax.core.tree import combine

    out = {}
    for name, extra in (("plain", ()), ("mesh", ("train.mesh={data: 2, fsdp: 2, tensor: 2}",))):
        cfg = commonsense_config(model_dir, f"{out_dir}/{name}", *extra)
        record = run(cfg, progress=False)
        task = make_task(cfg, need_train=False)
        if cfg.train.mesh:
            place_on_mesh(cfg, task)
        adapter = load_adapter(f"{out_dir}/{name}/adapter.safetensors", combine(task.trainable, task.buffers))
        _, generations = task.evaluate(adapter, {}, return_generations=True)
        losses = [json.loads(l)["loss"] for l in open(f"{out_dir}/{name}/metrics.jsonl") if '"loss"' in l]
        out[name] = {"losses": losses, "eval": record["eval"], "generations": generations}
    print(json.dumps({"lm_runner": True, **out}), flush=True)


def main(which):
    assert jax.device_count() == 8, jax.devices()
    for arg in which:
        if arg.startswith("runner="):
            runner(*arg[len("runner="):].split(","))
        if arg.startswith("lm_runner="):
            lm_runner(*arg[len("lm_runner="):].split(","))
    if "bytes" in which:
        frozen_bytes()
    if "moe" in which:
        compare("llama-moe", "lora", moe_setup, [{"data": 2, "expert": 2, "tensor": 2}])
        moe_gradients()
    if "quant" in which:
        quantized()
    if "batched" in which:
        batched_on_mesh()
    if "long_rows" in which:
        compare("llama-long", "lora", long_rows_setup, [{"data": 8}, {"data": 2, "fsdp": 4}])
        long_rows_gathers()
    for i, part in enumerate((QUICK0, QUICK1)):
        for model, method, mesh in part if ("quick" in which or f"quick{i}" in which) else ():
            compare(model, method, bert_setup if model == "bert" else llama_setup, [mesh])
    if "bert" in which:
        for method in BERT_METHODS:
            compare("bert", method, bert_setup, BERT_MESHES)
    if "llama" in which:
        for method in LLAMA_METHODS:
            compare("llama", method, llama_setup, LLAMA_MESHES)


if __name__ == "__main__":
    main(sys.argv[1:] or ["bytes", "quick"])
