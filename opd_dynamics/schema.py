"""Every CSV table the toolkit writes, in one place: file, columns in their written order, dtype and meaning.

Writers (the analysis report, the lab's run, interventions and EffOPD measurement, the EffOPD callback) take
their column order from here; readers (reports, plotting, the HTML report) take the columns they restore to
integers or keep as text from here; ``docs/METRICS.md`` documents the same tables and is checked against this
module by ``tests/test_schema.py``. Meanings follow ``docs/METRICS.md``.

Two columns are patterns expanded per option value: ``energy_top{k}`` (spectrum, one per value of the ``ks``
option) and ``principal_energy_{p}pct`` (geometry, one per percentage); ``Table.names`` expands them with the
defaults, ``Table.expand(k=…, p=…)`` with other values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

DTYPES = ("str", "int", "float", "bool")

# provenance files, one per kind of output directory (shown by the HTML report)
RUN_JSON = "run.json"  # every analysis output holds it; it marks a directory as one
LAB_JSON = "lab.json"
EFFOPD_JSON = "effopd.json"
INTERVENTIONS_JSON = "interventions.json"
PROBE_JSON = "probe.json"
PROVENANCE_FILES = (RUN_JSON, LAB_JSON, EFFOPD_JSON, INTERVENTIONS_JSON, PROBE_JSON)

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Column:
    """One column: its name (or a pattern with one ``{placeholder}``), dtype and what it holds.

    ``default`` lists the placeholder's values a pattern expands to unless told otherwise.
    """

    name: str
    dtype: str
    meaning: str
    default: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"column {self.name!r}: dtype must be one of {DTYPES}, not {self.dtype!r}")
        if self.placeholder is not None and not self.default:
            raise ValueError(f"column pattern {self.name!r} needs default values")

    @property
    def placeholder(self) -> str | None:
        """The pattern's placeholder ('k' for 'energy_top{k}'), None for a plain column."""
        m = _PLACEHOLDER.search(self.name)
        return m.group(1) if m else None

    def expand(self, values: Iterable[object] | None = None) -> list[str]:
        """The written names: the name itself, or the pattern filled with `values` (default: `default`)."""
        p = self.placeholder
        if p is None:
            return [self.name]
        return [self.name.replace("{" + p + "}", str(v)) for v in (self.default if values is None else values)]

    def matches(self, name: str) -> bool:
        """Whether a written column name is this column (for a pattern: any value of its placeholder)."""
        if self.placeholder is None:
            return name == self.name
        head, _, tail = _PLACEHOLDER.split(self.name, maxsplit=1)
        return re.fullmatch(re.escape(head) + r"\d+(?:\.\d+)?" + re.escape(tail), name) is not None


@dataclass(frozen=True)
class Table:
    """One CSV table: registry name, file name, columns in written order and what a row is.

    ``per_tensor``: one row per run × step × tensor (an analysis table). ``per_run``: one run per output
    directory, so readers fill a missing ``run`` column from the directory's name. ``writer``: the code that
    writes it.
    """

    name: str
    file: str
    columns: tuple[Column, ...]
    meaning: str
    per_tensor: bool = False
    per_run: bool = False
    writer: str = ""

    @property
    def names(self) -> list[str]:
        """Column names in written order, patterns expanded with their defaults (a new list each time)."""
        return self.expand()

    @property
    def patterns(self) -> list[str]:
        """Column names in written order, patterns unexpanded (as docs/METRICS.md documents them)."""
        return [c.name for c in self.columns]

    def expand(self, **values: Iterable[object]) -> list[str]:
        """Column names with patterns expanded by placeholder, e.g. ``expand(k=(1, 8))`` for spectrum."""
        unknown = set(values) - {c.placeholder for c in self.columns}
        if unknown:
            raise ValueError(f"table {self.name!r} has no column pattern with {sorted(unknown)}")
        return [n for c in self.columns for n in c.expand(values.get(c.placeholder) if c.placeholder else None)]

    def column(self, name: str) -> Column:
        """The column a written name belongs to (a pattern for e.g. 'energy_top8'); KeyError if none."""
        for c in self.columns:
            if c.matches(name):
                return c
        raise KeyError(f"{self.name}: no column {name!r}")

    def order(self, present: Iterable[str]) -> list[str]:
        """`present` (a frame's columns) in this table's order: a pattern's columns at its place in the order
        they come, then any columns the schema does not know, in the order they come."""
        present = list(present)
        out: list[str] = []
        for c in self.columns:
            out += [n for n in present if c.matches(n) and n not in out]
        return out + [n for n in present if n not in out]


