"""Permutation alignment: the spec of an architecture's permutation symmetry (``spec``),
permuted copies (``apply``), weight matching and activation matching (``matching`` and the
modules named after them), and the align stage's aligners (``aligner``)."""
