"""Kernels behind the op sets: ``triton/`` holds the Triton kernels (no torch.nn in here)."""
