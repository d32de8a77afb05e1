"""A quantized frozen base (QLoRA-style): kernels stored in 4 or 8 bits, dequantized inside each layer.

``quantize(x, kind, block_size)`` stores an array blockwise along its last axis (``block_size``
consecutive values share one absmax scale) as a ``QuantizedArray``, a pytree whose children are the
codes and the scales, so it goes through ``jit``, ``vmap`` and ``nn.scan`` (its shape follows the
children: a slice of a stacked kernel is the layer's quantized kernel):

- ``nf4``: the 16-value NormalFloat codebook of QLoRA (Dettmers et al. 2023), each value the nearest
  code of ``x / absmax``; two codes per byte. ``double_quant``: the block scales themselves stored
  in int8 (minus their group's mean, in groups of 256 as in QLoRA), 1 byte per block instead of 4.
- ``int8``: symmetric absmax int8 (``round(127 x / absmax)``).
- ``fp8``: ``x / absmax * 448`` in float8 e4m3 (its largest normal value is 448).
- ``q4_1``: llama.cpp's Q4_1, bit for bit: per block a float16 step ``d = (max - min) / 15`` and
  float16 ``min``, 4-bit codes ``q`` with ``x = d q + min``; blocks run along ``d_in`` (the rows of
  the ``(d_out, d_in)`` weight, as GGUF stores them), so the arrays are kept in that layout and the
  kernel is transposed back when dequantized. ``load_gguf(path, keep_quantized=True)`` keeps a GGUF
  file's Q4_1 blocks as they are (SmolLM2 ships as Q4_1: 0.625 bytes per parameter).

``quantize_params(params, kind, ...)`` replaces the frozen dense kernels of a parameter tree (not the
embedding tables, nor the leaves a regex ``skip`` matches, e.g. the trained head). Factored execution
(``dj.adapt``) dequantizes a quantized kernel in the layer that reads it, adapted or not; ``inject``
initialises factors from the dequantized kernel; ``merge`` returns a float model (every quantized
kernel dequantized, the adapter merged into the dequantized base). The adapter is relative to the
dequantized base, as PEFT's adapters over a bitsandbytes base are.
"""

from __future__ import annotations

import functools
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from decomp_jax.errors import ConfigError

KINDS = ("nf4", "int8", "fp8", "q4_1")
PACKED = ("nf4", "q4_1")  # two codes per byte
TRANSPOSED = ("q4_1",)  # blocks along d_in: stored as (..., d_out, d_in)

