"""The integer codes the kernels take for per-model rules, sign election and division."""

# per-model sparsification rules
KEEP_ALL, TRIM, DROP = 0, 1, 2
# sign election
NO_VOTE, VOTE_SUM, VOTE_COUNT = 0, 1, 2
# normalisation of the merged task vector
NO_DIVISION, DIVIDE, CLAMP_DIVIDE, GUARD_DIVIDE = 0, 1, 2, 3
