"""The layout of a lab directory, in one place: what `lab run` writes and every other lab command reads.

::

    LAB/teacher/            the teacher (a model directory; the student's architecture, trained from student_init)
    LAB/student_init/       the start of both runs, and the base their updates are measured against
    LAB/opd/checkpoint-N/   the OPD run's checkpoints, and LAB/opd/eval.csv their evaluation
    LAB/grpo/checkpoint-N/  the GRPO run's, and LAB/grpo/eval.csv
    LAB/grpo/grpo_groups.csv  per GRPO step, the share of sample groups with non-zero reward variance
    LAB/opd/sketch/, LAB/grpo/sketch/  each run's sketch series (`record.DynamicsRecorder`: every step of the
                            first SKETCH_DENSE of training, then every SKETCH_SPARSE steps)
    LAB/sketch_alignment.csv  the sketch series' alignment to their last step, per recorded step and matrix
    LAB/lab.json            preset, seed (the train/held-out split), timings, accuracies, versions

`lab run --seeds N` writes one such directory per seed, ``OUT/seed-K/`` (`seed_dirs` finds them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries
from opd_dynamics.schema import LAB_JSON

#: the lab's two runs, both from student_init: on-policy distillation and RL (GRPO)
RUNS = ("opd", "grpo")
TEACHER, STUDENT_INIT, EVAL_CSV = "teacher", "student_init", "eval.csv"


SKETCH, SKETCH_K = "sketch", 16
#: the lab records every step of the first SKETCH_DENSE of a run, then every SKETCH_SPARSE steps
SKETCH_DENSE, SKETCH_SPARSE = 0.2, 5

SEED_PREFIX = "seed"
SEED_DIR = SEED_PREFIX + "-{}"


def seed_dir(root: str | Path, seed: int) -> Path:
    """Where `lab run --seeds N` puts seed ``seed``'s lab directory."""
    return Path(root) / SEED_DIR.format(seed)


def numbered(root: str | Path, prefix: str) -> dict[int, Path]:
    """The directories ``PREFIX-N`` of ``root`` by N, in order: a multi-seed root's seed-K, a run's checkpoint-N."""
    found = {}
    for d in Path(root).glob(f"{prefix}-*"):
        tail = d.name[len(prefix) + 1:]
        if tail.isdigit() and d.is_dir():
            found[int(tail)] = d
    return dict(sorted(found.items()))


def seed_dirs(root: str | Path) -> dict[int, LabDir]:
    """The finished lab directories of a multi-seed root (``seed-K/`` with lab.json), by seed; a lab directory
    itself counts as its lab.json's seed."""
    root = Path(root)
    if (root / LAB_JSON).exists():
        return {LabDir(root).split_seed(0): LabDir(root)}
    found = {k: LabDir(d) for k, d in numbered(root, SEED_PREFIX).items() if (d / LAB_JSON).exists()}
    if not found:
        raise InputError(root, "holds no lab run: neither lab.json nor seed-K/lab.json directories")
    return found


@dataclass(frozen=True)
class LabDir:
    """A lab directory (see the module docstring); paths only, nothing is read until asked."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_student(cls, student_dir: str | Path) -> LabDir:
        """The lab a `student_init/` directory belongs to (its parent)."""
        return cls(Path(student_dir).parent)

    @property
    def teacher(self) -> Path:
        return self.root / TEACHER

    @property
    def student_init(self) -> Path:
        return self.root / STUDENT_INIT

    @property
    def meta_path(self) -> Path:
        return self.root / LAB_JSON

    def run(self, name: str) -> Path:
        """A run's directory (its checkpoint-N/ and eval.csv)."""
        return self.root / name

    def eval_csv(self, name: str) -> Path:
        return self.run(name) / EVAL_CSV

    def sketch(self, name: str) -> Path:
        """A run's sketch series."""
        return self.run(name) / SKETCH

    def series(self, name: str) -> CheckpointSeries:
        """A run's checkpoints against student_init."""
        return CheckpointSeries.discover(self.run(name), base=self.student_init, name=name)

    def meta(self) -> dict:
        """lab.json."""
        return json.loads(self.meta_path.read_text())

    def splits(self):
        """The lab's train and held-out problems (`TaskSplits`), from the preset and seed its lab.json records
        (not today's preset of that name)."""
        from opd_dynamics.lab.task import make_splits

        info = self.meta()
        p = info["preset"]
        return make_splits(p["digits"], p["n_train"], p["n_heldout"], int(info.get("seed", 0)))

    def heldout(self, n_eval: int | None = None) -> tuple:
        """The first ``n_eval`` held-out problems (default: as many as the lab evaluated its checkpoints on)."""
        return self.splits().heldout[: n_eval or self.meta()["preset"].get("n_eval", 500)]

    def split_seed(self, default: int) -> int:
        """The seed of the train/held-out split the lab's student was made from (lab.json), else ``default``."""
        return int(self.meta().get("seed", default)) if self.meta_path.exists() else default

    def require(self, *, meta: bool = False, teacher: bool = False) -> LabDir:
        """Refuse, naming what is missing, a directory that lacks student_init/ (and lab.json or teacher/ when
        asked for): one sentence instead of a traceback hours into an evaluation."""
        need = [(LAB_JSON, self.meta_path)] if meta else []
        need.append((STUDENT_INIT + "/", self.student_init / "config.json"))
        if teacher:
            need.append((TEACHER + "/", self.teacher / "config.json"))
        for what, path in need:
            if not path.exists():
                raise InputError(self.root, f"is not a lab directory: {what} is missing")
        return self
