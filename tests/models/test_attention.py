"""The decoders' attention implementations (decomp_jax.models.attention): ``chunked`` (blocks of queries and
keys, online softmax, a backward pass of its own), ``splash`` (the Pallas TPU kernel, run here in Pallas's
interpreter) and ``jax.nn.dot_product_attention`` (the ``cudnn`` path's call, run here with JAX's XLA
implementation) against ``xla`` (all scores at once) for every mask
our decoders build, outputs and gradients; the mask as its pieces (``Mask``) against the array; the model with each implementation; XLA's memory estimate of
the chunked backward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decomp_jax.models import attention as att
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM

B, HEADS, KV, D = 2, 6, 2, 8


def _mask(length, key_len, *, left=0, right=0, window=None, segments=None, prefix=0):
    """``allowed (B, L, S)``: causal over buffer positions (the queries are the last ``length`` of
    ``key_len``), row 0 padded ``left`` on the left, row 1 ``right`` on the right, a sliding ``window``,
    packed ``segments`` (ids per key position; a query sees its own segment only), ``prefix`` slots in front
    that every query sees."""
    q_index = np.arange(key_len - length, key_len)
    k_index = np.arange(key_len)
    allowed = np.broadcast_to(k_index[None, :] <= q_index[:, None], (B, length, key_len)).copy()
    if window is not None:
        allowed &= (k_index[None, :] > q_index[:, None] - window)[None]
    keys = np.ones((B, key_len), bool)
    keys[0, :left] = False
    if right:
        keys[1, key_len - right:] = False
    allowed &= keys[:, None, :]
    if segments is not None:
        seg = np.asarray(segments)
        allowed &= (seg[:, q_index][:, :, None] == seg[:, None, :])
    if prefix:
        allowed = np.concatenate([np.ones((B, length, prefix), bool), allowed], axis=-1)
    return jnp.asarray(allowed)


def _pieces(length, key_len, *, left=0, right=0, window=None, segments=None, prefix=0):
    """The same mask as ``_mask`` as an ``att.Mask`` (the pieces, no ``(B, L, S)`` array)."""
    keys = np.ones((B, key_len), bool)
    keys[0, :left] = False
    if right:
        keys[1, key_len - right:] = False
    q_index = np.arange(key_len - length, key_len)
    seg = None if segments is None else np.asarray(segments)
    mask = att.Mask(jnp.asarray(q_index), jnp.arange(key_len), jnp.asarray(keys),
                    jnp.asarray(att.NO_WINDOW if window is None else window),
                    None if seg is None else jnp.asarray(seg[:, q_index]), None if seg is None else jnp.asarray(seg))
    return mask.with_prefix(prefix) if prefix else mask


CASES = {
    "causal": dict(length=11, key_len=11),
    "padding": dict(length=11, key_len=11, left=3, right=2),
    "sliding window": dict(length=13, key_len=13, window=4, left=2),
    "soft-capped": dict(length=9, key_len=9, softcap=5.0, right=3),
    "prefix slots": dict(length=7, key_len=7, prefix=3, left=2),
    "packed segments": dict(length=12, key_len=12, segments=[[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [1] * 5]),
    "cache (queries at the end of the buffer)": dict(length=3, key_len=10, left=1),
}


def _inputs(case, seed=0):
    spec = dict(CASES[case])
    softcap = spec.pop("softcap", None)
    length, key_len = spec["length"], spec["key_len"] + spec.get("prefix", 0)
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, length, HEADS, D))
    k, v = (jax.random.normal(kk, (B, key_len, KV, D)) for kk in ks[1:3])
    return q, k, v, _mask(**spec), softcap, jax.random.normal(ks[3], (B, length, HEADS * D))


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_equals_all_scores_at_once(case):
    """Outputs and the gradients of q, k, v, with blocks of 4 or 5 positions (dividing the rows or not,
    one block row of queries for the cache case; blocks past the causal diagonal skipped). Rows with no
    allowed key (left padding under the causal mask) have outputs of no meaning and are left out."""
    q, k, v, allowed, softcap, probe = _inputs(case)
    rows = np.asarray(allowed.any(-1))
    probe = probe * rows[..., None]
    chunk = 4 + list(CASES).index(case) % 2

    def loss(impl):
        return lambda q, k, v: jnp.sum(probe * att.attention(q, k, v, allowed, KV, scale=0.3, softcap=softcap,
                                                             implementation=impl, chunk=chunk))

    ref = att.attention(q, k, v, allowed, KV, scale=0.3, softcap=softcap, implementation="xla")
    out = jax.jit(lambda q, k, v: att.attention(q, k, v, allowed, KV, scale=0.3, softcap=softcap,
                                                implementation="chunked", chunk=chunk))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], rtol=0, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))
    grads = [jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v) for impl in ("xla", "chunked")]
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(grads[0][1]))) > 1e-2  # the keys' gradient is not trivially zero


@pytest.mark.parametrize("case", list(CASES))
def test_the_mask_from_its_pieces_is_the_same_mask(case):
    """``Mask`` (positions, padding, window, packed segments, prefix slots) is ``_mask``'s array entry for entry
    (``dense()``), and ``chunked`` run from the pieces (each block's mask computed as it runs, blocks of 4 or
    5) gives the outputs and gradients of ``xla`` run from the array."""
    spec = dict(CASES[case])
    softcap = spec.pop("softcap", None)
    q, k, v, allowed, _, probe = _inputs(case)
    pieces = _pieces(**spec)
    np.testing.assert_array_equal(np.asarray(pieces.dense()), np.asarray(allowed))
    rows = np.asarray(allowed.any(-1))
    probe = probe * rows[..., None]
    chunk = 5 - list(CASES).index(case) % 2

    def loss(mask, impl):
        return lambda q, k, v: jnp.sum(probe * att.attention(q, k, v, mask, KV, scale=0.3, softcap=softcap,
                                                             implementation=impl, chunk=chunk))

    ref = jax.jit(jax.value_and_grad(loss(allowed, "xla"), argnums=(0, 1, 2)))(q, k, v)
    out = jax.jit(jax.value_and_grad(loss(pieces, "chunked"), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
    for a, b in zip(ref[1], out[1]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    xla = att.attention(q, k, v, pieces, KV, scale=0.3, softcap=softcap, implementation="xla")  # dense() inside
    np.testing.assert_array_equal(np.asarray(xla), np.asarray(att.attention(q, k, v, allowed, KV, scale=0.3,
                                                                           softcap=softcap, implementation="xla")))


def test_a_mask_of_pieces_is_never_a_full_array():
    """The gradient of chunked attention at 2048 positions from a ``Mask``: XLA's temporaries hold less than
    from the ``(B, L, S)`` array, by at least the array's 4 MiB (it is neither made nor cut into blocks)."""
    length, heads = 2048, 4
    q = jax.ShapeDtypeStruct((1, length, heads, 32), jnp.float32)
    dense = jax.ShapeDtypeStruct((1, length, length), jnp.bool_)
    pieces = att.Mask(jnp.arange(length), jnp.arange(length), jnp.ones((1, length), bool), jnp.asarray(att.NO_WINDOW))

    def temp(mask):
        def f(q, k, v, m):
            return jnp.sum(att.attention(q, k, v, m, heads, implementation="chunked", chunk=256))

        compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, q, q, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    from_array, from_pieces = temp(dense), temp(pieces)
    print(f"chunked attention gradient temporaries: {from_array:.1f} MiB from the array, {from_pieces:.1f} MiB from the pieces")
    assert from_array - from_pieces >= 4


