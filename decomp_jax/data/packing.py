"""Sequence packing for the decoder tasks (``data.packing: true``): tokenized examples laid one after
another in fixed-length rows, with segment ids (a token attends to its own example only; positions
restart at each example: ``LlamaForCausalLM(..., segment_ids=)``), so that short instruction examples
do not leave most of each row as padding. The loss on a packed batch equals the loss on the same
examples padded one per row: the scored tokens and their targets are the same."""

from __future__ import annotations

import bisect
from typing import Optional, Sequence

import numpy as np

from decomp_jax.data.lm import (
    TokenizedSet, check_buckets, bucket_length, epoch_batches, loss_slots, response_slots, steps_per_epoch,
)


def pack_rows(data: TokenizedSet, length: int, seed: int = 0) -> list[np.ndarray]:
    """Example indices of each packed row of ``length`` tokens: best-fit decreasing (the longest example
    first, into the row with the least room that holds it; ties in the order of
    ``default_rng(seed).permutation``), so rows are nearly full. A pure function of ``(data, length,
    seed)``: the same rows on every resume. Each example is in exactly one row."""
    length = int(length)
    too_long = [int(i) for i in np.nonzero(data.lengths > length)[0][:3]]
    if too_long:
        raise ValueError(f"Examples {too_long} hold more than the packed row length {length} tokens "
                         f"({int(data.lengths.max())} at most); set data.pack_length >= data.max_length.")
    order = np.random.default_rng((seed, 7)).permutation(len(data))
    order = order[np.argsort(-data.lengths[order], kind="stable")]
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order:
        need = int(data.lengths[i])
        at = bisect.bisect_left(room, (need, -1))
        if at == len(room):
            rows.append([int(i)])
            free, row = length - need, len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append(int(i))
            free -= need
        if free > 0:
            bisect.insort(room, (free, row))
    return [np.asarray(sorted(r), np.int64) for r in rows]


def padding_fraction(data: TokenizedSet, batch_size: int, buckets: Sequence[int] | None = None, *,
                     packed_rows: Optional[Sequence[np.ndarray]] = None, length: Optional[int] = None) -> float:
    """The share of padding among the tokens of one epoch's batches: padded to buckets as ``train_batch``
    lays them out (``seed`` 0), or in packed rows of ``length`` (``packed_rows``)."""
    if packed_rows is not None:
        return 1.0 - float(data.lengths.sum()) / (len(packed_rows) * int(length))
    buckets = check_buckets(buckets, data)
    plan = epoch_batches(data, batch_size, 0, 0)
    padded = sum(bucket_length(int(data.lengths[idx].max()), buckets) * len(idx) for idx in plan)
    return 1.0 - float(sum(data.lengths[idx].sum() for idx in plan)) / max(padded, 1)


def packed_batch(data: TokenizedSet, packed_rows: Sequence[np.ndarray], step: int, batch_size: int, length: int,
                 seed: int = 0, *, rows: slice | None = None) -> dict[str, np.ndarray]:
    """The packed causal-LM batch of global step ``step``: ``batch_size`` rows of ``pack_rows`` (each epoch
    shuffles the rows with ``default_rng((seed, epoch, 2))``, the tail dropped), each ``length`` tokens:
    its examples one after another, then padding. The keys of ``train_batch`` plus ``segment_ids``
    (int32, ``1..k`` for a row's examples, 0 on padding), with ``position_ids`` restarting at each example;
    ``loss_mask`` is 0 on each example's first token, which no token before it predicts (as in a row of
    its own), so the scored tokens and their targets are exactly the unpacked ones."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    per_epoch = steps_per_epoch(len(packed_rows), batch_size)
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(packed_rows)} packed rows.")
    epoch, position = divmod(int(step), per_epoch)
    chosen = np.random.default_rng((seed, epoch, 2)).permutation(len(packed_rows))[
        position * batch_size:(position + 1) * batch_size]
    scored = [sum(int(np.sum(data.loss_mask[i][1:])) for i in packed_rows[r]) for r in chosen]
    slots = response_slots(max(scored), length)
    chosen = chosen if rows is None else chosen[rows]
    shape = (len(chosen), int(length))
    ids, attn, lmask = np.full(shape, data.pad_id, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    seg, pos = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for r, row in enumerate(chosen):
        at = 0
        for k, i in enumerate(packed_rows[row]):
            n = len(data.ids[i])
            ids[r, at:at + n], attn[r, at:at + n], seg[r, at:at + n] = data.ids[i], 1, k + 1
            lmask[r, at:at + n], pos[r, at:at + n] = data.loss_mask[i], np.arange(n)
            lmask[r, at] = 0
            at += n
        pos[r, at:] = np.arange(shape[1] - at)
    loss_index, loss_targets, loss_weights = loss_slots(ids, lmask, slots)
    return {"input_ids": ids, "attention_mask": attn, "segment_ids": seg, "loss_mask": lmask,
            "labels": np.where(lmask > 0, ids, -100).astype(np.int32), "position_ids": pos,
            "weights": np.ones(len(chosen), np.float32), "loss_index": loss_index, "loss_targets": loss_targets,
            "loss_weights": loss_weights}
