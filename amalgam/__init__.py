"""amalgam: a streaming, reproducible model-merging pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("amalgam")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
