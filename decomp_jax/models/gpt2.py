"""GPT-2 as a sequence classifier (transformers' ``GPT2ForSequenceClassification``, which has no Flax
class): our Linen GPT-2 stack (``GPT2Stack``, the param names of transformers' Flax GPT-2) under ``transformer`` and a bias-free
``score`` head on each row's last real token, as transformers pools (the rightmost token that is not
the pad id). The params are the PyTorch model's names in Flax layout (``transformer/h/0/attn/c_attn``,
Conv1D kernels stored ``(d_out, d_in)``: ``models.hf.TRANSPOSED["gpt2"]``), so PEFT SEQ_CLS adapters
trained on the PyTorch classifier import onto them (``arch="gpt2"``; ``score`` in modules_to_save).
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from decomp_jax.models.llama import last_token_hidden


class Conv1D(nn.Module):
    """GPT-2's projection with its kernel stored ``(d_out, d_in)`` (``models.hf.TRANSPOSED["gpt2"]``):
    ``y = x @ kernel.T + bias``."""

    features: int
    dtype: object = jnp.float32  # (factored execution reads it, as of nn.Dense)
    precision: object = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (self.features, x.shape[-1]), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return x @ kernel.T + bias


def _activation(name: str):
    from decomp_jax.models.bert import ACTIVATIONS

    if name not in ACTIVATIONS:
        raise ValueError(f"config.json: activation_function={name!r} is not supported; use one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


class Block(nn.Module):
    """One GPT-2 block: pre-LayerNorm causal self-attention and MLP, each with a residual."""

    config: object

    @nn.compact
    def __call__(self, hidden, bias):
        cfg = self.config
        eps = cfg.layer_norm_epsilon
        hidden = hidden + Attention(cfg, name="attn")(nn.LayerNorm(epsilon=eps, name="ln_1")(hidden), bias)
        mlp = MLP(cfg, cfg.n_inner or 4 * cfg.n_embd, name="mlp")
        return hidden + mlp(nn.LayerNorm(epsilon=eps, name="ln_2")(hidden))


class Blocks(nn.Module):
    """The blocks, named ``0``, ``1``, ... (params ``h/{i}/...``)."""

    config: object

    @nn.compact
    def __call__(self, hidden, bias):
        for i in range(self.config.n_layer):
            hidden = Block(self.config, name=str(i))(hidden, bias)
        return hidden


class Attention(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x, bias):
        cfg = self.config
        d, h = cfg.n_embd, cfg.n_head
        b, s, _ = x.shape
        q, k, v = jnp.split(Conv1D(3 * d, name="c_attn")(x), 3, axis=-1)
        heads = lambda t: t.reshape(b, s, h, d // h).transpose(0, 2, 1, 3)  # noqa: E731
        scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) / np.sqrt(d // h) + bias
        context = (jax.nn.softmax(scores, axis=-1) @ heads(v)).transpose(0, 2, 1, 3).reshape(b, s, d)
        return Conv1D(d, name="c_proj")(context)


class MLP(nn.Module):
    config: object
    inner: int

    @nn.compact
    def __call__(self, x):
        act = _activation(self.config.activation_function)
        return Conv1D(self.config.n_embd, name="c_proj")(act(Conv1D(self.inner, name="c_fc")(x)))


class GPT2Stack(nn.Module):
    """The GPT-2 transformer (``wte``, ``wpe``, blocks ``h/{i}``, ``ln_f``), inference only: the
    attention bias is causal plus key padding (``finfo.min`` where masked)."""

    config: object

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids):
        cfg = self.config
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(cfg, key, False):
                raise ValueError(f"config.json: {key}=true is not supported by decomp_jax's GPT-2; set it to false.")
        if not getattr(cfg, "scale_attn_weights", True):
            raise ValueError("config.json: scale_attn_weights=false is not supported by decomp_jax's GPT-2.")
        s = input_ids.shape[-1]
        hidden = nn.Embed(cfg.vocab_size, cfg.n_embd, name="wte")(input_ids) + \
            nn.Embed(cfg.n_positions, cfg.n_embd, name="wpe")(position_ids)
        allowed = jnp.tril(jnp.ones((s, s), bool))[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        hidden = Blocks(cfg, name="h")(hidden, bias)
        return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="ln_f")(hidden)


class GPT2ForSequenceClassification(nn.Module):
    """``apply({"params": p}, input_ids, attention_mask)`` -> ``(B, num_labels)`` float32 logits.
    ``config``: a transformers ``GPT2Config`` (its ``pad_token_id`` decides the pooled token; positions
    are ``0..L-1`` as in transformers' PyTorch GPT-2 when none are given)."""

    config: object
    num_labels: int = 2

    def setup(self):
        self.transformer = GPT2Stack(self.config)
        self.score = nn.Dense(self.num_labels, use_bias=False, name="score")

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        hidden = self.transformer(input_ids, jnp.asarray(attention_mask), position_ids)
        pooled = last_token_hidden(hidden, input_ids, attention_mask, self.config.pad_token_id)
        return self.score(pooled).astype(jnp.float32)


def load_gpt2_classifier(folder: str):
    """``(model, params)`` from a transformers ``GPT2ForSequenceClassification`` folder (config.json and
    model.safetensors, or its shard index), names mapped by ``interop.peft.ARCHS["gpt2"]``."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    from transformers import GPT2Config

    from decomp_jax.interop.peft import get_arch
    from decomp_jax.models.hf import read_torch_weights

    weights = read_torch_weights(folder)
    score = weights.get("score.weight")
    if score is None:
        raise ValueError(f"{folder}/model.safetensors holds no score.weight: it is not a GPT2ForSequenceClassification "
                         f"checkpoint.")
    config = GPT2Config.from_pretrained(folder)
    model = GPT2ForSequenceClassification(config, num_labels=int(score.shape[0]))
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = flatten_dict(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"])
    spec = get_arch("gpt2")
    out = {}
    for path, like in shapes.items():
        name, transpose = spec.torch_leaf(path)
        value = weights.get(name, weights.get(name[len("transformer."):]) if name.startswith("transformer.") else None)
        if value is None:
            raise ValueError(f"{folder}/model.safetensors: {name} is missing; save the classifier again with save_pretrained.")
        value = np.asarray(value, np.float32)
        # Conv1D weights are (d_in, d_out) in PyTorch and (d_out, d_in) here; score is an nn.Linear
        value = value.T if transpose else value
        if value.shape != like.shape:
            raise ValueError(f"{folder}/model.safetensors: {name} has shape {value.shape[::-1] if transpose else value.shape}, "
                             f"config.json needs {like.shape[::-1] if transpose else like.shape}.")
        out[path] = np.ascontiguousarray(value)
    return model, unflatten_dict(out)