@pytest.mark.parametrize("case", [c for c in CASES if c != "soft-capped"])
def test_dot_product_attention_call_matches_on_allowed_rows(case):
    """The ``cudnn`` path's ``jax.nn.dot_product_attention`` call (here with JAX's XLA implementation): our
    mask and grouped heads mean the same to it. Rows with no allowed key are left out (its fill differs)."""
    q, k, v, allowed, _, _ = _inputs(case)
    ref = att.grouped_attention(q, k, v, allowed, KV, 0.3)
    out = att.sdpa_attention(q, k, v, allowed, 0.3, "xla")
    rows = np.asarray(allowed.any(-1))
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_dot_product_attention_own_causal_mask(window):
    """The ``cudnn`` path's call on a ``plain`` mask: no mask array, JAX's own causal mask (and sliding
    window), here with JAX's XLA implementation, equals ``xla`` with our mask on every row."""
    length = 13
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    q = jax.random.normal(ks[0], (B, length, HEADS, D))
    k, v = (jax.random.normal(kk, (B, length, KV, D)) for kk in ks[1:])
    ref = att.grouped_attention(q, k, v, _mask(length, length, window=window), KV, 0.3)
    out = att.sdpa_attention(q, k, v, None, 0.3, "xla", window=window)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5)


def _recording_dot_product_attention(monkeypatch):
    """``jax.nn.dot_product_attention`` run with JAX's XLA implementation whatever it is asked for, each
    call's ``(no mask array, is_causal, local_window_size)`` recorded in the returned list."""
    calls = []
    original = jax.nn.dot_product_attention

    def recorded(*args, implementation=None, **kwargs):
        calls.append((kwargs.get("mask") is None, kwargs.get("is_causal", False), kwargs.get("local_window_size")))
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    return calls


