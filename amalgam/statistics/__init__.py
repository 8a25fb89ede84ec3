"""Statistics for data-driven merges: Fisher diagonals and Gram matrices, as cached artifacts."""

from amalgam.statistics.artifact import StatisticsInfo, read_info
from amalgam.statistics.compute import cache_path, cached_statistics, compute_statistics
from amalgam.statistics.settings import KINDS

__all__ = [
    "KINDS",
    "StatisticsInfo",
    "cache_path",
    "cached_statistics",
    "compute_statistics",
    "read_info",
]
