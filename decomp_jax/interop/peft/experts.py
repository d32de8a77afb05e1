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

import re

import numpy as np

from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.tree import Path, has_experts, matrix_leaf, path_str
from decomp_jax.errors import ConfigError
from decomp_jax.interop.peft.format import PREFIX, PeftFormatError, as_numpy, peft_pattern_value

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


# --- adapters saved on transformers 4's per-expert modules -----------------------------------------------

_PER_EXPERT = re.compile(r"^(?P<layer>.*\.layers\.\d+)\.(block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\."
                         r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.lora_(?P<ab>[AB])\.weight$")
_PARTS = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "gate_proj": ("gate_up_proj", 0),
          "up_proj": ("gate_up_proj", 1), "w2": ("down_proj", 0), "down_proj": ("down_proj", 0)}


def _scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of the LoRA on ``module`` (stored at ``rank``): ``alpha / r``, ``alpha / sqrt(r)`` (rsLoRA)."""
    alpha = peft_pattern_value(config.get("alpha_pattern") or {}, module)
    alpha = float(config["lora_alpha"] if alpha is None else alpha)
    return alpha / (np.sqrt(rank) if config.get("use_rslora") else rank)


def stack_per_expert(config: dict, stored: dict, experts: dict) -> tuple[dict, dict]:
    """``(config, stored)`` of a LoRA adapter saved on transformers 4's per-expert ``nn.Linear`` modules
    (Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen-MoE's ``mlp.experts.{e}.gate/up/down_proj``)
    rewritten as PEFT writes LoRA on transformers 5's stacked expert parameters (``target_parameters``).
    ``experts``: ``{torch module name of a stacked parameter: number of experts}`` of the base model.

    Expert ``e``'s gate and up LoRAs join on the fused ``gate_up_proj``: their ``A`` rows stacked (rank
    ``r_gate + r_up``), their ``B`` block-diagonal; a part not saved (an expert, or the up projection) adds
    zeros, so the fused update equals the per-module ones exactly. Each block of ``B`` is rescaled to the
    fused module's scaling, given in ``rank_pattern`` / ``alpha_pattern``. Other keys pass unchanged (a
    Mixtral router's ``block_sparse_moe`` written ``mlp``)."""
    parts: dict[str, dict] = {}  # stacked module -> {(expert, part): {"A": .., "B": .., "scale": ..}}
    rest = {}
    for key, value in stored.items():
        m = _PER_EXPERT.match(key.removeprefix(PREFIX))
        if m is None:
            rest[key.replace(".block_sparse_moe.", ".mlp.")] = value
            continue
        target, part = _PARTS[m["proj"]]
        entry = parts.setdefault(f"{m['layer']}.mlp.experts.{target}", {}).setdefault((int(m["e"]), part), {})
        entry[m["ab"]] = as_numpy(value)
        rank = entry[m["ab"]].shape[0 if m["ab"] == "A" else 1]
        entry["scale"] = _scale(config, key.removeprefix(PREFIX).rsplit(".lora_", 1)[0], rank)
    if not parts:
        return config, stored
    unknown = sorted(set(parts) - set(experts))
    if unknown:
        raise PeftFormatError(f"The adapter has per-expert LoRA tensors for {unknown[:3]}, which the base model does not "
                              f"hold as stacked experts (it has {sorted(experts)[:3]}): is it the adapter's base model?")
    ranks, alphas = {}, {}
    adapted_down = {m.rpartition(".")[0] for m in parts if m.endswith(ROLES[1])}
    for module, blocks in sorted(parts.items()):
        missing = [f"expert {e}: lora_{'A' if 'A' not in entry else 'B'}" for (e, _), entry in sorted(blocks.items())
                   if "A" not in entry or "B" not in entry]
        if missing:
            raise PeftFormatError(f"{module}: the adapter lacks {missing[:3]}.")
        fused = module.endswith(ROLES[0])
        halves = sorted({p for _, p in blocks})
        rank_of = {p: max(entry["A"].shape[0] for (_, q), entry in blocks.items() if q == p) for p in halves}
        first = next(iter(blocks.values()))
        rank, scale, d_in, d_out = sum(rank_of.values()), first["scale"], first["A"].shape[1], first["B"].shape[0]
        a = np.zeros((experts[module], rank, d_in), np.float32)
        b = np.zeros((experts[module], d_out * (2 if fused else 1), rank), np.float32)
        for (e, p), entry in blocks.items():
            r0, r = sum(rank_of[q] for q in halves if q < p), entry["A"].shape[0]
            a[e, r0:r0 + r] = entry["A"]
            b[e, p * d_out:(p + 1) * d_out, r0:r0 + r] = entry["B"] * (entry["scale"] / scale)
        owner = module.rpartition(".")[0]
        stem = PREFIX + owner + (".base_layer" if fused and owner in adapted_down else "")
        rest[stem + ".lora_A.weight"] = a.reshape(-1, d_in)  # (E * r, d_in), expert-major
        rest[stem + ".lora_B.weight"] = np.ascontiguousarray(np.transpose(b, (1, 2, 0)).reshape(b.shape[1], -1))
        ranks[re.escape(module)] = rank
        alphas[re.escape(module)] = scale * (np.sqrt(rank) if config.get("use_rslora") else rank)
    config = {**config, "rank_pattern": {**ranks, **(config.get("rank_pattern") or {})},
              "alpha_pattern": {**alphas, **(config.get("alpha_pattern") or {})},
              "target_parameters": sorted(set(config.get("target_parameters") or []) | set(parts))}
    return config, rest
