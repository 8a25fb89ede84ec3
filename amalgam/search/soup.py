"""Greedy soup (Wortsman et al., "Model soups", arXiv 2203.05482, Algorithm 1): the models
ordered by their own validation accuracy, each added to the soup (a uniform average, the
``linear`` method) when the soup's validation accuracy with it is at least the soup's without
it (the paper's >=: an ingredient that changes nothing stays); the first model always starts
the soup. Scored by the quick scorer on the recipe's task folder.

Deviation: the paper's models are fine-tunes of one task; here any set of models of one
architecture is accepted (on the zoo, task experts), scored by their mean accuracy over the
recipe's tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from amalgam.errors import RecipeError
from amalgam.recipe import Recipe, parse_recipe
from amalgam.search.trial import Scoring, score_all, weighted


@dataclass
class SoupStep:
    """One model tried: the soup's score with it, and whether it stayed."""

    model: str
    individual: float
    score: float
    accepted: bool


@dataclass
class SoupResult:
    ingredients: list[str]
    score: float
    steps: list[SoupStep] = field(default_factory=list)
    recipe_file: str | None = None
    pipeline: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def greedy_soup(
    individual: Mapping[str, float], soup_score: Callable[[list[str]], float]
) -> SoupResult:
    """The greedy soup of the models in ``individual`` (model -> its own score, in the
    recipe's order; ties keep that order). ``soup_score(models)`` scores the uniform soup of
    ``models``; it is called once per model after the first."""
    if not individual:
        raise RecipeError("models: a soup needs at least one model")
    order = sorted(individual, key=lambda m: -individual[m])
    first = order[0]
    ingredients, best = [first], individual[first]
    steps = [SoupStep(first, best, best, True)]
    for model in order[1:]:
        score = soup_score([*ingredients, model])
        accepted = score >= best
        if accepted:
            ingredients, best = [*ingredients, model], score
        steps.append(SoupStep(model, individual[model], score, accepted))
    return SoupResult(ingredients, best, steps)


def soup_recipe(recipe: Recipe, labels: list[str]) -> Recipe:
    """``recipe`` over the models ``labels`` only, each with weight 1 (a uniform soup)."""
    data = recipe.model_dump(exclude_none=True)
    models = [
        m for m, spec in zip(data["models"], recipe.models, strict=True) if spec.label in labels
    ]
    for m in models:
        m.get("params", {}).pop("weight", None)
    data.update(models=models, overrides=[])
    return parse_recipe(data, "soup")


def run_soup(
    recipe: Recipe,
    *,
    split: str = "validation",
    limit: int | None = None,
    tasks: list[str] | None = None,
    workers: int = 1,
    executor: str = "local",
    output: Path | None = None,
    merge: bool = True,
) -> SoupResult:
    """The greedy soup of ``recipe``'s models (a ``linear`` recipe with an evaluate section
    naming ``tasks_dir`` and its tasks); writes the soup's recipe to ``output`` and, when
    ``merge``, runs it through the pipeline (merge, and evaluate/register as its sections
    say)."""
    if recipe.method != "linear":
        raise RecipeError(f"method: a soup is a uniform average (linear), not {recipe.method!r}")
    spec = recipe.evaluate
    if spec is None or spec.tasks_dir is None:
        raise RecipeError("evaluate: a soup needs evaluate.tasks_dir")
    names = tasks or spec.tasks
    if not names:
        raise RecipeError("evaluate.tasks: name the tasks the soup is scored on")
    missing = [t for t in names if not (Path(spec.tasks_dir) / t / f"{split}.jsonl").is_file()]
    if missing:
        raise RecipeError(f"evaluate.tasks: no {split} split in {spec.tasks_dir} for {missing}")
    scoring = Scoring(Path(spec.tasks_dir), tuple(names), {split: limit})
    weights = dict.fromkeys(names, 1.0)
    labels = [m.label for m in recipe.models]
    if len(set(labels)) != len(labels):
        raise RecipeError("models: a soup's models need distinct labels (set `name`)")

    def mean_score(results: list) -> list[float]:
        return [weighted(r.scores[split], weights) for r in results]

    alone = [soup_recipe(recipe, [label]) for label in labels]
    individual = dict(
        zip(labels, mean_score(score_all(alone, scoring, workers, executor)), strict=True)
    )
    result = greedy_soup(
        individual,
        lambda models: mean_score(score_all([soup_recipe(recipe, models)], scoring, 1, executor))[
            0
        ],
    )
    final = soup_recipe(recipe, result.ingredients)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(
            yaml.safe_dump(
                final.model_dump(mode="json", exclude_none=True, exclude_defaults=True),
                sort_keys=False,
            )
        )
        result.recipe_file = str(output)
    if merge:
        # lazy: the pipeline imports every stage
        from amalgam.pipeline import run_pipeline

        result.pipeline = run_pipeline(final).as_dict()
    return result
