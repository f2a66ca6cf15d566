"""The extrapolators, one `Method` each: the one place the method list lives. The command's choices, the option
checks, `lab extrapolate`'s methods and the docs' table (`methods_table`) are made from it.

Each of the authors' methods is reproduced as their code runs it (``authors`` names the repository; ``source`` the
file and lines the prediction, the selection and the copy rule follow): which tensors move (``select``, the
published rule), what the others become (``keep``: the last observed step, the base, or the container step
``ckpt_step``), how time or the target is read (``target``) and the prediction (``predict``). The toolkit's own
methods have ``authors`` None and no published selection: they move the toolkit's naming groups (attention and MLP
matrices by default). Every method can be given the toolkit's group selection instead (``select='groups'``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from opd_dynamics.effopd.options import effopd_selects
from opd_dynamics.extrapolate import predict as P

#: RLVR-Linearity copies a tensor whose lowercased name contains one of these (weight_extrapolation.py:94, 112)
NORM_KEYWORDS = ("layernorm", "rmsnorm", "ln_", "norm")
#: AlphaRL's matrices: 2-D ``.weight`` of a decoder layer's self_attn and mlp (svd.py:39-85, model.model.layers)
_ALPHARL = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn|mlp)\.(?:.+\.)?weight$")

#: Selector(name, shape, tied) → moves; ``tied`` is the base's {head: embedding it is tied to}
Selector = Callable[[str, Sequence[int], Mapping[str, str]], bool]


def _everything(name: str, shape: Sequence[int], tied: Mapping[str, str]) -> bool:
    return True


def _relex(name: str, shape: Sequence[int], tied: Mapping[str, str]) -> bool:
    return name not in tied  # a tied head is not tracked (precompute_deltas.py:231-238); it follows the embedding


def _rlvr(name: str, shape: Sequence[int], tied: Mapping[str, str]) -> bool:
    # trainable (named_parameters dedups a tied head, so it is copied from W_S) and no norm keyword; its copy,
    # loaded after the embedding it shares storage with, leaves the tied embedding at W_S's as well
    return not any(k in name.lower() for k in NORM_KEYWORDS) and name not in tied and name not in tied.values()


def _effopd(name: str, shape: Sequence[int], tied: Mapping[str, str]) -> bool:
    return effopd_selects(name)


def _alpharl(name: str, shape: Sequence[int], tied: Mapping[str, str]) -> bool:
    return len(shape) == 2 and bool(_ALPHARL.search(name))


@dataclass(frozen=True)
class Method:
    """One extrapolator: its name (``--method``), whose it is, what it needs and takes, what moves and what the rest
    becomes, and its prediction."""

    name: str
    authors: str | None  # the authors' method and repository; None: the toolkit's own
    source: str  # the file and lines it follows
    formula: str  # the prediction, in words and symbols
    target: str  # 'step': --target required; 'none': no target (a fixed jump); 'score': --target-score;
    #              'step-or-alpha': --target or --alpha
    min_steps: int  # observed steps needed besides the base
    options: tuple[str, ...]  # its own parameters (ExtrapolationOptions fields); the selection ones are everyone's
    moves: str  # which tensors its published rule moves (the toolkit's methods: the group rule)
    keep: str  # what the unmoved tensors are: 'last' (the last observed step), 'base', 'ckpt' (ckpt_step)
    predict: Callable[[P.Context, str], object]
    select: Selector | None = None  # the published selection rule (None: the toolkit's group rule only)
    fits: tuple[str, ...] = ()  # the values of ``fit`` it takes, its default first
    matrices: bool = False  # moves matrices only (a rank-1 part of each update)
    needs: str = ""  # what it needs besides checkpoints

    @property
    def published(self) -> bool:
        return self.authors is not None

    @property
    def keeps(self) -> str:
        return {"last": "the last observed step's", "base": "the base's (W_0)",
                "ckpt": "the container step's (W_k, --ckpt-step, by default the last observed step)"}[self.keep]


METHODS_LIST: tuple[Method, ...] = (
    Method("expo", "ExPO (chujiezheng/LLM-Extrapolation)", "code/extrapolate.py:11, 33-35",
           "θ_B + α(θ_B − θ_A), A the base (the SFT model), B the last observed step, α given (--alpha, required)",
           "none", 1, ("alpha",), "every parameter (embeddings, norms, biases, the head)", "last", P.predict_expo,
           select=_everything),
    Method("effopd", "EffOPD (caiyuchen-ustc/EffOPD)", "EffOPD/verl/verl/workers/fsdp_workers.py:1106-1191",
           "W_B + coef_step·k·(W_B − W_A), A the latest observed step ≤ t_B/2 (its previous power-of-two trigger; "
           "the base if none), k fixed (--k, default 1; `effopd search` searches it)",
           "none", 1, ("k", "coef_step"),
           "every parameter whose lowercased name contains attn, self_attn, attention, q/k/v/o_proj, mlp, "
           "feed_forward, ffn or gate/up/down_proj: q/k/v biases, q_norm/k_norm and post_attention_layernorm too",
           "last", P.predict_effopd, select=_effopd),
    Method("linear", "RLVR-Linearity (Miaow-Lab/RLVR-Linearity)", "acceleration/weight_extrapolation.py:56, 84-126",
           "W_0 + α(W_S − W_0), α = (t* − 0)/(t_S − 0), S the last observed step (fit two-point); fit lstsq (the "
           "toolkit's): per entry the least-squares line through the base and every observed step",
           "step", 1, ("fit",),
           "every tensor whose lowercased name has none of layernorm, rmsnorm, ln_, norm: embeddings, an untied head "
           "and biases too; norms are copied from W_S, and so is a tied embedding (their code copies the tied head "
           "from W_S and loads it after the embedding it shares)", "last", P.predict_linear, select=_rlvr,
           fits=("two-point", "lstsq")),
    Method("relex", "RELEX (weizhepei/RELEX)", "scripts/svd_extrapolation.py:141-189, 351-455, 857-1004",
           "W_0 + Σ_{j≤r} ĉ_j v_j: v_j the top r right singular vectors of the stacked deltas (via their Gram), ĉ_j "
           "fitted (linear, polynomial or sin_fft) to the coefficients against positions 0 … W−1 and queried at "
           "(W − 1) + (round(t*·scale) − t_n)", "step", 2,
           ("fit", "rank", "degree", "window", "refit", "time", "target_scale"),
           "every tensor of the base (embeddings, norms, biases); a tied head is set to the predicted embedding",
           "base", P.predict_relex, select=_relex, fits=("linear", "polynomial", "sin_fft")),
    Method("alpharl", "AlphaRL (caiyuchen-ustc/AlphaRL)",
           "eval/svd.py:39-85, eval/analysis/extract_rank1_au.py:32-100, AlphaPredVector.py:90-126, "
           "AlphaRLBuildPerdictModel.py:34-70",
           "W_k ± â v1ᵀ: a_s = σ1 u1 of ΔW_s at each observed step, signs aligned from the last step back; a "
           "one-component PLS of a_s against the step's score y_s; â at the target score y*; v1 of ΔW_k",
           "score", 2, ("scores", "target_score", "ckpt_step"),
           "2-D .weight of each decoder layer's self_attn and mlp (q, k, v, o, gate, up, down)", "ckpt",
           P.predict_alpharl, select=_alpharl, matrices=True,
           needs="a score per observed step (--scores CSV) and a target score (--target-score)"),
    Method("rank1-growth", None, "AlphaRL's eval/upd_rank.py:53-60 norm-matched rank-1 model, grown linearly in "
                                 "time (what alpharl was before issue 28)",
           "W_0 + (t*/t_n)·‖D_n‖F·u1 v1ᵀ, u1, v1 the top singular vectors of D_n = W_tn − W_0",
           "step", 1, (), "attention and MLP matrices (the toolkit's groups)", "last", P.predict_rank1_growth,
           matrices=True),
    Method("last-segment", None, "ExPO's jump along the last observed segment (what expo was before issue 28)",
           "W_B + α(W_B − W_A), A, B the last two observed steps (A the base with one), α given or (t* − t_B)/"
           "(t_B − t_A)", "step-or-alpha", 1, ("alpha",), "attention and MLP matrices (the toolkit's groups)",
           "last", P.predict_last_segment),
)
METHODS_BY_NAME: dict[str, Method] = {m.name: m for m in METHODS_LIST}
#: every method's name, the authors' first
METHODS: tuple[str, ...] = tuple(METHODS_BY_NAME)


def method(name: str) -> Method:
    return METHODS_BY_NAME[name]


def owners(option_name: str) -> tuple[str, ...]:
    """The methods that take a parameter."""
    return tuple(m.name for m in METHODS_LIST if option_name in m.options)


def methods_table() -> str:
    """The docs' table of methods (docs/EXTRAPOLATION.md; a test keeps the two equal)."""
    rows = ["| method | whose | prediction | needs | its options | moves (as published) | the other tensors |",
            "|---|---|---|---|---|---|---|"]
    target = {"step": "--target step", "none": "no target (a fixed jump)", "score": "--scores, --target-score",
              "step-or-alpha": "--target step or --alpha"}
    for m in METHODS_LIST:
        opts = ", ".join(f"`--{o.replace('_', '-')}`" for o in m.options) or "none"
        rows.append(f"| `{m.name}` | {m.authors or 'the toolkit'}: {m.source} | {m.formula} | "
                    f"{target[m.target]}; ≥ {m.min_steps} observed step{'s' if m.min_steps > 1 else ''} | {opts} | "
                    f"{m.moves} | {m.keeps} |")
    return "\n".join(rows)
