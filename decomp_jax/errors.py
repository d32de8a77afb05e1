"""The errors every floor raises: a wrong configuration value or key (``ConfigError``), a wrong type
(``ConfigTypeError``), a PEFT folder that does not fit (``PeftFormatError``), and ``closest``, the "Did you mean ...?" hint their messages carry."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which and how to fix it."""


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value has the wrong type (a string where a number goes, say): both a
    ``ConfigError`` (the CLI prints it as one line) and a ``TypeError``."""


def closest(word: str, choices) -> str:
    """`` Did you mean 'x'?`` for the choice nearest ``word`` (empty when none is near)."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" Did you mean {near[0]!r}?" if near else ""


class PeftFormatError(ConfigError):
    """A PEFT adapter folder does not match the model or the format (missing, unexpected or
    mis-shaped tensors, unsupported config fields); the message names them."""


__all__ = ["ConfigError", "ConfigTypeError", "PeftFormatError", "closest"]
