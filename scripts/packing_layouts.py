"""Packed layouts against rows padded to the longest example, on the commonsense CPU config (the setting of
``decomp-jax bench --long``'s packing measurement), all timed interleaved in one run.

    python scripts/packing_layouts.py [--examples 64] [--rounds 8] [--layouts padded,160:xla,320:xla,640:chunked:128]
                                      [--set KEY=VALUE ...]

A layout is ``padded`` (every row padded to the config's ``max_length``) or ``LENGTH[xBATCH]:ATTENTION[:CHUNK]``
(packed rows of LENGTH tokens, BATCH of them a step, ``model.attention`` ATTENTION, blocks of CHUNK for
``chunked``). Each layout trains one epoch of the same examples (batch 4 unless given, each batch shape
compiled and run first); the epochs
run interleaved, ``--rounds`` rounds each taking the next slice of every epoch, so that the machine's drift
weighs on all alike. Prints, per layout: padding, seconds, milliseconds per token slot and trained tokens
per second against the first layout. ``--set`` adds a config override to every layout (e.g.
``--set model.mlp_chunk=160``). Run it alone; the load average is printed. For jemalloc, start it
under ``LD_PRELOAD=.../libjemalloc.so.2 MALLOC_CONF=oversize_threshold:0,background_thread:true``.
"""

from __future__ import annotations

import argparse
import os

from decomp_jax.app import bench_long
from decomp_jax.app.experiment import load_config


def overrides(layout: str, max_length: int) -> list[str]:
    """The config overrides of one layout (see the module's docstring)."""
    if layout == "padded":
        return [f"data.bucket_multiple={max_length}", "model.attention=xla"]
    length, attention, *chunk = layout.split(":")
    length, _, batch = length.partition("x")
    sets = ["data.packing=true", f"data.pack_length={int(length)}", f"model.attention={attention}"]
    return sets + [f"model.attention_chunk={int(c)}" for c in chunk] + ([f"train.batch_size={int(batch)}"] if batch else [])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64, help="training examples per dataset (default 64)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    parser.add_argument("--layouts", default="padded,160:xla,320:xla,640:chunked:128",
                        help="comma-separated layouts, the first the reference (default %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every layout (repeatable), e.g. model.mlp_chunk=160")
    args = parser.parse_args(argv)
    bench = bench_long.LongBenchConfig(lengths=(), packing_examples=args.examples)
    max_length = load_config(bench_long.CPU_CONFIG).data.max_length
    layouts = args.layouts.split(",")
    ways = {name: bench_long.packing_way(bench, overrides(name, max_length) + args.set) for name in layouts}
    rounds, _, seconds = bench_long.interleaved(ways, args.rounds)
    rate = {}
    for name, way in ways.items():
        tokens, slots = bench_long.token_counts(way["batches"])
        wall = sum(seconds[name])
        rate[name] = tokens / wall
        print(f"{name:>16}: {len(way['batches'])} steps of {way['batches'][0]['input_ids'].shape}, padding "
              f"{1 - tokens / slots:.1%}, {wall:.1f} s, {1000 * wall / slots:.2f} ms per slot, "
              f"{rate[name]:.0f} trained tokens/s ({rate[name] / rate[layouts[0]]:.2f} x {layouts[0]})", flush=True)
    print(f"{rounds} rounds; 1-min load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
