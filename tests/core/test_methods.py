"""Each method's materialize/apply against an independent NumPy reference of the spec's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decomp_jax.core import methods
import decomp_jax as dj

D_IN, D_OUT, R = 12, 10, 4


MERGEABLE = [n for n in methods.names() if methods.get(n).mergeable]
ADAPTERS = [n for n in methods.names() if not methods.get(n).mergeable]


def _np_colnorm(k):
    return np.sqrt((k ** 2).sum(axis=0))


def _relu(z):
    return np.maximum(z, 0.0)


def reference_kernel(name, K, f, cfg):
    """The spec's adapted kernel K', written with NumPy only (float64)."""
    s = cfg.alpha / (np.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
    if name in ("lora", "pissa", "milora", "lora_bias"):
        return K + s * f["lora_a"] @ f["lora_b"]
    if name == "trilora":
        s_t = s if cfg.options.get("scale_by_rank") else 1.0
        return K + s_t * f["lora_a"] @ np.diag(f["lora_e"]) @ f["lora_b"]
    if name == "adalora":
        return K + (cfg.alpha / cfg.rank) * f["lora_a"] @ np.diag(f["lora_e"]) @ f["lora_b"]
    if name == "flexlora":  # the live triplets only, scaled by alpha / (their number)
        live = f["active"] > 0
        return K + (cfg.alpha / live.sum()) * f["lora_a"][:, live] @ np.diag(f["lora_e"][live]) @ f["lora_b"][live]
    if name in ("flora", "moslora"):
        return K + s * f["lora_a"] @ f["lora_g"] @ f["lora_b"]
    if name == "liera":
        return K * (1 + s * f["lora_a"] @ f["lora_b"])
    if name == "dora":
        V = K + s * f["lora_a"] @ f["lora_b"]
        return V * (f["magnitude"] / _np_colnorm(V))[None, :]
    if name == "ia3":
        return K * f["scale_out"][None, :]
    if name == "ia3_mixed":
        return f["ia3_l"][:, None] * K if cfg.options.get("input_side") else K * f["ia3_l"][None, :]
    if name == "ssl":
        return f["scale_in"][:, None] * K
    if name == "ssb":
        return f["scale_in"][:, None] * K * f["scale_out"][None, :]
    if name == "bitfit":
        return K
    if name == "sam_parser":
        return f["u"] @ np.diag(f["sigma"]) @ f["vt"]
    if name == "svdiff":
        return f["u"] @ np.diag(_relu(f["sigma0"] + f["delta"])) @ f["vt"]
    if name == "spectral":
        S = np.diag(f["s_r"])
        rotated = (f["u_r"] + f["adapter_u"]) @ S @ (f["vt_r"] + f["adapter_v"])
        return K + s * (rotated - f["u_r"] @ S @ f["vt_r"])
    if name == "lora_dash":
        return K + s * f["lora_a"] @ f["lora_b"] + f["dash_u"] @ np.diag(f["dash"]) @ f["dash_vt"]
    raise AssertionError(f"no kernel reference for {name}")


def reference_output(name, x, K, b, f, cfg):
    """The layer output: ``x @ K' + b`` for mergeable methods, the adapter formulas otherwise."""
    if name == "parallel_adapter":
        return x @ K + b + _relu(x @ f["lora_a"]) @ f["lora_b"]
    if name in ("houlsby", "pfeiffer"):
        h = x @ K + b
        z = h @ f["down"] + f["down_bias"]
        act = z / (1 + np.exp(-z)) if name == "houlsby" else _relu(z)
        return h + act @ f["up"] + f["up_bias"]
    if name in ("bottleneck", "bottleneck_learned"):
        return reference_bottleneck(x, K, b, f, cfg)
    if name == "lora_bias":  # PEFT's lora_B with a bias: s * (x @ a @ b + lora_bias)
        return x @ reference_kernel(name, K, f, cfg) + b + cfg.scale * f["lora_bias"]
    if name == "ia3_mixed":  # output side (the default): the bias is scaled too; input side: the input
        if cfg.options.get("input_side"):
            return (x * f["ia3_l"]) @ K + b
        return (x @ K + b) * f["ia3_l"]
    return x @ reference_kernel(name, K, f, cfg) + b


NP_ACTIVATIONS = {"tanh": np.tanh, "relu": _relu, "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
                  "swish": lambda z: z / (1 + np.exp(-z)), "identity": lambda z: z}


