"""EffOPD on checkpoints saved by any framework (verl, OpenRLHF, TRL …): extrapolate two model directories, or
run the published search with an external evaluation command.

Streaming: a tensor is read in row blocks of A and B (`io.rows.row_blocks`, the one row-block reader);
the jump (`effopd.search.jump`, the one jump function) is float64 and its result is rounded to B's stored dtype
once. Only the output tensor being assembled and the shard being written are held whole.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from opd_dynamics.effopd.options import EffOPDOptions
from opd_dynamics.effopd.search import Score, TriggerRecord, jump, published_search
from opd_dynamics.errors import InputError
from opd_dynamics.io.formats import open_full_weights
from opd_dynamics.io.model_dir import FP8_DTYPES, ModelDir
from opd_dynamics.io.reader import read_settings
from opd_dynamics.io.rows import row_blocks
from opd_dynamics.io.writer import (
    DEFAULT_SHARD_BYTES,
    MODEL,
    atomic_write_text,
    check_output,
    check_output_again,
    hidden_sibling,
    json_text,
    output_errors,
    replace_path,
    write_model,
    writing_for,
)

_SPLIT = re.compile(r"[\s=:,;]+")


def _check_selection(cur: ModelDir, opts: EffOPDOptions) -> None:
    """Refuse a selection that matches no float tensor of `cur`: the output would be B labelled as a jump."""
    fp8 = [n for n, e in cur.entries.items() if e.dtype in FP8_DTYPES]
    if fp8:
        raise InputError(cur.path, f"holds FP8 weights ({fp8[0]!r} …) whose scales are separate tensors; "
                                   "dequantise the checkpoint before extrapolating it")
    if not any(e.is_float and opts.selects(n, e.shape) for n, e in cur.entries.items()):
        if opts.selection == "published":
            raise InputError(cur.path, "has no float tensor that EffOPD's name rule selects (attention or MLP names) "
                                       "to extrapolate (see select and groups)", ("select", "groups"))
        what = "all groups" if opts.groups is None else "groups " + ",".join(opts.groups)
        raise InputError(cur.path, f"has no float {'matrix' if opts.matrices_only else 'tensor'} in {what} to "
                                   "extrapolate (see groups and matrices_only)", ("groups", "matrices_only"))


def extrapolated_tensors(prev: ModelDir, cur: ModelDir, coef: float, options: EffOPDOptions | None = None, *,
                         counts: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of `cur`: W_B + coef·(W_B − W_A) for the float tensors `options` selects,
    else W_B. NaN or Inf in what would be yielded is refused (InputError naming the tensor and the checkpoint that
    holds them, or the dtype the jump overflows)."""
    opts = options or EffOPDOptions()
    counts = counts if counts is not None else {}
    counts.setdefault("extrapolated", 0)
    counts.setdefault("copied", 0)
    for name in cur.names():
        e = cur.entries[name]
        if coef != 0 and e.is_float and opts.selects(name, e.shape):
            if name not in prev:
                raise InputError(prev.path, f"has no tensor {name!r}, which {cur.path} has")
            if prev.shape(name) != tuple(e.shape):
                raise InputError(prev.path, f"tensor {name!r} has shape {prev.shape(name)}, but {cur.path} has "
                                            f"{tuple(e.shape)}")
            dtype = cur.dtype(name)
            w = torch.empty(tuple(e.shape) or (1,), dtype=dtype)
            for lo, hi, wa, d in row_blocks(prev, [cur], name):  # float64 rows of A and B − A
                w[lo:hi] = jump(wa, wa + d[0], coef, torch.float64).to(dtype)
            w = w.reshape(e.shape)
            if not bool(torch.isfinite(w).all()):
                raise _nonfinite_jump(prev, cur, name, coef, prev.get(name), cur.get(name))
            yield name, w
            counts["extrapolated"] += 1
        else:
            b = cur.get(name)
            if b.is_floating_point() and not bool(torch.isfinite(b).all()):
                raise InputError(cur.path, f"holds NaN or Inf in {name!r}, which the output copies; nothing was "
                                           "written")
            yield name, b
            counts["copied"] += 1


