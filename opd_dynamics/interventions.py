"""Marginal-utility interventions: weights = base + transform(ΔW), ΔW = W_t − W_0.

Every function reads the two models tensor by tensor (paths or open ``ModelDir`` objects), forms ΔW in
float32 (never in bf16/fp16), applies its transform, adds it back to the base in float32 and casts to the
stored dtype. Identity and zero transforms return the checkpoint / base tensor itself, so α = 1 is the
checkpoint bit-exactly and α = 0 the base. Results come back as a state dict, or are written with
``write_model`` when ``write=out_dir`` is given (for external evaluation harnesses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Union

import torch

from opd_dynamics.checkpoints import open_model
from opd_dynamics.errors import InputError
from opd_dynamics.metrics.norms import fro2
from opd_dynamics.naming import MATRIX_GROUPS, TensorName, parse_name

__all__ = ["scale", "layer_window", "module_mask", "rank_truncate", "module_rescale", "embedding_swap",
           "transform_stream", "update_norm", "lab_interventions", "BASE", "CKPT"]

ModelLike = Union[str, Path, Any]
StateDict = dict[str, torch.Tensor]
BASE, CKPT = "base", "ckpt"
# fn(name, parsed, delta_f32) -> BASE | CKPT | new float32 delta
Transform = Callable[[str, TensorName, torch.Tensor], Union[str, torch.Tensor]]


def _open(stack: ExitStack, m: ModelLike):
    if hasattr(m, "get") and hasattr(m, "names"):
        return m
    return stack.enter_context(open_model(m))


def _check_pair(base, ckpt, name: str) -> None:
    try:
        shape = tuple(base.shape(name))  # one lookup, no list of the base's names per tensor
    except KeyError:
        raise InputError(getattr(base, "path", None), f"has no tensor {name!r}, which the checkpoint has") from None
    if shape != tuple(ckpt.shape(name)):
        raise InputError(getattr(ckpt, "path", None), f"tensor {name!r} has shape {tuple(ckpt.shape(name))} "
                                                      f"but the base has {shape}")


def transform_stream(base: ModelLike, ckpt: ModelLike, fn: Transform) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, base + fn(ΔW)) for every checkpoint tensor, one tensor in memory at a time.

    Non-float tensors are passed through from the checkpoint.
    """
    with ExitStack() as stack:
        b, c = _open(stack, base), _open(stack, ckpt)
        for name in c.names():
            _check_pair(b, c, name)
            t = c.get(name)
            if not t.is_floating_point():
                yield name, t
                continue
            w0 = b.get(name)
            delta = t.float() - w0.float()
            out = fn(name, parse_name(name), delta)
            if isinstance(out, str):
                yield name, (t if out == CKPT else w0)
            else:
                yield name, (w0.float() + out).to(t.dtype)


def _finish(stream: Iterable[tuple[str, torch.Tensor]], write: str | Path | None, copy_from: ModelLike,
            overwrite: bool, metadata: dict[str, str] | None) -> StateDict | Path:
    if write is None:
        return dict(stream)
    from opd_dynamics.writer import write_model

    src = copy_from if isinstance(copy_from, (str, Path)) else getattr(copy_from, "path", None)
    write_model(stream, write, metadata=metadata, copy_files_from=src, overwrite=overwrite)
    return Path(write)


def _run(base, ckpt, fn, write, overwrite, what: str) -> StateDict | Path:
    return _finish(transform_stream(base, ckpt, fn), write, ckpt, overwrite, {"intervention": what})


def scale(base: ModelLike, ckpt: ModelLike, alpha: float, *, write: str | Path | None = None,
          overwrite: bool = False) -> StateDict | Path:
    """base + α·ΔW for every tensor (α = 0 → base exactly, α = 1 → checkpoint exactly)."""
    a = float(alpha)

    def fn(_n, _p, d):
        return BASE if a == 0.0 else CKPT if a == 1.0 else d * a

    return _run(base, ckpt, fn, write, overwrite, f"scale alpha={a}")


