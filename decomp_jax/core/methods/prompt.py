"""Prompt methods of the reconstruction family: virtual tokens and per-layer key/value prefixes.

They add no leaves beside kernels: their trainable leaves live in one subtree at the top of the
params, ``params[name]`` (``kind="prompt"``), made by ``init(key, params, cfg)`` from the decoder's
params (our Llama: ``decomp_jax.models.llama``). Execution is ``decomp_jax.core.prompts``.

- ``prompt_tuning``: ``params["prompt_tuning"]["embedding"]`` (n, hidden), prepended to the input
  embeddings. ``options.init``: ``random`` (normal, std ``init_std``, default the std of the
  model's embedding table), ``vocab`` (the embeddings of n token ids drawn uniformly from the
  vocabulary), ``text`` (the embeddings of ``init_token_ids``, repeated / cut to n, as PEFT).
- ``prefix_tuning``: ``params["prefix_tuning"]["key"/"value"]`` (num_layers, P, kv_heads * head_dim),
  normal(``init_std``, default 1.0: PEFT's ``nn.Embedding``). With ``prefix_projection`` (PEFT's
  reparameterisation) the leaves are ``embedding`` (P, kv_dim) and an MLP ``dense_in`` (kv_dim ->
  encoder_hidden_size, default kv_dim; tanh) ``dense_out`` (-> 2 * num_layers * kv_dim), PyTorch
  ``nn.Linear`` init; PEFT's shapes (its ``token_dim`` is kv_heads * head_dim, = hidden without GQA);
  ``decomp_jax.core.prompts.fold_prefix`` turns it into the plain ``key``/``value`` for inference.
- ``p_tuning`` (PEFT's ``P_TUNING``): prompt tuning whose n virtual tokens are the output of a
  prompt encoder applied to a trainable ``embedding`` (n, hidden) (normal(1), PyTorch's
  ``nn.Embedding``). ``options.encoder_reparameterization_type``: ``MLP`` (``mlp_0``..``mlp_2``:
  hidden -> h -> h -> hidden, ReLU between) or ``LSTM`` (``encoder_num_layers`` bidirectional layers
  ``lstm_{l}_forward`` / ``lstm_{l}_backward`` of width h, then ``mlp_0`` (2h -> 2h), ReLU, ``mlp_1``
  (2h -> hidden)); ``h = encoder_hidden_size`` (default: hidden). PyTorch's inits (``nn.Linear``,
  ``nn.LSTM``: U(-1/sqrt(fan), 1/sqrt(fan))). ``p_tuning_embeddings`` runs the encoder.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from decomp_jax.core.methods.base import Method, register
from decomp_jax.errors import ConfigError

PROMPT_INITS = ("random", "vocab", "text")


def _error(message: str):
    return ConfigError(message)


def llama_dims(params, method: str) -> dict:
    """``vocab, hidden, num_layers, kv_dim`` of our Llama's params (ConfigError for other models)."""
    params = unfreeze(params)
    try:
        model = params["model"]
        vocab, hidden = np.shape(model["embed_tokens"]["embedding"])
        if "layers" in model:  # scan_layers: kernels stacked (L, d_in, d_out)
            num_layers, _, kv_dim = np.shape(model["layers"]["self_attn"]["k_proj"]["kernel"])
        else:
            num_layers = sum(1 for k in model if str(k).startswith("layers_"))
            kv_dim = np.shape(model["layers_0"]["self_attn"]["k_proj"]["kernel"])[1]
    except (KeyError, TypeError, ValueError):
        raise _error(
            f"Method {method!r} works with the params of decomp_jax.models.llama.LlamaForCausalLM "
            f"(model/embed_tokens/embedding, model/layers_{{i}}/self_attn/k_proj/kernel); these params have "
            f"top-level keys {sorted(map(str, params)) if isinstance(params, dict) else type(params).__name__}."
        ) from None
    return {"vocab": int(vocab), "hidden": int(hidden), "num_layers": num_layers, "kv_dim": int(kv_dim)}


def _positive_int(cfg, name, allow_none=False):
    value = cfg.option(name)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _error(f"options.{name} must be a positive integer{' or null' if allow_none else ''}, got {value!r}.")


def _check_tokens(cfg):
    """What every prompt method checks: no adapter dropout, a positive number of virtual tokens."""
    if cfg.dropout:
        raise _error(f"Method {cfg.method!r} has no adapter dropout; set dropout: 0.")
    _positive_int(cfg, "num_virtual_tokens")


def _check_common(cfg):
    _check_tokens(cfg)
    std = cfg.option("init_std")
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0):
        raise _error(f"options.init_std must be a number > 0 or null, got {std!r}.")


