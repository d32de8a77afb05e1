"""The seeds of one experiment trained together against one after another, as `decomp-jax sweep`
runs them with and without ``--batch-seeds``: one ``decomp-jax train C_0 ... C_N-1`` process
(``experiment.run_seeds``: one batched step over one copy of the base) against N ``decomp-jax train C_i``
processes.

    python scripts/bench_seeds.py [--config configs/quickstart.yaml] [--n 3] [--steps 60] [--set KEY=VALUE ...]

Each arm's wall time counts what a sweep pays per cell (process start, model and data load, compilation,
training, evaluation); ``train`` is the training loop alone (``train_seconds`` of metrics.json: the N seeds
together in the batched arm, their sum in the other). The final dev metrics of both arms are printed side by
side (they agree to float rounding). Ratios are separate / together (target >= 1: batching is not slower).
Run it alone: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "glue" / "SST-2"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--n", type=int, default=3, help="seeds (default 3)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides")
    args = ap.parse_args()

    from decomp_jax.app.experiment import load_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        configs = {}
        for arm in ("separate", "together"):
            for seed in range(args.n):
                cfg = load_config(args.config, [f"data.path={DATA}", "data.max_train_samples=2000",
                                                f"train.steps={args.steps}", f"train.log_every={args.steps}",
                                                f"train.seed={seed}", f"train.output_dir={tmp / arm / str(seed)}",
                                                *args.set])
                path = tmp / f"{arm}{seed}.yaml"
                path.write_text(cfg.to_yaml())
                configs.setdefault(arm, []).append(str(path))
        train = [sys.executable, "-m", "decomp_jax.app.cli", "train", "--no-progress"]
        print(f"{args.n} seeds of {Path(args.config).name}, {args.steps} steps, batch {cfg.train.batch_size}; "
              f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        wall = {}
        t0 = time.perf_counter()
        for path in configs["separate"]:
            subprocess.run(train + [path], check=True, stdout=subprocess.DEVNULL)
        wall["separate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(train + configs["together"], check=True, stdout=subprocess.DEVNULL)
        wall["together"] = time.perf_counter() - t0
        records = {arm: [json.loads((tmp / arm / str(s) / "metrics.json").read_text()) for s in range(args.n)]
                   for arm in wall}
    trained = {"separate": sum(r["train_seconds"] for r in records["separate"]),
               "together": records["together"][0]["train_seconds"]}
    examples = args.n * args.steps * cfg.train.batch_size
    for arm in wall:
        print(f"{arm:>9}: wall {wall[arm]:7.1f} s, train {trained[arm]:7.1f} s ({examples / trained[arm]:.1f} examples/s); "
              f"dev {[round(r['eval'][next(iter(r['eval']))], 4) for r in records[arm]]}")
    print(f"separate / together: wall {wall['separate'] / wall['together']:.2f}x, train "
          f"{trained['separate'] / trained['together']:.2f}x (target >= 1); load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
