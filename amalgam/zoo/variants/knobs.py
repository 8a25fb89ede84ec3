"""The settings that, with the main zoo, decide the bytes of the variants."""

from __future__ import annotations

from pydantic import Field

from amalgam.zoo.build import seed_for
from amalgam.zoo.profiles import Frozen, Profile


class Knobs(Frozen):
    """What, beyond the main zoo, decides the bytes of the variants."""

    #: Stage name whose seed (`build.seed_for`) becomes the second base's profile seed: a new
    #: initialisation and data order, the same data.
    second_seed_stage: str = "second-base"
    #: Token expert key -> the zoo task whose answers it writes in its own new script.
    token_tasks: dict[str, str] = Field(
        default_factory=lambda: {"a": "zoo_caesar", "b": "zoo_mulmod"}
    )
    #: The token experts train with the expert schedule at this multiple of its learning
    #: rate: their new rows start from the mean row and must be learned from nothing.
    token_lr_factor: float = 4.0


KNOBS = Knobs()


def second_profile(config: Profile, knobs: Knobs = KNOBS) -> Profile:
    """`config` with another seed: every `seed_for` stage seed of the second base and its
    experts differs from the main zoo's, while the data (drawn from `config.seed`) is shared."""
    return config.model_copy(update={"seed": seed_for(config, knobs.second_seed_stage)})
