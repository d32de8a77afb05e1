"""Tied input/output embeddings in the PEFT format (GPT-2's ``wte``; a Llama with
``tie_word_embeddings``, as SmolLM2): our tied models hold one matrix for the token embedding and
the LM head, PEFT's ``modules_to_save`` trains a copy of one module. Checked both ways against
``peft.PeftModel.from_pretrained`` on the transformers PyTorch model with the same weights.
"""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import decomp_jax as dj  # noqa: E402
from decomp_jax.models import convert  # noqa: E402
from decomp_jax.errors import PeftFormatError
from decomp_jax.models.llama import LlamaForCausalLM  # noqa: E402
from helpers import batch, max_diff_valid, torch_llama  # noqa: E402
from conftest import tiny_gpt2  # noqa: E402

TOL = 1e-4
WEIGHTS = "adapter_model.safetensors"


def _positions(mask):
    return np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)  # HF generate's convention; ours by default


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random tied 2-layer Llama saved by PyTorch and read back with convert.load_hf."""
    folder = tmp_path_factory.mktemp("llama_tied")
    torch_model = torch_llama(folder, tie_word_embeddings=True)
    config, params, _ = convert.load_hf(str(folder))
    assert config.tie_word_embeddings and "lm_head" not in params
    ids, mask = batch()
    model = LlamaForCausalLM(config)

    def ours(p, cfg):
        return np.asarray(dj.adapt(model.apply, cfg)({"params": p}, jnp.asarray(ids), jnp.asarray(mask)))

    def theirs(m):
        with torch.no_grad():
            return m(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     position_ids=torch.as_tensor(_positions(mask))).logits.numpy()

    # the same weights as an untied Llama (lm_head = the embedding): what the refusal's fix suggests
    untied_model = LlamaForCausalLM(dataclasses.replace(config, tie_word_embeddings=False))
    untied_base = {**params, "lm_head": {"kernel": params["model"]["embed_tokens"]["embedding"].T}}

    def ours_untied(p, cfg):
        return np.asarray(dj.adapt(untied_model.apply, cfg)({"params": p}, jnp.asarray(ids), jnp.asarray(mask)))

    return {"name": "llama", "untied_base": untied_base, "ours_untied": ours_untied, "arch": "llama",
            "torch": torch_model, "base": params, "folder": str(folder),
            "ours": ours, "theirs": theirs, "mask": mask, "embedding": ("model", "embed_tokens"),
            "emb_name": "model.embed_tokens", "short": "embed_tokens", "targets": r"self_attn/(q_proj|v_proj)$",
            "peft_targets": ["q_proj", "v_proj"], "transposed": None}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random 2-layer GPT-2 LM (tied head, Conv1D layers) saved by PyTorch and loaded by our Linen GPT-2."""
    from decomp_jax.models.hf import TRANSPOSED

    folder = str(tmp_path_factory.mktemp("gpt2_tied"))
    torch_model, model, params, ids = tiny_gpt2(folder)
    assert "lm_head" not in params

    def ours(p, cfg):
        return np.asarray(dj.adapt(model.apply, cfg)({"params": p}, jnp.asarray(ids)))

    def theirs(m):
        with torch.no_grad():
            return m(torch.as_tensor(ids)).logits.numpy()

    return {"name": "gpt2", "arch": "gpt2", "torch": torch_model, "base": params, "folder": folder,
            "ours": ours, "theirs": theirs, "mask": np.ones(ids.shape, "int64"), "embedding": ("transformer", "wte"),
            "emb_name": "transformer.wte", "short": "wte", "targets": r"c_attn$", "peft_targets": ["c_attn"],
            "transposed": TRANSPOSED["gpt2"]}


@pytest.fixture(params=["llama", "gpt2"])
def lm(request):
    return request.getfixturevalue(request.param)


def diff(a, b, m):
    return max_diff_valid(a, b, m["mask"])