# QLoRA's NormalFloat-4 codebook (the published values: quantiles of N(0, 1) rescaled to [-1, 1], with an
# exact zero)
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
FP8_MAX = 448.0


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """An array stored blockwise-quantized along its last axis (``q4_1``: along the second-to-last, stored
    transposed; see the module docstring). ``shape``, ``dtype`` (of the dequantized array) and ``ndim`` are
    those of the array it stands for."""

    def __init__(self, codes, scales, kind: str, dtype, block_size: int, scale_offset=None, scale_scale=None,
                 mins=None):
        self.codes, self.scales = codes, scales
        self.scale_offset, self.scale_scale = scale_offset, scale_scale  # double quantization (nf4)
        self.mins = mins  # q4_1: each block's minimum
        self.kind, self.dtype, self.block_size = kind, jnp.dtype(dtype), block_size

    def tree_flatten(self):
        return ((self.codes, self.scales, self.scale_offset, self.scale_scale, self.mins),
                (self.kind, self.dtype.name, self.block_size))

    @classmethod
    def tree_unflatten(cls, aux, children):
        codes, scales, offset, scale, mins = children
        kind, dtype, block_size = aux
        return cls(codes, scales, kind, dtype, block_size, offset, scale, mins)

    def _stored_shape(self) -> tuple:
        """The shape of the quantized layout (``(..., d_out, d_in)`` for the transposed kinds)."""
        per_byte = 2 if self.kind in PACKED else 1
        return tuple(self.codes.shape[:-1]) + (self.codes.shape[-1] * per_byte,)

    @property
    def shape(self) -> tuple:
        stored = self._stored_shape()
        return stored[:-2] + stored[-2:][::-1] if self.kind in TRANSPOSED else stored

    def astype(self, dtype) -> "QuantizedArray":
        """The same codes and scales, dequantizing to ``dtype``."""
        children, (kind, _, block_size) = self.tree_flatten()
        return QuantizedArray.tree_unflatten((kind, jnp.dtype(dtype).name, block_size), children)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(sum(np.prod(c.shape) * jnp.dtype(c.dtype).itemsize
                       for c in (self.codes, self.scales, self.scale_offset, self.scale_scale, self.mins) if c is not None))

    def block_scales(self):
        """The absmax of each block, ``(..., n_blocks)`` float32 (decoded when double-quantized)."""
        if self.scale_scale is None:
            return self.scales.astype(jnp.float32)
        decoded = self.scales.astype(jnp.float32) * self.scale_scale + self.scale_offset
        stored = self._stored_shape()
        return decoded.reshape(stored[:-1] + (stored[-1] // self.block_size,))

    def dequantize(self):
        """The array in ``dtype``: codes decoded and multiplied by their block's scale."""
        stored = self._stored_shape()
        lead, n = stored[:-1], stored[-1]
        if self.kind == "nf4":
            hi, lo = self.codes >> 4, self.codes & 15
            idx = jnp.stack([hi, lo], axis=-1).reshape(stored)
            unit = jnp.asarray(NF4)[idx.astype(jnp.int32)]
        elif self.kind == "q4_1":  # per block: the low nibbles are its first half, the high ones its second
            half = self.codes.reshape(lead + (n // self.block_size, self.block_size // 2))
            unit = jnp.concatenate([half & 15, half >> 4], axis=-1).astype(jnp.float32)
        elif self.kind == "int8":
            unit = self.codes.astype(jnp.float32) / 127.0
        else:
            unit = self.codes.astype(jnp.float32) / FP8_MAX
        blocks = unit.reshape(lead + (n // self.block_size, self.block_size))
        values = blocks * self.block_scales()[..., None]
        if self.mins is not None:
            values = values + self.mins.astype(jnp.float32)[..., None]
        values = values.reshape(stored)
        if self.kind in TRANSPOSED:
            values = jnp.swapaxes(values, -1, -2)
        return values.astype(self.dtype)

    def __repr__(self):
        return f"QuantizedArray({self.kind}, shape={self.shape}, dtype={self.dtype.name}, block_size={self.block_size})"


SCALE_GROUP = 256


def _scale_groups(absmax):
    """The block scales of each matrix (the last two axes; leading axes are stacked layers) in groups of
    ``SCALE_GROUP`` consecutive scales, each group with its own offset and int8 step (one group per matrix
    when 256 does not divide its number of blocks): ``(..., groups, group)``."""
    lead = absmax.shape[:-2] if absmax.ndim >= 2 else ()
    n = int(np.prod(absmax.shape[len(lead):]))
    group = SCALE_GROUP if n % SCALE_GROUP == 0 else n
    return absmax.reshape(lead + (n // group, group))


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def dequantize(x):
    """``x`` itself, or its dequantized array when it is a ``QuantizedArray`` (one compiled program per
    layout, not op by op, when called outside a trace)."""
    return _dequantize(x) if isinstance(x, QuantizedArray) else x


_dequantize = jax.jit(QuantizedArray.dequantize)


def quantize(x, kind: str = "nf4", block_size: int = 64, double_quant: bool = True) -> QuantizedArray:
    """``x`` blockwise-quantized along its last axis (``block_size`` must divide it); ``q4_1`` along
    its second-to-last (``d_in`` of a kernel ``(..., d_in, d_out)``; llama.cpp uses blocks of 32)."""
    if kind not in KINDS:
        raise ConfigError(f"quantize: kind={kind!r} is unknown; choose one of {', '.join(KINDS)}.")
    shape, axis = tuple(np.shape(x)), -2 if kind in TRANSPOSED else -1
    if len(shape) < -axis or shape[axis] % block_size or (kind in PACKED and block_size % 2):
        where = "last axis" if axis == -1 else "second-to-last axis (d_in)"
        n = shape[axis] if len(shape) >= -axis else "it"
        raise ConfigError(f"quantize: an array of shape {shape} cannot be split into {kind} blocks of {block_size} "
                          f"along its {where}; choose an even block_size that divides {n} (e.g. 64, 32).")
    return _quantize(x, kind, block_size, double_quant)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x, kind: str, block_size: int, double_quant: bool) -> QuantizedArray:
    """``quantize`` once the arguments are checked: one compiled program per shape and setting."""
    shape, dtype = x.shape, x.dtype
    if kind == "q4_1":
        return _quantize_q4_1(jnp.swapaxes(x.astype(jnp.float32), -1, -2), dtype, block_size)
    blocks = x.astype(jnp.float32).reshape(shape[:-1] + (shape[-1] // block_size, block_size))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    unit = (blocks / safe[..., None]).reshape(shape)
    if kind == "nf4":
        bounds = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)  # midpoints: the nearest code
        idx = jnp.searchsorted(bounds, unit, side="left").astype(jnp.uint8)
        pairs = idx.reshape(shape[:-1] + (shape[-1] // 2, 2))
        codes = (pairs[..., 0] << 4) | pairs[..., 1]
    elif kind == "int8":
        codes = jnp.round(unit * 127.0).astype(jnp.int8)
    else:
        codes = (unit * FP8_MAX).astype(jnp.float8_e4m3fn)
    if kind == "nf4" and double_quant:
        groups = _scale_groups(absmax)
        offset = jnp.mean(groups, axis=-1, keepdims=True)
        centred = groups - offset
        scale = jnp.maximum(jnp.max(jnp.abs(centred), axis=-1, keepdims=True), 1e-12) / 127.0
        return QuantizedArray(codes, jnp.round(centred / scale).astype(jnp.int8), kind, dtype, block_size,
                              offset, scale)
    return QuantizedArray(codes, absmax, kind, dtype, block_size)


def _quantize_q4_1(rows, dtype, block_size: int) -> QuantizedArray:
    """Q4_1 of ``rows`` (``(..., d_out, d_in)``) as llama.cpp rounds it: the step and minimum in float32
    for the codes, stored in float16."""
    shape = rows.shape
    blocks = rows.reshape(shape[:-1] + (shape[-1] // block_size, block_size))
    lo, hi = jnp.min(blocks, axis=-1), jnp.max(blocks, axis=-1)
    step = (hi - lo) / 15
    inverse = jnp.where(step == 0, 0.0, 1.0 / jnp.where(step == 0, 1.0, step))
    q = jnp.clip(jnp.trunc((blocks - lo[..., None]) * inverse[..., None] + 0.5), 0, 15).astype(jnp.uint8)
    half = block_size // 2
    codes = (q[..., :half] | (q[..., half:] << 4)).reshape(shape[:-1] + (shape[-1] // 2,))
    return QuantizedArray(codes, step.astype(jnp.float16), "q4_1", dtype, block_size, mins=lo.astype(jnp.float16))


def quantize_params(params, kind: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
                    skip: Optional[str] = None):
    """``params`` with every dense ``kernel`` (2-D, or 3-D stacked) quantized, except those whose
    '/'-joined path ``skip`` matches (the leaves that train: a head in ``train_extra``) and those whose
    blocked axis ``block_size`` does not divide (kept in float)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(params)
    pattern = re.compile(skip) if skip else None
    out = {}
    for path, value in flat.items():
        where = "/".join(map(str, path))
        if (path[-1] == "kernel" and np.ndim(value) >= 2 and not is_quantized(value)
                and not (pattern and pattern.search(where))
                and np.shape(value)[-2 if kind in TRANSPOSED else -1] % block_size == 0):
            out[path] = quantize(value, kind, block_size, double_quant)
        else:
            out[path] = value
    return unflatten_dict(out)


def default_block_size(kind: str) -> int:
    """64 values per block (QLoRA's), 32 for ``q4_1`` (llama.cpp's)."""
    return 32 if kind == "q4_1" else 64


def dequantize_params(params):
    """Every ``QuantizedArray`` of ``params`` dequantized: a plain float tree."""
    return jax.tree.map(dequantize, params, is_leaf=is_quantized)


def stored_bytes(params) -> int:
    """Bytes the leaves of ``params`` occupy (a quantized kernel: its codes and scales)."""
    return int(sum(x.nbytes if is_quantized(x) else np.prod(np.shape(x)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized)))
