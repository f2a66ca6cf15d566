"""Weight extrapolation along a training trajectory: each published method as its authors' code runs it, and the
toolkit's own, behind one interface.

`extrapolate(series, target, out, method=…)` writes the weights a method predicts from the observed checkpoints of a
series: ExPO's fixed-α jump, EffOPD's 2k jump, RLVR-Linearity's line in time, RELEX's rank-r trajectory, AlphaRL's
PLS of rank-1 vectors against scores; the toolkit's rank-1 growth and last-segment jump. The methods are one
registry (`opd_dynamics.extrapolate.registry`); one tensor at a time, float64 arithmetic, never two whole models in
memory.
"""

from opd_dynamics.extrapolate.methods import ExtrapolationOptions, extrapolate
from opd_dynamics.extrapolate.registry import METHODS, METHODS_LIST, Method, methods_table

__all__ = ["METHODS", "METHODS_LIST", "ExtrapolationOptions", "Method", "extrapolate", "methods_table"]
