"""Interoperability with other PEFT formats: ``peft`` reads and writes Hugging Face PEFT adapters."""

from decomp_jax.errors import PeftFormatError
from decomp_jax.interop.peft import export_peft, import_peft
from decomp_jax.models.names import ARCHS, Arch

__all__ = ["ARCHS", "Arch", "PeftFormatError", "export_peft", "import_peft"]
