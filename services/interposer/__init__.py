"""Interposer service: latent-space conversion between model families."""
