"""One recorded tensor: what the recorder keeps of it and what one step measures.

`DenseMatrix`: a trained weight; ΔW_t = W_t − W_0 formed from a float32 copy of W_t, its top-k triplets from the
certified Krylov route of `record.topk` or the exact float64 decomposition (``svd``, below). `LoraMatrix`: a PEFT
LoRA layer over a frozen base weight; ΔW_t = s·(B_t A_t − B_0 A_0) is kept as its factors and never formed: norms
and inner products are r × r products of the factors, and the top triplets come from the QR factors' small core
(exact, as cheap as the rank allows). The bf16-visible changed fraction needs the dense update, so a LoRA layer
leaves it empty. `NormedTensor`: any other trainable tensor (embeddings, norms, biases, an untied head, matrices
outside the decomposed groups): ‖ΔW_t‖F, ‖W_0‖F and the changed fraction only, so that a sketch series' shares
divide by the same tensors as a checkpoint analysis.

All give, per step, a `Measured`: the row of the ``sketch`` table (less the step and name), the top-k triplets,
and the sums the recorder adds over matrices for its scalars (‖ΔW_t‖², the segment's ‖·‖² and its inner product
with the previous segment, the inner product of ΔW_t with the previous recorded ΔW; a normed tensor gives ‖ΔW_t‖²
only).

``svd`` of a dense matrix: "certified" tries `record.topk.certified_topk` (warm-started from the previous step's
vectors, its basis capped at KRYLOV_SHARE of the smaller side, where its products cost about what the exact route
does) and falls back to the exact route when that does not certify (the first step, with nothing to start from,
takes the exact route: from a cold start the Krylov route almost never certified 16 values in the cap); after a
fallback the Krylov route is tried again only 1, 2, 4 … 32 steps later (a flat spectrum that needs a wide basis
keeps failing: the exact route is the cheaper one there). "exact": the float64 decomposition of
`numerics.decomposition` every step. "fast": `record.topk.warm_topk`, uncertified. Each row says which
(``svd_method``) and the relative bound on its σ (``sigma_bound``): the residual certificate of the Krylov route, or
the exact route's a priori rounding bound (`exact_bound`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from opd_dynamics.io.sketches import BASE_FILE, decomposed_names, read_meta
from opd_dynamics.numerics import dot, fro2, update_stats
from opd_dynamics.numerics.decomposition import decompose
from opd_dynamics.record.topk import CERTIFY_TOL, certified_topk, warm_topk

SUMS = ("f2", "seg2", "segdot", "prevseg2", "dotprev", "prevf2")
#: the Krylov basis of the certified route may reach this share of the smaller side before it gives up for the
#: exact route: around there its products cost what the exact Gram route does (measured on the 2-core CPU: at
#: 576 × 576 and 1536 × 576, a 144-column basis took 0.75–1.0× the exact route's time; docs/BENCHMARKS.md)
KRYLOV_SHARE = 0.25
#: the longest pause (in recorded steps) of the Krylov route after it failed to certify for a matrix
MAX_BACKOFF = 32
#: columns of each Krylov block that are fresh Gaussian ones (the rest: the previous step's top Ritz vectors)
FRESH = 4


def cosine(num: float, a2: float, b2: float) -> float:
    return num / math.sqrt(a2 * b2) if a2 > 0 and b2 > 0 else math.nan


@dataclass
class Measured:
    row: dict
    triplet: tuple[Tensor, Tensor, Tensor] | None
    sums: dict[str, float]
    #: what its decomposition cost ({"route", "products"}; empty when nothing was decomposed): `shards.measure_one`
    work: dict = field(default_factory=dict)


def _measured(f2: float, changed: float, seg2: float, segdot: float, prevseg2: float, dotprev: float,
              prevf2: float, triplet, method: str, bound: float = math.nan) -> Measured:
    if triplet is not None and triplet[1].numel() == 0:
        triplet = None
    S = triplet[1] if triplet is not None else None
    row = {"k": 0 if S is None else int(S.numel()), "update_norm": f2 ** 0.5, "changed_fraction": changed,
           "segment_norm": seg2 ** 0.5, "segment_cosine": cosine(segdot, prevseg2, seg2),
           "cosine_to_previous": cosine(dotprev, f2, prevf2), "spectral_norm": float(S[0]) if S is not None else 0.0,
           "energy_topk": float((S.double() ** 2).sum() / f2) if S is not None else math.nan,
           "svd_method": method if S is not None else "zero", "sigma_bound": bound if S is not None else math.nan}
    sums = dict(zip(SUMS, (f2, seg2, segdot, prevseg2, dotprev, prevf2)))
    return Measured(row, triplet, sums)


class NormedTensor:
    """A trainable tensor recorded by its norms only (module docstring): W_0 kept (float32, or its stored dtype)."""

    lora = False
    decomposed = False

    def __init__(self, w0: Tensor, device: torch.device, keep: str):
        self.w0 = w0.to(device, torch.float32 if keep == "float32" else w0.dtype, copy=True)
        self.base_norm = fro2(self.w0.float()) ** 0.5
        self.shape = tuple(w0.shape)

    def restart(self, snap: Tensor) -> None:
        pass

    def measure(self, wt: Tensor, segment: bool) -> Measured:
        f2, changed = update_stats(self.w0.float(), wt)
        nan = math.nan
        row = {"k": 0, "update_norm": f2 ** 0.5, "changed_fraction": changed / max(1, wt.numel()),
               "segment_norm": nan, "segment_cosine": nan, "cosine_to_previous": nan, "spectral_norm": nan,
               "energy_topk": nan, "svd_method": "norms", "sigma_bound": nan}
        return Measured(row, None, {"f2": f2})


class DenseMatrix:
    """A trained weight: W_0 kept (float32, or its stored dtype), the previous recorded weights and segment, and the
    previous step's top vectors (the certified and fast routes start from them). ``vectors``: the exact route's
    eigenvector method (`numerics.decomposition.decompose`); ``tol``: the certified route's bound."""

    lora = False
    decomposed = True

    def __init__(self, w0: Tensor, device: torch.device, keep: str, k: int, svd: str, oversample: int, power: int,
                 vectors: str = "auto", tol: float = CERTIFY_TOL):
        self.w0 = w0.to(device, torch.float32 if keep == "float32" else w0.dtype, copy=True)
        self.base_norm = fro2(self.w0.float()) ** 0.5
        self.shape = tuple(w0.shape)
        self.device, self.k, self.svd, self.oversample, self.power = device, k, svd, oversample, power
        self.vectors, self.tol = vectors, tol
        self.prev: Tensor = self.w0.float().clone()
        self.prev_seg: Tensor | None = None
        self.prev_seg2 = math.nan
        self.prev_f2 = math.nan
        self.basis: Tensor | None = None
        d, b = min(self.shape), k + oversample
        cap = int(KRYLOV_SHARE * d) // b * b  # whole blocks
        self.cap = cap if cap >= 2 * b else 0  # below two blocks the exact route is as cheap: always that
        self.pause = self.backoff = 0  # steps left before the Krylov route is tried again; the next pause
        self.calls = 0
        #: what the last `measure` did: {"route": "krylov" | "exact" | "fast", "products": block products}
        self.work: dict = {}

    def snapshot(self, weight: Tensor) -> Tensor:
        """A float32 copy of the weights now (the recorder owns it; training may change the parameter)."""
        return weight.detach().to(self.device, torch.float32, copy=True)

    def restart(self, snap: Tensor) -> None:
        """Continue from these weights (a resumed run): no previous segment is known."""
        self.prev, self.prev_seg, self.prev_f2 = snap, None, math.nan

    def measure(self, wt: Tensor, segment: bool) -> Measured:
        w0 = self.w0.float()
        f2, changed = update_stats(w0, wt)
        delta = wt - w0
        seg = wt - self.prev
        nan = math.nan
        seg2 = fro2(seg) if segment else nan
        prev_seg = self.prev_seg if segment else None
        segdot = dot(prev_seg, seg) if prev_seg is not None else nan
        prevseg2 = self.prev_seg2 if prev_seg is not None else nan  # its energy, kept when it was measured
        prevf2 = self.prev_f2 if segment else nan
        dotprev = f2 - dot(delta, seg) if segment else nan  # ⟨ΔW_t, ΔW_prev⟩ = ⟨ΔW_t, ΔW_t − segment⟩
        self.work = {}
        triplet, method, bound = self._topk(delta) if f2 > 0 and math.isfinite(f2) else (None, "zero", math.nan)
        if segment:
            self.prev_seg, self.prev_seg2 = seg, seg2
        self.prev, self.prev_f2 = wt, f2
        return _measured(f2, changed / max(1, delta.numel()), seg2, segdot, prevseg2, dotprev, prevf2, triplet,
                         method, bound)

    def _topk(self, delta: Tensor):
        """(the top triplets, svd_method, the certified relative bound or NaN) of ΔW_t, by ``svd`` (module
        docstring)."""
        self.calls += 1
        if self.svd == "fast":
            U, S, V, self.basis = warm_topk(delta.double(), self.k, self.basis, self.oversample, self.power)
            kk = int((S > 0).sum())
            self.work = {"route": "fast", "products": 2 * self.power + 2}
            return (U[:, :kk], S[:kk], V[:, :kk]), "warm-randomized", math.nan
        if self.svd == "certified" and self.cap and self.basis is not None:  # cold (no basis yet): exact
            if self.pause:
                self.pause -= 1
            else:
                r = certified_topk(delta.double(), self.k, self.basis, extra=self.oversample, fresh=FRESH, tol=self.tol,
                                   max_basis=self.cap, seed=self.calls)
                if r.certified:
                    self.basis, self.backoff = r.basis, 0
                    self.work = {"route": "krylov", "products": r.products}
                    return (r.U, r.S, r.V), "certified-krylov-f64", r.bound
                self.backoff = min(2 * self.backoff or 1, MAX_BACKOFF)
                self.pause = self.backoff
                self.work = {"products": r.products}  # spent before giving up
        # the exact route (in float64 from the float32 update, whose resolution is its rank floor); its top
        # k + oversample vectors of the smaller side start the next Krylov try
        dec = decompose(delta, k_vectors=self.k + self.oversample, mode="exact", vectors=self.vectors)
        kk = min(self.k, dec.rank, dec.U.shape[1])
        self.basis = dec.V if self.shape[1] <= self.shape[0] else dec.U
        self.work = {"route": "exact", "products": self.work.get("products", 0)}
        S = dec.singular_values[:kk]
        return (dec.U[:, :kk], S, dec.V[:, :kk]), dec.method, exact_bound(dec.method, self.shape, S)