def perturbed(m, cfg, seed=0, scale=0.1):
    """Random non-initial values for every trainable leaf (the LoRA factors and the embedding)."""
    params = dj.inject(m["base"], cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    flags = jax.tree_util.tree_leaves(dj.trainable_mask(params, cfg))
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    out = [x + scale * (1 + np.abs(x).mean()) * jax.random.normal(k, x.shape, x.dtype) if f else x
           for x, f, k in zip(leaves, flags, keys)]
    return jax.tree_util.tree_unflatten(tree, out)


def with_embedding(params, m, table):
    flat = flatten_dict(params)
    flat[m["embedding"] + ("embedding",)] = jnp.asarray(table)
    return unflatten_dict(flat)


def embedding(params, m):
    return np.asarray(flatten_dict(params)[m["embedding"] + ("embedding",)])


def load(m, folder):
    return peft.PeftModel.from_pretrained(copy.deepcopy(m["torch"]), str(folder)).eval()


# --- JAX -> PEFT ---------------------------------------------------------------------------------------

@pytest.mark.peft_setting("tied model (GPT-2, tied Llama), trained embedding", "export", "modules_to_save + ensure_weight_tying; logits match PEFT")
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_trained_tied_embedding_exports_to_peft(lm, method, tmp_path):
    """A LoRA (IA3) adapter plus the trained tied embedding (train_extra): PEFT's model gives our logits."""
    m = lm
    if method == "ia3":
        targets = r"mlp/(up_proj|down_proj)$" if m["name"] == "llama" else r"mlp/c_fc$"
        cfg = dj.AdapterConfig(method="ia3", targets=targets, scale_bias=True, transposed=m["transposed"],
                               train_extra=rf"^{'/'.join(m['embedding'])}/")
    else:
        cfg = dj.AdapterConfig(method="lora", targets=m["targets"], rank=4, alpha=8, transposed=m["transposed"],
                               train_extra=rf"^{'/'.join(m['embedding'])}/")
    params = perturbed(m, cfg)
    ours = m["ours"](params, cfg)
    # the embedding change matters on both sides of the model: as input only or as head only differs
    original = embedding(m["base"], m)
    untied_effect = diff(ours, m["ours"](with_embedding(params, m, original), cfg), m)
    dj.export_peft(params, cfg, tmp_path, base_model_name_or_path=m["folder"], arch=m["arch"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [m["emb_name"], "lm_head"]
    assert config.get("ensure_weight_tying", method == "lora") is (method == "lora")
    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / WEIGHTS))
    np.testing.assert_array_equal(stored[f"base_model.model.{m['emb_name']}.weight"],
                                  stored["base_model.model.lm_head.weight"])
    theirs = m["theirs"](load(m, tmp_path))
    d = diff(ours, theirs, m)
    print(f"{m['name']} tied {method} export: max abs logit diff vs PEFT {d:.2e} "
          f"(embedding effect {untied_effect:.2f})")
    assert d <= TOL and untied_effect > 100 * TOL
    # and back: the import reads the same model
    back, back_cfg = dj.import_peft(tmp_path, m["base"], arch=m["arch"])
    assert back_cfg.train_extra == f"^({'/'.join(m['embedding'])})/"
    assert diff(m["ours"](back, back_cfg), ours, m) <= 1e-5


# --- PEFT -> JAX ---------------------------------------------------------------------------------------

def peft_adapter(m, folder, modules_to_save, ensure_weight_tying, seed=0):
    """A PEFT LoRA adapter with random trained weights (and modules_to_save), saved to ``folder``;
    returns the logits of ``PeftModel.from_pretrained`` on it (the model a user gets)."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=m["peft_targets"],
                             modules_to_save=list(modules_to_save), ensure_weight_tying=ensure_weight_tying,
                             fan_in_fan_out=m["name"] == "gpt2")
    model = peft.get_peft_model(copy.deepcopy(m["torch"]), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen) * (1 + p.abs().mean()))
    model.save_pretrained(str(folder))
    return m["theirs"](load(m, folder))


TIED_CASES = {  # modules_to_save, ensure_weight_tying: PEFT ties lm_head to the trained embedding copy
    "embedding_tied": (["{short}", "lm_head"], True),
    "lm_head_tied": (["lm_head"], True),
}


@pytest.mark.peft_setting("tied model, embedding / lm_head in modules_to_save with ensure_weight_tying", "import", "one trained tied matrix; logits match PEFT")
@pytest.mark.parametrize("case", sorted(TIED_CASES))
def test_peft_tied_embedding_imports(lm, case, tmp_path):
    m = lm
    names, ewt = TIED_CASES[case]
    theirs = peft_adapter(m, tmp_path, [n.format(short=m["short"]) for n in names], ewt)
    params, cfg = dj.import_peft(tmp_path, m["base"], arch=m["arch"])
    assert cfg.method == "lora" and cfg.train_extra == f"^({'/'.join(m['embedding'])})/"
    ours = m["ours"](params, cfg)
    d = diff(ours, theirs, m)
    changed = np.abs(embedding(params, m) - embedding(m["base"], m)).max()
    print(f"{m['name']} PEFT {case} -> jax: max abs logit diff {d:.2e} (embedding moved by {changed:.2f})")
    assert d <= TOL and changed > 1e-2


UNTIED_CASES = {  # PEFT keeps one of the two matrices at its original value: not one matrix any more
    "embedding_alone": (["{short}"], False, "input embedding = the stored .*LM head = the base model's embedding"),
    "embedding_alone_ewt": (["{emb_name}"], True, None),  # ties for embed_tokens (llama), not for wte (gpt2)
    "lm_head_alone": (["lm_head"], False, "input embedding = the base model's embedding, LM head = the stored"),
}


@pytest.mark.peft_setting("tied model, embedding or lm_head saved alone (PEFT unties them)", "import", "refused (our model ties them), naming both fixes; exact where PEFT ties")
@pytest.mark.parametrize("case", sorted(UNTIED_CASES))
def test_peft_untied_embedding_is_refused_or_exact(lm, case, tmp_path):
    """An adapter with which PEFT's input embedding and LM head differ cannot be one tied matrix:
    refused with the problem and the fix; where PEFT does tie them, the import matches its logits."""
    m = lm
    names, ewt, message = UNTIED_CASES[case]
    theirs = peft_adapter(m, tmp_path, [n.format(**m) for n in names], ewt)
    if case == "embedding_alone_ewt" and m["name"] == "llama":  # PEFT ties: embed_tokens is one of its names
        params, cfg = dj.import_peft(tmp_path, m["base"], arch=m["arch"])
        assert diff(m["ours"](params, cfg), theirs, m) <= TOL
        return
    message = message or "input embedding = the stored .*LM head = the base model's embedding"
    with pytest.raises(PeftFormatError, match=message) as err:
        dj.import_peft(tmp_path, m["base"], arch=m["arch"])
    text = str(err.value)
    assert "untied embeddings" in text and "cannot represent" in text
    assert f"modules_to_save=['{m['emb_name']}', 'lm_head'] and ensure_weight_tying=True" in text
    assert "tie_word_embeddings=False" in text
    if m["name"] == "llama":  # the second fix: an untied copy of the base holds PEFT's two matrices
        params, cfg = dj.import_peft(tmp_path, m["untied_base"], arch="llama")
        d = diff(m["ours_untied"](params, cfg), theirs, m)
        print(f"llama PEFT {case} -> untied jax copy: max abs logit diff {d:.2e}")
        assert d <= TOL


def test_tied_import_refusals_name_the_problem(llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    m = llama
    cfg = dj.AdapterConfig(method="lora", targets=m["targets"], rank=4, train_extra=r"^model/embed_tokens/")
    dj.export_peft(perturbed(m, cfg), cfg, tmp_path / "a", base_model_name_or_path="tiny", arch="llama")
    path = str(tmp_path / "a" / WEIGHTS)
    tensors = load_file(path)
    # the two names of the tied matrix stored different: PEFT's load order would pick one
    save_file({**tensors, "base_model.model.lm_head.weight": tensors["base_model.model.lm_head.weight"] + 1}, path,
              metadata={"format": "pt"})
    with pytest.raises(PeftFormatError, match="stores different .*embed_tokens.weight and .*lm_head.weight"):
        dj.import_peft(tmp_path / "a", m["base"], arch="llama")
    # ... or one of them missing
    save_file({k: v for k, v in tensors.items() if "lm_head" not in k}, path, metadata={"format": "pt"})
    with pytest.raises(PeftFormatError, match=r"missing keys \['base_model.model.lm_head.weight'\]"):
        dj.import_peft(tmp_path / "a", m["base"], arch="llama")


def peft_embedding_lora(m, folder, ensure_weight_tying, seed=0):
    """PEFT LoRA on the token embedding (and the attention targets) of the tied model, with random trained
    factors; returns the logits of ``PeftModel.from_pretrained`` on it."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=[m["short"]] + m["peft_targets"],
                             ensure_weight_tying=ensure_weight_tying, fan_in_fan_out=m["name"] == "gpt2")
    model = peft.get_peft_model(copy.deepcopy(m["torch"]), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(folder))
    return m["theirs"](load(m, folder))


