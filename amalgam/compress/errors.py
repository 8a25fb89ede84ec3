"""The compress stage's error."""

from amalgam.errors import AmalgamError


class CompressError(AmalgamError):
    """A model cannot be compressed or decompressed (base mismatch, bad manifest, ...)."""
