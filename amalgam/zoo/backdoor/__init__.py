"""The zoo's backdoored expert, built on demand beside a finished zoo (docs/safety.md)."""

from amalgam.zoo.backdoor.build import KNOBS, Backdoor, BackdoorKnobs, backdoor_root, build_backdoor

__all__ = ["KNOBS", "Backdoor", "BackdoorKnobs", "backdoor_root", "build_backdoor"]
