"""Prefect flows: the merge pipeline, the nightly continual merge, sweeps and promotion."""