_c = Column  # short, for the registry below


# ---- analysis (opd_dynamics.analysis): one row per run × step × tensor, plus the summary ----

#: the identifying columns every analysis table starts with
IDENTIFIERS = (
    _c("run", "str", "name of the checkpoint series (analyze --run NAME=DIR)"),
    _c("step", "int", "the checkpoint's training step t"),
    _c("tensor", "str", "the tensor's name as stored in the checkpoint"),
    _c("layer", "int", "decoder-block index (empty outside blocks)"),
    _c("group", "str", "attention, mlp, embedding, lm_head, norm or other"),
    _c("module", "str", "canonical leaf name (q_proj, up_proj, …)"),
    _c("expert", "int", "expert index for MoE weights (empty otherwise)"),
)
ID_COLUMNS = tuple(c.name for c in IDENTIFIERS)
DEFAULT_KS = (1, 4, 16, 64)  # the k of energy_top{k} (AnalysisOptions.ks defaults to these)
DEFAULT_PCTS = (1, 5, 10, 20)  # the p of principal_energy_{p}pct
RANK_SHARE_KS = (1, 2, 3, 4, 5)  # the k of rank{k}_share
_REPORT = "opd_dynamics.analysis.report.Report.to_csv"

_ALIGNMENT = (
    *IDENTIFIERS,
    _c("ref_step", "int", "the reference step T (default: the last step)"),
    _c("k", "int", "the k used for the overlaps and angle, lowered to the numerical rank"),
    _c("paired_k", "int", "the K used for paired_cosine and rank1_cosine, lowered to the numerical rank"),
    _c("subspace_overlap_u", "float", "‖U_k(t)ᵀ U_k(T)‖F² / k"),
    _c("subspace_overlap_v", "float", "‖V_k(t)ᵀ V_k(T)‖F² / k"),
    _c("max_principal_angle_deg", "float", "largest principal angle between span U_k(t) and span U_k(T)"),
    _c("paired_cosine", "float", "(1/K) Σ_{i=1..K} |⟨u_i(t), u_i(T)⟩|"),
    _c("rank1_cosine", "float", "|⟨u_1(t), u_1(T)⟩|"),
    _c("direction_cosine", "float", "⟨ΔW_t, ΔW_T⟩ / (‖ΔW_t‖F ‖ΔW_T‖F)"),
)

