"""Evolutionary recipe search (arXiv 2403.13187, parameter-space merging; mergekit-evolve):
CMA-ES over a recipe's per-model weights, densities or any numeric parameter of its method,
optionally once per group of layers.

Each generation's candidates are merged and scored side by side (Ray tasks, one CPU each);
the objective is a weighted mean of task accuracies on the search split. After every
generation the CMA-ES state and the trials are checkpointed, so a killed search resumes where
its last generation ended and, with the same seed, ends as an uninterrupted one does. The
held-out split scores the start point (the recipe as given) and the best candidate only.

Deviations from the paper: the paper's parameter-space search tunes DARE-TIES densities and
weights per layer with CMA-ES from optuna on benchmark scores; here any registered method's
numeric parameters are searched (the ``cmaes`` package, bounds handled by its resampling) and
candidates are scored by the quick multiple-choice scorer. Its data-flow-space search (layer
order across models) is not implemented.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from amalgam.checkpoint import open_checkpoint
from amalgam.errors import RecipeError
from amalgam.recipe import Recipe
from amalgam.search.spec import Prepared, SearchSpec, load_search_spec, prepare
from amalgam.search.trial import Scoring, score_all, weighted
from amalgam.stages.base import StageReport

if TYPE_CHECKING:
    from amalgam.registry import Registry

log = logging.getLogger(__name__)

STATE_FILE = "state.pkl"


@dataclass
class Trial:
    """One scored candidate: its point in the unit cube, the values it maps to, its accuracy
    per task on the search split and the objective."""

    index: int
    generation: int
    x: list[float]
    values: dict[str, float | int]
    scores: dict[str, float]
    objective: float
    seconds: float
    host: str


@dataclass
class SearchState:
    """What a checkpoint holds: the optimizer after the last finished generation and every
    trial so far; ``digest`` ties it to the spec and recipe that made it."""

    digest: str
    optimizer: Any  # cmaes.CMA
    generation: int = 0
    trials: list[Trial] = field(default_factory=list)
    run_id: str | None = None


@dataclass
class SearchResult:
    """The best trial, the start and best scores on both splits, the written recipe."""

    best: dict
    start: dict
    best_scores: dict
    recipe_file: str
    trials: int
    generations: int
    seconds: float
    resumed_at: int
    mlflow_run_id: str | None = None
    registered: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def report(self) -> StageReport:
        """Start point and best candidate, objective on each split, as one table."""
        rows = [
            {"candidate": name, **{f"objective.{k}": v for k, v in scores["objective"].items()}}
            for name, scores in (("start", self.start), ("best", self.best_scores))
        ]
        text = f"{self.trials} trials in {self.generations} generations; recipe {self.recipe_file}"
        return StageReport(tables={"search-result": rows}, description=text)


def new_state(prepared: Prepared) -> SearchState:
    # lazy: numpy and cmaes are needed by a search only
    import numpy as np
    from cmaes import CMA

    spec, dims = prepared.spec, len(prepared.space.coordinates)
    optimizer = CMA(
        mean=np.array(prepared.space.start()),
        sigma=spec.sigma,
        bounds=np.array([[0.0, 1.0]] * dims),
        seed=spec.seed,
        population_size=spec.population,
    )
    return SearchState(prepared.digest, optimizer)


def load_state(prepared: Prepared) -> SearchState | None:
    """The checkpoint in the state folder, if any; one of another spec or recipe is refused.
    The file is this search's own (written by :func:`save_state`), never a user's input."""
    path = prepared.state / STATE_FILE
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        state: SearchState = pickle.load(fh)  # the search's own file, see above
    if state.digest != prepared.digest:
        raise RecipeError(
            f"state: {prepared.state} holds a search of another spec or recipe "
            f"({state.digest}, not {prepared.digest}); give another state folder"
        )
    return state


def save_state(prepared: Prepared, state: SearchState) -> SearchState:
    """Write the checkpoint atomically (a kill leaves the previous one or this one) and return
    the state it holds: the search always goes on from its checkpoint's bytes, so a resumed
    search and an uninterrupted one continue from the same optimizer (cmaes stores its
    covariance as one triangle, which need not give back the same bits)."""
    prepared.state.mkdir(parents=True, exist_ok=True)
    data = pickle.dumps(state)
    tmp = prepared.state / f".{STATE_FILE}.{os.getpid()}"
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, prepared.state / STATE_FILE)
    return pickle.loads(data)  # the bytes just written


def scoring(prepared: Prepared, *splits: str) -> Scoring:
    spec = prepared.spec
    scratch = spec.scratch
    if scratch == "auto":
        scratch = (
            "memory" if _model_bytes(prepared.space.recipe) <= spec.memory_limit_bytes else "disk"
        )
    where = "memory" if scratch == "memory" else str(prepared.state / "scratch")
    if where != "memory":
        Path(where).mkdir(parents=True, exist_ok=True)
    objective = spec.objective
    limits = {
        s: objective.limit if s == objective.split else objective.heldout_limit for s in splits
    }
    return Scoring(prepared.tasks_dir, tuple(objective.tasks), limits, where)


def _model_bytes(recipe: Recipe) -> int:
    ckpt = open_checkpoint(recipe.base or recipe.models[0].uri, **recipe.storage_options)
    try:
        return ckpt.nbytes
    finally:
        ckpt.close()


def generation_seed(seed: int, generation: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{generation}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def run_generation(prepared: Prepared, state: SearchState) -> list[Trial]:
    """Ask the optimizer for a population, score it, tell it the (negated) objectives."""
    spec, space = prepared.spec, prepared.space
    optimizer = state.optimizer
    # cmaes leaves its random state out of a pickle: each generation draws from a generator
    # seeded by (seed, generation), so a resumed search draws what an uninterrupted one does
    optimizer.reseed_rng(generation_seed(spec.seed, state.generation))
    xs = [optimizer.ask() for _ in range(optimizer.population_size)]
    recipes = [space.recipe_at(list(x)) for x in xs]
    results = score_all(
        recipes, scoring(prepared, spec.objective.split), spec.workers, spec.executor
    )
    trials = []
    for x, result in zip(xs, results, strict=True):
        scores = result.scores[spec.objective.split]
        trials.append(
            Trial(
                index=len(state.trials) + len(trials),
                generation=state.generation,
                x=[float(v) for v in x],
                values=space.values(list(x)),
                scores=scores,
                objective=weighted(scores, spec.objective.tasks),
                seconds=result.seconds,
                host=result.host,
            )
        )
    optimizer.tell([(x, -t.objective) for x, t in zip(xs, trials, strict=True)])
    return trials


def best_trial(trials: list[Trial]) -> Trial:
    """The highest objective; the earliest on ties."""
    return max(trials, key=lambda t: (t.objective, -t.index))


def run_search(
    spec: SearchSpec | str | Path, *, progress: Callable[[int, float], None] | None = None
) -> SearchResult:
    """Run (or resume) the search to ``spec.generations``; write the best recipe, score it and
    the start point on both splits, register it as candidate when the recipe has a register
    section (through the pipeline: merge, evaluate, register). ``progress(generation, best
    objective)`` is called after each generation's checkpoint."""
    started = time.perf_counter()
    spec = spec if isinstance(spec, SearchSpec) else load_search_spec(spec)
    prepared = prepare(spec)
    recipe = prepared.space.recipe
    state = load_state(prepared) or new_state(prepared)
    resumed_at = state.generation
    registry = None
    if recipe.register is not None:
        # lazy: MLflow is needed when the recipe registers
        from amalgam.stages.register import registry_for

        registry = registry_for(recipe.register)
        if state.run_id is None:
            state.run_id = registry.start_search(
                recipe.register.experiment, prepared.digest, spec.model_dump(mode="json")
            )
            state = save_state(prepared, state)
        registry.log_search_trials(state.run_id, [asdict(t) for t in state.trials])
    while state.generation < spec.generations:
        trials = run_generation(prepared, state)
        state.trials += trials
        state.generation += 1
        state = save_state(prepared, state)
        best = best_trial(state.trials)
        log.info(
            "generation %d/%d: best objective %.4f (trial %d)",
            state.generation,
            spec.generations,
            best.objective,
            best.index,
        )
        if progress is not None:
            progress(state.generation, best.objective)
        if registry is not None and state.run_id is not None:
            registry.log_search_trials(state.run_id, [asdict(t) for t in trials])
    return finish(prepared, state, registry, started, resumed_at)


