"""Continual merges: absorb models one at a time into a checkpoint plus a small JSON state.

Each step reads the base, the running merge and one new model tensor by tensor and writes the
next merge (a normal model folder) with ``continual_state.json`` beside it; several models in
one recipe are absorbed step by step through hidden intermediate folders next to the output,
so one run over N models gives the same bytes as N runs chained with ``continue_from``, and
memory never depends on how many models were absorbed.
"""

from __future__ import annotations

import json
import math
import resource
import time
import uuid
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from amalgam import storage
from amalgam.checkpoint import open_checkpoint
from amalgam.device import compute_threads, pick_device
from amalgam.engine.execute import Progress
from amalgam.engine.executors import pick_executor
from amalgam.engine.inputs import check_output, open_recipe_inputs, plan_inputs
from amalgam.engine.options import MergeOptions, MergeResult, job_context, output_of
from amalgam.engine.plan import AbsorbStep, NormPass, Plan, build_plan
from amalgam.engine.ray_executor import WorkerMemory
from amalgam.engine.write import write_output
from amalgam.errors import CheckpointError, RecipeError
from amalgam.methods.base import STEP_KEY, Method, Step, get_method
from amalgam.recipe import ModelSpec, ParamValue, Recipe
from amalgam.writer import remove_folder, remove_stale_staging, staging_prefix

STATE_NAME = "continual_state.json"
STATE_FORMAT = 1


class Absorbed(BaseModel):
    """One model in a continual merge's history."""

    model_config = ConfigDict(extra="forbid")

    label: str
    uri: str
    content_hash: str


class ContinualState(BaseModel):
    """What a continual merge carries from one step to the next, beside its checkpoint."""

    model_config = ConfigDict(extra="forbid")

    format: int = STATE_FORMAT
    method: str
    params: dict[str, ParamValue]
    step: int = 0
    scale: float = 1.0  # the merged task vector's divisor (OPCM's lambda_t)
    norms: list[float] = []  # whole-model task-vector norms of the absorbed models (OPCM)
    base: Absorbed
    models: list[Absorbed] = []


