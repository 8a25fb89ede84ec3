"""Tests of amalgam.merge: each method against hand-worked cases and a naive formulation."""
