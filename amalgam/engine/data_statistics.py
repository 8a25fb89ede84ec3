"""The data statistics pass: resolve each recipe model's statistics artifact, and check it."""

from __future__ import annotations

import dataclasses
import json

from amalgam.checkpoint import Checkpoint
from amalgam.engine.plan import MAX_LISTED, DataStatisticsPass, Plan
from amalgam.errors import StatisticsError
from amalgam.methods.base import REGISTRY
from amalgam.methods.needs import DataStatistics
from amalgam.statistics.artifact import StatisticsInfo, read_info
from amalgam.statistics.compute import cached_statistics
from amalgam.statistics.data import load_examples
from amalgam.statistics.settings import statistic_shape


def attach_statistics(
    plan: Plan, inputs: dict[str, Checkpoint], pass_: DataStatisticsPass, device: str = "auto"
) -> Plan:
    """The plan with one checked statistics artifact per model (computed and cached where the
    recipe names data but no artifact); their content hashes join the output's provenance."""
    recipe = plan.recipe
    method, kind, settings = recipe.method, pass_.kind, json.loads(pass_.settings)
    infos = []
    for i, m in enumerate(recipe.models):
        where = f"models[{i}] ({m.label})"
        if m.statistics:
            info = read_info(m.statistics, **recipe.storage_options)
            if info.kind != kind:
                raise StatisticsError(
                    f"{where}.statistics: {m.statistics} holds {info.kind} statistics, "
                    f"method '{method}' reads {kind}"
                )
            model_hash = inputs[m.label].content_hash()
            if info.model_hash != model_hash:
                raise StatisticsError(
                    f"{where}.statistics: {m.statistics} was computed for model "
                    f"{info.model_hash}, but {m.uri} is {model_hash}"
                )
            if m.data and load_examples(m.data, **recipe.storage_options)[1] != info.data_hash:
                raise StatisticsError(
                    f"{where}.statistics: {m.statistics} was computed on other data than {m.data}"
                )
        elif m.data:
            info, _ = cached_statistics(
                m.uri, m.data, kind, settings, device=device, **recipe.storage_options
            )
        else:
            raise StatisticsError(f"{where}: give data: or statistics: for '{method}'")
        infos.append(info)
    _check_coverage(plan, infos, kind)
    need = REGISTRY[method].need(DataStatistics)
    if need is not None and need.check is not None:
        need.check(recipe, infos)
    provenance = ";".join(
        f"{m.label}={info.content_hash}" for m, info in zip(recipe.models, infos, strict=True)
    )
    return dataclasses.replace(
        plan, statistics=tuple(infos), metadata={**plan.metadata, "statistics": provenance}
    )


def _check_coverage(plan: Plan, infos: list[StatisticsInfo], kind: str) -> None:
    """Fisher: every merged tensor, same shape. Gram: the same tensors in every artifact, each
    an (in x in) matrix for a 2-D merged tensor (a linear layer) or, for an input embedding, a
    vector with one token share per row of the 2-D tensor. One error lists every problem."""
    merged = {j.name: j.shape for j in plan.jobs if not j.copy}
    problems: list[str] = []
    union = set().union(*(info.shapes for info in infos)) if kind == "gram" else set(merged)
    for info in infos:
        for name in sorted(union):
            have = info.shapes.get(name)
            shape = merged.get(name)
            if have is None:
                problems.append(f"{info.uri}: lacks the statistic of tensor '{name}'")
            elif shape is None:
                problems.append(f"{info.uri}: tensor '{name}' is not a merged tensor of the plan")
            else:
                want = statistic_shape(kind, shape, len(have))
                if (kind == "gram" and len(shape) != 2) or tuple(have) != want:
                    problems.append(
                        f"{info.uri}: statistic of '{name}' has shape {list(have)}, "
                        f"the tensor {list(shape)} needs {list(want)}"
                    )
    if problems:
        shown = problems[:MAX_LISTED]
        tail = [f"... and {len(problems) - len(shown)} more"] if len(problems) > len(shown) else []
        raise StatisticsError("statistics do not fit the models:\n  " + "\n  ".join(shown + tail))