def _validate_prompt(cfg):
    _check_common(cfg)
    init = cfg.option("init")
    if init not in PROMPT_INITS:
        raise _error(f"options.init={init!r} is unknown for prompt_tuning; choose one of {PROMPT_INITS}.")
    ids = cfg.option("init_token_ids")
    if init == "text":
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise _error("options.init: text needs options.init_token_ids: the token ids of the init text "
                         "(e.g. tokenizer.encode('Classify the sentiment:')), a non-empty list of ints.")
    elif ids is not None:
        raise _error(f"options.init_token_ids is used by init: text only, not {init!r}; remove it.")


def _validate_prefix(cfg):
    _check_common(cfg)
    if not isinstance(cfg.option("prefix_projection"), bool):
        raise _error(f"options.prefix_projection must be true or false, got {cfg.option('prefix_projection')!r}.")
    _positive_int(cfg, "encoder_hidden_size", allow_none=True)
    if cfg.option("encoder_hidden_size") is not None and not cfg.option("prefix_projection"):
        raise _error("options.encoder_hidden_size is used with prefix_projection: true only; remove it.")


def _init_prompt(key, params, cfg) -> dict:
    dims = llama_dims(params, cfg.method)
    n = cfg.option("num_virtual_tokens")
    table = jnp.asarray(unfreeze(params)["model"]["embed_tokens"]["embedding"])
    init = cfg.option("init")
    if init == "random":
        std = cfg.option("init_std")
        std = jnp.std(table.astype(jnp.float32)) if std is None else float(std)  # traceable (eval_shape)
        return {"embedding": (std * jax.random.normal(key, (n, dims["hidden"]), jnp.float32)).astype(table.dtype)}
    if init == "vocab":
        ids = jax.random.randint(key, (n,), 0, dims["vocab"])
    else:
        ids = list(cfg.option("init_token_ids"))
        if max(ids) >= dims["vocab"]:
            raise _error(f"options.init_token_ids holds id {max(ids)} >= the vocabulary size {dims['vocab']}.")
        ids = jnp.asarray((ids * math.ceil(n / len(ids)))[:n], jnp.int32)  # PEFT: repeat, then cut to n
    return {"embedding": jnp.take(table, ids, axis=0)}