def layer_window(base: ModelLike, ckpt: ModelLike, center: int, half_width: int = 8,
                 groups: Sequence[str] = ("mlp",), *, write: str | Path | None = None,
                 overwrite: bool = False) -> StateDict | Path:
    """Only layers center−half_width … center+half_width of ``groups`` take the update; the rest stay at base."""
    lo, hi, gs = center - half_width, center + half_width, set(groups)

    def fn(_n, p, _d):
        return CKPT if p.layer is not None and lo <= p.layer <= hi and p.group in gs else BASE

    return _run(base, ckpt, fn, write, overwrite, f"layer_window center={center} hw={half_width} {sorted(gs)}")


def module_mask(base: ModelLike, ckpt: ModelLike, groups: Sequence[str] | None = MATRIX_GROUPS,
                modules: Sequence[str] | None = None, *, write: str | Path | None = None,
                overwrite: bool = False) -> StateDict | Path:
    """Only tensors whose group is in ``groups`` and module in ``modules`` (None = any) take the update."""
    gs = None if groups is None else set(groups)
    ms = None if modules is None else set(modules)

    def fn(_n, p, _d):
        ok = (gs is None or p.group in gs) and (ms is None or p.module in ms)
        return CKPT if ok else BASE

    return _run(base, ckpt, fn, write, overwrite, f"module_mask groups={groups} modules={modules}")


SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def truncate_matrix(delta: torch.Tensor, pct: float, side: str = "top", rescale_to_norm: bool = False,
                    svd: SVD | None = None) -> torch.Tensor:
    """Top or bottom k = ceil(pct·r) singular components of one matrix (float64 SVD), r = min(shape).

    ``svd`` is the matrix's float64 (U, S, Vh) when the caller already has it."""
    if side not in ("top", "bottom"):
        raise InputError(None, f"rank side must be 'top' or 'bottom', not {side!r}")
    if not 0 < pct <= 1:
        raise InputError(None, f"rank fraction must be in (0, 1], not {pct}")
    d = delta.double()
    u, s, vh = svd if svd is not None else torch.linalg.svd(d, full_matrices=False)
    r = s.numel()
    k = min(r, math.ceil(pct * r - 1e-9))
    sl = slice(0, k) if side == "top" else slice(r - k, r)
    out = (u[:, sl] * s[sl]) @ vh[sl]
    if rescale_to_norm:
        n_out = torch.linalg.vector_norm(out)
        if n_out > 0:
            out = out * (torch.linalg.vector_norm(d) / n_out)
    return out.float()


def rank_truncate(base: ModelLike, ckpt: ModelLike, pct: float, side: str = "top",
                  rescale_to_norm: bool = False, *, others: str = CKPT, svd_cache: dict[str, SVD] | None = None,
                  write: str | Path | None = None, overwrite: bool = False) -> StateDict | Path:
    """Per attention/MLP matrix keep the top or bottom ⌈pct·r⌉ singular components of ΔW.

    ``rescale_to_norm`` rescales each truncated ΔW to the full ‖ΔW‖F. Tensors that are not attention/MLP
    matrices (norms, embeddings) take ``others``: the full update (CKPT, default) or none (BASE). Pass the
    same ``svd_cache`` dict to every call on one (base, ckpt) pair so each ΔW is decomposed once.
    """
    pct = float(pct)

    def fn(n, p, d):
        if not (p.group in MATRIX_GROUPS and d.ndim == 2):
            return others
        if svd_cache is not None and n not in svd_cache:
            svd_cache[n] = torch.linalg.svd(d.double(), full_matrices=False)
        return truncate_matrix(d, pct, side, rescale_to_norm, None if svd_cache is None else svd_cache[n])

    return _run(base, ckpt, fn, write, overwrite, f"rank_truncate {side} {pct} rescaled={rescale_to_norm}")