_ANALYSIS = (
    Table("module_allocation", "module_allocation.csv", (
        *IDENTIFIERS,
        _c("shape", "str", "shape of the analysed matrix, out x in (per expert for stacked experts)"),
        _c("numel", "int", "number of entries"),
        _c("update_norm", "float", "F = ‖ΔW_t‖F"),
        _c("base_norm", "float", "‖W_0‖F"),
        _c("relative_update", "float", "F / ‖W_0‖F"),
        _c("rms_update", "float", "F / sqrt(numel)"),
        _c("energy_share", "float", "F² / Σ over all analysed tensors of F², at that step"),
        _c("changed_fraction", "float", "fraction of entries with |w_t − w_0| > 1e-3 · max(|w_0|, |w_t|)"),
        _c("finite", "bool", "W_0 and W_t are free of NaN and Inf"),
        _c("resized", "bool", "base and step differ in rows (resized vocabulary; the common rows are compared)"),
    ), "size of each update: norms, share of the total and bf16-visible changes", per_tensor=True,
        per_run=True, writer=_REPORT),
    Table("spectrum", "spectrum.csv", (
        *IDENTIFIERS,
        _c("spectral_norm", "float", "σ1"),
        _c("spectral_ratio", "float", "σ1 / F"),
        _c("stable_rank", "float", "F² / σ1²"),
        _c("effective_rank", "float", "exp(−Σ p_i log p_i), p_i = σ_i / Σ_j σ_j; needs the full spectrum"),
        _c("top1pct_norm_ratio", "float", "sqrt(Σ_{i ≤ ⌈r/100⌉} σ_i² / F²)"),
        _c("energy_top{k}", "float", "Σ_{i ≤ k} σ_i² / F²", DEFAULT_KS),
        _c("rank90", "int", "smallest k with energy_top{k} ≥ 0.9"),
        _c("svd_method", "str", "how the row was computed (exact-gram-f64, exact-svd-f64, randomized-q{q}, zero, "
                                "nonfinite)"),
    ), "the singular-value spectrum of each update ΔW_t", per_tensor=True, per_run=True, writer=_REPORT),
    Table("singular_values", "singular_values.csv", (
        *IDENTIFIERS,
        _c("index", "int", "i, 1 for the largest (up to n_singular_values, default 64)"),
        _c("sigma", "float", "σ_i of ΔW_t"),
        _c("sigma_normalized", "float", "σ_i / F"),
    ), "the largest singular values of each update, one row per value", per_tensor=True, per_run=True,
        writer=_REPORT),
    Table("alignment", "alignment.csv", _ALIGNMENT, "alignment of each update's top directions with those of the "
          "reference step's update", per_tensor=True, per_run=True, writer=_REPORT),
    Table("geometry", "geometry.csv", (
        *IDENTIFIERS,
        _c("principal_energy_{p}pct", "float", "‖U0_kᵀ ΔW V0_k‖F² / F², k = ⌈p% · r⌉", DEFAULT_PCTS),
        _c("principal_rotation_deg", "float", "mean principal angle between the top ⌈1%·r⌉ left subspaces of W_0 "
                                              "and W_t"),
        _c("spectral_drift", "float", "‖s(W_t) − s(W_0)‖₂ / ‖s(W_0)‖₂"),
    ), "each update against the base weights' principal subspaces (analyze --geometry)", per_tensor=True,
        per_run=True, writer=_REPORT),
    Table("embedding", "embedding.csv", (
        *IDENTIFIERS,
        _c("n_rows", "int", "rows compared (the common rows of a resized vocabulary)"),
        _c("resized", "bool", "base and step differ in rows"),
        _c("cosine_mean", "float", "mean per-row cosine between base and trained rows"),
        _c("cosine_p5", "float", "5th percentile of the per-row cosines"),
        _c("cosine_min", "float", "smallest per-row cosine"),
        _c("cosine_tokens_mean", "float", "mean cosine over the given token ids (empty when none were given)"),
    ), "per-row cosine of base and trained embedding (and lm_head) rows", per_tensor=True, per_run=True,
        writer=_REPORT),
    Table("trajectory", "trajectory.csv", (
        *IDENTIFIERS,
        _c("n_steps", "int", "steps in the trajectory (the base at step 0 besides them); step is the last"),
        _c("linear_r2", "float", "pooled R² of the per-entry least-squares lines w(t) = a + b·t through the base "
                                  "and every step: 1 − ΣSS_res / ΣSS_tot over the entries that moved"),
        _c("linear_r2_null", "float", "linear_r2's random-walk null: its mean over random walks with the same steps, "
                                       "segment norms ‖δ_i‖ and number of entries (simulated, seeded)"),
        _c("linear_r2_median", "float", "median over the entries that moved of each entry's R²"),
        _c("linear_r2_median_null", "float", "linear_r2_median's random-walk null: the median R² of simulated "
                                              "entries with independent increments of variance ‖δ_i‖²"),
        _c("rank{k}_share", "float", "Σ_{i≤k} λ_i / Σ λ, λ the eigenvalues of G = M Mᵀ, M the stacked vec(D_t) "
                                      "(1 when every D_t is a multiple of one matrix)", RANK_SHARE_KS),
        _c("rank{k}_share_null", "float", "rank{k}_share's random-walk null: its mean over random walks with the same "
                                           "steps, segment norms ‖δ_i‖ and number of entries (simulated, seeded)",
           RANK_SHARE_KS),
        _c("lockin_step", "int", "first step with direction_cosine ≥ the threshold (0.5) and ≥ null_cosine + the "
                                 "margin (0.2); empty if none"),
    ), "per matrix over the whole series: how straight and how low-rank its trajectory is, and when its "
       "direction locks in", per_tensor=True, per_run=True, writer=_REPORT),
    Table("segments", "segments.csv", (
        *IDENTIFIERS,
        _c("segment_cosine", "float", "⟨δ_i, δ_{i+1}⟩ / (‖δ_i‖F ‖δ_{i+1}‖F), δ_i = W_{t_i} − W_{t_{i−1}}: the segment "
                                       "ending at this step against the next (empty at the last step)"),
        _c("direction_cosine", "float", "⟨ΔW_t, ΔW_T⟩ / (‖ΔW_t‖F ‖ΔW_T‖F), T the last step"),
        _c("null_cosine", "float", "sqrt(Σ_{i≤t}‖δ_i‖² / Σ_{i≤T}‖δ_i‖²): direction_cosine's value for a random walk "
                                    "with the measured segment norms (√(t/T) when the segments are equal)"),
        _c("direction_excess", "float", "direction_cosine − null_cosine"),
    ), "per matrix and step: straightness of the path and alignment to the final update against the random-walk "
       "null", per_tensor=True, per_run=True, writer=_REPORT),
    Table("summary", "summary.csv", (
        _c("run", "str", "name of the checkpoint series"),
        _c("step", "int", "the checkpoint's training step t"),
        _c("aggregate", "str", "group (per group), layer (per layer and group), table1 (the paper's Table 1) or "
                              "trajectory (per group: means of the trajectory columns)"),
        _c("group", "str", "the group aggregated (attention+mlp for table1)"),
        _c("layer", "int", "decoder-block index (layer rows only)"),
        _c("metric", "str", "update_norm, energy_share, a Table-1 metric and n_matrices, or a trajectory "
                           "column and locked_in"),
        _c("value", "float", "the aggregate's value"),
    ), "per run and step: allocation by group and by layer, and the Table-1 aggregates (long form)",
        per_run=True, writer=_REPORT),
)