def read_state(uri: str, **storage_options: Any) -> ContinualState:
    """The continual state stored with the merge at ``uri``."""
    fs, path = storage.resolve(uri, **storage_options)
    where = f"{uri}/{STATE_NAME}"
    try:
        with fs.open(storage.join(path, STATE_NAME), "rb") as fh:
            data = json.loads(fh.read())
    except FileNotFoundError:
        raise CheckpointError(
            f"{where}: not found ({uri} is not the output of a continual merge)"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: unreadable ({exc})") from None
    try:
        state = ContinualState.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "state"
        raise CheckpointError(f"{where}: invalid state: {loc}: {first['msg']}") from None
    if state.format != STATE_FORMAT:
        raise CheckpointError(f"{where}: format {state.format} is not {STATE_FORMAT}")
    if state.step != len(state.models):
        raise CheckpointError(f"{where}: step {state.step} but {len(state.models)} models")
    try:
        method = get_method(state.method)
    except RecipeError:  # an unknown method: continuing names the mismatch, reading works
        return state
    # A parameter the method gained after the state was written ran at its default there.
    return state.model_copy(
        update={"params": {**state.params, **shared_params(state.params, method)}}
    )


def absorbed_hashes(uri: str, **storage_options: Any) -> list[str]:
    """Content hashes of the models already absorbed into the merge at ``uri``, in order."""
    return [m.content_hash for m in read_state(uri, **storage_options).models]


def shared_params(values: dict[str, Any], method: Method) -> dict[str, ParamValue]:
    """Parameter values with the method's defaults filled in."""
    return {p.name: values.get(p.name, p.default) for p in method.params}


def check_continuation(
    state: ContinualState, recipe: Recipe, params: dict[str, Any], base_hash: str, uri: str
) -> None:
    """Continuing needs the same method, base and parameters; one error lists every mismatch."""
    problems = []
    if state.method != recipe.method:
        problems.append(f"method: '{recipe.method}' here but '{state.method}' in the state")
    if state.base.content_hash != base_hash:
        problems.append(
            f"base: {recipe.base} ({base_hash}) is not the state's base "
            f"{state.base.uri} ({state.base.content_hash})"
        )
    elif state.method == recipe.method:
        for key in sorted(set(params) | set(state.params)):
            if params.get(key) != state.params.get(key):
                problems.append(
                    f"params.{key}: {params.get(key)!r} here but "
                    f"{state.params.get(key)!r} in the state"
                )
    if problems:
        raise RecipeError(
            f"continue_from {uri}: the recipe does not continue this merge:\n  "
            + "\n  ".join(problems)
        )


def run_continual(
    recipe: Recipe, options: MergeOptions, progress: Progress | None = None
) -> MergeResult:
    """Absorb ``recipe.models`` in order into the base (or into ``options.continue_from``),
    one plan step per model."""
    start = time.perf_counter()
    method = recipe.method_spec
    output = output_of(recipe, options)
    so = recipe.storage_options
    params = shared_params(recipe.params, method)
    merged = options.continue_from
    state, base_hash, steps = _check_all(recipe, options, output, params)
    if state is None:
        base = Absorbed(label="base", uri=recipe.base, content_hash=base_hash)
        state = ContinualState(method=recipe.method, params=params, base=base)
    fs, path = storage.resolve(output, **so)
    p = PurePosixPath(path)
    remove_stale_staging(fs, str(p.parent), p.name, "steps")
    scratch = str(p.parent / f"{staging_prefix(p.name, 'steps')}{uuid.uuid4().hex[:12]}")
    device = pick_device(options.device)
    read = 0
    memory = WorkerMemory({})
    try:
        # all cores but one, as before: the steps' SVDs round by the BLAS thread count, and a
        # Ray task runs one thread (local equals Ray where that leaves one thread)
        with compute_threads(options.threads):
            for i, (model, step) in enumerate(zip(recipe.models, steps, strict=True)):
                last = i == len(recipe.models) - 1
                step_uri = storage.full_uri(fs, storage.join(scratch, f"step-{i + 1}"))
                out = output if last else step_uri
                step_options = options.model_copy(
                    update={"output": out, "overwrite": options.overwrite and last}
                )
                state, plan, n = _absorb(
                    recipe, step, model, merged, state, step_options, device, progress, memory
                )
                read += n
                if merged is not None and merged != options.continue_from:
                    remove_folder(fs, storage.resolve(merged, **so)[1])
                merged = out
    finally:
        remove_folder(fs, scratch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - start
    return MergeResult(output, plan, seconds, read, peak, memory.sorted_peaks())


def _check_all(
    recipe: Recipe, options: MergeOptions, output: str, params: dict[str, Any]
) -> tuple[ContinualState | None, str, tuple[AbsorbStep, ...]]:
    """Before any work: the state fits the recipe, every input fits the base, the output is
    free. Returns the state to continue (None: start from the base), the base's hash and the
    plan's steps."""
    inputs = open_recipe_inputs(recipe, options)
    try:
        base_hash = inputs["base"].content_hash()
        state = None
        if options.continue_from:
            state = read_state(options.continue_from, **recipe.storage_options)
            check_continuation(state, recipe, params, base_hash, options.continue_from)
            running = open_checkpoint(
                options.continue_from, allow_pickle=False, **recipe.storage_options
            )
            # in step order (base, running merge, models): the inputs' tensor rule then holds
            # for every step as it does for the whole (extra_tensors, tensor_sets.py)
            base = inputs.pop("base")
            inputs = {"base": base, "continue_from": running, **inputs}
        check_output(output, inputs, options.overwrite, recipe.storage_options)
        steps = build_plan(recipe, inputs, {}).passes
        return state, base_hash, tuple(s for s in steps if isinstance(s, AbsorbStep))
    finally:
        for c in inputs.values():
            c.close()


def _absorb(
    recipe: Recipe,
    step: AbsorbStep,
    model: ModelSpec,
    merged: str | None,
    state: ContinualState,
    options: MergeOptions,
    device: torch.device,
    progress: Progress | None,
    memory: WorkerMemory,
) -> tuple[ContinualState, Plan, int]:
    """One step: base, running merge (none on the first step) and one model -> the next merge,
    by the step's passes (a norm pass fixes the step's divisor, the tensor pass writes)."""
    inputs_spec = [ModelSpec(uri=merged, name="merged")] if merged else []
    read_from = options.read_from
    new = ModelSpec(uri=read_from.get(model.label, model.uri), name="new")
    base = read_from.get("base", recipe.base)
    step_recipe = recipe.model_copy(update={"models": [*inputs_spec, new], "base": base})
    inputs = open_recipe_inputs(step_recipe, options.model_copy(update={"read_from": {}}))
    try:
        plan = plan_inputs(step_recipe, inputs, options)
        # provenance names the user's recipe, not the step's (whose inputs include a scratch path)
        metadata = {**plan.metadata, "recipe_hash": recipe.hash()}
        plan = replace(plan, metadata=metadata, passes=step.passes)
        index, prev_scale = state.step + 1, state.scale
        norms, scale = state.norms, 1.0
        ctx = job_context(plan, options, device, progress, {STEP_KEY: Step(index, prev_scale)})
        executor = pick_executor(ctx, inputs, options, memory)
        for pass_ in step.passes:
            if isinstance(pass_, NormPass):
                merged_sq, task_sq = executor.norms(ctx, pass_, list(inputs.values()))
                norms, scale = _rescale(state.norms, merged_sq, task_sq)
            else:  # the tensor pass: this step's merge, with the state it leaves
                new_hash = inputs["new"].content_hash()
                entry = Absorbed(label=model.label, uri=model.uri, content_hash=new_hash)
                update = {"step": index, "scale": scale, "norms": norms}
                state = state.model_copy(update={**update, "models": [*state.models, entry]})
                ctx = replace(ctx, stats={STEP_KEY: Step(index, prev_scale, scale)})
                extra = {STATE_NAME: state.model_dump(mode="json")}
                read = write_output(ctx, inputs, options, executor, extra)
    finally:
        for c in inputs.values():
            c.close()
    return state, plan, read


def _rescale(norms: list[float], merged_sq: float, task_sq: float) -> tuple[list[float], float]:
    """The absorbed task vectors' norms with the new one's, and the step's divisor:
    ||unscaled merge|| / their mean (1 where either is zero)."""
    norms = [*norms, math.sqrt(task_sq)]
    mean, norm = sum(norms) / len(norms), math.sqrt(merged_sq)
    return norms, norm / mean if norm > 0 and mean > 0 else 1.0
