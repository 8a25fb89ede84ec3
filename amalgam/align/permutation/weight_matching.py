"""Weight matching (Git Re-Basin, arXiv 2209.04836; analysed in arXiv 2402.04051): the
permutation of each group maximises the summed inner products of the reference's and the
model's weights along the axes the group permutes.

API (stable): ``match_weights(spec, ref, model, seed=, max_iter=) -> (perms, passes)``."""

from __future__ import annotations

from amalgam.align.permutation.apply import Perms
from amalgam.align.permutation.matching import coordinate_descent
from amalgam.align.permutation.spec import PermSpec
from amalgam.checkpoint import Checkpoint


def match_weights(
    spec: PermSpec, ref: Checkpoint, model: Checkpoint, *, seed: int = 0, max_iter: int = 100
) -> tuple[Perms, int]:
    """(the permutations that bring ``model``'s units onto ``ref``'s, coordinate-descent
    passes); tensors are read one at a time, in float32."""
    return coordinate_descent(
        spec.groups,
        spec.axes,
        lambda name: ref.tensor(name).float(),
        lambda name: model.tensor(name).float(),
        seed=seed,
        max_iter=max_iter,
    )
