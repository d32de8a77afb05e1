"""Configuration dataclasses: validated on construction, round-trip through plain dicts and YAML."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from collections.abc import Mapping as AbcMapping
from typing import Any, Mapping, Optional

import numpy as np
import yaml

from decomp_jax.core.methods import base
from decomp_jax.errors import ConfigError, ConfigTypeError, closest

MPC_KINDS = (None, "mpc_o", "mpc_d")
MPC_NORMS = ("squared", "plain")
LORA_INITS = ("kaiming", "normal", "gaussian")
FACTOR_DTYPES = ("float32", "bfloat16", "float16")


def _check_keys(cls, data: Mapping[str, Any], where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise ConfigError(
                f"Unknown key {key!r} in {where}.{closest(key, known)} "
                f"Valid keys: {', '.join(known)}."
            )


def _compile(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{field}={pattern!r} is not a valid regular expression ({err}).") from err


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _string_hint(value: Any, field: str, kind=float) -> str:
    """`` Write mpc_lambda=0.0005, not the string '5e-4'.`` for a number given as a string."""
    if isinstance(value, str):
        try:
            return f" Write {field}={kind(value)!r}, not the string {value!r}."
        except ValueError:
            pass
    return ""


def _real(value: Any, field: str, example: str) -> float:
    """A finite real number (not a bool), as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(
            f"{field} must be a number, e.g. {field}={example}; {_got(value)}.{_string_hint(value, field)}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, e.g. {field}={example}; got {value!r}.")
    return value


