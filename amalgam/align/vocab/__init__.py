"""Vocabulary union (``align.method: vocab``): one output tokenizer for every input, each input's
embedding and LM-head rows remapped into it, and which rows each input owns
(:mod:`amalgam.align.vocab.ownership`) so the merge does not dilute rows only some inputs have.
See docs/align-vocab.md."""
