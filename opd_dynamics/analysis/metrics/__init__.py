"""Per-matrix metric kernels: pure functions on torch tensors (no I/O); the engine streams tensors in.

norms (update size), spectrum (spectrum.csv columns of a `numerics.decomposition` decomposition),
subspace (alignment to a reference step), geometry (update vs base weights), embeddings (row cosines).
"""

from opd_dynamics.analysis.metrics.embeddings import embedding_metrics
from opd_dynamics.analysis.metrics.geometry import BaseDecomposition, decompose_base, geometry_metrics
from opd_dynamics.analysis.metrics.norms import norm_metrics
from opd_dynamics.analysis.metrics.spectrum import spectrum_metrics, top_singular_values
from opd_dynamics.analysis.metrics.subspace import alignment_metrics, principal_angles
from opd_dynamics.numerics.decomposition import Decomposition, decompose

__all__ = ["BaseDecomposition", "Decomposition", "alignment_metrics", "decompose", "decompose_base",
           "embedding_metrics", "geometry_metrics", "norm_metrics", "principal_angles", "spectrum_metrics",
           "top_singular_values"]
