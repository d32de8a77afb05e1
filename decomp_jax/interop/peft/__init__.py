"""The Hugging Face PEFT adapter format (PEFT 0.21), both ways.

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``; PyTorch
loads it with ``peft.PeftModel.from_pretrained(base_model, folder)``. This package writes and reads
that format from decomp_jax's adapted params without importing torch or peft: ``format`` holds what
both directions share (and describes what the format holds), ``export`` writes an adapter
(``export_peft``) and ``load`` reads one (``import_peft``).
"""

from decomp_jax.interop.peft.export import ADALORA_TOTAL_STEP, ENCODER_TASK_TYPES, EXPORTABLE, export_peft
from decomp_jax.interop.peft.format import (
    ADALORA_EPS, CONFIG_NAME, CORE_FIELDS, FACTORS, HEAD_TASK_TYPES, LEGACY_WEIGHTS_NAME, MERGE_FIX, PEFT_VERSION,
    PREFIX, PROMPT_TYPES, READ_FIX, TIE_NAMES, TIEABLE_TYPES, WEIGHTS_NAME, adapter_folder, export_entries,
    layer_factors,
)
from decomp_jax.interop.peft.load import IMPORTABLE, KEY_HINTS, PROMPT_IMPORTS, UNSUPPORTED_SETTINGS, import_peft
from decomp_jax.models.names import Arch, Path, PeftFormatError, get_arch

__all__ = [
    "ADALORA_EPS", "ADALORA_TOTAL_STEP", "CONFIG_NAME", "CORE_FIELDS", "ENCODER_TASK_TYPES", "EXPORTABLE", "FACTORS",
    "HEAD_TASK_TYPES", "IMPORTABLE", "KEY_HINTS", "LEGACY_WEIGHTS_NAME", "MERGE_FIX", "PEFT_VERSION", "PREFIX",
    "PROMPT_IMPORTS", "PROMPT_TYPES", "READ_FIX", "TIEABLE_TYPES", "TIE_NAMES", "UNSUPPORTED_SETTINGS", "WEIGHTS_NAME",
    "Arch", "Path", "PeftFormatError", "adapter_folder", "export_entries", "export_peft", "get_arch", "import_peft",
    "layer_factors",
]