def module_rescale(base: ModelLike, mid: ModelLike, final: ModelLike, beta: float = 1.0, *,
                   write: str | Path | None = None, overwrite: bool = False) -> StateDict | Path:
    """Per tensor: ΔW_mid scaled to β·‖ΔW_final‖F (norms in float64); a zero ΔW_mid stays zero."""
    with ExitStack() as stack:
        b, f = _open(stack, base), _open(stack, final)
        target: dict[str, float] = {}
        for name in f.names():
            _check_pair(b, f, name)
            w = f.get(name)
            if w.is_floating_point():
                target[name] = math.sqrt(fro2(w.float() - b.get(name).float()))

        def fn(n, _p, d):
            if n not in target:
                raise InputError(getattr(f, "path", None), f"has no tensor {n!r}, which the mid checkpoint has")
            nm = float(torch.linalg.vector_norm(d.double()))
            return BASE if nm == 0.0 else (d.double() * (beta * target[n] / nm)).float()

        return _finish(transform_stream(b, mid, fn), write, mid, overwrite, {"intervention": f"module_rescale beta={beta}"})


def embedding_swap(base: ModelLike, ckpt: ModelLike, *, write: str | Path | None = None,
                   overwrite: bool = False) -> StateDict | Path:
    """The checkpoint with its embeddings and lm_head put back to base."""

    def fn(_n, p, _d):
        return BASE if p.group in ("embedding", "lm_head") else CKPT

    return _run(base, ckpt, fn, write, overwrite, "embedding_swap")


def update_norm(base: ModelLike, ckpt: ModelLike) -> float:
    """‖ΔW‖F over all float tensors (square root of the float64 sum of squares)."""
    total = 0.0
    with ExitStack() as stack:
        b, c = _open(stack, base), _open(stack, ckpt)
        for name in c.names():
            t = c.get(name)
            if t.is_floating_point():
                _check_pair(b, c, name)
                total += fro2(t.float() - b.get(name).float())
    return math.sqrt(total)


# --------------------------------------------------------------------------------------------------
# Lab evaluation: every intervention on the lab's OPD and GRPO runs, scored by greedy held-out accuracy.

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
RANK_PCTS = (0.01, 0.05, 0.10, 0.25, 0.50, 1.0)
BETAS = (0.5, 1.0, 1.5)