def _nonfinite_jump(prev: ModelDir, cur: ModelDir, name: str, coef: float, wa: torch.Tensor, wb: torch.Tensor
                    ) -> InputError:
    """The refusal of a jump that came out NaN or Inf: the checkpoint holding NaN or Inf, else the dtype overflowed."""
    for m, w in ((cur, wb), (prev, wa)):
        if not bool(torch.isfinite(w).all()):
            return InputError(m.path, f"holds NaN or Inf in {name!r}, so W_B + coef·(W_B − W_A) is NaN or Inf there; "
                                      "nothing was written")
    top = float((wb.double() + coef * (wb.double() - wa.double())).abs().max())
    return InputError(None, f"W_B + coef·(W_B − W_A) with coef {coef:g} goes beyond {str(wb.dtype).split('.')[-1]} in "
                            f"{name!r} (up to {top:.2g}); nothing was written", ("coef",))


def extrapolate_checkpoint(prev: str | Path, cur: str | Path, coef: float, out: str | Path,
                           options: EffOPDOptions | None = None, *, overwrite: bool = False,
                           max_shard_bytes: int = DEFAULT_SHARD_BYTES, read: str = "pread", weights: str = "model",
                           prefer_format: str | None = None, load_mode: str | None = None,
                           metadata: dict[str, str] | None = None, **fields) -> Path:
    """Write W_B + coef·(W_B − W_A) (the tensors `options` selects, by default those EffOPD's name rule moves;
    everything else copied from B) as a model directory `out`. Keyword ``fields`` of `EffOPDOptions` (select,
    groups, matrices_only, naming_overrides) replace its values. ``read``, ``weights`` and ``prefer_format`` say how
    A and B are read (`formats.open_model`; ``load_mode`` is their deprecated alias).

    Shards and index as the writer makes them, config and tokenizer files copied from B, the sources and the
    coefficient recorded in every shard's safetensors metadata; written under a temporary name, then renamed.
    """
    prev, cur, out = Path(prev), Path(cur), Path(out)
    opts = replace(options or EffOPDOptions(), **fields)
    if not math.isfinite(coef):
        raise InputError(None, f"the extrapolation coefficient coef must be a finite number, got {coef}", ("coef",))
    check_output(out, MODEL, overwrite=overwrite, inputs=[prev, cur])
    read, weights = read_settings(read, weights, load_mode)
    a = open_full_weights(prev, read, prefer_format, weights=weights)
    b = open_full_weights(cur, read, prefer_format, weights=weights)
    if coef != 0:
        _check_selection(b, opts)
    meta = {"effopd_prev": str(prev.resolve()), "effopd_cur": str(cur.resolve()), "effopd_coef": repr(float(coef)),
            "effopd_select": opts.selection,
            "effopd_groups": ("" if opts.selection == "published" else
                              ",".join(opts.groups) if opts.groups is not None else "all"),
            "effopd_matrices_only": "" if opts.selection == "published" else str(bool(opts.matrices_only)),
            "effopd_formula": "W_cur + coef*(W_cur - W_prev)",
            **(metadata or {})}
    with a, b:  # an OS error writing `out` is one sentence (write_model); readers say their own
        return write_model(extrapolated_tensors(a, b, coef, opts),
                           out, metadata=meta, copy_files_from=cur, max_shard_bytes=max_shard_bytes,
                           overwrite=overwrite)


