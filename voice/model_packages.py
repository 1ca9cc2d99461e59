"""The pip packages that ship closeloop's speech models, imported with an error saying how to get them."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol

__all__ = ["import_model_package"]


class _Unavailable(Protocol):
    """An ``STTUnavailable``/``TTSUnavailable``-like error class."""

    def __call__(self, message: str, *, retryable: bool) -> Exception: ...


def import_model_package(module: str, *, what: str, pip_name: str, unavailable: _Unavailable) -> ModuleType:
    """The model package ``module``.

    Args:
        module: The import name of the package.
        what: What the package is, for the message ("the Piper voice package").
        pip_name: The name to ``pip install``.
        unavailable: The error class to raise when the package is missing.

    Raises:
        unavailable: The package is not installed (not retryable).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise unavailable(
            f"{what} is not installed; install it with: pip install {pip_name}", retryable=False
        ) from e
