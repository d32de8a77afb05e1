"""Interoperability with other PEFT formats: ``peft`` reads and writes Hugging Face PEFT adapters."""

from decomp_jax.interop.peft import ARCHS, Arch, PeftFormatError, export_peft, import_peft

__all__ = ["ARCHS", "Arch", "PeftFormatError", "export_peft", "import_peft"]