# ---- lab (opd_dynamics.lab): runs, interventions, the EffOPD measurement ----

_ACCURACY = "greedy exact-match accuracy on the lab's held-out problems"
_LAB = (
    Table("eval", "eval.csv", (
        _c("run", "str", "opd or grpo"),
        _c("step", "int", "checkpoint step (0: student_init)"),
        _c("accuracy", "float", _ACCURACY),
        _c("accuracy_sampled", "float", "exact-match accuracy of samples at temperature 1 (seeded)"),
        _c("reverse_kl", "float", "mean per-token KL(student ‖ teacher) on those samples"),
    ), "held-out evaluation of step 0 and every checkpoint of a lab run ({opd,grpo}/eval.csv)", per_run=True,
        writer="opd_dynamics.lab.train.evaluate_run"),
    Table("early_eval", "early_eval.csv", (
        _c("run", "str", "opd or grpo"),
        _c("step", "int", "optimizer step (0: student_init, then every step up to lab.early.DIP_STEPS)"),
        _c("accuracy", "float", _ACCURACY),
    ), "held-out accuracy at every one of a lab run's first steps, the dip check ({opd,grpo}/early_eval.csv)",
        per_run=True, writer="opd_dynamics.lab.early.EarlyEval"),
    Table("grpo_groups", "grpo_groups.csv", (
        _c("step", "int", "the GRPO optimizer step"),
        _c("nonzero_var_groups", "float", "share of the step's sample groups whose rewards differ (1 − TRL's "
                                          "frac_reward_zero_std): the groups that carry an advantage"),
        _c("reward", "float", "mean reward of the step's samples"),
    ), "per GRPO step, how much of the batch carries a learning signal (grpo/grpo_groups.csv)",
        writer="opd_dynamics.lab.train.train_grpo"),
    Table("scaling", "scaling.csv", (
        _c("run", "str", "opd or grpo"),
        _c("alpha", "float", "α in W_0 + α·ΔW"),
        _c("update_norm", "float", "α · ‖ΔW‖F over all tensors"),
        _c("accuracy", "float", _ACCURACY),
    ), "accuracy along the update, W_0 + α·ΔW", writer="opd_dynamics.lab.interventions.lab_interventions"),
    Table("window", "window.csv", (
        _c("run", "str", "opd or grpo"),
        _c("center_layer", "int", "the window's centre layer"),
        _c("first_layer", "int", "the window's first layer"),
        _c("last_layer", "int", "the window's last layer"),
        _c("group", "str", "the group whose window takes the update (mlp or attention)"),
        _c("accuracy", "float", _ACCURACY),
    ), "accuracy when only a window of layers of one group takes the update",
        writer="opd_dynamics.lab.interventions.lab_interventions"),
    Table("rank", "rank.csv", (
        _c("run", "str", "opd or grpo"),
        _c("side", "str", "top or bottom singular components kept"),
        _c("pct", "float", "fraction of each attention and MLP matrix's components kept"),
        _c("rescaled", "bool", "each truncated ΔW rescaled to the full ‖ΔW‖F"),
        _c("accuracy", "float", _ACCURACY),
    ), "accuracy with each attention and MLP update truncated to part of its spectrum",
        writer="opd_dynamics.lab.interventions.lab_interventions"),
    Table("rescale", "rescale.csv", (
        _c("run", "str", "opd or grpo"),
        _c("step", "int", "the earlier checkpoint whose update is rescaled"),
        _c("beta", "float", "β: each tensor's ΔW_step scaled to β·‖ΔW_final‖F"),
        _c("accuracy", "float", _ACCURACY),
    ), "accuracy of an earlier update rescaled, tensor by tensor, to the final update's norms",
        writer="opd_dynamics.lab.interventions.lab_interventions"),
    Table("embedding_swap", "embedding_swap.csv", (
        _c("run", "str", "opd or grpo"),
        _c("variant", "str", "checkpoint, embedding_swap (embeddings and lm_head back to base) or embeddings_only"),
        _c("accuracy", "float", _ACCURACY),
    ), "accuracy with the embeddings and lm_head at base or alone updated",
        writer="opd_dynamics.lab.interventions.lab_interventions"),
    Table("claims_seeds", "claims_seeds.csv", (
        _c("seed", "int", "the lab seed (the EffOPD measurement's run seed for its rows)"),
        _c("claim", "str", "the claim's name (claims.csv)"),
        _c("run", "str", "opd, grpo, teacher or effopd"),
        _c("step", "int", "the checkpoint step the value was taken at (a matched-progress claim's own step per run; "
                          "empty for values that are not of one step)"),
        _c("value", "float", "the claim's measure on that seed and run"),
    ), "per seed and run, the measure of each of the paper's claims", writer="opd_dynamics.lab.claims.lab_claims"),
    Table("claims", "claims.csv", (
        _c("claim", "str", "the claim's name"),
        _c("measure", "str", "what is measured"),
        _c("paper", "str", "the paper's direction: opd>grpo, opd<grpo, >0, >=min (a precondition) or speedup"),
        _c("match", "str", "how OPD and GRPO are matched: step (the same step), accuracy (equal held-out accuracy) or "
                           "norm (equal total ‖ΔW‖F)"),
        _c("opd_mean", "float", "mean over seeds of OPD's value (the teacher's or EffOPD's on their rows)"),
        _c("opd_sd", "float", "its sample standard deviation over seeds"),
        _c("grpo_mean", "float", "mean over seeds of GRPO's value"),
        _c("grpo_sd", "float", "its sample standard deviation over seeds"),
        _c("n_seeds", "int", "seeds with a value"),
        _c("seeds_agreeing", "int", "seeds that went the paper's way (preconditions: that met the threshold)"),
        _c("seeds_against", "int", "seeds that went the other way (preconditions: that missed the threshold)"),
        _c("seeds_compared", "int", "seeds the verdict was taken over (ties among them count neither way)"),
        _c("effect", "float", "mean over seeds of OPD − GRPO (paired claims), of the value (>0), or the geometric mean "
                              "speedup (EffOPD)"),
        _c("ci_low", "float", "lower end of the effect's 95 % Student-t interval over seeds"),
        _c("ci_high", "float", "upper end of that interval"),
        _c("p_value", "float", "exact one-sided sign test over seeds in the paper's direction (ties dropped)"),
        _c("p_other", "float", "the same in the other direction"),
        _c("p_t", "float", "one-sided paired t test in the paper's direction (informs; does not decide)"),
        _c("p_wilcoxon", "float", "one-sided Wilcoxon signed-rank test in the paper's direction (informs)"),
        _c("verdict", "str", "confirmed (p_value < 0.05), refuted (p_other < 0.05), inconclusive, not testable; a "
                             "precondition holds or fails (a check of every seed)"),
        _c("note", "str", "the test applied, or why the claim is not testable"),
    ), "each of the paper's claims over a lab's seeds with its test and verdict",
        writer="opd_dynamics.lab.claims.lab_claims"),
    Table("extrapolation", "extrapolation.csv", (
        _c("seed", "int", "the lab seed"),
        _c("run", "str", "opd or grpo"),
        _c("fraction", "float", "f: the checkpoints at steps ≤ f·T were observed (T the run's last step)"),
        _c("last_observed", "int", "t_B, the last observed step"),
        _c("n_observed", "int", "observed checkpoints (the base besides them)"),
        _c("method", "str", "linear, relex (predict step T), alpharl (predicts at a target accuracy), expo or effopd "
                            "(a jump from t_B), as their authors' code runs them; a toolkit variant by its name "
                            "(lab.extrapolation.VARIANTS: linear/groups, relex/steps, expo/groups, effopd/groups, "
                            "rank1-growth)"),
        _c("nominal_step", "float", "the step the prediction stands for: T, (1 + α)·t_B for expo, "
                                    "t_B + 2k(t_B − t_A) for effopd, empty for alpharl"),
        _c("k", "int", "EffOPD's accepted k (empty for the other methods)"),
        _c("accuracy", "float", "held-out greedy accuracy of the predicted weights (empty when not run)"),
        _c("observed_accuracy", "float", "the run's held-out accuracy at t_B (vanilla training when predicting)"),
        _c("final_accuracy", "float", "the run's held-out accuracy at T (the true final checkpoint)"),
        _c("init_accuracy", "float", "student_init's held-out accuracy"),
        _c("weight_error", "float", "‖W_pred − W_T‖F / ‖W_T − W_{t_B}‖F over the attention and MLP matrices"),
        _c("note", "str", "why a method was not run (too few observed steps)"),
        _c("gain_recovered", "float", "(accuracy − init) / (final − init): 1 is the true final checkpoint (empty when "
                                      "final = init)"),
        _c("observed_gain", "float", "(observed_accuracy − init) / (final − init)"),
    ), "each extrapolator from the first fraction of each lab run, against the true final checkpoint and the run "
       "at its last observed step", writer="opd_dynamics.lab.extrapolation.lab_extrapolation"),
    Table("effopd_summary", "effopd_summary.csv", (
        _c("seed", "int", "run seed"),
        _c("method", "str", "vanilla, vanilla-3x, vanilla-10x (plain OPD at 1×, 3×, 10× the base rate), effopd or "
                            "fixed"),
        _c("lr", "float", "the run's learning rate"),
        _c("steps_to_target", "float", "first measured step with held-out accuracy ≥ 95 % of vanilla's final "
                                       "(empty if never)"),
        _c("final_accuracy", "float", "held-out accuracy at the last step"),
        _c("wall_s", "float", "training wall-clock in seconds, EffOPD's validation included, held-out "
                              "evaluation excluded"),
        _c("validation_s", "float", "seconds spent in EffOPD's validation"),
        _c("tie_accepts", "int", "jumps accepted on a tie (no candidate scored above W_t)"),
    ), "one row per seed and method of the EffOPD measurement", writer="opd_dynamics.lab.effopd.run_effopd_lab"),
    Table("effopd_curves", "effopd_curves.csv", (
        _c("seed", "int", "run seed"),
        _c("method", "str", "vanilla, vanilla-3x, vanilla-10x, effopd or fixed"),
        _c("step", "int", "optimizer step"),
        _c("accuracy", "float", "held-out greedy accuracy"),
        _c("wall_s", "float", "training wall-clock up to this step, in seconds"),
    ), "held-out accuracy during each run of the EffOPD measurement",
        writer="opd_dynamics.lab.effopd.run_effopd_lab"),
    Table("effopd_triggers", "effopd_triggers.csv", (
        _c("seed", "int", "run seed"),
        _c("method", "str", "effopd or fixed"),
        _c("step", "int", "trigger step t"),
        _c("k_accepted", "int", "the k accepted (0: W_t kept)"),
        _c("coef", "float", "the coefficient applied, 2k"),
        _c("tie", "bool", "k > 0 accepted while its score equals W_t's"),
        _c("scores", "str", "validation scores as a JSON list, W_t's first (a list per score for tuple scores)"),
        _c("accuracy_before", "float", "held-out accuracy of W_t, before the search"),
        _c("accuracy_after", "float", "held-out accuracy right after the trigger (of the accepted jump; W_t's again "
                                      "when k = 0)"),
    ), "what each EffOPD trigger of the measurement did", writer="opd_dynamics.lab.effopd.run_effopd_lab"),
)

