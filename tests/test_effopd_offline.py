"""Offline EffOPD on sharded bf16 checkpoints written with safetensors directly; exact float64 references."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from opd_dynamics.cli import main
from opd_dynamics.effopd.offline import command_scorer, extrapolate_checkpoint, parse_score, search_checkpoints
from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import ModelDir

from builders import llama_like, write_dir

SELECTED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")
#: EffOPD's _should_modify_param (fsdp_workers.py:1106-1132), read from the authors' code: any of these substrings of
#: the lowercased parameter name
EFFOPD_WORDS = ("attn", "self_attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "feed_forward", "ffn",
                "gate_proj", "up_proj", "down_proj")


def is_selected(name: str) -> bool:
    """The toolkit's group rule with its defaults: attention and MLP matrices."""
    return any(f".{s}." in name for s in SELECTED)


def effopd_moves(name: str) -> bool:
    return any(w in name.lower() for w in EFFOPD_WORDS)


def jump64(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """W_B + c(W_B − W_A) in float64, rounded once to B's dtype."""
    return (b.double() + c * (b.double() - a.double())).to(b.dtype)


def make_pair(tmp: Path, dtype=torch.bfloat16) -> tuple[Path, Path, dict, dict]:
    a = llama_like(seed=0, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    # B = A + a small update everywhere (norms and embeddings too), computed in float64 and cast
    b = {k: (v.double() + 0.01 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(dtype)
         for k, v in a.items()}
    pa = write_dir(tmp / "A", a, layout="sharded", n_shards=2)
    pb = write_dir(tmp / "B", b, layout="sharded", n_shards=3)
    (pb / "tokenizer.json").write_text('{"version": "1.0"}')
    (pb / "tokenizer_config.json").write_text("{}")
    return pa, pb, a, b


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with ModelDir(path) as m:
        return {n: m.get(n).clone() for n in m.names()}


def test_extrapolate_sharded_bf16_exact(tmp_path):
    """By default the tensors EffOPD's own name rule moves (attention and MLP projections, and
    post_attention_layernorm, whose name contains 'attention'), each equal to the float64 jump rounded once."""
    pa, pb, a, b = make_pair(tmp_path)
    out = extrapolate_checkpoint(pa, pb, 3.0, tmp_path / "O", max_shard_bytes=20_000)
    got = read_all(out)
    assert set(got) == set(b)
    n_sel = 0
    for n, t in got.items():
        assert t.dtype == torch.bfloat16
        if effopd_moves(n):
            assert torch.equal(t, jump64(a[n], b[n], 3.0)), n
            n_sel += 1
        else:  # embeddings, input_layernorm, the final norm, lm_head: copied bit for bit
            assert torch.equal(t, b[n]), n
    assert n_sel == 16 and effopd_moves("model.layers.1.post_attention_layernorm.weight")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b) and set(index["weight_map"].values()) == set(shards)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_text() == (pb / f).read_text()
    with safe_open(str(out / shards[0]), framework="pt") as f:
        meta = f.metadata()
    assert meta["effopd_coef"] == "3.0" and meta["effopd_select"] == "published" and meta["effopd_groups"] == ""
    assert meta["effopd_prev"] == str(pa.resolve()) and meta["effopd_cur"] == str(pb.resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_the_toolkit_group_rule_is_select_groups(tmp_path):
    """select groups (or groups / matrices_only given) is the toolkit's rule: attention and MLP matrices by default;
    groups or shapes with select published are refused."""
    pa, pb, a, b = make_pair(tmp_path)
    got = read_all(extrapolate_checkpoint(pa, pb, 3.0, tmp_path / "G", select="groups"))
    assert sorted(n for n in got if not torch.equal(got[n], b[n])) == sorted(n for n in b if is_selected(n))
    for n in b:
        assert torch.equal(got[n], jump64(a[n], b[n], 3.0) if is_selected(n) else b[n]), n
    with safe_open(str(tmp_path / "G" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["effopd_select"] == "groups" and f.metadata()["effopd_groups"] == "attention,mlp"
    with pytest.raises(InputError, match="groups and matrices_only apply with select groups"):
        extrapolate_checkpoint(pa, pb, 3.0, tmp_path / "N", select="published", groups=("mlp",))
    r = CliRunner().invoke(main, ["extrapolate", "--prev", str(pa), "--cur", str(pb), "--coef", "3", "--out",
                                  str(tmp_path / "C"), "--groups", "attention,mlp"])  # the default value, given
    assert r.exit_code == 0, r.output
    assert all(torch.equal(t, read_all(tmp_path / "G")[n]) for n, t in read_all(tmp_path / "C").items())
    r = CliRunner().invoke(main, ["extrapolate", "--prev", str(pa), "--cur", str(pb), "--coef", "3", "--out",
                                  str(tmp_path / "D"), "--select", "published", "--all-shapes"])
    assert r.exit_code == 2 and "--all-shapes applies with --select groups" in r.output, r.output
    assert not (tmp_path / "N").exists() and not (tmp_path / "D").exists()


def test_extrapolate_groups_and_refusals(tmp_path):
    pa, pb, a, b = make_pair(tmp_path)
    out = extrapolate_checkpoint(pa, pb, 2.0, tmp_path / "O", groups=("mlp",))
    got = read_all(out)
    for n in got:
        if ".mlp." in n:
            assert torch.equal(got[n], jump64(a[n], b[n], 2.0))
        else:
            assert torch.equal(got[n], b[n])
    with pytest.raises(InputError, match="already exists"):
        extrapolate_checkpoint(pa, pb, 1.0, out)
    before = (out / "model.safetensors").read_bytes() if (out / "model.safetensors").exists() else None
    extrapolate_checkpoint(pa, pb, 0.0, out, overwrite=True)
    assert all(torch.equal(t, b[n]) for n, t in read_all(out).items())  # coef 0 reproduces B exactly
    assert before is None or (out / "model.safetensors").read_bytes() != before
    for bad in (pb / "sub", pa, pb, tmp_path):  # inside, equal to, or containing an input
        with pytest.raises(InputError, match="overlaps the input"):
            extrapolate_checkpoint(pa, pb, 1.0, bad, overwrite=True)
    assert (pa / "model.safetensors.index.json").exists() and (pb / "tokenizer.json").exists()
    with pytest.raises(InputError, match="has no float matrix in groups other to extrapolate"):
        extrapolate_checkpoint(pa, pb, 2.0, tmp_path / "N", groups=("other",))  # B has no such tensor
    q = "model.layers.0.self_attn.q_proj.weight"
    fa = write_dir(tmp_path / "FA", {**a, q: a[q].to(torch.float8_e4m3fn)})
    fb = write_dir(tmp_path / "FB", {**b, q: b[q].to(torch.float8_e4m3fn)})
    with pytest.raises(InputError, match="holds FP8 weights"):
        extrapolate_checkpoint(fa, fb, 2.0, tmp_path / "N")
    for coef in (float("nan"), float("inf")):
        with pytest.raises(InputError, match="must be a finite number"):
            extrapolate_checkpoint(pa, pb, coef, tmp_path / "N")
    assert not (tmp_path / "N").exists()
    small = write_dir(tmp_path / "S", {k: v[:2] if v.ndim == 2 else v for k, v in a.items()}, layout="single")
    with pytest.raises(InputError, match="has shape"):
        extrapolate_checkpoint(small, pb, 1.0, tmp_path / "X")
    assert not (tmp_path / "X").exists()


def test_extrapolate_cli(tmp_path):
    pa, pb, a, b = make_pair(tmp_path)
    r = CliRunner().invoke(main, ["extrapolate", "--prev", str(pa), "--cur", str(pb), "--coef", "4",
                                  "--out", str(tmp_path / "O"), "--max-shard-size", "20KB"])
    assert r.exit_code == 0, r.output
    got = read_all(tmp_path / "O")
    n = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(got[n], jump64(a[n], b[n], 4.0))
    mask = os.umask(0)  # read the umask: the weights get the mode any new file gets (safetensors alone: 0600)
    os.umask(mask)
    shards = list((tmp_path / "O").glob("*.safetensors"))
    assert len(shards) > 1 and {stat.S_IMODE(f.stat().st_mode) for f in shards} == {0o666 & ~mask}
    r = CliRunner().invoke(main, ["extrapolate", "--prev", str(pa), "--cur", str(pb), "--coef", "4",
                                  "--out", str(pb / "inside")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "overlaps the input" in r.output
    r = CliRunner().invoke(main, ["extrapolate", "--prev", str(pa), "--cur", str(pb), "--coef", "4",
                                  "--out", str(tmp_path / "P"), "--groups", "attn"])
    assert r.exit_code == 2 and "--groups" in r.output


# An evaluation command that needs only numpy: minus the squared distance of the selected tensors to a target dir.
SCORE_SCRIPT = """
import sys, glob, numpy as np
from safetensors.numpy import load_file
def load(d):
    out = {}
    for f in glob.glob(d + "/*.safetensors"):
        out.update(load_file(f))
    return out
m, t = load(sys.argv[1]), load(sys.argv[2])
print("evaluating", sys.argv[1])
print("score:", -sum(float(((m[k].astype(np.float64) - t[k]) ** 2).sum()) for k in t))
"""


def test_search_with_external_command_finds_planted_k(tmp_path):
    pa, pb, a, b = make_pair(tmp_path, dtype=torch.float32)
    target = {n: (b[n].double() + 6 * (b[n].double() - a[n].double())) for n in b if effopd_moves(n)}
    write_dir(tmp_path / "T", target, layout="single")  # float64 target: the peak is exactly k = 3
    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT)
    cmd = f"{sys.executable} {script} {{path}} {tmp_path / 'T'}"
    r = CliRunner().invoke(main, ["effopd", "search", "--prev", str(pa), "--cur", str(pb), "--out",
                                  str(tmp_path / "O"), "--eval-cmd", cmd, "--max-shard-size", "20KB"])
    assert r.exit_code == 0, r.output
    assert "accepted k=3 (coef 6)" in r.output
    info = json.loads((tmp_path / "O" / "effopd_search.json").read_text())
    assert info["k_accepted"] == 3 and info["coefs"] == [0, 2, 4, 6, 8]
    s = info["scores"]
    assert s[0] < s[1] < s[2] < s[3] > s[4] and s[3] == pytest.approx(0.0, abs=1e-9)
    got = read_all(tmp_path / "O")
    for n in b:
        assert torch.equal(got[n], jump64(a[n], b[n], 6.0) if effopd_moves(n) else b[n]), n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "B", "O", "T", "score.py"]  # candidates removed
    assert "tie" not in r.output and info["tie"] is False


def test_search_command_warns_when_it_jumps_on_a_tie(tmp_path):
    pa, pb, _, _ = make_pair(tmp_path)
    r = CliRunner().invoke(main, ["effopd", "search", "--prev", str(pa), "--cur", str(pb), "--out",
                                  str(tmp_path / "O"), "--eval-cmd", "echo 0.5 #", "--k-max", "2", "--accept-ties"])
    assert r.exit_code == 0, r.output
    assert "accepted k=2 (coef 4)" in r.output
    assert "warning: EffOPD accepted k=2 (coef 4) on a tie: every score was 0.5" in r.output


def test_search_rejecting_everything_writes_b_and_strict_tie(tmp_path):
    pa, pb, a, b = make_pair(tmp_path)
    scores = iter([1.0, 0.5])
    rec = search_checkpoints(pa, pb, tmp_path / "O", lambda p: next(scores))
    assert (rec.k_accepted, rec.scores) == (0, [1.0, 0.5])
    assert all(torch.equal(t, b[n]) for n, t in read_all(tmp_path / "O").items())
    rec = search_checkpoints(pa, pb, tmp_path / "O2", lambda p: 1.0)  # strict by default, as published
    assert (rec.k_accepted, rec.scores) == (0, [1.0, 1.0])
    rec = search_checkpoints(pa, pb, tmp_path / "O3", lambda p: 1.0, k_max=2, strict=False)
    assert (rec.k_accepted, rec.coef) == (2, 4.0)
    assert json.loads((tmp_path / "O3" / "effopd_search.json").read_text())["tie"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "B", "O", "O2", "O3"]


def test_an_input_that_fails_to_read_is_named_not_the_output(tmp_path, monkeypatch):
    """An I/O error reading A or B (EIO, a network mount gone) used to be reported as 'OUT could not be
    written'. The error is injected at the one read call: no real disk fails on demand."""
    from opd_dynamics.io import model_dir

    pa, pb, _, _ = make_pair(tmp_path)

    def eio(*a):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(model_dir.os, "preadv", eio)
    with pytest.raises(InputError, match=r"could not be read \(Input/output error\)") as e:
        extrapolate_checkpoint(pa, pb, 2.0, tmp_path / "O")
    assert str(e.value).startswith(str(pa)) or str(e.value).startswith(str(pb))
    assert not (tmp_path / "O").exists()


def test_the_cli_and_the_api_default_to_one_shard_size():
    """--max-shard-size 2GB (Hugging Face's decimal GB) is the Python default too; it was 2 GiB there."""
    import inspect

    from opd_dynamics.cli.kit import parse_size
    from opd_dynamics.effopd.offline import extrapolate_checkpoint, search_checkpoints
    from opd_dynamics.extrapolate.cli import extrapolate
    from opd_dynamics.extrapolate.methods import extrapolate as predict
    from opd_dynamics.io.writer import write_model

    cli_default = parse_size(next(p.default for p in extrapolate.params if p.name == "max_shard_size"))
    assert cli_default == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20
    for f in (extrapolate_checkpoint, search_checkpoints, write_model, predict):
        assert inspect.signature(f).parameters["max_shard_bytes"].default == cli_default, f.__name__


def test_command_scorer_errors(tmp_path):
    assert parse_score("loading\naccuracy: 0.75\n\n") == 0.75
    assert parse_score("step 3 acc=0.5") == 0.5
    assert parse_score("-1e-3") == -0.001
    assert parse_score("done") is None and parse_score("") is None
    with pytest.raises(InputError, match=r"failed \(exit 3\).*boom"):
        command_scorer("echo boom >&2; exit 3")(tmp_path)
    with pytest.raises(InputError, match="printed no number"):
        command_scorer("echo finished")(tmp_path)
    assert command_scorer("echo 0.25 #")(tmp_path) == 0.25  # path appended after a shell comment
    pa, pb, _, _ = make_pair(tmp_path)
    with pytest.raises(InputError, match="failed"):
        search_checkpoints(pa, pb, tmp_path / "O", "false")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "B"]


def test_provenance_json_is_strict():
    """effopd.json, effopd_search.json, run.json …: NaN (a method that never reached its target) is null."""
    import json
    import math

    import numpy as np

    from opd_dynamics.io.writer import json_text
    text = json_text({"speedup": {"k": float("nan"), "inf": math.inf}, "n": np.int64(3), "x": np.float32(1.5),
                      "p": Path("a/b"), "scores": [1.0, float("nan")]})
    got = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert got == {"speedup": {"k": None, "inf": None}, "n": 3, "x": 1.5, "p": "a/b", "scores": [1.0, None]}


def test_non_finite_weights_are_never_written(tmp_path):
    """B holding NaN in a tensor that moves or in one that is copied, or a jump that overflows bf16: one sentence
    naming the tensor and the checkpoint, no output (and no search evaluates anything past it)."""
    pa, pb, a, b = make_pair(tmp_path)
    q, norm = "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"
    bad = dict(b)
    bad[q] = b[q].clone()
    bad[q][0, 1] = float("nan")
    pn = write_dir(tmp_path / "NB", bad)
    with pytest.raises(InputError, match=rf"^{pn}: holds NaN or Inf in {q!r}, so W_B \+ coef·\(W_B − W_A\) is NaN or "
                                         "Inf there; nothing was written"):
        extrapolate_checkpoint(pa, pn, 2.0, tmp_path / "O")
    with pytest.raises(InputError, match=rf"^{pn}: holds NaN or Inf in {q!r}"):
        search_checkpoints(pa, pn, tmp_path / "O", lambda p: 1.0)
    bad = dict(b)
    bad[norm] = torch.full_like(b[norm], float("inf"))
    pi = write_dir(tmp_path / "IB", bad)
    with pytest.raises(InputError, match=rf"^{pi}: holds NaN or Inf in {norm!r}, which the output copies; nothing "
                                         "was written"):
        extrapolate_checkpoint(pa, pi, 2.0, tmp_path / "O")
    big = {k: torch.full_like(v, 3e38) for k, v in a.items()}
    pbig = write_dir(tmp_path / "BIG", {k: torch.full_like(v, 3.3e38) for k, v in a.items()})
    pabig = write_dir(tmp_path / "ABIG", big)
    with pytest.raises(InputError, match=r"W_B \+ coef·\(W_B − W_A\) with coef 2 goes beyond bfloat16 in "
                                         r"'model\.layers\.\d\.[a-z_.]+' \(up to 3\.9e\+38\); nothing was "
                                         "written"):
        extrapolate_checkpoint(pabig, pbig, 2.0, tmp_path / "O")
    assert not (tmp_path / "O").exists()


@pytest.mark.parametrize("printed", ["nan", "accuracy: inf", "score -Infinity"])
def test_a_non_finite_score_is_refused(tmp_path, printed):
    """An evaluation command printing nan or inf (a crashed metric, a division by zero) is not a score the search
    can compare: refused in one sentence, nothing written."""
    pa, pb, _, _ = make_pair(tmp_path)
    with pytest.raises(InputError, match=rf"^evaluation command printed a score that is not a finite number "
                                         rf"\({float(printed.split()[-1])}\) for {pb}: echo {printed} #"):
        search_checkpoints(pa, pb, tmp_path / "O", f"echo {printed} #")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "B"]
    r = CliRunner().invoke(main, ["effopd", "search", "--prev", str(pa), "--cur", str(pb), "--out",
                                  str(tmp_path / "O"), "--eval-cmd", f"echo {printed} #"])
    assert r.exit_code == 2 and r.output.startswith("score") is False and r.output.count("\n") == 1, r.output
