"""GPT-2 as a sequence classifier (transformers' ``GPT2ForSequenceClassification``, which has no Flax
class): transformers' Flax GPT-2 stack (``FlaxGPT2Module``) under ``transformer`` and a bias-free
``score`` head on each row's last real token, as transformers pools (the rightmost token that is not
the pad id). The params are the PyTorch model's names in Flax layout (``transformer/h/0/attn/c_attn``,
Conv1D kernels stored ``(d_out, d_in)``: ``models.hf.TRANSPOSED["gpt2"]``), so PEFT SEQ_CLS adapters
trained on the PyTorch classifier import onto them (``arch="gpt2"``; ``score`` in modules_to_save).
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from decomp_jax.models.llama import last_token_hidden


class GPT2ForSequenceClassification(nn.Module):
    """``apply({"params": p}, input_ids, attention_mask)`` -> ``(B, num_labels)`` float32 logits.
    ``config``: a transformers ``GPT2Config`` (its ``pad_token_id`` decides the pooled token; positions
    are ``0..L-1`` as in transformers' PyTorch GPT-2 when none are given)."""

    config: object
    num_labels: int = 2

    def setup(self):
        from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2Module

        self.transformer = FlaxGPT2Module(self.config, dtype=jnp.float32)
        self.score = nn.Dense(self.num_labels, use_bias=False, name="score")

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        hidden = self.transformer(input_ids, jnp.asarray(attention_mask), position_ids, deterministic=True)[0]
        pooled = last_token_hidden(hidden, input_ids, attention_mask, self.config.pad_token_id)
        return self.score(pooled).astype(jnp.float32)


def load_gpt2_classifier(folder: str):
    """``(model, params)`` from a transformers ``GPT2ForSequenceClassification`` folder (config.json and
    model.safetensors): the GPT-2 stack read by transformers' Flax loader, ``score.weight`` read here."""
    from safetensors.numpy import load_file
    from transformers import FlaxGPT2Model, GPT2Config

    from decomp_jax.models.hf import quiet_transformers

    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} does not exist; save the classifier with save_pretrained (safetensors).")
    score = load_file(weights).get("score.weight")
    if score is None:
        raise ValueError(f"{weights} holds no score.weight: it is not a GPT2ForSequenceClassification checkpoint.")
    config = GPT2Config.from_pretrained(folder)
    with quiet_transformers():  # ("score.weight was not used": it is read below)
        stack = FlaxGPT2Model.from_pretrained(folder, from_pt=True)
    model = GPT2ForSequenceClassification(config, num_labels=int(score.shape[0]))
    return model, {"transformer": stack.params, "score": {"kernel": np.ascontiguousarray(score.T)}}