def _linear_init(key, d_in, d_out):
    """PyTorch ``nn.Linear``'s init: U(-1/sqrt(d_in), 1/sqrt(d_in)) for the weight and the bias."""
    bound = 1.0 / math.sqrt(d_in)
    k1, k2 = jax.random.split(key)
    return {"kernel": jax.random.uniform(k1, (d_in, d_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k2, (d_out,), jnp.float32, -bound, bound)}


def _init_prefix(key, params, cfg) -> dict:
    dims = llama_dims(params, cfg.method)
    p, layers, kv_dim = cfg.option("num_virtual_tokens"), dims["num_layers"], dims["kv_dim"]
    std = cfg.option("init_std")
    std = 1.0 if std is None else float(std)
    k_emb, k_in, k_out = jax.random.split(key, 3)
    if cfg.option("prefix_projection"):
        encoder = cfg.option("encoder_hidden_size") or kv_dim  # PEFT: token_dim = kv_heads * head_dim
        return {"embedding": std * jax.random.normal(k_emb, (p, kv_dim), jnp.float32),
                "dense_in": _linear_init(k_in, kv_dim, encoder),
                "dense_out": _linear_init(k_out, encoder, 2 * layers * kv_dim)}
    return {"key": std * jax.random.normal(k_in, (layers, p, kv_dim), jnp.float32),
            "value": std * jax.random.normal(k_out, (layers, p, kv_dim), jnp.float32)}


ENCODER_TYPES = ("MLP", "LSTM")


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _init_p_tuning(key, params, cfg) -> dict:
    dims = llama_dims(params, cfg.method)
    n, d = cfg.option("num_virtual_tokens"), dims["hidden"]
    h = cfg.option("encoder_hidden_size") or d
    keys = iter(jax.random.split(key, 8 + 4 * 2 * cfg.option("encoder_num_layers")))
    out = {"embedding": jax.random.normal(next(keys), (n, d), jnp.float32)}
    if cfg.option("encoder_reparameterization_type") == "MLP":
        for i, (d_in, d_out) in enumerate([(d, h), (h, h), (h, d)]):
            out[f"mlp_{i}"] = _linear_init(next(keys), d_in, d_out)
        return out
    bound = 1.0 / math.sqrt(h)  # PyTorch's nn.LSTM: every weight and bias U(-1/sqrt(h), 1/sqrt(h))
    for layer in range(cfg.option("encoder_num_layers")):
        d_in = d if layer == 0 else 2 * h
        for direction in ("forward", "backward"):
            out[f"lstm_{layer}_{direction}"] = {
                "w_ih": _uniform(next(keys), (d_in, 4 * h), bound), "w_hh": _uniform(next(keys), (h, 4 * h), bound),
                "b_ih": _uniform(next(keys), (4 * h,), bound), "b_hh": _uniform(next(keys), (4 * h,), bound)}
    out["mlp_0"] = _linear_init(next(keys), 2 * h, 2 * h)
    out["mlp_1"] = _linear_init(next(keys), 2 * h, d)
    return out


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _lstm(x: jax.Array, p: dict) -> jax.Array:
    """One direction of PyTorch's LSTM over the rows of ``x`` (n, d_in): gates i, f, g, o."""
    h_size = p["w_hh"].shape[0]

    def cell(carry, x_t):
        h, c = carry
        i, f, g, o = jnp.split(x_t @ p["w_ih"] + p["b_ih"] + h @ p["w_hh"] + p["b_hh"], 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((h_size,), x.dtype)
    return jax.lax.scan(cell, (zeros, zeros), x)[1]


def p_tuning_embeddings(leaves: dict) -> jax.Array:
    """The n virtual-token embeddings (n, hidden): p-tuning's prompt encoder applied to its
    ``embedding`` (the encoder type is read from the leaves)."""
    x = leaves["embedding"]
    if "lstm_0_forward" not in leaves:  # MLP
        return _dense(jax.nn.relu(_dense(jax.nn.relu(_dense(x, leaves["mlp_0"])), leaves["mlp_1"])), leaves["mlp_2"])
    layer = 0
    while f"lstm_{layer}_forward" in leaves:
        forward = _lstm(x, leaves[f"lstm_{layer}_forward"])
        backward = _lstm(x[::-1], leaves[f"lstm_{layer}_backward"])[::-1]
        x = jnp.concatenate([forward, backward], axis=-1)
        layer += 1
    return _dense(jax.nn.relu(_dense(x, leaves["mlp_0"])), leaves["mlp_1"])


def _validate_p_tuning(cfg):
    _check_tokens(cfg)
    kind = cfg.option("encoder_reparameterization_type")
    if kind not in ENCODER_TYPES:
        raise _error(f"options.encoder_reparameterization_type={kind!r} is unknown for p_tuning; choose MLP or LSTM.")
    _positive_int(cfg, "encoder_hidden_size", allow_none=True)
    _positive_int(cfg, "encoder_num_layers")
    if cfg.option("encoder_num_layers") != 2 and kind == "MLP":
        raise _error("options.encoder_num_layers applies to the LSTM encoder; the MLP encoder always has 3 layers "
                     "(PEFT ignores it there with a warning). Remove it or use encoder_reparameterization_type: LSTM.")
    if cfg.option("encoder_dropout"):
        raise _error(f"options.encoder_dropout={cfg.option('encoder_dropout')!r}: dropout between the LSTM encoder's "
                     f"layers is not implemented; set it to 0.")


PROMPT_TUNING = register(Method(
    name="prompt_tuning",
    family="reconstruction",
    formula="h_0 = [embedding (n trainable virtual tokens); E(x)]; logits of the real tokens only (Llama)",
    factor_names=("embedding",),
    init=_init_prompt,
    options={"num_virtual_tokens": 20, "init": "random", "init_token_ids": None, "init_std": None},
    validate=_validate_prompt,
    kind="prompt",
))

PREFIX_TUNING = register(Method(
    name="prefix_tuning",
    family="reconstruction",
    formula="attn(q, [key_l; K], [value_l; V]): P trainable key/value slots per layer (Llama)",
    factor_names=("key", "value"),
    init=_init_prefix,
    options={"num_virtual_tokens": 20, "prefix_projection": False, "encoder_hidden_size": None, "init_std": None},
    validate=_validate_prefix,
    kind="prompt",
))

P_TUNING = register(Method(
    name="p_tuning",
    family="reconstruction",
    formula="h_0 = [encoder(embedding) (n virtual tokens; MLP or bi-LSTM encoder); E(x)] (Llama)",
    factor_names=("embedding",),
    init=_init_p_tuning,
    options={"num_virtual_tokens": 20, "encoder_reparameterization_type": "MLP", "encoder_hidden_size": None,
             "encoder_num_layers": 2, "encoder_dropout": 0.0},
    validate=_validate_p_tuning,
    kind="prompt",
))