SLIDING = dict(sliding_window=5, layer_types=("sliding_attention", "full_attention"))


@pytest.mark.parametrize("extra", [dict(), SLIDING, dict(SLIDING, scan_layers=True)],
                         ids=["llama", "sliding", "sliding, scanned"])
def test_cudnn_is_given_its_own_causal_mask_when_the_mask_is_plain(extra, monkeypatch):
    """``attention='cudnn'`` in our Llama (``jax.nn.dot_product_attention`` run here with JAX's XLA
    implementation): called without a padding mask, each layer passes no mask array, cuDNN's causal mask
    and the layer's window (a scanned layer's picked by ``lax.cond``); with one, the mask array. Logits and
    gradients equal ``xla``'s either way (the window, 5 keys of 14, changes them)."""
    calls = _recording_dot_product_attention(monkeypatch)
    config = LlamaConfig(**TINY, **extra, attention="xla")
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 14), 3, 64)
    params = LlamaForCausalLM(config).init(jax.random.PRNGKey(0), ids)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    padded = jnp.ones((2, 14), jnp.int32).at[1, 10:].set(0)
    for mask in (None, padded):
        def run(impl):
            model = LlamaForCausalLM(dataclasses.replace(config, attention=impl))
            loss = lambda p: jnp.mean(model.apply({"params": p}, ids, mask)[:, :10] ** 2)  # noqa: E731
            return jax.jit(model.apply)({"params": params}, ids, mask), jax.jit(jax.grad(loss))(params)

        ref, gref = run("xla")
        calls.clear()
        out, gout = run("cudnn")
        np.testing.assert_allclose(np.asarray(out)[:, :10], np.asarray(ref)[:, :10], rtol=0, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=1e-5), gref, gout)
        windows = {c[2] for c in calls}
        if mask is None:
            assert calls and all(c[0] and c[1] for c in calls)
            assert windows == ({None, (4, 0)} if "sliding_window" in extra else {None})
        else:
            assert calls and all(not c[0] and not c[1] for c in calls) and windows == {None}