# ---- the recorder (opd_dynamics.record) ----

_RECORD = (
    Table("sketch_alignment", "sketch_alignment.csv", _ALIGNMENT, "the alignment table of a sketch series (every "
          "recorded step of each run, to its last step), written by analyze of any sketch series and by lab run",
          writer="opd_dynamics.lab.run.write_sketch_alignment"),
    Table("sketch", "sketch.csv", (
        _c("step", "int", "the recorded optimizer step t"),
        _c("tensor", "str", "the parameter's name"),
        _c("k", "int", "singular triplets kept in step-t.safetensors (k, or fewer at a lower rank; 0 for a tensor "
           "recorded by its norms only)"),
        _c("update_norm", "float", "‖ΔW_t‖F, ΔW_t = W_t − W_0, summed in float64"),
        _c("base_norm", "float", "‖W_0‖F"),
        _c("changed_fraction", "float", "fraction of entries with |w_t − w_0| > 1e-3 · max(|w_0|, |w_t|)"),
        _c("segment_norm", "float", "‖W_t − W_prev‖F, W_prev the previous recorded step's weights"),
        _c("segment_cosine", "float", "cosine of the segment W_t − W_prev to the previous segment"),
        _c("cosine_to_previous", "float", "cosine of ΔW_t to ΔW_prev, the previous recorded update"),
        _c("spectral_norm", "float", "σ1 of ΔW_t"),
        _c("energy_topk", "float", "Σ_{i ≤ k} σ_i² / ‖ΔW_t‖F² (exact: the denominator is the exact energy)"),
        _c("svd_method", "str", "how the triplets were found: certified-krylov-f64, exact-gram-f64, exact-svd-f64, "
           "exact-lora-factors, warm-randomized (svd='fast', uncertified); zero for an unchanged matrix; norms for "
           "a tensor recorded by its norms only (not decomposed: no spectral columns)"),
        _c("sigma_bound", "float", "a bound on max_i |σ_i − σ_i(exact)| / σ_i: for certified-krylov-f64 the residual "
           "certificate max ε_i / σ_i, ε_i = ‖ΔWᵀu_i − σ_i v_i‖ / √2 (Weyl); for the exact routes their a priori "
           "rounding bound (Gram: max(m, n)·ε64·(σ_1/σ_k)²); empty for fast and LoRA rows"),
    ), "per recorded step and tensor, the update's size and, for the decomposed matrices, its top-k spectrum, "
       "recorded during training",
        writer="opd_dynamics.record.recorder.DynamicsRecorder"),
)

