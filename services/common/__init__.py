"""Shared runtime of Baton's services: blobs, latent spaces, gRPC plumbing, configuration."""