def reference_bottleneck(x, K, b, f, cfg):
    """LLM-Adapters' bottleneck adapters (spec: output / parallel / mh placements)."""
    o = {"placement": "output", "activation": "tanh", "scaling": 1.0, **cfg.options}
    s = f["adapter_scaling"][0] if "adapter_scaling" in f else o["scaling"]

    def adapter(v):
        return s * NP_ACTIVATIONS[o["activation"]](v @ f["adapter_down"]) @ f["adapter_up"]

    if o["placement"] == "mh":
        return (x + adapter(x)) @ K + b
    y = x @ K + b
    return y + adapter(y if o["placement"] == "output" else x)


def random_factors(method, key, K, b, cfg):
    """The method's factors (buffers included) with the init's shapes but random, non-initial values."""
    init = method.init(key, jnp.asarray(K), jnp.asarray(b), cfg)
    rng = np.random.default_rng(1)
    out = {}
    for n, v in init.items():
        val = rng.normal(size=v.shape)
        if n in ("scale_in", "scale_out", "magnitude", "sigma", "sigma0", "s_r", "ia3_l"):
            val = 1.0 + 0.3 * val  # positive-ish, some sigma0 + delta < 0 so relu matters
        if n == "active":  # FlexLoRA's live slots: some on, some off
            val = (np.arange(v.shape[0]) % 3 != 1).astype(np.float64)
        out[n] = val
    return out


@pytest.fixture
def kernel_bias():
    rng = np.random.default_rng(0)
    return rng.normal(size=(D_IN, D_OUT)), rng.normal(size=(D_OUT,))


def _j(tree):
    return {n: jnp.asarray(v, jnp.float32) for n, v in tree.items()}


@pytest.mark.parametrize("name", methods.names())
@pytest.mark.parametrize("rslora", [False, True])
def test_materialize_and_apply_match_reference(name, rslora, kernel_bias):
    K, b = kernel_bias
    if name in ("adalora", "flexlora") and rslora:
        with pytest.raises(dj.ConfigError, match="rslora does not apply"):
            dj.AdapterConfig(method=name, rslora=True)
        return
    cfg = dj.AdapterConfig(method=name, rank=R, alpha=6.0, rslora=rslora)
    method = methods.get(name)
    f = random_factors(method, jax.random.PRNGKey(0), K, b, cfg)
    if method.mergeable:
        got = method.materialize(jnp.asarray(K, jnp.float32), _j(f), cfg)
        np.testing.assert_allclose(np.asarray(got), reference_kernel(name, K, f, cfg), rtol=1e-5, atol=1e-5)
    x = np.random.default_rng(2).normal(size=(3, 5, D_IN))
    y = method.apply(jnp.asarray(x, jnp.float32), jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32), _j(f), cfg) \
        if method.apply else None
    if method.apply is None:  # runs merged per layer (LiERA)
        y = x @ np.asarray(method.materialize(jnp.asarray(K, jnp.float32), _j(f), cfg)) + b
    np.testing.assert_allclose(np.asarray(y), reference_output(name, x, K, b, f, cfg), rtol=1e-4, atol=1e-4)


def test_ia3_mixed_sides_per_layer(kernel_bias):
    """ia3_mixed: layers matching options.feedforward scale their input, the others their output and bias."""
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method="ia3_mixed", options={"feedforward": "mlp/down$"})
    method = methods.get("ia3_mixed")
    x = np.random.default_rng(2).normal(size=(4, D_IN))
    for where, side in (("model/mlp/down", True), ("model/attn/k", False)):
        lcfg = cfg.for_layer(where)
        assert lcfg.option("input_side") is side
        f = random_factors(method, jax.random.PRNGKey(0), K, b, lcfg)
        assert f["ia3_l"].shape == ((D_IN,) if side else (D_OUT,))
        y = method.apply(jnp.asarray(x, jnp.float32), jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32), _j(f), lcfg)
        np.testing.assert_allclose(np.asarray(y), reference_output("ia3_mixed", x, K, b, f, lcfg), rtol=1e-5, atol=1e-5)
        merged = x @ np.asarray(method.materialize(jnp.asarray(K, jnp.float32), _j(f), lcfg)) + np.asarray(
            method.materialize_bias(jnp.asarray(b, jnp.float32), _j(f), lcfg))
        np.testing.assert_allclose(merged, np.asarray(y), rtol=1e-5, atol=1e-5)
    with pytest.raises(dj.ConfigError, match="regex"):
        dj.AdapterConfig(method="ia3_mixed", options={"feedforward": "("})


