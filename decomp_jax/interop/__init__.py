"""Floor 3, interoperability with other PEFT libraries: ``peft`` reads and writes Hugging Face PEFT adapters
(``format`` < ``export`` < ``load``).

May import: floors 0-2.
"""

from decomp_jax.errors import PeftFormatError
from decomp_jax.interop.peft import export_peft, import_peft
from decomp_jax.models.names import ARCHS, Arch

__all__ = ["ARCHS", "Arch", "PeftFormatError", "export_peft", "import_peft"]