def test_cudnn_takes_the_mask_array_for_a_cache_and_its_own_mask_for_prompt_tuning(monkeypatch):
    """Prompt tuning's virtual tokens in front keep a call without a padding mask plain (cuDNN's own causal
    mask; the logits equal ``xla``'s); a cached decoding call passes the mask array."""
    from decomp_jax.core.config import AdapterConfig
    from decomp_jax.core.execution import adapt
    from decomp_jax.core.inject import inject
    from decomp_jax.models.llama import init_cache

    calls = _recording_dot_product_attention(monkeypatch)
    config = LlamaConfig(**TINY, attention="xla")
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 3, 64)
    cfg = AdapterConfig(method="prompt_tuning", options={"num_virtual_tokens": 3, "init": "random"})
    params = inject(LlamaForCausalLM(config).init(jax.random.PRNGKey(0), ids)["params"], cfg, jax.random.PRNGKey(3))
    out = {}
    for impl in ("xla", "cudnn"):
        calls.clear()
        out[impl] = adapt(LlamaForCausalLM(dataclasses.replace(config, attention=impl)).apply, cfg)({"params": params}, ids)
    assert calls and all(c[0] and c[1] for c in calls)
    np.testing.assert_allclose(np.asarray(out["cudnn"]), np.asarray(out["xla"]), rtol=0, atol=1e-5)
    calls.clear()
    model = LlamaForCausalLM(dataclasses.replace(config, attention="cudnn"))
    model.apply({"params": LlamaForCausalLM(config).init(jax.random.PRNGKey(0), ids)["params"]}, ids[:, :1],
                cache=init_cache(config, 2, 9, jnp.float32), cache_index=0)
    assert calls and all(not c[0] and not c[1] for c in calls)


def test_choices_and_refusals():
    assert att.choose("auto", 256, 256, jnp.float32) == "xla"
    assert att.choose("auto", 1024, 1024, jnp.float32) == "xla"
    assert att.choose("auto", 2048, 2048, jnp.float32) == "chunked"
    assert att.choose("auto", 4096, 4096, jnp.bfloat16) == ("cudnn" if jax.default_backend() == "gpu" else "chunked")
    assert att.choose("auto", 4096, 4096, jnp.bfloat16, softcap=50.0) == "chunked"
    with pytest.raises(ValueError, match="'cudnn' has no logit soft-capping"):
        LlamaConfig(attention="cudnn", attn_logit_softcapping=50.0)
    assert att.choose("splash", 256, 256, jnp.float32, segments=True) == "splash"
    assert att.choose("splash", 1, 256, jnp.float32) == "xla"  # a cached decoding step: what auto picks off a TPU
    q = jnp.zeros((1, 2, HEADS, D))
    with pytest.raises(ValueError, match="'splash' is for self-attention: 2 queries against 9 keys"):
        att.splash_attention(q, jnp.zeros((1, 9, KV, D)), jnp.zeros((1, 9, KV, D)), jnp.zeros((1, 2)), KV, 0.3)
    with pytest.raises(ValueError, match="attention='flash' is unknown"):
        LlamaConfig(attention="flash")
    with pytest.raises(ValueError, match="attention_chunk=0"):
        LlamaConfig(attention_chunk=0)