def _evenly(xs: Sequence[int], n: int) -> list[int]:
    if n <= 0:
        return []
    if len(xs) <= n:
        return list(xs)
    if n == 1:
        return [xs[len(xs) // 2]]
    return sorted({xs[round(i * (len(xs) - 1) / (n - 1))] for i in range(n)})


def lab_interventions(lab_dir: str | Path, out: str | Path, *, step: int | None = None, half_width: int = 1,
                      runs: Sequence[str] = ("opd", "grpo"), n_eval: int | None = None, n_rescale_steps: int = 4,
                      overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate the intervention grid on a lab directory and write scaling/window/rank/rescale/embedding_swap CSVs.

    Each intervened state dict is loaded into one in-memory student model (no checkpoints written) and scored
    by greedy exact-match accuracy on the lab's held-out problems (the first ``n_eval``, default the lab's).
    ``step`` picks the checkpoint (default: each run's last); rescaling uses up to ``n_rescale_steps``
    earlier checkpoints, evenly spaced. Returns the tables as DataFrames.
    """
    import json
    import time

    import pandas as pd

    from opd_dynamics.lab.evaluate import evaluate_model
    from opd_dynamics.lab.models import load_model
    from opd_dynamics.lab.task import build_tokenizer, make_splits
    from opd_dynamics.series import CheckpointSeries
    from opd_dynamics.writer import atomic_dir, check_output, json_text

    log = log or (lambda m: print(m, flush=True))
    lab = Path(lab_dir)
    meta_path, base_dir = lab / "lab.json", lab / "student_init"
    if not meta_path.exists():
        raise InputError(lab, "is not a lab directory: lab.json is missing")
    if not base_dir.exists():
        raise InputError(lab, "is not a lab directory: student_init/ is missing")
    check_output(out, ("interventions.json",), overwrite=overwrite, inputs=[lab])  # before hours of evaluation
    info = json.loads(meta_path.read_text())
    p, seed = info["preset"], int(info.get("seed", 0))
    held = make_splits(p["digits"], p["n_train"], p["n_heldout"], seed).heldout[: n_eval or p.get("n_eval", 500)]
    tok = build_tokenizer()
    model = load_model(base_dir)
    n_layers = int(model.config.num_hidden_layers)

    def acc(sd: StateDict) -> float:
        model.load_state_dict(sd, strict=True)
        return float(evaluate_model(model, tok, held)["accuracy"])

    tables: dict[str, list[dict]] = {k: [] for k in ("scaling", "window", "rank", "rescale", "embedding_swap")}
    t0 = time.time()
    used_steps: dict[str, int] = {}
    with open_model(base_dir) as base:
        for run in runs:
            series = CheckpointSeries.discover(lab / run, base=base_dir, name=run)
            steps = series.step_numbers
            final = steps[-1] if step is None else int(step)
            if final not in steps:
                raise InputError(lab / run, f"has no checkpoint-{final} (steps: {steps})")
            used_steps[run] = final
            with series.open_step(final) as ck:
                total = update_norm(base, ck)
                for a in ALPHAS:
                    tables["scaling"].append({"run": run, "alpha": a, "update_norm": a * total,
                                              "accuracy": acc(scale(base, ck, a))})
                log(f"[interventions] {run} step {final}: scaling done ({time.time() - t0:.0f}s)")
                for group in ("mlp", "attention"):
                    for c in range(n_layers):
                        tables["window"].append({
                            "run": run, "center_layer": c, "first_layer": max(0, c - half_width),
                            "last_layer": min(n_layers - 1, c + half_width), "group": group,
                            "accuracy": acc(layer_window(base, ck, c, half_width, (group,)))})
                log(f"[interventions] {run}: window done ({time.time() - t0:.0f}s)")
                svds: dict = {}  # each ΔW decomposed once for all 24 truncations
                for side in ("top", "bottom"):
                    for pct in RANK_PCTS:
                        for resc in (False, True):
                            sd = rank_truncate(base, ck, pct, side, resc, svd_cache=svds)
                            tables["rank"].append({"run": run, "side": side, "pct": pct, "rescaled": resc,
                                                   "accuracy": acc(sd)})
                log(f"[interventions] {run}: rank done ({time.time() - t0:.0f}s)")
                for variant, sd in (("checkpoint", scale(base, ck, 1.0)), ("embedding_swap", embedding_swap(base, ck)),
                                    ("embeddings_only", module_mask(base, ck, groups=("embedding", "lm_head")))):
                    tables["embedding_swap"].append({"run": run, "variant": variant, "accuracy": acc(sd)})
                for mid in _evenly([s for s in steps if s < final], n_rescale_steps):
                    with series.open_step(mid) as mk:
                        for beta in BETAS:
                            tables["rescale"].append({"run": run, "step": mid, "beta": beta,
                                                      "accuracy": acc(module_rescale(base, mk, ck, beta))})
                log(f"[interventions] {run}: rescale and embedding swap done ({time.time() - t0:.0f}s)")
    frames = {k: pd.DataFrame(v) for k, v in tables.items()}
    with atomic_dir(out, ("interventions.json",), overwrite=overwrite) as tmp:
        for k, df in frames.items():
            df.to_csv(tmp / f"{k}.csv", index=False)
        (tmp / "interventions.json").write_text(json_text({
            "lab": str(lab.resolve()), "steps": used_steps, "half_width": half_width, "n_eval": len(held),
            "alphas": ALPHAS, "rank_pcts": RANK_PCTS, "betas": BETAS, "wall_s": round(time.time() - t0, 2)}))
    return frames