def parse_score(stdout: str) -> float | None:
    """The score an evaluation command printed: the (last) number on its last non-empty stdout line."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        return None
    for token in reversed(_SPLIT.split(lines[-1])):
        try:
            return float(token)
        except ValueError:
            continue
    return None


def command_scorer(eval_cmd: str, *, timeout: float | None = None, echo: Callable[[str], None] | None = None
                   ) -> Callable[[Path], float]:
    """A scorer that runs `eval_cmd` (a shell command) on a model directory: `{path}` is replaced by the
    directory, or the directory is appended; the score is the number on the last line of its stdout."""
    if not eval_cmd.strip():
        raise InputError(None, "eval_cmd is empty", ("eval_cmd",))

    def score(path: Path) -> float:
        q = shlex.quote(str(path))
        cmd = eval_cmd.replace("{path}", q) if "{path}" in eval_cmd else f"{eval_cmd} {q}"
        try:
            res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise InputError(None, f"evaluation command timed out after {timeout} s on {path}: {cmd}") from None
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or [""])[-1]
            raise InputError(None, f"evaluation command failed (exit {res.returncode}) on {path}: {cmd}"
                                   + (f" — {tail}" if tail else ""))
        s = parse_score(res.stdout)
        if s is None:
            last = (res.stdout.strip().splitlines() or [""])[-1]
            raise InputError(None, f"evaluation command printed no number on its last stdout line "
                                   f"({last!r}) for {path}: {cmd}")
        if not math.isfinite(s):  # nan never compares, inf beats everything: neither can be searched on
            raise InputError(None, f"evaluation command printed a score that is not a finite number ({s}) for "
                                   f"{path}: {cmd}")
        if echo is not None:
            echo(f"score {s:g}  {path}")
        return s

    return score


def search_checkpoints(prev: str | Path, cur: str | Path, out: str | Path, score: Callable[[Path], float] | str,
                       options: EffOPDOptions | None = None, *, overwrite: bool = False,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, read: str = "pread", weights: str = "model",
                       prefer_format: str | None = None, load_mode: str | None = None, step: int | None = None,
                       timeout: float | None = None, echo: Callable[[str], None] | None = None,
                       **fields) -> TriggerRecord:
    """The published search on saved checkpoints: score B itself, then candidates B + 2k(B − A), k = 1 … K, in
    order, keeping the last one whose score is > the best so far (≥ with `strict=False`); the kept model is written to
    `out` (a copy of B when no candidate is accepted) with `effopd_search.json` describing every score.

    `score` is a callable on a model directory, or a shell command (see `command_scorer`). `options` (or its
    keyword ``fields``: k_max, coef_step, strict, groups, matrices_only, naming_overrides) say what is searched.
    Candidates are written beside `out` under temporary names and removed once judged.
    """
    prev, cur, out = Path(prev), Path(cur), Path(out)
    opts = replace(options or EffOPDOptions(), **fields)
    k_max, coef_step, strict = opts.k_max, opts.coef_step, opts.strict
    check_output(out, MODEL, overwrite=overwrite, inputs=[prev, cur])
    # fail early, before any evaluation: unreadable inputs, or …
    read, weights = read_settings(read, weights, load_mode)
    open_full_weights(prev, read, prefer_format, weights=weights).close()
    with open_full_weights(cur, read, prefer_format, weights=weights) as b:  # … an empty selection
        _check_selection(b, opts)
    scorer = command_scorer(score, timeout=timeout, echo=echo) if isinstance(score, str) else score
    t0 = time.perf_counter()
    val_s = 0.0
    cands: dict[int, Path] = {}

    def make(k: int) -> Path:
        p = hidden_sibling(out, f"effopd-k{k}")
        extrapolate_checkpoint(prev, cur, coef_step * k, p, opts, max_shard_bytes=max_shard_bytes, read=read,
                               weights=weights, prefer_format=prefer_format,
                               metadata={"effopd_k": str(k)})
        cands[k] = p
        return p

    def score_k(k: int) -> Score:
        nonlocal val_s
        path = cur if k == 0 else make(k)
        v0 = time.perf_counter()
        s = scorer(path)
        val_s += time.perf_counter() - v0
        for j in [j for j in cands if j < k - 1]:  # only the best so far (k − 1) and k can still be kept
            _rm(cands.pop(j))
        return s

    with output_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with writing_for(out):  # a candidate beside OUT that cannot be written is said of OUT
            k_acc, scores = published_search(score_k, k_max, strict=strict)
            keep = cands.pop(k_acc) if k_acc else make(0)
        cands.pop(0, None)
        rec = TriggerRecord(step=step, scores=scores, coefs=[coef_step * k for k in range(len(scores))],
                            k_accepted=k_acc, coef=coef_step * k_acc, delta_norm=float("nan"), validation_s=val_s,
                            extrapolate_s=time.perf_counter() - t0 - val_s)
        info = {"prev": str(prev.resolve()), "cur": str(cur.resolve()), "k_accepted": k_acc,
                "coef": coef_step * k_acc, "scores": scores, "coefs": rec.coefs, "strict": strict, "tie": rec.tie,
                "select": opts.selection,
                "groups": (list(opts.groups) if opts.groups is not None else None) if opts.selection == "groups"
                else None, "matrices_only": opts.matrices_only if opts.selection == "groups" else None,
                "eval_cmd": score if isinstance(score, str) else None, "validation_s": val_s}
        with output_errors(out):
            atomic_write_text(keep / "effopd_search.json", json_text(info))
        check_output_again(keep, out, MODEL, overwrite=overwrite)  # a refusal keeps the model and names it
        with output_errors(out):
            replace_path(keep, out)
        return rec
    finally:
        for p in cands.values():
            _rm(p)


def _rm(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)