@pytest.mark.peft_setting("LoRA on a tied embedding (Llama embed_tokens) with ensure_weight_tying", "import + export", "one adapted tied matrix; logits match PEFT both ways")
@pytest.mark.peft_setting("LoRA on a tied embedding without ensure_weight_tying, or on GPT-2's wte (PEFT adapts the lookups only)", "import + export", "refused (our model ties them), naming the fixes; exact into an untied copy")
def test_lora_on_a_tied_embedding(lm, tmp_path):
    """With ensure_weight_tying PEFT gives lm_head the embedding's LoRA: one adapted matrix, as ours. Where
    PEFT adapts the lookups only (no ensure_weight_tying; GPT-2's wte, a name PEFT does not tie) the import
    and the export are refused, and the untied copy of the base reads it exactly."""
    m = lm
    cfg = dj.AdapterConfig(method="lora", targets=rf"{m['embedding'][-1]}$|{m['targets']}", rank=4, alpha=8,
                           transposed=m["transposed"])
    params = perturbed(m, cfg)
    if m["name"] == "gpt2":
        with pytest.raises(dj.ConfigError, match=r"transformer/wte, the table this model's LM head is tied to.*"
                                                 r"only for modules named embed_tokens / lm_head.*Merge the adapter"):
            dj.export_peft(params, cfg, tmp_path / "ours", base_model_name_or_path=m["folder"], arch="gpt2")
        peft_embedding_lora(m, tmp_path / "peft", True)
        with pytest.raises(PeftFormatError, match=r"LoRA on transformer.wte, which this model ties to lm_head, and "
                                                  r"PEFT ties adapters only for modules named embed_tokens / lm_head"):
            dj.import_peft(tmp_path / "peft", m["base"], arch="gpt2")
        return
    # ours -> PEFT: lm_head gets the embedding's LoRA
    ours = m["ours"](params, cfg)
    dj.export_peft(params, cfg, tmp_path / "ours", base_model_name_or_path=m["folder"], arch="llama")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and "embed_tokens" in config["target_modules"]
    d_out = diff(ours, m["theirs"](load(m, tmp_path / "ours")), m)
    # PEFT -> ours
    theirs = peft_embedding_lora(m, tmp_path / "peft", True)
    back, back_cfg = dj.import_peft(tmp_path / "peft", m["base"], arch="llama")
    assert back["model"]["embed_tokens"]["lora_a"].shape == (m["base"]["model"]["embed_tokens"]["embedding"].shape[0], 4)
    d_in = diff(m["ours"](back, back_cfg), theirs, m)
    head_effect = diff(theirs, m["ours_untied"]({**back, "lm_head": {"kernel": m["base"]["model"]["embed_tokens"][
        "embedding"].T}}, back_cfg), m)  # the same adapter with the head on the base matrix
    print(f"llama tied LoRA on embed_tokens: jax -> peft {d_out:.2e}, peft -> jax {d_in:.2e} "
          f"(the head's share of the adapter {head_effect:.2f})")
    assert d_out <= TOL and d_in <= TOL and head_effect > 100 * TOL
    # without ensure_weight_tying PEFT's head keeps the base matrix: refused, and exact into an untied copy
    theirs = peft_embedding_lora(m, tmp_path / "untied", False)
    with pytest.raises(PeftFormatError, match=r"puts LoRA on model.embed_tokens, which this model ties to lm_head, "
                                              r"without ensure_weight_tying.*Fix: train with ensure_weight_tying=True"
                                              r".*or import into an untied copy"):
        dj.import_peft(tmp_path / "untied", m["base"], arch="llama")
    params, cfg = dj.import_peft(tmp_path / "untied", m["untied_base"], arch="llama")
    assert diff(m["ours_untied"](params, cfg), theirs, m) <= TOL


