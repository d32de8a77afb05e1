"""Do our PEFT exports load in older PEFT releases with the same outputs?

    pip install --no-deps --target /tmp/peft014 peft==0.14.0     # any release, beside the dev install
    python scripts/peft_compat.py /tmp/peft014 [/tmp/peft017 ...]

Exports LoRA, rsLoRA, DoRA, IA3, SSL (IA3 on feedforward modules), AdaLoRA, LoRA with per-layer
rank/alpha patterns, FlexLoRA, lora_bias, LoRA on the word embeddings and LoRA with trainable token rows
(trainable_token_indices: PEFT >= 0.15) from a small random BERT classifier (perturbed off their inits), then
for each given PEFT folder loads every export with that release's ``PeftModel.from_pretrained`` in a
subprocess and prints the largest logit difference against ours (and the release's warnings).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

from decomp_jax.models.bert import NativeSequenceClassifier
from decomp_jax.models.hf import native_params, sequence_classifier_apply
import decomp_jax as dj

ALL = r"attention/self/(query|key|value)$|attention/output/dense$|intermediate/dense$|layer/\d+/output/dense$"
CASES = {
    "lora": dict(method="lora", targets=ALL, rank=4, alpha=8),
    "rslora": dict(method="lora", targets=ALL, rank=4, alpha=8, rslora=True),
    "dora": dict(method="dora", targets=r"attention/self/(query|value)$", rank=4, alpha=8),
    "ia3": dict(method="ia3", targets=r"attention/self/(key|value)$|intermediate/dense$", scale_bias=True),
    "ssl": dict(method="ssl", targets=r"intermediate/dense$|layer/\d+/output/dense$"),
    "adalora": dict(method="adalora", targets=ALL, rank=4, alpha=6),
    "lora_patterns": dict(method="lora", targets=ALL, rank=4, alpha=8, rank_pattern={r"value$": 2},
                          alpha_pattern={r"layer/0/attention/self/query$": 3.0}),
    "flexlora": dict(method="flexlora", targets=ALL, rank=2, alpha=6, options={"max_rank": 4}),
    "lora_bias": dict(method="lora_bias", targets=r"attention/self/(query|value)$", rank=4, alpha=8),
    "lora_embedding": dict(method="lora", targets=r"word_embeddings$|attention/self/query$", rank=4, alpha=8),
    "trainable_tokens": dict(method="lora", targets=r"attention/self/query$", rank=4, alpha=8,
                             trainable_tokens={r"word_embeddings$": [3, 5, 9]}),
}

# settings older PEFT releases do not know (they drop them with a warning, so the logits differ)
SINCE = {"trainable_tokens": "0.15.0"}

LOADER = """
import json, sys, warnings
import numpy as np, torch
from transformers import BertForSequenceClassification
import peft
base, folder, batch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = peft.PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), folder).eval()
with torch.no_grad():
    logits = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
print(json.dumps({"version": peft.__version__, "logits": logits.tolist(),
                  "warnings": sorted({str(w.message)[:160] for w in caught if "peft" in str(w.filename)})}))
"""


def main(peft_dirs: list[str]) -> int:
    import torch
    import transformers as tf

    work = tempfile.mkdtemp(prefix="peft_compat_")
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, num_labels=3, initializer_range=0.2)
    tf.BertForSequenceClassification(config).eval().save_pretrained(f"{work}/base")
    model = NativeSequenceClassifier(config)
    model.params = native_params(model, f"{work}/base")
    ids = np.random.default_rng(0).integers(3, 100, size=(2, 8))
    ids[0, 1], ids[1, 2] = 5, 9  # rows the trainable_tokens case trains
    batch = {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()}
    ours = {}
    for name, kw in CASES.items():
        cfg = dj.AdapterConfig(train_extra="^classifier/", **kw)
        params = dj.inject(model.params, cfg, jax.random.PRNGKey(1))
        mask = dj.trainable_mask(params, cfg)
        keys = iter(jax.random.split(jax.random.PRNGKey(2), 4096))
        params = jax.tree.map(lambda x, m: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype) if m else x,
                              params, mask)
        ours[name] = np.asarray(dj.adapt(sequence_classifier_apply(model), cfg)(
            params, {k: np.asarray(v) for k, v in batch.items()}))
        dj.export_peft(params, cfg, f"{work}/{name}", base_model_name_or_path=f"{work}/base", arch="bert")
    worst = 0.0
    for peft_dir in peft_dirs:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([peft_dir, os.environ.get("PYTHONPATH", "")])}
        for name in CASES:
            version = subprocess.run([sys.executable, "-c", "import peft; print(peft.__version__)"], env=env,
                                     capture_output=True, text=True).stdout.strip()
            since = SINCE.get(name)
            if since and tuple(map(int, version.split(".")[:2])) < tuple(map(int, since.split(".")[:2])):
                print(f"PEFT {version:7s} {name:14s} not checked: the setting exists since PEFT {since}")
                continue
            proc = subprocess.run([sys.executable, "-c", LOADER, f"{work}/base", f"{work}/{name}", json.dumps(batch)],
                                  env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{peft_dir} {name}: FAILED\n{proc.stderr[-1500:]}")
                worst = float("inf")
                continue
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            diff = float(np.abs(np.asarray(out["logits"]) - ours[name]).max())
            worst = max(worst, diff)
            note = f"; warnings: {out['warnings']}" if out["warnings"] else ""
            print(f"PEFT {out['version']:7s} {name:14s} max |logit diff| {diff:.2e}{note}")
    print(f"worst {worst:.2e}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1:]))
