"""Twin-Merging's error."""

from amalgam.errors import AmalgamError


class TwinError(AmalgamError):
    """A Twin-Merging artifact cannot be built or loaded (rank, router data, manifest, ...)."""
