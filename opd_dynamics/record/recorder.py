"""`DynamicsRecorder`: the update's geometry recorded inside training, step by step, without checkpoints.

    rec = DynamicsRecorder("sketches", k=16)
    rec.record(model, 0)              # the start weights W_0 (kept, for the selected matrices)
    ... optimizer.step(); rec.record(model, step)
    rec.close()

Per recorded step and selected matrix (attention and MLP by default, through the project's naming): ‖ΔW_t‖F,
‖W_0‖F, the bf16-visible changed fraction (`numerics.CHANGE_THRESHOLD`), the segment ‖W_t − W_prev‖F since the
previous recorded step, the exact ‖ΔW_t‖F² and the top-k singular triplets of ΔW_t = W_t − W_0 (float64 exact
decomposition, `analysis.metrics.spectrum.decompose`), so that the energy of the kept k, σ1/‖ΔW‖F and alignments
of the stored vectors are exact. Output, each file written under a temporary name and renamed:
``step-NNNNNNNN.safetensors`` (per matrix ``<name>::U`` (out × k), ``::S`` (k), ``::V`` (in × k), float32) and
``sketch.csv`` (one row per step and matrix, the columns of `schema.TABLES["sketch"]`), rewritten after every step.

Memory: two float32 copies of the selected matrices (W_0 and the previous recorded weights) on ``device`` and one
matrix's decomposition at a time. `record.callback.DynamicsCallback` drops it into any transformers/TRL Trainer and
logs its scalars through the trainer. Not yet: FSDP gathering, PEFT adapters, the consecutive-segment cosine and lock-in
scalars, reading a sketch series back in `analyze` (issue 21).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from opd_dynamics.analysis.metrics.norms import changed_count
from opd_dynamics.analysis.metrics.spectrum import decompose
from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import MATRIX_GROUPS, is_selected, parse_name
from opd_dynamics.io.writer import atomic_file, save_safetensors
from opd_dynamics.numerics import fro2
from opd_dynamics.schema import TABLES

SKETCH_CSV = TABLES["sketch"].file


def _step_file(out: Path, step: int) -> Path:
    return out / f"step-{step:08d}.safetensors"


class DynamicsRecorder:
    """Records the update of a model's selected matrices at chosen steps (module docstring).

    ``every``: record when ``step % every == 0``, or a callable ``step -> bool`` (dense early, sparse later …).
    ``groups``: naming groups whose 2-D weights are recorded. ``device``: where W_0 and the previous weights are
    kept ("cpu" frees the accelerator). ``svd``: "exact" (float64) or "fast" (the analysis' seeded randomized
    top-k; energies still divide by the exact ‖ΔW‖F²). An existing ``out_dir`` holding a sketch.csv is refused unless
    ``overwrite`` (nothing a user had is replaced silently).
    """

    def __init__(self, out_dir: str | Path, k: int = 16, every: int | Callable[[int], bool] = 1,
                 groups: tuple[str, ...] = MATRIX_GROUPS, device: str | torch.device = "cpu",
                 overwrite: bool = False, svd: str = "exact"):
        if svd not in ("exact", "fast"):
            raise InputError(None, f"svd must be exact or fast, not {svd!r}", ("svd",))
        if k < 1:
            raise InputError(None, f"k must be at least 1, not {k}", ("k",))
        self.out = Path(out_dir)
        if (self.out / SKETCH_CSV).exists() and not overwrite:
            raise InputError(self.out, f"already holds a sketch series ({SKETCH_CSV}); pass overwrite=True to "
                                       "replace it")
        self.out.mkdir(parents=True, exist_ok=True)
        self.k, self.groups, self.device, self.svd = k, groups, torch.device(device), svd
        self.every = every if callable(every) else (lambda s, n=int(every): s % n == 0)
        self.w0: dict[str, torch.Tensor] = {}
        self.prev: dict[str, torch.Tensor] = {}
        self.rows: list[dict] = []
        #: the last recorded step's scalars (what `DynamicsCallback` logs): update norm by group, the segment norm
        #: since the previous recorded step, and the cosine between ΔW_t and the previous recorded ΔW (all
        #: selected matrices together)
        self.scalars: dict[str, float] = {}

    def _selected(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p for n, p in model.named_parameters()
                if p.dim() == 2 and p.is_floating_point() and is_selected(n, tuple(p.shape), self.groups, True)}

    @torch.no_grad()
    def record(self, model: torch.nn.Module, step: int) -> bool:
        """Record ``step`` (the first call keeps the start weights, step 0 by convention); False when the schedule
        skips it."""
        params = self._selected(model)
        if not self.w0:
            if not params:
                raise InputError(None, f"the model has no 2-D weights in the groups {', '.join(self.groups)}")
            self.w0 = {n: p.detach().to(self.device, torch.float32, copy=True) for n, p in params.items()}
            self.prev = {n: t.clone() for n, t in self.w0.items()}
            self.base_norm = {n: fro2(t) ** 0.5 for n, t in self.w0.items()}  # fixed for the whole run
            self.group = {n: parse_name(n).group for n in self.w0}
            self.start = step
            return True
        if not self.every(step):
            return False
        tensors: dict[str, torch.Tensor] = {}
        by_group: dict[str, float] = {}
        dot_prev = norm_prev = seg_total = 0.0
        for name, p in params.items():
            w0 = self.w0[name]
            wt = p.detach().to(self.device, torch.float32)
            w0d = w0.double()
            delta = wt.double() - w0d  # float64: never a bf16 subtraction, exact norms
            before = self.prev[name].double() - w0d  # the previous recorded update
            seg = fro2(delta - before)
            dec = decompose(delta, k_vectors=self.k, mode=self.svd)
            kk = 0 if dec.U is None else min(self.k, dec.U.shape[1], dec.rank)  # no triplet of a zero value
            sv = dec.singular_values[:kk]
            f2 = dec.fro2
            by_group[self.group[name]] = by_group.get(self.group[name], 0.0) + f2
            dot_prev += float((delta * before).sum())
            norm_prev += fro2(before)
            seg_total += seg
            self.rows.append({"step": step, "tensor": name, "k": kk, "update_norm": f2 ** 0.5,
                              "base_norm": self.base_norm[name],
                              "changed_fraction": changed_count(w0, wt, delta) / delta.numel(),
                              "segment_norm": seg ** 0.5, "spectral_norm": float(sv[0]) if kk else 0.0,
                              "energy_topk": float((sv ** 2).sum() / f2) if kk and f2 > 0 else float("nan")})
            if kk:
                tensors[f"{name}::U"] = dec.U[:, :kk].float().cpu().contiguous()
                tensors[f"{name}::S"] = sv.float().cpu().contiguous()
                tensors[f"{name}::V"] = dec.V[:, :kk].float().cpu().contiguous()
            self.prev[name] = wt.clone()
        total = sum(by_group.values())
        self.scalars = {**{f"dynamics/update_norm/{g}": v ** 0.5 for g, v in sorted(by_group.items())},
                        "dynamics/segment_norm": seg_total ** 0.5,
                        "dynamics/cosine_to_previous": dot_prev / (total * norm_prev) ** 0.5
                        if total > 0 and norm_prev > 0 else float("nan")}
        with atomic_file(_step_file(self.out, step)) as tmp:
            save_safetensors(tensors, tmp, metadata={"step": str(step), "start_step": str(self.start),
                                                     "k": str(self.k)})
        self._write_csv()
        return True

    def _write_csv(self) -> None:
        df = pd.DataFrame(self.rows, columns=TABLES["sketch"].names)
        with atomic_file(self.out / SKETCH_CSV) as tmp:
            df.to_csv(tmp, index=False)

    def close(self) -> None:
        """Release the kept weights."""
        self.w0.clear()
        self.prev.clear()