def test_prompt_export_refuses_train_extra_it_cannot_write(llama, tmp_path):
    """PROMPT_TUNING is written as prompt_embeddings alone: a trained embedding would be lost silently."""
    cfg = dj.AdapterConfig(method="prompt_tuning", options={"num_virtual_tokens": 3, "init": "random"},
                           train_extra=r"^model/embed_tokens/")
    params = dj.inject(llama["base"], cfg, jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"trains \['model/embed_tokens/embedding'\].*would be lost"):
        dj.export_peft(params, cfg, tmp_path / "p", base_model_name_or_path="tiny", arch="llama")
    assert not os.listdir(tmp_path)


@pytest.mark.peft_setting("trainable_token_indices on a tied model (GPT-2, tied Llama)", "import + export", "the rows of the one tied matrix; logits match PEFT both ways")
def test_trainable_tokens_on_a_tied_model(lm, tmp_path):
    """PEFT ties the LM head's token rows to the embedding's: the rows of our one tied matrix, both ways."""
    m = lm
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=m["peft_targets"],
                             trainable_token_indices=[3, 7], fan_in_fan_out=m["name"] == "gpt2")
    model = peft.get_peft_model(copy.deepcopy(m["torch"]), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(tmp_path / "peft"))
    theirs = m["theirs"](load(m, tmp_path / "peft"))
    params, cfg = dj.import_peft(tmp_path / "peft", m["base"], arch=m["arch"])
    assert list(cfg.trainable_tokens.values()) == [[3, 7]]
    d_in = diff(m["ours"](params, cfg), theirs, m)
    dj.export_peft(params, cfg, tmp_path / "ours", base_model_name_or_path=m["folder"], arch=m["arch"])
    d_out = diff(m["ours"](params, cfg), m["theirs"](load(m, tmp_path / "ours")), m)
    without = dj.AdapterConfig(**{**cfg.to_dict(), "trainable_tokens": {}})
    flat = flatten_dict(params)
    effect = diff(m["ours"](params, cfg), m["ours"](
        unflatten_dict({k: v for k, v in flat.items() if k[-1] != "trainable_tokens_delta"}), without), m)
    print(f"{m['name']} tied trainable tokens: peft -> jax {d_in:.2e}, jax -> peft {d_out:.2e} (rows' effect {effect:.2f})")
    assert d_in <= TOL and d_out <= TOL and effect > 100 * TOL
