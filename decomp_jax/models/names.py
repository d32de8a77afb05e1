"""Our models' params by their PyTorch names: per architecture (``ARCHS``: bert, roberta, gpt2, llama)
how a Flax leaf path maps to the PyTorch parameter name and layout, the PyTorch ``state_dict`` of a
param tree (``torch_state_dict``), and the config.json of a classifier. The PEFT format and the
checkpoint loaders read these tables."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from typing import Mapping, Optional

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from decomp_jax.errors import ConfigError, PeftFormatError

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Arch:
    """How one architecture's Flax params are named and laid out in its PyTorch model.

    - ``to_torch`` / ``from_torch``: ``(pattern, replacement)`` regex substitutions applied in order to
      the '.'-joined Flax module path (resp. to the PyTorch module name) where the two differ; the HF
      BERT/RoBERTa/GPT-2/Llama Flax ports use the PyTorch names, so these are usually empty.
    - ``leaf_names``: Flax leaf name -> PyTorch parameter name.
    - ``transposed``: Flax leaves stored transposed in PyTorch (``kernel``: true of both ``nn.Linear``
      and GPT-2's ``Conv1D``, since HF's Flax ``Conv1D`` keeps its kernel as ``(d_out, d_in)``).
    - ``conv1d``: regex over '/'-joined Flax module paths whose PyTorch layer is a ``Conv1D`` (weight
      ``(d_in, d_out)``, GPT-2): PEFT then needs ``fan_in_fan_out: true``; its LoRA factors keep the
      ``nn.Linear`` shapes.
    - ``task_type`` / ``head_modules``: PEFT's task type for the sequence classifier, and the module
      names its task wrapper adds to ``modules_to_save`` (they are saved whole, trained or not).
    - ``embedding`` / ``lm_head``: for causal LMs, the Flax module path of the input embedding and the
      PyTorch name of the output layer; when the params hold no ``lm_head`` the head is tied to the
      embedding (one matrix) and the PEFT format needs both names (see ``_tied_embedding``).
    """

    name: str
    task_type: str = "SEQ_CLS"
    head_modules: tuple[str, ...] = ("classifier", "score")
    to_torch: tuple[tuple[str, str], ...] = ()
    from_torch: tuple[tuple[str, str], ...] = ()
    leaf_names: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
    )
    transposed: tuple[str, ...] = ("kernel",)
    conv1d: Optional[str] = None
    embedding: Optional[Path] = None
    lm_head: str = "lm_head"

    def torch_module(self, path: Path) -> str:
        name = ".".join(path)
        for pattern, repl in self.to_torch:
            name = re.sub(pattern, repl, name)
        return name

    def is_conv1d(self, path: Path) -> bool:
        return bool(self.conv1d and re.search(self.conv1d, '/'.join(map(str, path))))

    def torch_leaf(self, path: Path) -> tuple[str, bool]:
        """``(PyTorch parameter name, transpose?)`` of the Flax leaf at ``path``."""
        *module, leaf = path
        if leaf not in self.leaf_names:
            raise PeftFormatError(f"No PyTorch name for the Flax leaf {'/'.join(map(str, path))!r} in arch {self.name!r}.")
        return f"{self.torch_module(tuple(module))}.{self.leaf_names[leaf]}", leaf in self.transposed


# GPT-2 (GPT2LMHeadModel, tied head) and Llama (decomp_jax.models.llama.LlamaForCausalLM, whose Flax
# paths are the PyTorch names with layers.N written layers_N) are causal LMs: no task head.
ARCHS: dict[str, Arch] = {
    "bert": Arch("bert"),
    "roberta": Arch("roberta"),
    # (with a score head: GPT2ForSequenceClassification, decomp_jax.models.gpt2: PEFT's SEQ_CLS)
    "gpt2": Arch("gpt2", task_type="CAUSAL_LM", head_modules=("classifier", "score"), conv1d=r"(c_attn|c_proj|c_fc)$",
                 embedding=("transformer", "wte")),
    # (a Llama with a ``score`` head is LlamaForSequenceClassification: PEFT's SEQ_CLS)
    "llama": Arch(
        "llama", task_type="CAUSAL_LM", head_modules=("classifier", "score"), embedding=("model", "embed_tokens"),
        to_torch=((r"(^|\.)layers_(\d+)(?=\.|$)", r"\1layers.\2"),),
        from_torch=((r"(^|\.)layers\.(\d+)(?=\.|$)", r"\1layers_\2"),),
        leaf_names={"kernel": "weight", "bias": "bias", "weight": "weight", "embedding": "weight"},
    ),
}
"""The architectures whose params map to PyTorch names for the PEFT format, by name (bert, roberta,
gpt2, llama), each one's ``Arch``; ``get_arch`` looks a name up."""


def get_arch(arch: str) -> Arch:
    """The ``Arch`` (PyTorch names and layouts of our params) of ``arch``, a key of ``ARCHS``; any other
    name raises ``ConfigError`` listing the supported ones."""
    if arch not in ARCHS:
        raise ConfigError(f"arch={arch!r} is not supported for the PEFT format; choose one of {sorted(ARCHS)}.")
    return ARCHS[arch]


def encoder_arch(config) -> str:
    """The ``models.names.ARCHS`` key whose names an encoder config's params use (XLM-RoBERTa and
    CamemBERT name their params as RoBERTa)."""
    model_type = getattr(config, "model_type", "bert")
    return "roberta" if model_type in ROBERTA_TYPES else model_type


def save_classifier_config(config, folder) -> None:
    """``config.json`` of a sequence classifier, naming the PyTorch class that reads its weights."""
    config = copy.deepcopy(config)
    config.architectures = [{"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
                             "xlm-roberta": "XLMRobertaForSequenceClassification",
                             "camembert": "CamembertForSequenceClassification",
                             "gpt2": "GPT2ForSequenceClassification"}.get(config.model_type, "AutoModel")]
    config.save_pretrained(folder)


def torch_state_dict(params, arch: str) -> dict:
    """The PyTorch ``state_dict`` of our Flax params: names and layouts from the architecture's
    table in ``models.names.ARCHS`` (kernels transposed, ``scale``/``embedding`` -> ``weight``)."""
    spec = get_arch(arch)
    out = {}
    for path, value in flatten_dict(jax.device_get(params)).items():
        name, transpose = spec.torch_leaf(path)
        value = np.asarray(value)
        if transpose and value.ndim != 2:
            raise ConfigError(f"{'/'.join(path)}: a {value.ndim}-D kernel has no PyTorch Linear layout.")
        out[name] = np.ascontiguousarray(value.T if transpose else value)
    return out


ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")


def read_torch_weights(folder: str) -> dict:
    """``{PyTorch name: numpy array}`` from ``folder``'s ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json``."""
    import json

    from safetensors.numpy import load_file

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(load_file(os.path.join(folder, shard)))
        return out
    raise FileNotFoundError(f"{folder} holds no model.safetensors, model.safetensors.index.json nor "
                            f"flax_model.msgpack; save the model with save_pretrained (safetensors) first.")
