"""The kvforge exception hierarchy.

Every error kvforge raises on bad input is a subclass of :class:`Error`, and also of the builtin
class a caller would expect (``ValueError`` for bad values, ``TypeError`` for bad types), so both
``except kvforge.Error`` and ``except ValueError`` work. The Rust core raises these same classes.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every kvforge error."""


class ModelFormatError(Error, ValueError):
    """A model file or folder is malformed, inconsistent with its config, or unsupported."""


class ConfigError(Error, ValueError):
    """A configuration value or call parameter is out of range."""


class InputTypeError(Error, TypeError):
    """A parameter has the wrong type."""


class CacheFullError(Error, RuntimeError):
    """The KV block pool cannot hold what a request needs."""


class NumericalError(Error, ArithmeticError):
    """Non-finite values appeared in weights, activations or logits."""


class InternalError(Error, RuntimeError):
    """A bug inside kvforge (a Rust panic caught at the boundary). Please report it."""


__all__ = [
    "Error",
    "ModelFormatError",
    "ConfigError",
    "InputTypeError",
    "CacheFullError",
    "NumericalError",
    "InternalError",
]
