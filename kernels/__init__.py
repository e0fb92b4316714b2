"""Public kernel ops. The pure-torch reference (``reference.py``) is the specification; Triton
kernels replace it on CUDA (DESIGN.md, "The kernels"). Imports nothing from gcflows."""

from .reference import interpolate_pair, pairwise_sqdist

__all__ = ["interpolate_pair", "pairwise_sqdist"]
