"""Series discovery in the layouts TRL, verl and OpenRLHF leave, and its refusals."""

import pytest

from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries

from builders import llama_like, perturb, write_dir


@pytest.fixture()
def base(tmp_path):
    return write_dir(tmp_path / "base", llama_like(n_layers=1))


@pytest.mark.parametrize("pattern,sub", [
    ("checkpoint-{}", ""), ("global_step_{}", "actor/huggingface"), ("global_step{}_hf", ""),
    ("step_{}", ""), ("step-{}", ""), ("iter_{}", ""), ("iter-{}", ""),
])
def test_layouts_are_found_and_sorted(tmp_path, base, pattern, sub):
    run = tmp_path / "run"
    sd = llama_like(n_layers=1)
    for s in (20, 5, 100):
        write_dir(run / pattern.format(s) / sub if sub else run / pattern.format(s), perturb(sd, 0.01, s))
    (run / "logs").mkdir()
    series = CheckpointSeries.discover(run, base=base, name="opd")
    assert series.step_numbers == [5, 20, 100]
    assert series.name == "opd"
    if sub:
        assert all(p.parts[-2:] == ("actor", "huggingface") for _, p in series.steps)
    assert CheckpointSeries.discover(run, base=base, steps=[20]).step_numbers == [20]


def test_explicit_list(tmp_path, base):
    a = write_dir(tmp_path / "a", llama_like(n_layers=1))
    b = write_dir(tmp_path / "b", llama_like(n_layers=1))
    s = CheckpointSeries.from_list([(7, b), (3, a)], base=base, name="x")
    assert s.steps == [(3, a), (7, b)]


def test_refusals(tmp_path, base):
    with pytest.raises(InputError, match="does not exist"):
        CheckpointSeries.discover(tmp_path / "missing", base=base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is empty"):
        CheckpointSeries.discover(tmp_path / "empty", base=base)
    junk = tmp_path / "junk"
    (junk / "whatever").mkdir(parents=True)
    with pytest.raises(InputError, match="no recognisable checkpoints"):
        CheckpointSeries.discover(junk, base=base)
    run = tmp_path / "dup"
    write_dir(run / "checkpoint-10", llama_like(n_layers=1))
    write_dir(run / "step_10", llama_like(n_layers=1))
    with pytest.raises(InputError, match="repeats step 10"):
        CheckpointSeries.discover(run, base=base)
    with pytest.raises(InputError, match="explicit base"):
        CheckpointSeries.discover(run, base=None)
    verl = tmp_path / "verl" / "global_step_4" / "actor"
    verl.mkdir(parents=True)
    (verl / "model_world_size_2_rank_0.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="lacks rank file.s. model_world_size_2_rank_1.pt"):
        CheckpointSeries.discover(tmp_path / "verl", base=base)


def test_openrlhf_deepspeed_state_beside_hf_weights_is_ignored(tmp_path, base):
    """OpenRLHF's SFT/DPO/RM trainers save ckpt/global_stepN (DeepSpeed state) beside ckpt/global_stepN_hf."""
    run = tmp_path / "ckpt"
    sd = llama_like(n_layers=1)
    for s in (2, 4):
        write_dir(run / f"global_step{s}_hf", perturb(sd, 0.01, s))
        (run / f"global_step{s}" / "mp_rank_00_model_states.pt").parent.mkdir(parents=True)
        (run / f"global_step{s}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    series = CheckpointSeries.discover(run, base=base)
    assert series.steps == [(2, run / "global_step2_hf"), (4, run / "global_step4_hf")]


def test_requested_steps_must_all_exist(tmp_path, base):
    run = tmp_path / "run"
    for s in (1, 2):
        write_dir(run / f"checkpoint-{s}", llama_like(n_layers=1))
    with pytest.raises(InputError, match=r"has no checkpoint for step\(s\) 999 \(it has 1, 2\)"):
        CheckpointSeries.discover(run, base=base, steps=[2, 999])
