"""What a figure says about the runs it shows: their names, and their kind (OPD, RL, SFT …) only where the
provenance states it.

A run's kind is never guessed from its name ("opd-v2", "grpo_lr1e-5", "rl" are names, not facts): a title says
the runs by name, one run ("sft"), two ("opd vs grpo") or more ("a, b and c"), and adds a kind only where
metadata gives one:

- a provenance file's top-level ``"kinds": {run: kind}`` (any run.json, lab.json … the tables came with), or a
  ``"kind"`` in the run's entry of a run.json's ``inputs``;
- ``lab.json``: the lab's two runs are OPD and RL (GRPO) by construction (`lab.layout.RUNS`).

The one thing a name decides is the colour: a run named exactly "opd" is OPD blue (`style.run_colors`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from opd_dynamics.plotting.tables import Tables
from opd_dynamics.schema import LAB_JSON

#: the lab's runs and what they are (opd_dynamics.lab.layout.RUNS: TRL's DistillationTrainer and GRPOTrainer)
LAB_KINDS = {"opd": "OPD", "grpo": "RL, GRPO"}


def run_kinds(tables: Tables) -> dict[str, str]:
    """{run: kind} for the runs whose kind the provenance states (module docstring); later files do not
    override earlier ones."""
    out: dict[str, str] = {}
    for source, meta in tables.metas:
        found: dict[str, str] = {}
        if Path(source).name == LAB_JSON:
            found |= LAB_KINDS
        kinds = meta.get("kinds")
        if isinstance(kinds, Mapping):
            found |= {str(r): str(k) for r, k in kinds.items() if k}
        for entry in meta.get("inputs") or []:
            if isinstance(entry, Mapping) and entry.get("run") is not None and entry.get("kind"):
                found[str(entry["run"])] = str(entry["kind"])
        for r, k in found.items():
            out.setdefault(r, k)
    return out


def and_list(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def runs_title(runs: Sequence[str]) -> str:
    """The runs as a title says them: 'sft', 'opd vs grpo', 'a, b and c'."""
    runs = [str(r) for r in runs]
    return " vs ".join(runs) if len(runs) == 2 else and_list(runs)


def run_label(run: str, kinds: Mapping[str, str] | None = None, step: int | None = None) -> str:
    """'grpo (RL, GRPO; step 40)', 'sft (step 8)', 'sft': the name, its stated kind (when it is not the name
    itself) and the step shown."""
    extra = []
    kind = (kinds or {}).get(str(run))
    if kind and kind.strip().lower() != str(run).strip().lower():
        extra.append(kind)
    if step is not None:
        extra.append(f"step {step}")
    return f"{run} ({'; '.join(extra)})" if extra else str(run)


def runs_caption(runs: Iterable[str], kinds: Mapping[str, str] | None = None,
                 steps: Mapping[str, int] | None = None) -> str:
    """The runs as a caption names them: 'sft (step 8)', 'opd (OPD; step 40) and grpo (RL, GRPO; step 40)'."""
    steps = steps or {}
    return and_list([run_label(r, kinds, steps.get(str(r))) for r in runs])
