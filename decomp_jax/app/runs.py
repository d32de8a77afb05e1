"""Finished runs: restore the adapted model from a checkpoint, and export it merged.

``restore_run(path)`` needs only a checkpoint: its metadata holds the experiment config, from
which the base model is loaded (no data), injected, and overwritten with the saved leaves.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax

from decomp_jax.app.experiment import (
    ExperimentConfig, architecture, initial_state, load_adapter, load_base_model, load_config, peft_arch,
    save_adapter,
)
from decomp_jax.core.execution import adapt
from decomp_jax.core.inject import merge, partition
from decomp_jax.core.tree import combine
from decomp_jax.errors import ConfigError
from decomp_jax.guards import (
    atomic_folder, atomic_save_safetensors, atomic_write_text, check_finite, manifest_files, read_json,
    write_manifest,
)
from decomp_jax.interop.peft import export_peft, import_peft
from decomp_jax.models.causal_lm import scanned_params, unrolled_params
from decomp_jax.models.convert import save_converted
from decomp_jax.models.gpt2 import GPT2LMHeadModel, save_gpt2_lm
from decomp_jax.models.hf import hub_id_of, sequence_classifier_apply
from decomp_jax.models.names import encoder_arch, save_classifier_config, torch_state_dict
from decomp_jax.tasks.base import model_params
from decomp_jax.training import checkpoint


class RestoredRun(NamedTuple):
    cfg: ExperimentConfig
    model: Any  # the sequence classifier (HF Flax or native) or our LlamaForCausalLM
    base_params: dict
    params: dict  # the adapted params at the checkpoint's step
    tokenizer: Any
    step: int


def _locate(path: Path) -> tuple[Path, Optional[int]]:
    """``(checkpoints folder, step or None for the latest)`` from a run folder, its
    ``checkpoints`` folder, or one step folder."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and path.parent.is_dir():
        return path.parent, int(path.name)
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return path, None
    raise FileNotFoundError(
        f"{path} is not a checkpoint: pass a run's output_dir, its checkpoints/ folder, or checkpoints/STEP."
    )


class AdapterFileFallbackWarning(UserWarning):
    """``restore_run`` used a run's ``adapter.safetensors`` because no checkpoint holds its final step."""


def _adapter_file_run(run_dir: Path, step: int, why: str) -> RestoredRun:
    """The run in ``run_dir`` from its ``config.yaml`` and ``adapter.safetensors`` (what a finished run writes
    before its final checkpoint), at its final ``step``: the base is loaded and injected as in training, then
    the saved adapter replaces the trainable leaves and buffers. ``why``: why no checkpoint serves, in words."""

    cfg = load_config(run_dir / "config.yaml")
    model, base, tokenizer = load_base_model(cfg)
    base, params = model_params(base, cfg, jax.random.PRNGKey(cfg.train.seed))
    trainable, buffers, frozen = partition(params, cfg.adapter)
    adapter = load_adapter(run_dir / "adapter.safetensors", combine(trainable, buffers))
    warnings.warn(f"{run_dir}: {why}; using its adapter.safetensors (step {step}), written when training ended.",
                  AdapterFileFallbackWarning, stacklevel=3)
    return RestoredRun(cfg, model, base, combine(adapter, {}, frozen), tokenizer, step)


