"""Weight extrapolation along a training trajectory, every published method behind one interface.

`extrapolate(series, target, method=…)` predicts the weights at step `target` from the observed checkpoints
of a series and writes them as a model directory: ExPO's fixed-α jump, RLVR-Linearity's line in time, RELEX's
rank-r trajectory, AlphaRL's rank-1 update, and EffOPD's 2k jump. One tensor at a time, float64 arithmetic,
never two whole models in memory. See `opd_dynamics.extrapolate.methods` for what each computes.
"""

from opd_dynamics.extrapolate.methods import METHODS, ExtrapolationOptions, extrapolate

__all__ = ["METHODS", "ExtrapolationOptions", "extrapolate"]
