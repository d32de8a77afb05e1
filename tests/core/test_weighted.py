"""Combining LoRA adapters (dj.add_weighted_adapter) against HF PEFT's add_weighted_adapter: two adapters
trained (perturbed) in PEFT on one small BERT, imported, combined on both sides; logits of the combined
adapter match for every combination type (DARE with the same masks on both sides)."""

import copy

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import decomp_jax as dj  # noqa: E402
from helpers import TOL, jax_logits, small_classifier, torch_classifier_logits  # noqa: E402

DENSITY = 0.6


def value_mask(t, density):
    """A 0/1 mask that is a function of each element's value only, on a coarse grid (the SVD variants mask
    the updates s * a @ b, which PEFT and we round differently in the last bits): the same on PEFT's (out, in)
    tensors and on our transposed ones, so both sides drop the same elements (about 3 in 5, whatever
    ``density``: both sides rescale by 1 / density)."""
    return (np.floor(np.abs(np.asarray(t, np.float64)) * 97) % 5 < 3).astype(np.asarray(t).dtype)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return small_classifier("bert", str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def two_adapters(bert, tmp_path_factory):
    """PEFT adapters "a" (q, v; r=4) and "b" (v, the FFN dense; r=4, another alpha) on one model (no task type:
    PEFT combines adapters that do not both save the classifier head)."""
    folder = str(tmp_path_factory.mktemp("weighted"))
    config_a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    config_b = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["value", "intermediate.dense"])
    model = peft.get_peft_model(copy.deepcopy(bert["torch"]), config_a, adapter_name="a")
    model.add_adapter("b", config_b)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)  # a/ and b/ subfolders
    ours = [dj.import_peft(folder, bert["params"], arch="bert", subfolder=name) for name in ("a", "b")]
    return {"model": model, "ours": ours}


# cat, svd, ties and dare_ties in the default suite (each code path: factors, SVD, sign election, random
# masks); the others with -m slow (suite budget)
@pytest.mark.parametrize("combination", ["cat", "svd", "ties", "dare_ties"] + [
    pytest.param(c, marks=pytest.mark.slow) for c in ("linear", "ties_svd", "dare_linear", "dare_linear_svd",
                                                      "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")])
def test_weighted_adapter_matches_peft(combination, bert, two_adapters, monkeypatch):
    from peft.utils import merge_utils

    monkeypatch.setattr(merge_utils, "random_pruning",
                        lambda t, density, rescale: t * torch.as_tensor(value_mask(t.detach().numpy(), density)) /
                        (density if rescale else 1.0))
    model = copy.deepcopy(two_adapters["model"])
    weights = [0.7, -0.4]
    kwargs = {"density": DENSITY} if combination not in ("cat", "linear", "svd") else {}
    model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=combination, **kwargs)
    model.set_adapter("ab")
    model.eval()
    theirs = torch_classifier_logits(model, bert["batch"])
    params, cfg = dj.add_weighted_adapter(two_adapters["ours"], weights, combination, mask_fn=value_mask, **kwargs)
    expected_rank = {"cat": 8}.get(combination, 4)
    assert cfg.rank == expected_rank and cfg.scale == 1.0
    ours = jax_logits(bert, params, cfg)
    alone = [jax_logits(bert, p, c) for p, c in two_adapters["ours"]]
    effect = min(np.abs(ours - a).max() for a in alone)
    diff = np.abs(ours - theirs).max()
    print(f"{combination}: max abs diff vs PEFT {diff:.2e} (differs from each adapter alone by >= {effect:.2e})")
    assert diff <= TOL and effect > 100 * TOL


def test_svd_clamp_clips_the_factors_at_their_quantile(two_adapters):
    """svd_clamp (PEFT's): each layer's SVD factors clipped to +-(their signed values' quantile). PEFT's
    quantile reads signed values, so its result depends on the SVD's sign choices (LAPACK's: torch's and
    NumPy's differ on rank-deficient updates); here against the unclamped factors instead."""
    from flax.traverse_util import flatten_dict

    plain = flatten_dict(dj.add_weighted_adapter(two_adapters["ours"], [0.7, -0.4], "svd")[0])
    clamped = flatten_dict(dj.add_weighted_adapter(two_adapters["ours"], [0.7, -0.4], "svd", svd_clamp=0.9)[0])
    layers = {p[:-1] for p in plain if p[-1] == "lora_a"}
    clipped = 0
    for layer in layers:
        a, b = (np.asarray(plain[layer + (n,)]) for n in ("lora_a", "lora_b"))
        hi = np.quantile(np.concatenate([a.ravel(), b.ravel()]), 0.9)
        for name, factor in (("lora_a", a), ("lora_b", b)):
            np.testing.assert_allclose(np.asarray(clamped[layer + (name,)]), np.clip(factor, -hi, hi), atol=1e-6)
            clipped += int((np.abs(factor) > hi).sum())
    assert clipped > 0


def test_weighted_adapter_refusals(two_adapters):
    (pa, ca), (pb, cb) = two_adapters["ours"]
    with pytest.raises(dj.ConfigError, match="combination_type='mean' is unknown"):
        dj.add_weighted_adapter([(pa, ca), (pb, cb)], [1, 1], "mean")
    with pytest.raises(dj.ConfigError, match="prunes: give density"):
        dj.add_weighted_adapter([(pa, ca), (pb, cb)], [1, 1], "ties")
    dora = dj.AdapterConfig(method="dora", targets="query$", rank=4)
    with pytest.raises(dj.ConfigError, match="Adapter 1 is a 'dora' adapter"):
        dj.add_weighted_adapter([(pa, ca), (pb, dora)], [1, 1], "cat")
    wide = dj.AdapterConfig(method="lora", targets="query$", rank=2)
    with pytest.raises(dj.ConfigError, match=r"needs one rank in every adapter and layer \(found \[2, 4\]\)"):
        dj.add_weighted_adapter([(pa, ca), (dj.inject(dj.merge(pa, ca), wide, jax.random.PRNGKey(0)), wide)], [1, 1],
                                "linear")
