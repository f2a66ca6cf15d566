"""The lab's teacher made by GRPO from student_init (as the paper's), measured against the SFT stand-in:
trains student_init and a GRPO teacher with the default preset (``teacher_method="grpo"``, seed 0), then writes
``OUT/grpo_teacher.json``: the teacher's held-out accuracy and pass@8, and the student init's reverse KL to it.

    .venv/bin/python benchmarks/lab_grpo_teacher.py OUT [PRESET]

(docs/lab-regime/grpo_teacher.json is its output on the shared 2-core CPU machine.)
"""

import json
import sys
import time
from dataclasses import replace

from opd_dynamics.lab.evaluate import evaluate_model
from opd_dynamics.lab.layout import LabDir
from opd_dynamics.lab.models import load_model
from opd_dynamics.lab.presets import get_preset
from opd_dynamics.lab.run import pass_rates
from opd_dynamics.lab.task import build_tokenizer
from opd_dynamics.lab.train import splits_for, train_teacher_and_student


def main(out: str, preset: str = "default") -> None:
    p = replace(get_preset(preset), teacher_method="grpo")
    t0 = time.time()
    info = train_teacher_and_student(out, p, 0, log=lambda m: print(m, flush=True))
    info["total_s"] = time.time() - t0
    tok = build_tokenizer()
    held = splits_for(p, 0).heldout[: p.n_eval]
    s, t = load_model(LabDir(out).student_init), load_model(LabDir(out).teacher)
    info["student_vs_grpo_teacher"] = evaluate_model(s, tok, held, teacher=t) | pass_rates(s, tok, held, p.pass_k, 0)
    info["grpo_teacher"] = evaluate_model(t, tok, held, sampled=True) | pass_rates(t, tok, held, p.pass_k, 0)
    text = json.dumps(info, indent=1)
    print(text)
    (LabDir(out).root / "grpo_teacher.json").write_text(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
