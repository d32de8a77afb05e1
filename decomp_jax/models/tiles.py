"""Tiles: a position-wise computation run a tile of rows (or positions) at a time, so that its backward pass
holds one tile's intermediates instead of every row's.

``in_row_tiles(module, fn, rows, tile)`` runs ``fn(module, *row_tiles)`` under ``nn.scan`` + ``nn.remat``
with the module's parameters broadcast (they keep their names and shapes): the forward pass keeps no
intermediates of ``fn``, and the backward pass recomputes them one tile at a time. ``in_position_tiles``
does the same over the positions of a batch ``(B, L, ...)``, each tile holding some positions of every
row: a batch split over devices stays split (tiles of flattened rows would each live on one device, and
XLA gathers them). They serve the decoders' MLP (``LlamaConfig.mlp_chunk``: long rows, whose ``(tokens,
intermediate_size)`` activations outgrow everything else in a layer) and the per-token loss
(``ScoredHead``'s ``chunk``: ``(tokens, vocab)`` logits). They are exact for any computation that treats
positions independently; an adapter on the tiled layers works unchanged (factored execution intercepts
each tile's calls).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp


def in_row_tiles(module: nn.Module, fn: Callable, rows: tuple, tile: int):
    """``fn(module, *tiles)`` over ``rows`` (arrays with the same leading number ``N`` of rows), ``tile``
    rows at a time under ``nn.scan`` + ``nn.remat``; returns ``fn``'s output for all ``N`` rows. The last
    tile is padded with zero rows, whose outputs are cut off."""
    n = rows[0].shape[0]
    tile = min(tile, n)
    count = -(-n // tile)

    def tiled(a):
        a = jnp.pad(a, [(0, count * tile - n)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((count, tile) + a.shape[1:])

    def body(mod, carry, xs):
        return carry, fn(mod, *xs)

    scan = nn.scan(nn.remat(body), variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                   length=count)
    _, out = scan(module, None, tuple(tiled(a) for a in rows))
    return out.reshape((count * tile,) + out.shape[2:])[:n]


def in_position_tiles(module: nn.Module, fn: Callable, arrays: tuple, tile: int):
    """``fn(module, *tiles)`` over ``arrays`` ``(B, L, ...)``, ``tile`` positions of every row at a time (each
    tile ``(B, tile, ...)``), as ``in_row_tiles``; returns ``fn``'s ``(B, L, ...)`` output. One row's
    positions are tiled as rows (no transposes)."""
    if arrays[0].shape[0] == 1:
        out = in_row_tiles(module, lambda mod, *xs: fn(mod, *(x[None] for x in xs))[0], tuple(a[0] for a in arrays),
                           tile)
        return out[None]

    def swapped(mod, *xs):
        return jnp.swapaxes(fn(mod, *(jnp.swapaxes(x, 0, 1) for x in xs)), 0, 1)

    return jnp.swapaxes(in_row_tiles(module, swapped, tuple(jnp.swapaxes(a, 0, 1) for a in arrays), tile), 0, 1)
