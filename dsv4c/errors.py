"""The errors the public API raises. Each message says what was expected, what was found and where;
the CLI prints it as one line (with the traceback only under `--debug`)."""

from __future__ import annotations

__all__ = ["ArtifactError", "DsvError", "InputError", "TargetMismatchError", "UnavailableError"]


class DsvError(Exception):
    """Base of every error dsv4c raises on purpose (the CLI prints these without a traceback)."""


class ArtifactError(DsvError):
    """An artifact directory is missing, incomplete, altered, or from other tool versions."""


class TargetMismatchError(ArtifactError):
    """An artifact was compiled for another target than the one asked for or present."""


class InputError(DsvError, TypeError):
    """The tensors given to a compiled entry point do not match its input types."""


class UnavailableError(DsvError):
    """A backend or toolchain that is not installed (or not written yet)."""
