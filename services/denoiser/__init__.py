"""Denoiser service: partial-denoise windows of one model's schedule; encode and decode."""