def test_trilora_scale_by_rank_option(kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method="trilora", rank=R, alpha=6.0, options={"scale_by_rank": True})
    method = methods.get("trilora")
    f = random_factors(method, jax.random.PRNGKey(0), K, b, cfg)
    got = method.materialize(jnp.asarray(K, jnp.float32), _j(f), cfg)
    np.testing.assert_allclose(np.asarray(got), reference_kernel("trilora", K, f, cfg), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(got), reference_kernel("trilora", K, f, cfg.replace(options={})), atol=1e-3)


def _initial(method, K, b, cfg, key=3):
    """(factors, base kernel after injection) at init."""
    Kj = jnp.asarray(K, jnp.float32)
    f = method.init(jax.random.PRNGKey(key), Kj, jnp.asarray(b, jnp.float32), cfg)
    base = method.residual(Kj, f, cfg) if method.residual else Kj
    return f, base


@pytest.mark.parametrize("name", methods.names())
def test_init_is_identity(name, kernel_bias):
    """At init the adapted layer is the base layer; SAM-PARSER and SVDiff rebuild K from its SVD,
    PiSSA/MiLoRA's residual plus their factors give K back."""
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method=name, rank=R)
    method = methods.get(name)
    f, base = _initial(method, K, b, cfg)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(6, D_IN)), jnp.float32)
    if method.mergeable:
        np.testing.assert_allclose(np.asarray(method.materialize(base, f, cfg)), K, rtol=1e-5, atol=1e-5)
    if method.apply is not None:
        y = method.apply(x, base, jnp.asarray(b, jnp.float32), f, cfg)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ K + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("placement,activation", [("output", "tanh"), ("parallel", "relu"), ("mh", "swish"),
                                                  ("mh", "sigmoid"), ("parallel", "identity")])
def test_bottleneck_placements_match_reference(placement, activation, learned, kernel_bias):
    K, b = kernel_bias
    name = "bottleneck_learned" if learned else "bottleneck"
    options = {"placement": placement, "activation": activation, **({} if learned else {"scaling": 0.7})}
    cfg = dj.AdapterConfig(method=name, rank=R, options=options)
    method = methods.get(name)
    f = random_factors(method, jax.random.PRNGKey(0), K, b, cfg)
    d, d_up = {"output": (D_OUT, D_OUT), "parallel": (D_IN, D_OUT), "mh": (D_IN, D_IN)}[placement]
    assert f["adapter_down"].shape == (d, R) and f["adapter_up"].shape == (R, d_up)
    x = np.random.default_rng(2).normal(size=(3, 5, D_IN))
    y = method.apply(jnp.asarray(x, jnp.float32), jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32), _j(f), cfg)
    want = reference_bottleneck(x, K, b, f, cfg)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - (x @ K + b)).max() > 0.1  # the adapter changes the output


def test_bottleneck_inits():
    """``bert`` (the toolkit's default): both matrices normal(0.02), not a no-op; ``mam_adapter`` (ours):
    kaiming-uniform down (bound 1/sqrt(d)), zero up, a no-op (checked in test_init_is_identity)."""
    K = np.random.default_rng(0).normal(size=(300, 200))
    method = methods.get("bottleneck")
    bert = method.init(jax.random.PRNGKey(0), jnp.asarray(K, jnp.float32), None,
                       dj.AdapterConfig(method="bottleneck", rank=64, options={"placement": "parallel", "init_weights": "bert"}))
    for leaf in bert.values():
        assert abs(float(jnp.std(leaf)) - 0.02) < 0.002 and abs(float(jnp.mean(leaf))) < 0.002
    cfg = dj.AdapterConfig(method="bottleneck", rank=64, options={"placement": "parallel"})
    mam = method.init(jax.random.PRNGKey(0), jnp.asarray(K, jnp.float32), None, cfg)
    bound = 1 / np.sqrt(300)
    assert float(jnp.max(jnp.abs(mam["adapter_down"]))) <= bound and float(jnp.max(jnp.abs(mam["adapter_down"]))) > 0.95 * bound
    assert not np.any(np.asarray(mam["adapter_up"]))
    learned = methods.get("bottleneck_learned").init(jax.random.PRNGKey(0), jnp.asarray(K, jnp.float32), None,
                                                     cfg.replace(method="bottleneck_learned", options={}))
    np.testing.assert_array_equal(np.asarray(learned["adapter_scaling"]), [1.0])