def finish(
    prepared: Prepared,
    state: SearchState,
    registry: Registry | None,
    started: float,
    resumed_at: int,
) -> SearchResult:
    """Score start and best on both splits, write the best recipe, register it."""
    spec, space = prepared.spec, prepared.space
    best = best_trial(state.trials)
    best_recipe = space.recipe_at(best.x)
    best_recipe = best_recipe.model_copy(update={"output": space.recipe.output})
    splits = [s for s in (spec.objective.split, spec.objective.heldout) if s]
    start_scores, best_scores = score_all(
        [space.recipe, best_recipe], scoring(prepared, *splits), spec.workers, spec.executor
    )
    summary = {split: weighted(best_scores.scores[split], spec.objective.tasks) for split in splits}
    start = {split: weighted(start_scores.scores[split], spec.objective.tasks) for split in splits}
    output = prepared.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        yaml.safe_dump(
            best_recipe.model_dump(mode="json", exclude_none=True, exclude_defaults=True),
            sort_keys=False,
        )
    )
    registered = None
    if registry is not None and state.run_id is not None:
        # lazy: the pipeline imports every stage
        from amalgam.pipeline import run_pipeline

        registered = run_pipeline(best_recipe).registered
        registry.finish_search(
            state.run_id,
            {"best": asdict(best), "start": start, "best_scores": summary, "recipe": str(output)},
            {f"best.{k}": v for k, v in summary.items()}
            | {f"start.{k}": v for k, v in start.items()},
        )
    result = SearchResult(
        best=asdict(best),
        start={"objective": start, "scores": start_scores.scores},
        best_scores={"objective": summary, "scores": best_scores.scores},
        recipe_file=str(output),
        trials=len(state.trials),
        generations=state.generation,
        seconds=time.perf_counter() - started,
        resumed_at=resumed_at,
        mlflow_run_id=state.run_id,
        registered=registered,
    )
    (prepared.state / "result.json").write_text(json.dumps(result.as_dict(), indent=1))
    return result