SPLASH_CASES = {  # one kernel each (its masks are static): a few mask kinds per case
    "padding, packed segments, soft-capped": dict(length=12, segments=[[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [1] * 5],
                                                  left=2, right=3, softcap=5.0),
    "sliding window, padding": dict(length=13, window=4, left=2, right=1),
}


@pytest.mark.parametrize("case", list(SPLASH_CASES))
def test_splash_equals_all_scores_at_once(case):
    """The Pallas TPU kernel (``splash``; here in Pallas's interpreter) against ``xla``: outputs at the real
    tokens and the gradients of q, k, v, within 1e-5, grouped heads through its multi-query form. Its mask is
    the causal (or sliding-window) one within segment ids: padding gets an id of its own
    (``segment_ids``), so a padding query sees padding only; nothing reads those rows."""
    spec = dict(SPLASH_CASES[case])
    length, softcap, window, segments = spec.pop("length"), spec.pop("softcap", None), spec.get("window"), spec.get("segments")
    keys = np.ones((B, length), np.int32)
    keys[0, :spec["left"]] = 0
    keys[1, length - spec["right"]:] = 0
    ids = att.segment_ids(jnp.asarray(keys), None if segments is None else jnp.asarray(segments))
    allowed = _mask(length, length, **spec) & (ids[:, :, None] == ids[:, None, :])  # (padding queries see padding)
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(ks[0], (B, length, HEADS, D))
    k, v = (jax.random.normal(kk, (B, length, KV, D)) for kk in ks[1:3])
    real = keys.astype(bool)
    probe = jax.random.normal(ks[3], (B, length, HEADS * D)) * real[..., None]

    def run(impl):
        call = lambda q, k, v: att.attention(q, k, v, allowed, KV, scale=0.3, softcap=softcap, implementation=impl,  # noqa: E731
                                             segments=ids, window=window)
        grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(probe * call(q, k, v)), argnums=(0, 1, 2)))(q, k, v)
        return jax.jit(call)(q, k, v), grads

    (ref, gref), (out, gout) = run("xla"), run("splash")
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=0, atol=1e-5)
    for a, b in zip(gref, gout):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(gref[1]))) > 1e-2


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def _gpt2(attention):
    import transformers as tf

    from decomp_jax.models.gpt2 import GPT2LMHeadModel

    return GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32),
                           attention=attention, attention_chunk=4)


@pytest.mark.parametrize("extra", [dict(), pytest.param(dict(
    sliding_window=5, layer_types=("sliding_attention", "full_attention"), attn_logit_softcapping=20.0,
    model_type="gemma2", sandwich_norms=True), marks=pytest.mark.slow), "gpt2"], ids=["llama", "gemma2-like", "gpt2"])
def test_the_model_gives_the_same_logits_and_gradients_with_each(extra):
    """Our Llama (a Gemma-2-like one with -m slow) and our GPT-2 with ``xla``, ``chunked`` and ``splash``
    (in Pallas's interpreter) attention."""
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 14), 3, 64)
    mask = jnp.ones((2, 14), jnp.int32).at[0, :3].set(0)
    if extra == "gpt2":
        make = _gpt2
    else:
        config = LlamaConfig(**TINY, **extra, attention="xla")
        make = lambda impl: LlamaForCausalLM(dataclasses.replace(config, attention=impl, attention_chunk=4))  # noqa: E731
    params = make("xla").init(jax.random.PRNGKey(0), ids, mask)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)

    def run(impl):
        model = make(impl)
        loss = lambda p: jnp.mean(model.apply({"params": p}, ids, mask)[:, 3:] ** 2)  # noqa: E731
        return jax.jit(model.apply)({"params": params}, ids, mask), jax.jit(jax.grad(loss))(params)

    ref, gref = run("xla")
    valid = np.asarray(mask, bool)
    for impl in ("chunked", "splash"):
        out, gout = run(impl)
        np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], rtol=0, atol=1e-5, err_msg=impl)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=impl), gref, gout)


def test_the_chunked_backward_pass_holds_less():
    """XLA's memory estimate of the gradient of one attention call at 2048 positions (8 heads): the chunked
    one (blocks of 256 x 256 forward and backward) needs about a tenth of what all scores at once need
    (388 MiB; the query-block checkpointing it replaced held one block row of scores: 79 MiB)."""
    length, heads = 2048, 8
    q = jax.ShapeDtypeStruct((1, length, heads, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, heads, 64), jnp.float32)
    allowed = jax.ShapeDtypeStruct((1, length, length), jnp.bool_)

    def temp(impl):
        f = jax.grad(lambda q, k, v, m: jnp.sum(att.attention(q, k, v, m, heads, implementation=impl, chunk=256)),
                     argnums=(0, 1, 2))
        return jax.jit(f).lower(q, kv, kv, allowed).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp("xla"), temp("chunked")
    print(f"attention gradient at {length} positions: XLA temp {full / 2**20:.0f} MiB all at once, "
          f"{chunked / 2**20:.0f} MiB chunked ({chunked / full:.3f}x)")
    assert chunked < 0.12 * full
