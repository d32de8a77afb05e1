"""LoRA on a mixture's experts in PEFT's format: PEFT (>= 0.17) adapts transformers 5's stacked expert
parameters (``mlp.experts.gate_up_proj (E, 2I, H)``, ``mlp.experts.down_proj (E, H, I)``) through
``target_parameters``, one LoRA of rank ``r * E`` per parameter:

- ``lora_A (r * E, d_in)``, expert-major: rows ``e*r .. e*r + r - 1`` are expert ``e``'s ``A_e (r, d_in)``;
- ``lora_B (d_out, r * E)``, rank-major: ``B_e = lora_B.reshape(d_out, r, E)[:, :, e]``;
- expert ``e``'s update ``(alpha / r) * B_e @ A_e``, our ``s * (lora_a[e] @ lora_b[e]).T``.

Both parameters of one ``experts`` module wrap it twice: the inner wrapper (``gate_up_proj``) stores its
tensors under ``experts.base_layer.lora_*``, the outer (``down_proj``) under ``experts.lora_*``; a module
with one adapted parameter under ``experts.lora_*``. PEFT's parameter wrapper has no DoRA, no dropout,
no bias term: other methods on experts are refused (merge them instead)."""

from __future__ import annotations

import numpy as np

from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.tree import Path, has_experts, matrix_leaf, path_str
from decomp_jax.errors import ConfigError
from decomp_jax.interop.peft.format import PREFIX, as_numpy

ROLES = ("gate_up_proj", "down_proj")  # inner, outer wrapper of one experts module


def split_experts(layers: dict, cfg: AdapterConfig) -> tuple[dict, dict]:
    """``(layers, expert layers)``: the adapted layers holding experts' kernels apart from the others."""
    experts = {p: layer for p, layer in layers.items() if has_experts(p, layer[matrix_leaf(layer)], cfg)}
    return {p: layer for p, layer in layers.items() if p not in experts}, experts


def check_expert_export(experts: dict, cfg: AdapterConfig) -> None:
    """Refuse, by setting, what PEFT's parameter wrapper cannot hold."""
    if not experts:
        return
    where = [path_str(p) for p in experts][:3]
    if cfg.method != "lora":
        raise ConfigError(f"The {cfg.method} adapter adapts experts' kernels {where}; PEFT adapts expert parameters with "
                          f"LoRA only (target_parameters). Merge the adapter instead (dj.merge / decomp-jax merge), or "
                          f"leave the experts out of `targets`.")
    if cfg.dropout > 0:
        raise ConfigError(f"adapter.dropout={cfg.dropout} on experts' kernels {where}: PEFT's LoRA on parameters "
                          f"(target_parameters) has no dropout, so its config could not say so. Export an adapter "
                          f"trained with dropout: 0, or merge it.")
    bad = [path_str(p) for p in experts if p[-1] not in ROLES]
    if bad:
        raise ConfigError(f"Experts' kernels {bad[:3]}: PEFT's format names the experts' parameters {ROLES}.")


def _module(spec, path: Path) -> str:
    return spec.torch_module(path).rpartition(".")[0]


def expert_tensors(experts: dict, spec) -> tuple[dict[str, np.ndarray], list[str]]:
    """``(tensors, target_parameters)`` of the adapted experts' LoRA factors in PEFT's layout."""
    tensors: dict[str, np.ndarray] = {}
    wrapped: dict[str, set] = {}
    for path in experts:
        wrapped.setdefault(_module(spec, path), set()).add(path[-1])
    for path, layer in experts.items():
        module = _module(spec, path)
        inner = path[-1] == ROLES[0] and len(wrapped[module]) == 2
        key = PREFIX + module + (".base_layer" if inner else "") + "."
        a, b = as_numpy(layer["lora_a"]), as_numpy(layer["lora_b"])  # (E, d_in, r), (E, r, d_out)
        tensors[key + "lora_A.weight"] = np.ascontiguousarray(np.transpose(a, (0, 2, 1)).reshape(-1, a.shape[1]))
        tensors[key + "lora_B.weight"] = np.ascontiguousarray(np.transpose(b, (2, 1, 0)).reshape(b.shape[2], -1))
    return tensors, sorted(spec.torch_module(p) for p in experts)


def expert_paths(paths: list, base_flat: dict) -> list:
    """The paths among ``paths`` that hold experts' kernels (a 3-D kernel under an ``experts`` module)."""
    probe = AdapterConfig()
    return [p for p in paths if p + ("kernel",) in base_flat and has_experts(p, base_flat[p + ("kernel",)], probe)]


def expected_expert_tensors(paths: list, base_flat: dict, spec) -> dict:
    """``{key: (flax leaf path, stored -> flax converter)}`` of the LoRA factors PEFT stores for the expert
    parameters at ``paths`` (see ``expert_factors``)."""
    wrapped: dict[str, set] = {}
    for path in paths:
        wrapped.setdefault(_module(spec, path), set()).add(path[-1])
    expected = {}
    for path in paths:
        module = _module(spec, path)
        experts = int(np.shape(base_flat[path + ("kernel",)])[0])
        key = PREFIX + module + (".base_layer" if path[-1] == ROLES[0] and len(wrapped[module]) == 2 else "") + "."

        def to_a(a, n=experts):
            return np.transpose(a.reshape(n, a.shape[0] // n, a.shape[1]), (0, 2, 1))

        def to_b(b, n=experts):
            return np.transpose(b.reshape(b.shape[0], b.shape[1] // n, n), (2, 1, 0))

        to_a.stored_shape = lambda s: (s[0] * s[2], s[1])  # (E, d_in, r) <- (E * r, d_in)
        to_b.stored_shape = lambda s: (s[2], s[0] * s[1])  # (E, r, d_out) <- (d_out, r * E)
        expected[key + "lora_A.weight"] = (path + ("lora_a",), to_a)
        expected[key + "lora_B.weight"] = (path + ("lora_b",), to_b)
    return expected