def _final_step(run_dir: Path) -> Optional[int]:
    """The final step of the finished run in ``run_dir`` (``metrics.json``'s ``steps``, with its
    ``adapter.safetensors`` and ``config.yaml`` beside it); None for anything else."""
    if not all((run_dir / name).is_file() for name in ("metrics.json", "adapter.safetensors", "config.yaml")):
        return None
    try:
        return int(read_json(run_dir / "metrics.json")["steps"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def restore_run(path: str | os.PathLike) -> RestoredRun:
    """The adapted model of a run at a checkpoint (default: the run's latest good one; a corrupted
    latest checkpoint is named in a warning and the previous one is used). A finished run whose
    checkpoints do not reach its final step (its final checkpoint could not be written, or cannot be
    read) is restored from its ``adapter.safetensors`` and ``config.yaml``, with a warning saying so."""
    path = Path(path)
    final = _final_step(path)
    if final is not None and not (path / "checkpoints").is_dir():
        return _adapter_file_run(path, final, "it has no checkpoints folder")
    folder, step = _locate(path)
    fallback = final is not None and step is None  # a run folder, its latest checkpoint asked for
    mngr = checkpoint.manager(folder)
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if fallback and (not steps or steps[0] < final):
            return _adapter_file_run(path, final, f"no checkpoint holds its final step {final}"
                                     + (f" (the latest is step {steps[0]})" if steps else ""))
        if not steps or (step is not None and step not in steps):
            raise FileNotFoundError(f"No checkpoint {'' if step is None else step} in {folder}; it holds {steps[::-1]}.")
        try:
            cfg = ExperimentConfig.from_dict(checkpoint.saved_experiment(mngr, steps if step is None else [step]))
            model, base, tokenizer = load_base_model(cfg)
            base, params = model_params(base, cfg, jax.random.PRNGKey(cfg.train.seed))
            trainable, buffers, frozen = partition(params, cfg.adapter)
            _, _, like = initial_state(cfg, 1, trainable, buffers, frozen)
            fingerprint = checkpoint.fingerprint(base, cfg.adapter, architecture(model))
            with warnings.catch_warnings(record=fallback) as skipped:
                state, frozen, _ = checkpoint.restore(mngr, like, frozen, cfg.adapter, fingerprint=fingerprint,
                                                      step=step)
        except checkpoint.CheckpointError as err:
            if not fallback:
                raise
            return _adapter_file_run(path, final, f"no checkpoint can be read ({err})")
        if fallback and int(state.step) < final:  # the final checkpoint is damaged: the adapter file is newer
            return _adapter_file_run(path, final, f"its checkpoint of step {final} cannot be read "
                                     f"({'; '.join(str(w.message) for w in skipped)})")
        for w in skipped or ():
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    finally:
        mngr.close()
    check_finite(combine(state.trainable, state.buffers or {}), f"The adapter in {folder}/{int(state.step)}",
                 "it cannot be exported or merged; use an earlier checkpoint (checkpoints/STEP).")
    adapted = combine(state.trainable, state.buffers or {}, frozen)
    return RestoredRun(cfg, model, base, adapted, tokenizer, int(state.step))


MERGE_MANIFEST = "decomp_jax_merge.json"


def export_merged(run: RestoredRun, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Write the merged model: for a classifier config.json and PyTorch-format ``model.safetensors``
    (transformers' PyTorch ``AutoModelForSequenceClassification`` and our loader read it), and the
    tokenizer; for our Llama the HF folder of ``convert.save_converted`` (config.json,
    model.safetensors, tokenizer), which transformers' ``LlamaForCausalLM`` and ``load_hf`` read; for
    GPT-2's LM the folder transformers' ``GPT2LMHeadModel`` and ``models.gpt2.load_gpt2_lm`` read.

    All files or none: an earlier merged model in ``out_dir`` is replaced only once the new one is
    complete. A folder holding anything else (a run, a folder of runs, the user's files) is refused
    unless ``overwrite``: then the merged files are written into it and its other files are kept."""
    merged = merge(run.params, run.cfg.adapter)
    check_finite(merged, "The merged model", "nothing is written.")
    info = {"source_step": run.step, "method": run.cfg.adapter.method, "model": run.cfg.model.name}
    with atomic_folder(out_dir, ours=lambda d: manifest_files(d, MERGE_MANIFEST), overwrite=overwrite,
                       writer="merge") as tmp:
        if peft_arch(run.model) == "llama":

            save_converted(str(tmp), run.model.config, unrolled_params(run.model, merged), run.tokenizer)
        elif isinstance(run.model, GPT2LMHeadModel):
            save_gpt2_lm(tmp, run.model.config, unrolled_params(run.model, merged), run.tokenizer)
        else:
            save_classifier_config(run.model.config, tmp)
            atomic_save_safetensors(torch_state_dict(merged, encoder_arch(run.model.config)), tmp / "model.safetensors",
                                    metadata={"format": "pt"})
            run.tokenizer.save_pretrained(tmp)
        return write_manifest(tmp, MERGE_MANIFEST, info)


def adapted_apply(run: RestoredRun):
    """``apply(batch) -> logits`` of the restored adapted model (factored execution)."""
    fn = adapt(sequence_classifier_apply(run.model), run.cfg.adapter, mode=run.cfg.train.mode)
    return lambda batch: fn(run.params, batch)


def export_peft_run(run: RestoredRun, out_dir: str | os.PathLike, overwrite: bool = False,
                    base_model_id: Optional[str] = None) -> dict[str, Any]:
    """Write the run's adapter in the HF PEFT format (``adapter_config.json`` +
    ``adapter_model.safetensors``), relative to the run's base model (``overwrite``: as ``export_peft``).
    ``base_model_name_or_path`` records ``base_model_id``, else the config's ``model.hub_id``, else
    ``hub_id_of(model.name)``: the model as the config names it (a hub id, a model package's hub id, or
    the user's folder), never the folder it resolved to on this machine."""
    arch = peft_arch(run.model)
    base_id = base_model_id or run.cfg.model.hub_id or hub_id_of(run.cfg.model.name)
    export_peft(unrolled_params(run.model, run.params), run.cfg.adapter, str(out_dir),
                base_model_name_or_path=base_id, arch=arch,
                base_params=unrolled_params(run.model, run.base_params), model_config=run.model.config,
                overwrite=overwrite)
    return {"source_step": run.step, "method": run.cfg.adapter.method, "arch": arch, "format": "peft",
            "base_model_name_or_path": base_id}


def import_peft_run(peft_dir: str | os.PathLike, config_path: str | os.PathLike, out_dir: str | os.PathLike,
                    overrides=(), subfolder: Optional[str] = None) -> dict[str, Any]:
    """Turn a PEFT adapter folder (``subfolder``: a named adapter inside it) into a run folder of ours:
    ``config.yaml`` (the experiment config with the imported adapter section), ``adapter.safetensors``
    and a step-0 checkpoint, so that ``decomp-jax eval``, ``merge`` and ``export`` work on it."""

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty; import into a new folder.")
    cfg = load_config(config_path, overrides)
    model, base, _ = load_base_model(cfg)
    params, adapter_cfg = import_peft(str(peft_dir), unrolled_params(model, base), arch=peft_arch(model),
                                      base_model_name_or_path=cfg.model.name, subfolder=subfolder)
    params = scanned_params(model, params)  # PEFT names layers one by one: stack them again for scan_layers
    cfg = ExperimentConfig(model=cfg.model, data=cfg.data, adapter=adapter_cfg,
                           train=cfg.train.replace(output_dir=str(out_dir)))
    trainable, buffers, frozen = partition(params, adapter_cfg)
    _, _, state = initial_state(cfg, 1, trainable, buffers, frozen)
    with atomic_folder(out_dir) as tmp:  # a failed import leaves no folder behind
        mngr = checkpoint.manager(tmp / "checkpoints")
        try:
            checkpoint.save(mngr, state, frozen, adapter_cfg,
                            metadata={"experiment": cfg.to_dict(), "imported_from": str(peft_dir)},
                            fingerprint=checkpoint.fingerprint(base, adapter_cfg, architecture(model)))
        finally:
            mngr.close()
        atomic_write_text(tmp / "config.yaml", cfg.to_yaml())
        save_adapter(combine(trainable, buffers), tmp / "adapter.safetensors")
    return {"method": adapter_cfg.method, "targets": adapter_cfg.targets, "rank": adapter_cfg.rank, "out": str(out_dir)}
