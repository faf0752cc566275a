"""Built-in latents processors, one per module; each registers itself on import."""