@pytest.mark.parametrize("name", [n for n in MERGEABLE if methods.get(n).unmaterialize is not None])
def test_unmaterialize_inverts_materialize(name, kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method=name, rank=R, alpha=6.0, scale_bias=(name == "ia3"))
    method = methods.get(name)
    f = _j(random_factors(method, jax.random.PRNGKey(0), K, b, cfg))
    Kj, bj = jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32)
    if name == "svdiff":  # K' ignores K; unmerge rebuilds it from the buffers (K = u diag(sigma0) vt)
        Kj = (f["u"] * f["sigma0"]) @ f["vt"]
    merged_b = method.materialize_bias(bj, f, cfg) if method.materialize_bias else bj
    back_k, back_b = method.unmaterialize(method.materialize(Kj, f, cfg), merged_b, f, cfg)
    np.testing.assert_allclose(np.asarray(back_k), np.asarray(Kj), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(back_b), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,bottom", [("pissa", False), ("milora", True)])
def test_pissa_milora_factors_come_from_the_svd(name, bottom, kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method=name, rank=R, alpha=6.0)
    f, base = _initial(methods.get(name), K, b, cfg)
    U, S, Vt = np.linalg.svd(K, full_matrices=False)
    pick = slice(len(S) - R, None) if bottom else slice(0, R)
    s = cfg.alpha / cfg.rank
    principal = U[:, pick] @ np.diag(S[pick]) @ Vt[pick]
    np.testing.assert_allclose(s * np.asarray(f["lora_a"]) @ np.asarray(f["lora_b"]), principal, atol=1e-5)
    np.testing.assert_allclose(np.asarray(base), K - principal, atol=1e-5)
    # lora_a = U_r diag(sqrt(S_r / s)): orthogonal columns with squared norms S_r / s
    gram = np.asarray(f["lora_a"]).T @ np.asarray(f["lora_a"])
    np.testing.assert_allclose(gram, np.diag(S[pick] / s), atol=1e-5)


def test_sam_parser_and_svdiff_buffers_are_the_svd(kernel_bias):
    K, b = kernel_bias
    U, S, Vt = np.linalg.svd(K, full_matrices=False)
    for name, values in (("sam_parser", "sigma"), ("svdiff", "sigma0")):
        f, _ = _initial(methods.get(name), K, b, dj.AdapterConfig(method=name))
        np.testing.assert_allclose(np.asarray(f[values]), S, rtol=1e-5)
        # singular vectors up to sign
        np.testing.assert_allclose(np.abs(np.asarray(f["u"]).T @ U), np.eye(len(S)), atol=1e-4)
        np.testing.assert_allclose(np.abs(np.asarray(f["vt"]) @ Vt.T), np.eye(len(S)), atol=1e-4)
    assert set(methods.get("svdiff").buffers) == {"u", "sigma0", "vt"}
    assert set(methods.get("sam_parser").trainable_names) == {"sigma"}


def test_ia3_scale_bias_scales_whole_output(kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method="ia3", scale_bias=True)
    l = 1.0 + 0.5 * np.random.default_rng(4).normal(size=(D_OUT,))
    x = np.random.default_rng(5).normal(size=(7, D_IN))
    f = {"scale_out": jnp.asarray(l, jnp.float32)}
    ia3 = methods.get("ia3")
    y = ia3.apply(jnp.asarray(x, jnp.float32), jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32), f, cfg)
    np.testing.assert_allclose(np.asarray(y), (x @ K + b) * l, rtol=1e-5, atol=1e-5)
    # merging folds the scale into kernel *and* bias
    merged_b = ia3.materialize_bias(jnp.asarray(b, jnp.float32), f, cfg)
    np.testing.assert_allclose(np.asarray(merged_b), b * l, rtol=1e-6)
    # the paper's IA3 leaves the bias alone: outputs differ by b * (l - 1)
    y_paper = ia3.apply(jnp.asarray(x, jnp.float32), jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32), f, cfg.replace(scale_bias=False))
    np.testing.assert_allclose(np.asarray(y) - np.asarray(y_paper), np.broadcast_to(b * (l - 1), y.shape), atol=1e-5)


@pytest.mark.parametrize("init", ["kaiming", "normal", "gaussian"])
def test_lora_inits(init):
    d_in, d_out, r = 256, 64, 16
    cfg = dj.AdapterConfig(method="lora", rank=r, init=init)
    f = methods.get("lora").init(jax.random.PRNGKey(0), jnp.zeros((d_in, d_out)), None, cfg)
    a = np.asarray(f["lora_a"])
    assert a.shape == (d_in, r) and f["lora_b"].shape == (r, d_out)
    assert not np.any(np.asarray(f["lora_b"]))
    if init == "kaiming":  # uniform(-1/sqrt(d_in), 1/sqrt(d_in)): std = bound / sqrt(3)
        bound = 1 / np.sqrt(d_in)
        assert np.abs(a).max() <= bound
        assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound
    elif init == "normal":
        assert abs(a.std() - 0.02) < 0.002
    else:
        assert abs(a.std() - 1 / r) < 0.1 / r


