"""Processor service: latents processors (noise, scale, interposer, ...) run as chains."""
