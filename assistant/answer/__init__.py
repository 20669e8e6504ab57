"""Answering: prompt building, generation, citation verification and the `ask` pipeline."""