def _integer(value: Any, field: str, example: str) -> int:
    """An integer (not a bool), as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        whole = isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()
        fix = f" Write {field}={int(value)}." if whole else _string_hint(value, field, int)
        raise ConfigTypeError(f"{field} must be an integer, e.g. {field}={example}; {_got(value)}.{fix}")
    return int(value)


def _boolean(value: Any, field: str) -> bool:
    if isinstance(value, np.bool_):
        value = bool(value)
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{field} must be True or False; {_got(value)}.")
    return value


def _string(value: Any, field: str, choices, optional: bool = False) -> None:
    if not isinstance(value, str) and not (optional and value is None):
        none = "None or " if optional else ""
        raise ConfigTypeError(f"{field} must be {none}a string, one of {tuple(choices)}; {_got(value)}.")


def _regex(value: Any, field: str, example: str, meaning: str, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        none = " (or None)" if optional else ""
        raise ConfigTypeError(
            f"{field} must be a regular expression string{none} {meaning}, e.g. {field}={example}; {_got(value)}."
        )
    _compile(value, field)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert YAML scalars to a field's type: ``"5e-4"`` (YAML 1.1 reads it as a string) -> 5e-4."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    try:
        if hint is float and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, str):
            return int(value)
        if hint is int and isinstance(value, float) and value.is_integer():
            return int(value)
    except ValueError:
        raise ConfigTypeError(f"{where} must be of type {hint.__name__}, got {value!r}.") from None
    is_bool_for_number = isinstance(value, bool) and hint is not bool
    if hint in (int, float, bool, str) and (not isinstance(value, hint) or is_bool_for_number):
        raise ConfigTypeError(f"{where} must be of type {hint.__name__}, got {value!r}.")
    return value


class Serializable:
    """Dict and YAML round trip shared by the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: Optional[str] = None):
        where = where or cls.__name__
        if data is not None and not isinstance(data, AbcMapping):
            raise ConfigTypeError(
                f"{where} must be a mapping of keys to values (key: value lines in YAML), with keys among "
                f"{', '.join(f.name for f in dataclasses.fields(cls))}; {_got(data)}."
            )
        data = dict(data or {})
        _check_keys(cls, data, where)
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"The {cls.__name__} text is not valid YAML: {err}") from err
        return cls.from_dict(data or {})

    def replace(self, **changes):
        _check_keys(type(self), changes, f"{type(self).__name__}.replace()")
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    """An integer (NumPy's too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class AdapterConfig(Serializable):
    """What to adapt and how.

    - ``method``: a name from ``decomp_jax.core.methods.names()``.
    - ``targets``: regex searched in the '/'-joined path of each dense layer (the path of the dict that
      holds ``kernel``), e.g. ``r"attention/self/(query|value)$"``.
    - ``rank``, ``alpha``: low-rank size ``r`` and scale numerator; ``s = alpha / r`` (``alpha / sqrt(r)``
      with rslora).
    - ``dropout``: dropout on the adapter path's input (factored execution, training only).
    - ``init``: ``lora_a`` init for LoRA-type methods: kaiming | normal | gaussian.
    - ``mpc``: matrix pattern constraint on ``lora_a``/``lora_b``: None | mpc_o | mpc_d.
    - ``mpc_lambda``: weight of the MPC term; ``mpc_norm``: squared (paper) | plain (toolkit).
    - ``train_extra``: regex over '/'-joined leaf paths of base leaves that also train (a new head, say).
    - ``scale_bias``: IA3 only: scale the bias too, ``y = (x@K + b) * scale_out`` (HF PEFT's IA3).
    - ``transposed``: regex of layer paths whose kernels are stored ``(d_out, d_in)`` (GPT-2's Conv1D:
      ``(c_attn|c_proj|c_fc)$``); the methods see them transposed, factors keep their shapes.
    - ``options``: method-specific options, validated by the method.
    - ``rank_pattern``, ``alpha_pattern``: per-layer rank and alpha, ``{layer path regex: value}`` (PEFT's
      options of the same names): a layer whose '/'-joined path the first matching regex (in order) finds
      gets that rank / alpha, the others ``rank`` / ``alpha``. ``for_layer(path)`` is the config a layer's
      method functions see. On stacked (scanned) layers a pattern matches the stacked path, one value for
      the whole stack.
    - ``trainable_tokens``: ``{embedding path regex: [token ids]}``: those rows of each matching embedding
      table (an ``nn.Embed``'s ``embedding``) train, the others stay frozen (PEFT's
      ``trainable_token_indices``: new special tokens, say). The rows are a leaf ``trainable_tokens_delta``
      (n, features) beside the table, started at the rows' values and written over them in the table (a
      tied LM head reads them too). Any method beside it, on other layers.
    - ``stacked``: the name of a scanned module (a path component; default ``layers``, as ``nn.scan``'d
      decoders name it in our Llama with ``scan_layers`` and in MaxText): a targeted layer under it whose
      kernel is 3-D is stacked ``(L, d_in, d_out)``; its factors get the same leading axis and layer
      ``i``'s equal those of the unrolled layer at ``.../layers_{i}/...``. None: no stacked layers (a 3-D
      kernel is then an error).
    - ``experts``: the name of the module holding a mixture's stacked expert kernels (a path component;
      default ``experts``, as our MoE decoders and transformers 5 name it): a targeted layer under it
      whose kernel has one more axis is ``E`` experts ``(E, d_in, d_out)`` (``(L, E, d_in, d_out)`` when
      also stacked); each expert gets its own factors (leading axis ``E``), initialised with its own key,
      and factored execution runs the method per expert. None: no expert layers.
    - ``factor_dtype``: dtype of the factor leaves (and so of their optimizer moments), whatever the base
      kernel's dtype: ``float32`` (default) | ``bfloat16`` | ``float16``. Factored execution computes in
      the layer's activation dtype (the Dense ``dtype``), casting the factors to it.
    - ``kernel_in_axes``: for kernels that are not matrices (``nn.DenseGeneral`` projections such as
      ``(embed, heads, head_dim)`` or ``(heads, head_dim, embed)``, ``nn.Einsum`` kernels):
      ``{layer path regex: n or [axes]}``: the first ``n`` axes (after a stacked layer axis), or the
      listed axes, are inputs (contracted with x); the others are outputs. The methods see the matrix
      ``(prod(input axes), prod(output axes))`` (axes in the kernel's order); factors are made for it and
      merged back in the kernel's layout. E.g. ``{"(query|key|value)$": 1, "out$": 2}``; an Einsum
      ``"BTD,NDH->BTNH"`` kernel: ``[1]``.
    - ``kernel_leaf``: ``{layer path regex: parameter name}``: layers of other people's models that hold
      their matrix under another name than ``kernel`` (tunix's and Gemma's ``Einsum`` modules: ``w``);
      ``decomp_jax.nnx`` adapts them (an einsum module's input axes come from its equation).

    Prompt methods (``prompt_tuning``, ``prefix_tuning``; ``decomp_jax.core.prompts``) add one subtree
    ``params[method]`` to our Llama's params: ``targets``, ``rank``, ``alpha``, ``init`` and
    ``transposed`` do not apply to them and are ignored; their settings are ``options``.
    """

    method: str = "lora"
    targets: str = r"attention/self/(query|value)$"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    mpc: Optional[str] = None
    mpc_lambda: float = 0.1
    mpc_norm: str = "squared"
    train_extra: Optional[str] = None
    scale_bias: bool = False
    transposed: Optional[str] = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    stacked: Optional[str] = "layers"
    experts: Optional[str] = "experts"
    factor_dtype: str = "float32"
    kernel_in_axes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    kernel_leaf: Mapping[str, str] = dataclasses.field(default_factory=dict)
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    trainable_tokens: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.method, str):
            raise ConfigTypeError(
                f"method must be a string naming a method, e.g. method='lora'; {_got(self.method)}. "
                f"Known methods: {', '.join(base.names(None))}."
            )
        method = base.get(self.method)  # raises a clear error for unknown names
        self._check_layout()
        self._check_scalars(method)
        self._check_options(method)
        self._check_patterns(method)
        self._check_tokens(method)

    def _check_layout(self) -> None:
        """The path regexes, ``stacked`` and ``kernel_in_axes``."""
        _regex(self.targets, "targets", r"'attention/self/(query|value)$'",
               "searched in each dense layer's '/'-joined path", optional=False)
        _regex(self.train_extra, "train_extra", "'^classifier/'",
               "searched in each leaf's '/'-joined path", optional=True)
        _regex(self.transposed, "transposed", "'(c_attn|c_proj|c_fc)$'",
               "searched in each layer's '/'-joined path", optional=True)
        for key, example, what in (("stacked", "layers", "scanned module"), ("experts", "experts", "experts' module")):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value or "/" in value):
                raise ConfigTypeError(f"{key} must be None or the name of the {what}, one path component such as "
                                      f"{example!r}; {_got(value)}.")
        self._own_mapping("kernel_in_axes", "input axis counts", "{'(query|key|value)$': 1, 'out$': 2}")
        for regex, n in self.kernel_in_axes.items():
            _regex(regex, "a kernel_in_axes key", "'(query|key|value)$'", "searched in each layer's '/'-joined path",
                   optional=False)
            if isinstance(n, (list, tuple)) and n and all(_is_int(a) and a >= 0 for a in n) and len(set(n)) == len(n):
                self.kernel_in_axes[regex] = [int(a) for a in n]
            elif _is_int(n) and n >= 1:
                self.kernel_in_axes[regex] = int(n)
            else:
                raise ConfigError(f"kernel_in_axes[{regex!r}] must be a positive integer (the kernel's first n axes are "
                                  f"inputs) or a list of distinct axis indices (the input axes); got {n!r}.")
        self._own_mapping("kernel_leaf", "parameter names", "{'attn/(q|k|v|o)_proj$': 'w'}")
        for regex, leaf in self.kernel_leaf.items():
            _regex(regex, "a kernel_leaf key", "'attn/(q|k|v|o)_proj$'", "searched in each layer's '/'-joined path",
                   optional=False)
            if not isinstance(leaf, str) or not leaf.isidentifier():
                raise ConfigError(f"kernel_leaf[{regex!r}] must name the parameter that holds the layer's matrix "
                                  f"(e.g. 'w'); got {leaf!r}.")

    def _check_scalars(self, method) -> None:
        """``factor_dtype``, rank, alpha, dropout, init and the MPC settings (numbers become Python scalars)."""
        _string(self.factor_dtype, "factor_dtype", FACTOR_DTYPES)
        if self.factor_dtype not in FACTOR_DTYPES:
            raise ConfigError(
                f"factor_dtype={self.factor_dtype!r} is unknown.{closest(self.factor_dtype, FACTOR_DTYPES)} "
                f"Choose one of {FACTOR_DTYPES}."
            )
        checked = {
            "rank": _integer(self.rank, "rank", "8"),
            "alpha": _real(self.alpha, "alpha", "16.0"),
            "dropout": _real(self.dropout, "dropout", "0.1"),
            "mpc_lambda": _real(self.mpc_lambda, "mpc_lambda", "0.1"),
            "rslora": _boolean(self.rslora, "rslora"),
            "scale_bias": _boolean(self.scale_bias, "scale_bias"),
        }
        for name, value in checked.items():  # numpy scalars become Python ones (they dump to YAML)
            object.__setattr__(self, name, value)
        if self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, e.g. rank=8; got {self.rank!r}.")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be a finite number > 0, e.g. alpha=16.0; got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), e.g. dropout=0.1; got {self.dropout!r}.")
        _string(self.init, "init", LORA_INITS)
        if self.init not in LORA_INITS:
            raise ConfigError(f"init={self.init!r} is unknown.{closest(self.init, LORA_INITS)} Choose one of {LORA_INITS}.")
        _string(self.mpc, "mpc", MPC_KINDS[1:], optional=True)
        if self.mpc not in MPC_KINDS:
            raise ConfigError(f"mpc={self.mpc!r} is unknown.{closest(self.mpc, MPC_KINDS[1:])} Choose None, 'mpc_o' or 'mpc_d'.")
        _string(self.mpc_norm, "mpc_norm", MPC_NORMS)
        if self.mpc_norm not in MPC_NORMS:
            raise ConfigError(f"mpc_norm={self.mpc_norm!r} is unknown. Choose 'squared' or 'plain'.")
        if self.mpc is not None and not {"lora_a", "lora_b"} <= set(method.factor_names):
            with_ab = [m.name for m in base.registry().values() if {"lora_a", "lora_b"} <= set(m.factor_names)]
            raise ConfigError(
                f"mpc={self.mpc!r} constrains lora_a/lora_b factors, which method {self.method!r} does not have. "
                f"Use it with one of {with_ab}, or set mpc: null."
            )
        if self.mpc_lambda < 0:
            raise ConfigError(f"mpc_lambda must be >= 0, e.g. mpc_lambda=0.1; got {self.mpc_lambda!r}.")
        if self.scale_bias and self.method != "ia3":
            raise ConfigError(f"scale_bias applies to method 'ia3' only, not {self.method!r}; remove it.")

    def _check_options(self, method) -> None:
        """``options``: a mapping of the method's options, then the method's own ``validate``."""
        accepts = sorted(method.options) or "none"
        if self.options is not None and not isinstance(self.options, AbcMapping):
            raise ConfigTypeError(
                f"options must be a mapping (a dict) of method options, e.g. options={dict(method.options)!r}; "
                f"{_got(self.options)}. Method {self.method!r} accepts {accepts}."
            )
        object.__setattr__(self, "options", dict(self.options or {}))
        unknown = set(self.options) - set(method.options)
        if unknown:
            raise ConfigError(
                f"Unknown option(s) {sorted(unknown, key=str)} for method {self.method!r}; it accepts {accepts}."
            )
        if method.validate is not None:
            method.validate(self)

    def _check_tokens(self, method) -> None:
        if not isinstance(self.trainable_tokens, AbcMapping):
            raise ConfigTypeError(f"trainable_tokens must be a mapping of embedding path regexes to lists of token ids, "
                                  f"e.g. {{'embed_tokens$': [49152, 49153]}}; {_got(self.trainable_tokens)}.")
        checked = {}
        for regex, ids in self.trainable_tokens.items():
            _regex(regex, "a trainable_tokens key", "'embed_tokens$'", "searched in each embedding's '/'-joined path",
                   optional=False)
            if (not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(i) and i >= 0 for i in ids)
                    or len(set(ids)) != len(ids)):
                raise ConfigError(f"trainable_tokens[{regex!r}] must be a non-empty list of distinct token ids (integers "
                                  f">= 0), e.g. [49152, 49153]; got {ids!r}.")
            checked[regex] = [int(i) for i in ids]
        if checked and method.kind == "prompt":
            raise ConfigError(f"trainable_tokens with the prompt method {self.method!r} is not supported: its virtual "
                              f"tokens are its own trainable embeddings. Remove trainable_tokens.")
        object.__setattr__(self, "trainable_tokens", checked)

    def token_ids(self, where: str) -> Optional[list]:
        """The trainable token ids of the embedding at ``where`` (first matching ``trainable_tokens`` regex)."""
        return next((ids for regex, ids in self.trainable_tokens.items() if re.search(regex, where)), None)

    def _check_patterns(self, method) -> None:
        for name, kind in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
            pattern = getattr(self, name)
            if not isinstance(pattern, AbcMapping):
                raise ConfigTypeError(f"{name} must be a mapping of layer path regexes to {kind}s, e.g. "
                                      f"{{'attention/self/value$': 16}}; {_got(pattern)}.")
            checked = {}
            for regex, value in pattern.items():
                _regex(regex, f"a {name} key", "'attention/self/value$'", "searched in each layer's '/'-joined path",
                       optional=False)
                number = _integer(value, f"{name}[{regex!r}]", "16") if kind == "rank" else _real(
                    value, f"{name}[{regex!r}]", "32.0")
                if number <= 0:
                    raise ConfigError(f"{name}[{regex!r}] must be > 0; got {value!r}.")
                checked[regex] = number
            object.__setattr__(self, name, checked)
        if (self.rank_pattern or self.alpha_pattern) and not method.uses_rank:
            raise ConfigError(f"rank_pattern / alpha_pattern set a per-layer rank and alpha; method {self.method!r} has "
                              f"no rank. Remove them.")
        if (self.rank_pattern or self.alpha_pattern) and method.schedule is not None:
            raise ConfigError(f"rank_pattern / alpha_pattern with {self.method!r}, whose schedule budgets ranks over all "
                              f"layers, is not supported; use one rank (its schedule moves the ranks).")

    def _own_mapping(self, key: str, values: str, example: str) -> None:
        """Field ``key`` as a dict of its own (a mapping of layer path regexes to ``values``), else a type error."""
        value = getattr(self, key)
        if not isinstance(value, AbcMapping):
            raise ConfigTypeError(f"{key} must be a mapping of layer path regexes to {values}, e.g. {example}; "
                                  f"{_got(value)}.")
        object.__setattr__(self, key, dict(value))

    def for_layer(self, where: str) -> "AdapterConfig":
        """The config a layer's method functions see: ``rank`` and ``alpha`` from the first matching
        ``rank_pattern`` / ``alpha_pattern`` regex (searched in ``where``, the '/'-joined layer path),
        and the method's per-layer options (``Method.layer_options``)."""
        layer_options = base.get(self.method).layer_options
        if not self.rank_pattern and not self.alpha_pattern and layer_options is None:
            return self
        cache = self.__dict__.setdefault("_layer_cache", {})
        if where not in cache:
            pick = lambda pattern, default: next(  # noqa: E731
                (v for regex, v in pattern.items() if re.search(regex, where)), default)
            options = {**self.options, **(layer_options(self, where) if layer_options else {})}
            cache[where] = dataclasses.replace(self, rank=pick(self.rank_pattern, self.rank),
                                               alpha=pick(self.alpha_pattern, self.alpha), rank_pattern={},
                                               alpha_pattern={}, options=options)
        return cache[where]

    @property
    def scale(self) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with rslora."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def option(self, name: str):
        """A method option, falling back to the method's declared default."""
        declared = base.get(self.method).options
        if name not in declared:
            raise ConfigError(f"Method {self.method!r} has no option {name!r}; it has {sorted(declared) or 'none'}.")
        return self.options.get(name, declared[name])