def test_lora_dropout_only_on_adapter_path(kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method="lora", rank=R, dropout=0.5)
    lora = methods.get("lora")
    f = _j(random_factors(lora, jax.random.PRNGKey(0), K, b, cfg))
    x = jnp.asarray(np.random.default_rng(6).normal(size=(64, D_IN)), jnp.float32)
    Kj, bj = jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32)
    key = jax.random.PRNGKey(9)
    y_train = lora.apply(x, Kj, bj, f, cfg, train=True, key=key)
    keep = jax.random.bernoulli(key, 0.5, x.shape)
    x_drop = np.where(np.asarray(keep), np.asarray(x) / 0.5, 0.0)
    expected = np.asarray(x) @ K + b + cfg.scale * x_drop @ np.asarray(f["lora_a"]) @ np.asarray(f["lora_b"])
    np.testing.assert_allclose(np.asarray(y_train), expected, rtol=1e-4, atol=1e-4)
    # without training mode dropout is off
    y_eval = lora.apply(x, Kj, bj, f, cfg, train=False, key=key)
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(x) @ np.asarray(lora.materialize(Kj, f, cfg)) + b, rtol=1e-4, atol=1e-4)


def test_dora_magnitude_gradient_treats_norm_as_constant(kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method="dora", rank=R)
    dora = methods.get("dora")
    f = _j(random_factors(dora, jax.random.PRNGKey(0), K, b, cfg))
    Kj = jnp.asarray(K, jnp.float32)
    g = jax.grad(lambda m: jnp.sum(dora.materialize(Kj, {**f, "magnitude": m}, cfg)))(f["magnitude"])
    V = K + cfg.scale * np.asarray(f["lora_a"]) @ np.asarray(f["lora_b"])
    np.testing.assert_allclose(np.asarray(g), V.sum(axis=0) / _np_colnorm(V), rtol=1e-4)


def test_trainable_budgets_reproduce_the_papers_per_mille_column():
    """The paper's budget column for RoBERTa-base (Tables II-III), from shapes only (jax.eval_shape of a
    randomly initialised RoBERTa-base: nothing is computed). The counts fit with SSL, IA3 and SSB on key,
    value and the FFN intermediate layer (the `key_value_ffn` preset), LoRA/DoRA r=2 on all six matrices,
    BitFit on every bias (LayerNorm's too), all over the paper's 125M parameters of RoBERTa-base (our
    count of the encoder with its pooler: 124.6M, which gives 0.01 more in the last digit for some rows)."""
    from transformers import RobertaConfig

    from decomp_jax.core.inject import trainable_count
    from decomp_jax.core.tree import count_params
    from decomp_jax.models.bert import BertModel, from_hf_config
    from decomp_jax.models.hf import TARGET_PRESETS

    model = BertModel(from_hf_config(RobertaConfig()))  # the bare RobertaModel, with its pooler
    ids = jax.numpy.full((1, 8), 2, jax.numpy.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)["params"])
    assert count_params(shapes) == 124_644_864  # roberta-base with its pooler: "125M"
    presets = TARGET_PRESETS["roberta"]
    kv_ffn, six = presets["key_value_ffn"], presets["all_linear"]
    paper = {  # method: (AdapterConfig, the paper's per mille)
        "SSL": (dj.AdapterConfig(method="ssl", targets=kv_ffn), 0.22),
        "IA3": (dj.AdapterConfig(method="ia3", targets=kv_ffn), 0.44),
        "SSB": (dj.AdapterConfig(method="ssb", targets=kv_ffn), 0.66),
        "BitFit": (dj.AdapterConfig(method="bitfit", targets=six, train_extra=r"LayerNorm/bias$"), 0.82),
        "LoRA r=2": (dj.AdapterConfig(method="lora", targets=six, rank=2), 2.65),
        "DoRA r=2": (dj.AdapterConfig(method="dora", targets=six, rank=2), 3.32),
    }
    got = {name: 1000 * trainable_count(shapes, cfg) / 125e6 for name, (cfg, _) in paper.items()}
    print({name: round(v, 4) for name, v in got.items()})
    for name, (_, expected) in paper.items():
        assert abs(got[name] - expected) < 0.005, (name, got[name], expected)
