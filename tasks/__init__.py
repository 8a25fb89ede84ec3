"""Prefect tasks: one generic wrapper (``tasks/stage.py``) over the library's stages."""
