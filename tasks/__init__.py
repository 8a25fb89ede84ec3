"""Prefect tasks: one thin wrapper per pipeline stage over the plain amalgam functions."""
