"""Tests of amalgam.methods: each method against hand-worked cases and a naive formulation."""
