"""Tiny, randomly initialised but real diffusers pipelines, built offline for tests and first runs."""
