"""Typed errors: every failure names the file, tensor or field it is about."""


class AmalgamError(Exception):
    """Base class for every error amalgam raises on bad input."""


class CheckpointError(AmalgamError):
    """A checkpoint cannot be opened or read (missing, corrupt, pickle, ...)."""


class RecipeError(AmalgamError):
    """A recipe (or mergekit YAML) is invalid."""


class PlanError(AmalgamError):
    """The inputs of a merge do not fit together (missing tensors, shape mismatches)."""


class MergeError(AmalgamError):
    """A merge method failed on a tensor (NaN/Inf input, bad parameter value)."""


class OutputError(AmalgamError):
    """The output location is not usable (exists, inside an input, ...)."""


class StatisticsError(AmalgamError):
    """Statistics for a data-driven merge cannot be computed or used (data, artifact, hash)."""
