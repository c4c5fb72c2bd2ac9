"""The error every package raises when an optional dependency (an extra of pyproject.toml) is missing."""

from __future__ import annotations


class MissingExtraError(ImportError):
    """An optional dependency that the requested model or runtime needs is not installed (the message names the
    extra and the command that installs it)."""
