"""Forgetting and backward transfer of a nightly candidate against the champion chain.

The chain is every version promoted to champion so far, by version number; each step records
its primary score per task (the ``accuracy.<task>`` metrics of its run) and the tasks whose
experts it absorbed. The candidate is measured against it:

- forgetting of task t: F_t = max over earlier champions j of s_j(t), minus s_now(t): the best
  score t ever had in a champion minus the candidate's (the forgetting measure of Chaudhry et
  al. 2018, arXiv 1801.10112, over a champion chain instead of training steps). F_t > 0 means
  ground lost; F_t < 0 means the candidate beats every champion on t. Only tasks some earlier
  champion was scored on have one. For a lower-is-better score (perplexity-like), the best is
  the lowest and F_t = s_now(t) - min_j s_j(t), so that F_t > 0 still means worse;
- backward transfer: BWT = mean over the tasks absorbed by an earlier champion of
  s_now(t) - s_a(t)(t), where a(t) is the first champion that absorbed t's expert (its score
  "just after" learning t): Lopez-Paz & Ranzato 2017 (arXiv 1706.08840), R_{T,i} - R_{i,i}
  averaged over the earlier tasks, with champions as steps. Negative means lost ground; signs
  flip for a lower-is-better score as above. The task(s) the candidate itself absorbs are not in
  it (they have no "after" yet), as in the benchmark's continual rows (benchmarks/quality.py).

First night (no champion yet): the history is empty, no task has a forgetting figure, BWT is
undefined (None) and the gates on them pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import mean

from pydantic import BaseModel, computed_field


class ChampionStep(BaseModel):
    """One champion of the chain: its version, primary score per task, absorbed tasks."""

    version: str
    scores: dict[str, float]
    absorbed: list[str]


class TaskForgetting(BaseModel):
    """One task: the best earlier champion score (and which version had it), the candidate's
    score, and F_t (positive: ground lost)."""

    best: float
    best_version: str
    now: float
    forgetting: float


class Forgetting(BaseModel):
    """A candidate's forgetting per task and its backward transfer over ``history``;
    ``absorbed_at`` maps each task in BWT to the version that absorbed it."""

    history: list[ChampionStep]
    tasks: dict[str, TaskForgetting]
    absorbed_at: dict[str, str]
    bwt: float | None

    @computed_field
    @property
    def max_forgetting(self) -> float | None:
        return max((f.forgetting for f in self.tasks.values()), default=None)

    @computed_field
    @property
    def mean_forgetting(self) -> float | None:
        return mean(f.forgetting for f in self.tasks.values()) if self.tasks else None

    def metrics(self) -> dict[str, float]:
        """``forgetting.<task>``, ``max_forgetting``, ``mean_forgetting``, ``bwt`` (those
        defined)."""
        out = {f"forgetting.{t}": f.forgetting for t, f in self.tasks.items()}
        named = {
            "max_forgetting": self.max_forgetting,
            "mean_forgetting": self.mean_forgetting,
            "bwt": self.bwt,
        }
        return out | {k: v for k, v in named.items() if v is not None}


def measure_forgetting(
    now: Mapping[str, float],
    history: Sequence[ChampionStep],
    higher_is_better: Mapping[str, bool] | None = None,
) -> Forgetting:
    """Forgetting and BWT of the candidate scoring ``now`` (task -> primary score) against the
    champions in ``history`` (oldest first); ``higher_is_better`` per task (default True)."""
    better = dict(higher_is_better or {})
    sign = {t: 1.0 if better.get(t, True) else -1.0 for t in now}
    tasks: dict[str, TaskForgetting] = {}
    for t in now:
        seen = [(step.scores[t], step.version) for step in history if t in step.scores]
        if not seen:
            continue
        best, version = max(seen, key=lambda sv: sign[t] * sv[0])
        tasks[t] = TaskForgetting(
            best=best, best_version=version, now=now[t], forgetting=sign[t] * (best - now[t])
        )
    absorbed_at: dict[str, str] = {}
    after: dict[str, float] = {}
    for step in history:
        for t in step.absorbed:
            if t in now and t in step.scores and t not in absorbed_at:
                absorbed_at[t], after[t] = step.version, step.scores[t]
    bwt = mean(sign[t] * (now[t] - after[t]) for t in absorbed_at) if absorbed_at else None
    return Forgetting(history=list(history), tasks=tasks, absorbed_at=absorbed_at, bwt=bwt)