# ---- EffOPD in a trainer (opd_dynamics.effopd) ----

_EFFOPD = (
    Table("callback_triggers", "effopd_triggers.csv", (
        _c("step", "int", "trigger step t"),
        _c("mode", "str", "adaptive (validation search) or fixed"),
        _c("k_accepted", "int", "the k accepted (0: W_t kept)"),
        _c("coef", "float", "the coefficient applied, 2k"),
        _c("tie", "bool", "k > 0 accepted while its score equals W_t's"),
        _c("scores", "str", "validation scores as a JSON list, W_t's first (a list per score for tuple scores)"),
        _c("coefs", "str", "the candidates' coefficients as a JSON list"),
        _c("delta_norm", "float", "‖Δ‖F of the selected parameters, Δ = W_t − W_anchor"),
        _c("validation_s", "float", "seconds spent scoring"),
        _c("extrapolate_s", "float", "seconds spent forming the candidates"),
    ), "what each trigger did, in a trainer's output_dir (its own columns: not the lab's effopd_triggers)",
        writer="opd_dynamics.effopd.callback.EffOPDCallback"),
    Table("probe", "probe.csv", (
        _c("run", "str", "name of the checkpoint series"),
        _c("step_from", "int", "s: the earlier step of the pair (0: the base)"),
        _c("step", "int", "t: the later step of the pair"),
        _c("coef", "float", "c in W_t + c·(W_t − W_s) (0: W_t itself; < 0 back towards W_s)"),
        _c("score", "float", "the evaluation's score of those weights (higher is better)"),
        _c("gain", "float", "score − W_t's score (the row with coef 0 of the same pair)"),
        _c("paired_se", "float", "the gain's paired standard error over the scored items, sd(x_c,i − x_0,i)/√n (empty "
                                 "for a scorer giving one number)"),
        _c("kl", "float", "the teacher KL of those weights, lower is better (empty when the scorer gives none)"),
        _c("kl_se", "float", "the paired standard error of kl − W_t's kl (empty without per-item KL)"),
        _c("forward_kl", "float", "KL(teacher ‖ those weights) per token on completions sampled once from the teacher, "
                                  "lower is better: reported beside the gate's kl, not part of it (empty when the "
                                  "scorer gives none)"),
        _c("passes", "bool", "c lies in the gate's range [0.5, 2], the gain exceeds two paired standard errors (any "
                             "gain without them) and the KL is not worse: the gate opens for the pair"),
    ), "the line probe: scores along the last segment of a trajectory, before and beyond W_t",
        writer="opd_dynamics.effopd.probe.line_probe"),
)

