"""The one error type of bad input data or arguments."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or arguments; the CLI prints the message as a one-line reason and exits non-zero."""
