"""Per-matrix metric kernels: pure functions on torch tensors (no I/O); the engine streams tensors in.

norms (update size), spectrum (exact Gram/SVD or randomized decomposition and spectrum.csv columns),
subspace (alignment to a reference step), geometry (update vs base weights), embeddings (row cosines).
"""

from .norms import norm_metrics
from .spectrum import Decomposition, decompose, spectrum_metrics, top_singular_values
from .subspace import alignment_metrics, principal_angles

__all__ = ["Decomposition", "alignment_metrics", "decompose", "norm_metrics", "principal_angles",
           "spectrum_metrics", "top_singular_values"]