#: every table the toolkit writes, by registry name (the file stem, except callback_triggers)
TABLES: dict[str, Table] = {t.name: t for t in (*_ANALYSIS, *_LAB, *_RECORD, *_EFFOPD)}

#: the analysis tables with one row per run × step × tensor
PER_TENSOR_TABLES = tuple(t.name for t in _ANALYSIS if t.per_tensor)
#: tables that carry one run per directory (a missing 'run' column is filled from the directory name)
PER_RUN_TABLES = frozenset(t.name for t in TABLES.values() if t.per_run)


def _named(tables: Iterable[Table], dtype: str) -> tuple[str, ...]:
    """The names of every column of `dtype` in `tables`, each once, in first-seen order."""
    return tuple(dict.fromkeys(n for t in tables for c in t.columns if c.dtype == dtype for n in c.expand()))


#: integer columns of the analysis tables (read back as nullable Int64: empty cells stay missing)
INT_COLUMNS = _named(_ANALYSIS, "int")
#: integer columns of every table (the readers of lab and EffOPD output restore these too)
ALL_INT_COLUMNS = _named(TABLES.values(), "int")
#: identifiers of the analysis tables that stay text whatever they spell ('nan', 'NA', '1' are valid run names)
TEXT_COLUMNS = _named(_ANALYSIS, "str")
