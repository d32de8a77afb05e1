"""Helpers several test folders share: tiny random PyTorch models saved as Hugging Face checkpoints (a BERT or
RoBERTa classifier, a Llama), their logits, padded batches, and the commonsense task's small config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decomp_jax as dj
from conftest import DATA, REPO
from decomp_jax.app.experiment import load_config
from decomp_jax.models.hf import sequence_classifier_apply

TOL = 1e-4


def small_classifier(kind, folder):
    """A random 2-layer classifier saved as a PyTorch checkpoint and loaded from it by our native
    module (``decomp_jax.models.bert``, params read by ``models.hf.native_params``)."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    from decomp_jax.models.bert import NativeSequenceClassifier
    from decomp_jax.models.hf import native_params

    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=40, num_labels=3, initializer_range=0.2)
    if kind == "bert":
        config = tf.BertConfig(**common)
        torch_cls = tf.BertForSequenceClassification
    else:
        config = tf.RobertaConfig(**common, pad_token_id=1, type_vocab_size=1)
        torch_cls = tf.RobertaForSequenceClassification
    torch.manual_seed(0)
    torch_model = torch_cls(config).eval()
    torch_model.save_pretrained(folder)
    model = NativeSequenceClassifier(config)
    model.params = native_params(model, folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, size=(3, 10)).astype("int64")
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = config.pad_token_id
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {"torch": torch_model, "flax": model, "params": model.params, "batch": batch, "arch": kind,
            "folder": folder}


def jax_logits(m, params, cfg):
    return np.asarray(dj.adapt(sequence_classifier_apply(m["flax"]), cfg)(params, m["batch"]))


def torch_classifier_logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}).logits.numpy()


def tiny_hf_config(**overrides):
    cfg = dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=50000.0, max_position_embeddings=64,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    cfg.update(overrides)
    return cfg


def torch_llama(folder, **overrides):
    """A random PyTorch Llama (norm weights randomised too), saved with save_pretrained to ``folder``."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    config = tf.LlamaConfig(**tiny_hf_config(**overrides), attn_implementation="eager")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def batch(length=12, vocab=128, seed=0, left=4, right=3):
    """Row 0 full, row 1 left-padded by ``left``, row 2 right-padded by ``right`` (pad id 0)."""
    ids = np.random.default_rng(seed).integers(3, vocab, size=(3, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :left] = 0
    mask[2, -right:] = 0
    ids[mask == 0] = 0
    return ids, mask


def torch_lm_logits(model, ids, mask):
    """A transformers causal LM's float32 logits, positions ``cumsum(mask) - 1`` as its ``generate`` makes them
    (and our decoder by default)."""
    import torch

    positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions)).logits
    return out.float().numpy()


def max_diff_valid(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask > 0].max())


def commonsense_config(model_dir, out_dir, *extra):
    """The commonsense CPU config on ``model_dir``, made tiny (two sets, 8 training examples, 3 steps)."""
    return load_config(REPO / "configs" / "commonsense" / "smollm2_lora_cpu.yaml", [
        f"model.name={model_dir}", f"data.path={DATA / 'commonsense'}", "data.datasets=boolq,arc_e", "data.max_length=160",
        "data.max_train_samples=8", "data.max_eval_samples=6", "data.max_new_tokens=6", "train.steps=3",
        "train.batch_size=4", "train.eval_batch_size=4", "train.log_every=1", f"train.output_dir={out_dir}", *extra,
    ])


def random_torch_lm(config_class: str, fields: dict, folder, norm_mean: float = 1.0, also: tuple = ()):
    """transformers' causal LM ``config_class(**fields)`` (eager attention), seed 0, with its norm weights drawn
    around ``norm_mean``, its biases and the parameters whose names hold one of ``also`` (those transformers
    starts at zero or tiny, e.g. experts and routers) drawn around 0; saved to ``folder``."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    config = getattr(tf, config_class)(**fields, attn_implementation="eager")
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.2 * torch.randn_like(p) + norm_mean)
            elif name.endswith("bias") or any(a in name for a in also):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def loaded_models(tmp_path_factory, torch_model):
    """``get(case)``: ``{"torch", "config", "params", "folder"}`` of ``torch_model(case, folder)`` saved and
    read back with ``convert.load_hf``, made once per case."""
    from decomp_jax.models import convert

    cache = {}

    def get(case):
        if case not in cache:
            folder = tmp_path_factory.mktemp(case)
            model = torch_model(case, folder)
            config, params, _ = convert.load_hf(str(folder))
            cache[case] = {"torch": model, "config": config, "params": jax.tree.map(jnp.asarray, params),
                           "folder": str(folder)}
        return cache[case]

    return get


def adam_losses(loss, cfg, parts, batch, steps: int, learning_rate: float = 1e-2):
    """``(losses, final state, last metrics)`` of ``steps`` train steps (``dj.make_train_step``, Adam) on ``parts =
    (trainable, buffers, frozen)`` with one ``batch``."""
    import optax

    trainable, buffers, frozen = parts
    opt = optax.adam(learning_rate)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(3), buffers=buffers)
    step = dj.make_train_step(loss, opt, cfg)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return losses, state, metrics


def torch_greedy(model, ids, mask, new_tokens: int) -> np.ndarray:
    """transformers' greedy ``generate`` of exactly ``new_tokens`` tokens (no eos stop), as NumPy ids."""
    import torch

    with torch.no_grad():
        return model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0).numpy()


def records_kept(logger_name: str, message: str, filenames=("/site-packages/orbax/checkpoint/_src/x.py",
                                                             "/home/me/my_code.py")) -> list[str]:
    """For each of ``filenames``: an error raised in code of that file name, handed to logger
    ``logger_name`` as an ERROR record of ``message`` (``%r`` or ``%s``: the error) with its traceback.
    Returns the file names whose records reached the logger's handlers (its filters let them through)."""
    import logging

    def raised_in(filename):
        namespace = {}
        exec(compile("def write():\n    raise OSError(28, 'No space left on device')\n", filename, "exec"), namespace)
        try:
            namespace["write"]()
        except OSError as err:
            return err

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    logger, keep = logging.getLogger(logger_name), Keep()
    logger.addHandler(keep)
    try:
        for filename in filenames:
            err = raised_in(filename)
            logger.handle(logger.makeRecord(logger_name, logging.ERROR, __file__, 1, message, (err,),
                                            (type(err), err, err.__traceback__)))
    finally:
        logger.removeHandler(keep)
    return [r.exc_info[1].__traceback__.tb_next.tb_frame.f_code.co_filename for r in seen]
