"""The pipeline's stages as library objects (see :mod:`amalgam.stages.base` for the contract):
usable from a notebook or a Ray job with :func:`execute`, wrapped as Prefect tasks by ``tasks/``.
"""

from amalgam.registry import Registered
from amalgam.stages.align import AlignStage
from amalgam.stages.base import (
    Mapper,
    Runner,
    Stage,
    StageReport,
    content_key,
    execute,
    in_order,
)
from amalgam.stages.compress import Compressed, CompressInput, CompressStage
from amalgam.stages.discover import DiscoverInput, DiscoverStage
from amalgam.stages.evaluate import (
    EvaluateInput,
    EvaluateStage,
    ScoreInput,
    ScoreStage,
)
from amalgam.stages.fetch import Fetched, FetchInput, FetchStage
from amalgam.stages.merge import Merged, MergeInput, MergeStage
from amalgam.stages.promote import Promoted, PromoteInput, PromoteStage, run_promote
from amalgam.stages.register import RegisterInput, RegisterStage, registry_for

__all__ = [
    "AlignStage",
    "CompressInput",
    "CompressStage",
    "Compressed",
    "DiscoverInput",
    "DiscoverStage",
    "EvaluateInput",
    "EvaluateStage",
    "FetchInput",
    "FetchStage",
    "Fetched",
    "Mapper",
    "MergeInput",
    "MergeStage",
    "Merged",
    "PromoteInput",
    "PromoteStage",
    "Promoted",
    "RegisterInput",
    "RegisterStage",
    "Registered",
    "Runner",
    "ScoreInput",
    "ScoreStage",
    "Stage",
    "StageReport",
    "content_key",
    "execute",
    "in_order",
    "registry_for",
    "run_promote",
]
