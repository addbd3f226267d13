"""A nanoGPT-compatible GPT-2 whose attention and LayerNorm run in PyTorch or in cuTile kernels."""
