"""Tokenizer transplant: give a model another model's tokenizer, with the embedding and
LM-head rows of the tokens it lacks approximated from the tokens both share (what
``mergekit-tokensurgeon`` does); see docs/align-transplant.md."""

from amalgam.align.transplant.surgery import METHODS, Transplanted, transplant
from amalgam.align.transplant.vocab import TransplantError

__all__ = ["METHODS", "TransplantError", "Transplanted", "transplant"]