def exact_bound(method: str, shape: tuple[int, int], S: Tensor) -> float:
    """The exact routes' a priori bound on max_i |σ̃_i − σ_i| / σ̃_i (a rounding bound, not a residual: a residual
    check would cost a fifth of the decomposition again): the float64 Gram is formed and eigen-decomposed with an
    error of at most about dl = max(m, n)·ε·σ_1² in each eigenvalue (Weyl; the bound `numerics.decomposition`
    checks the Gram route against), so σ_i is within dl / σ̃_i; the SVD's, max(m, n)·ε·σ_1."""
    if not S.numel():
        return 0.0
    eps = max(shape) * float(torch.finfo(torch.float64).eps)
    s1, sk = float(S[0]), float(S[-1])
    return eps * (s1 / sk) ** 2 if method == "exact-gram-f64" else eps * s1 / sk


# ---- LoRA: an update held as factors L Rᵀ (L: out × q, R: in × q) ----


def _dot(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
    """⟨L_a R_aᵀ, L_b R_bᵀ⟩ = Σ (L_aᵀ L_b) ∘ (R_aᵀ R_b), in float64."""
    return float(((a[0].T @ b[0]) * (a[1].T @ b[1])).sum())


def _minus(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return torch.cat([a[0], -b[0]], 1), torch.cat([a[1], b[1]], 1)


def _lowrank_topk(f: tuple[Tensor, Tensor], k: int):
    """Top-k triplets of L Rᵀ from QR(L) = Q_l T_l, QR(R) = Q_r T_r and the SVD of the small core T_l T_rᵀ."""
    ql, tl = torch.linalg.qr(f[0])
    qr, tr = torch.linalg.qr(f[1])
    uc, s, vch = torch.linalg.svd(tl @ tr.T)
    keep = int((s > s[0] * 1e-12).sum()) if s.numel() and s[0] > 0 else 0
    kk = min(k, keep)
    return ql @ uc[:, :kk], s[:kk], qr @ vch.T[:, :kk]


class LoraMatrix:
    """A PEFT LoRA layer: ΔW_t = s·(B_t A_t − B_0 A_0) from its factors (module docstring)."""

    lora = True
    decomposed = True
    work: dict = {"route": "factors", "products": 0}

    def __init__(self, base: Tensor, B0: Tensor, A0: Tensor, scale: float, k: int):
        self.scale, self.k = scale, k
        self.shape = tuple(base.shape)
        self.f0 = self._factors(B0, A0)
        w0 = base.double() + scale * (B0.double() @ A0.double())  # once, at the start: ‖W_0‖F
        self.base_norm = fro2(w0) ** 0.5
        self.zero_start = not bool(B0.any()) or not bool(A0.any())
        self.prev = self._update(self.f0)
        self.prev_seg: tuple[Tensor, Tensor] | None = None
        self.prev_seg2 = math.nan
        self.prev_f2 = math.nan

    def _factors(self, B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        return self.scale * B.detach().double(), A.detach().double().T

    def _update(self, f: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """ΔW as factors: s B Aᵀ… less the start's (dropped when the start is zero, PEFT's default init)."""
        return f if self.zero_start else _minus(f, self.f0)

    @staticmethod
    def snapshot(factors: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """float32 copies of (B, A) now."""
        return tuple(t.detach().to("cpu", torch.float32, copy=True) for t in factors)

    def restart(self, snap) -> None:
        self.prev, self.prev_seg, self.prev_f2 = self._update(self._factors(*snap)), None, math.nan

    def measure(self, snap, segment: bool) -> Measured:
        delta = self._update(self._factors(*snap))
        f2 = _dot(delta, delta)
        nan = math.nan
        seg = _minus(delta, self.prev)
        seg2 = _dot(seg, seg) if segment else nan
        prev_seg = self.prev_seg if segment else None
        segdot = _dot(prev_seg, seg) if prev_seg is not None else nan
        prevseg2 = self.prev_seg2 if prev_seg is not None else nan
        prevf2 = self.prev_f2 if segment else nan
        dotprev = _dot(delta, self.prev) if segment else nan
        triplet = _lowrank_topk(delta, self.k) if f2 > 0 and math.isfinite(f2) else None
        if segment:
            self.prev_seg, self.prev_seg2 = seg, seg2
        self.prev, self.prev_f2 = delta, f2
        return _measured(f2, nan, seg2, segdot, prevseg2, dotprev, prevf2, triplet, "exact-lora-factors")


def lora_factors(module) -> tuple[Tensor, Tensor, float] | None:
    """(B, A, scale) of a PEFT LoRA layer's one active adapter; None for anything else. Several active adapters
    are refused by the caller (their sum is not one B·A)."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if lora_a is None or lora_b is None or not hasattr(module, "base_layer"):
        return None
    active = [a for a in getattr(module, "active_adapters", []) if a in lora_a]
    if len(active) != 1:
        return None
    name = active[0]
    return lora_b[name].weight, lora_a[name].weight, float(module.scaling[name])


Matrix = DenseMatrix | LoraMatrix | NormedTensor


def copied(value: torch.Tensor | tuple) -> torch.Tensor | tuple:
    """A copy of a recorded tensor's value (a weight, or a LoRA layer's (B, A))."""
    return tuple(t.clone() for t in value) if isinstance(value, tuple) else value.clone()


def build_matrices(out: Path, settings: dict, names: list[str] | None = None) -> dict[str, Matrix]:
    """The recorded tensors ``names`` (all by default) of the series in ``out``, each with W_0 from
    ``base.safetensors`` and the recorder's ``settings`` (`StepRecorder`)."""
    meta = read_meta(out)["tensors"]
    decomposed = set(decomposed_names(meta))
    names = list(meta) if names is None else names
    device = torch.device(settings["device"])
    out_matrices: dict[str, Matrix] = {}
    with safe_open(Path(out) / BASE_FILE, "pt") as f:
        for n in names:
            v = meta[n]
            if n not in decomposed:
                out_matrices[n] = NormedTensor(f.get_tensor(n), device, settings["keep"])
            elif "lora_scale" in v:
                out_matrices[n] = LoraMatrix(f.get_tensor(n), f.get_tensor(f"{n}::lora_B0"),
                                             f.get_tensor(f"{n}::lora_A0"), float(v["lora_scale"]), int(settings["k"]))
            else:
                out_matrices[n] = DenseMatrix(f.get_tensor(n), device, settings["keep"], int(settings["k"]),
                                              settings["svd"], int(settings["oversample"]), int(settings["power"]),
                                              settings.get("vectors", "auto"), float(settings.get("tol", CERTIFY_TOL)))
    return out_matrices
