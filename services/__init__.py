"""Baton: multi-model cooperative denoising as a cluster of gRPC services."""
