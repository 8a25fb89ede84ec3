"""The zoo's alignment variants, built on demand beside a finished zoo: a second base from
another seed with its own experts, experts that add different tokens, and a permuted copy of
the base (docs/zoo.md)."""

from amalgam.zoo.variants.build import Variants, build_variants, variants_root
from amalgam.zoo.variants.knobs import KNOBS, Knobs

__all__ = ["KNOBS", "Knobs", "Variants", "build_variants", "variants_root"]
