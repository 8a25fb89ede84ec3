"""Twin-Merging (arXiv 2406.15479): a shared merge, each expert's exclusive knowledge as
truncated-SVD factors, and a router that mixes them per input."""

from amalgam.twin.errors import TwinError
from amalgam.twin.spec import TwinSpec

__all__ = ["TwinError", "TwinSpec"]
