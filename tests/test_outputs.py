"""Outputs: `--overwrite` replaces only a directory opd-dynamics wrote (it carries `.opd-dynamics-output.json`),
for every command that writes one; a user's directory, even one holding a run.json or model.safetensors they
made, is refused in one sentence and left as it is. An output that cannot be written (a path under a file, a
read-only file system, a full disk) is one sentence naming it and exit status 2, never a traceback."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from opd_dynamics.cli import main
from opd_dynamics.errors import InputError
from opd_dynamics.io.writer import OUTPUT_MARKER, check_output, mark_output, output_marker

from builders import llama_like, perturb, write_dir

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "data" / "lab"  # the shipped lab subset: steps 30 and 150 of OPD and GRPO
NOT_OURS = "was not written by opd-dynamics"
LEFT = "it is left as it is"
SCORE = "echo 1"  # an evaluation command that scores every model 1


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """A tiny series (base, run/checkpoint-{1,2}) and an analysis of it (for plot and report)."""
    d = tmp_path_factory.mktemp("inputs")
    sd = llama_like(n_layers=1, hidden=32, inter=48, vocab=40)
    write_dir(d / "base", sd)
    write_dir(d / "run" / "checkpoint-1", perturb(sd, 1e-3, 1))
    write_dir(d / "run" / "checkpoint-2", perturb(sd, 2e-3, 2))
    p = {"base": str(d / "base"), "run": str(d / "run"), "a": str(d / "run" / "checkpoint-1"),
         "b": str(d / "run" / "checkpoint-2"), "analysis": str(d / "analysis")}
    r = CliRunner().invoke(main, ["analyze", p["run"], "--base", p["base"], "--out", p["analysis"], "--svd", "none",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    return p


# each command writing a directory: its arguments (OUT is the output), and the file the old rule took for the
# sign of an earlier output (what a user's own directory may well hold)
COMMANDS = {
    "analyze": (["analyze", "{run}", "--base", "{base}", "--out", "OUT", "--svd", "none", "--quiet"], "run.json"),
    "extrapolate": (["extrapolate", "{run}", "--base", "{base}", "--target", "4", "--method", "linear",
                     "--out", "OUT"], "model.safetensors"),
    "extrapolate-jump": (["extrapolate", "--prev", "{a}", "--cur", "{b}", "--coef", "2", "--out", "OUT"],
                         "model.safetensors"),
    "effopd-search": (["effopd", "search", "--prev", "{a}", "--cur", "{b}", "--out", "OUT", "--eval-cmd", SCORE,
                       "--k-max", "1"], "model.safetensors"),
    "probe": (["probe", "{run}", "--base", "{base}", "--pairs", "1:2", "--coefs", "0,1", "--eval-cmd", SCORE,
               "--out", "OUT"], "probe.json"),
    "lab-ship": (["lab", "ship", str(LAB), "OUT", "--steps", "30"], "lab.json"),
}
# refused before any training or evaluation, so cheap to try; replacing their earlier outputs is not
REFUSE_ONLY = {
    "lab-run": (["lab", "run", "--out", "OUT"], "lab.json"),
    "lab-effopd": (["lab", "effopd", "--seeds", "1", "--out", "OUT"], "effopd.json"),
    "lab-claims": (["lab", "claims", str(LAB), "--out", "OUT"], "claims.json"),
    "lab-extrapolate": (["lab", "extrapolate", str(LAB), "--fractions", "0.2", "--out", "OUT"],
                        "extrapolation.json"),
    "lab-interventions": (["lab", "interventions", "--lab", str(LAB), "--out", "OUT"], "interventions.json"),
    "demo": (["demo", "--out", "OUT"], "demo.json"),
}


def _args(spec: list[str], inputs: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [str(out) if a == "OUT" else a.format(**inputs) for a in spec] + list(extra)


def _run(args: list[str]):
    return CliRunner().invoke(main, args)


def _user_dir(path: Path, lookalike: str | None) -> Path:
    """A directory a user made: their notes, and perhaps a file an output of ours would also hold."""
    path.mkdir(parents=True)
    (path / "NOTES.md").write_text("my notes")
    if lookalike is not None:
        (path / lookalike).write_text("{}" if lookalike.endswith(".json") else "mine")
    return path


def _one_line_refusal(r, *phrases: str) -> None:
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in r.output, r.output
    for p in phrases:
        assert p in lines[-1], (p, r.output)


@pytest.mark.parametrize("lookalike", [None, "own"])
@pytest.mark.parametrize("name", [*COMMANDS, *REFUSE_ONLY])
def test_overwrite_refuses_a_directory_the_user_made(tmp_path, inputs, name, lookalike):
    spec, own = {**COMMANDS, **REFUSE_ONLY}[name]
    out = _user_dir(tmp_path / "mine", own if lookalike else None)
    before = sorted(p.name for p in out.iterdir())
    r = _run(_args(spec, inputs, out, "--overwrite"))
    _one_line_refusal(r, str(out), NOT_OURS, LEFT, "--overwrite")
    assert (out / "NOTES.md").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it


@pytest.mark.parametrize("name", list(COMMANDS))
def test_overwrite_replaces_an_earlier_output_of_the_same_command(tmp_path, inputs, name):
    spec, _ = COMMANDS[name]
    out = tmp_path / "out"
    r = _run(_args(spec, inputs, out))
    assert r.exit_code == 0, r.output
    mark = output_marker(out)
    assert mark is not None and mark["tool"] == "opd-dynamics" and mark["version"]
    (out / "stale.txt").write_text("from the first run")  # gone once the output is replaced
    r = _run(_args(spec, inputs, out))
    _one_line_refusal(r, str(out), "already exists", "--overwrite")
    r = _run(_args(spec, inputs, out, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert not (out / "stale.txt").exists() and output_marker(out)["kind"] == mark["kind"]


def test_an_empty_directory_is_used_as_it_is(tmp_path, inputs):
    spec, _ = COMMANDS["analyze"]
    out = tmp_path / "empty"
    out.mkdir()
    r = _run(_args(spec, inputs, out, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert (out / "run.json").exists() and output_marker(out)["kind"] == "analysis"


def test_the_marker_says_what_wrote_the_output(tmp_path, inputs):
    spec, _ = COMMANDS["extrapolate-jump"]
    out = tmp_path / "jump"
    r = _run(_args(spec, inputs, out))
    assert r.exit_code == 0, r.output
    mark = json.loads((out / OUTPUT_MARKER).read_text())
    assert mark["kind"] == "model" and isinstance(mark["command"], str) and isinstance(mark["argv"], list)
    from opd_dynamics._version import __version__

    assert mark["version"] == __version__
    assert "analysis" == output_marker(inputs["analysis"])["kind"]
    assert "opd-dynamics analyze" in output_marker(inputs["analysis"])["command"]  # the command line as typed


def test_overwrite_refuses_an_output_of_another_kind(tmp_path, inputs):
    """An extrapolated model is not replaced by an analysis (nor the reverse) by a slip of --out."""
    model = tmp_path / "model"
    assert _run(_args(COMMANDS["extrapolate-jump"][0], inputs, model)).exit_code == 0
    r = _run(_args(COMMANDS["analyze"][0], inputs, model, "--overwrite"))
    _one_line_refusal(r, str(model), "another kind", LEFT)
    assert (model / "model.safetensors").exists() and output_marker(model)["kind"] == "model"
    # a search writes a model too: either may replace the other
    r = _run(_args(COMMANDS["effopd-search"][0], inputs, model, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert (model / "effopd_search.json").exists()


@pytest.mark.parametrize("bad", ["not json", "[]", json.dumps({"tool": "other", "kind": "analysis"})])
def test_a_marker_that_is_not_ours_counts_for_nothing(tmp_path, bad):
    out = _user_dir(tmp_path / "mine", "run.json")
    (out / OUTPUT_MARKER).write_text(bad)
    with pytest.raises(InputError, match=NOT_OURS):
        check_output(out, "analysis", overwrite=True)
    link = _user_dir(tmp_path / "linked", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mark_output(elsewhere, "analysis")
    (link / OUTPUT_MARKER).symlink_to(elsewhere / OUTPUT_MARKER)  # a marker must be a file of the directory itself
    with pytest.raises(InputError, match=NOT_OURS):
        check_output(link, "analysis", overwrite=True)
    assert (link / "NOTES.md").exists()


def test_api_outputs_carry_the_marker_and_the_call(tmp_path, inputs):
    """The Python API's writers mark their outputs too (kind and the calling script), so the command line may
    replace them."""
    from opd_dynamics.analysis import analyze
    from opd_dynamics.io.series import CheckpointSeries

    s = CheckpointSeries.discover(inputs["run"], base=inputs["base"])
    rep = analyze(s, out=tmp_path / "api", svd="none", progress=False)
    assert output_marker(tmp_path / "api")["kind"] == "analysis"
    rep.to_csv(tmp_path / "csv")
    assert output_marker(tmp_path / "csv")["kind"] == "analysis"
    r = _run(_args(COMMANDS["analyze"][0], inputs, tmp_path / "csv", "--overwrite"))
    assert r.exit_code == 0, r.output


def test_lab_seeds_are_checked_before_any_seed_is_run(tmp_path):
    """`lab run --seeds 2 --overwrite` over OUT/seed-1 that a user made refuses before seed 0 trains."""
    from opd_dynamics.lab.run import run_lab_seeds

    root = tmp_path / "labs"
    mark_output(_user_dir(root / "seed-0", None), "lab")
    (root / "seed-0" / "NOTES.md").unlink()
    _user_dir(root / "seed-1", "lab.json")
    with pytest.raises(InputError, match=NOT_OURS) as e:
        run_lab_seeds(root, seeds=2, overwrite=True, log=lambda m: None)
    assert "seed-1" in str(e.value)
    assert (root / "seed-1" / "NOTES.md").exists() and output_marker(root / "seed-0")["kind"] == "lab"


def test_lab_ship_never_replaces_its_input(tmp_path):
    """`lab ship LAB LAB --overwrite` is refused as an overlap, whatever LAB carries."""
    lab = tmp_path / "lab"
    assert _run(["lab", "ship", str(LAB), str(lab), "--steps", "30"]).exit_code == 0
    r = _run(["lab", "ship", str(lab), str(lab), "--steps", "30", "--overwrite"])
    _one_line_refusal(r, str(lab), "overlaps the input")
    assert (lab / "opd" / "checkpoint-30" / "model.safetensors").exists()


def test_plot_and_report_leave_other_files_of_the_folder(tmp_path, inputs):
    figs = _user_dir(tmp_path / "figs", "run.json")
    r = _run(["plot", inputs["analysis"], "--figures", str(figs), "--format", "svg", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (figs / "NOTES.md").read_text() == "my notes" and (figs / "run.json").read_text() == "{}"
    r = _run(["report", inputs["analysis"], "--html", str(figs / "run.json"), "--overwrite"])
    _one_line_refusal(r, "run.json", "not an .html path")
    assert (figs / "run.json").read_text() == "{}"


# ---- outputs that cannot be written ----

WRITERS = {name: spec for name, (spec, _) in COMMANDS.items()}
WRITERS.update({name: spec for name, (spec, _) in REFUSE_ONLY.items()})  # refused before any work
WRITERS["plot"] = ["plot", "{analysis}", "--figures", "OUT", "--format", "svg"]
WRITERS["report"] = ["report", "{analysis}", "--html", "OUT"]


def _out_in(where: Path, name: str) -> Path:
    return where / ("r.html" if name == "report" else "out")


@pytest.mark.parametrize("name", list(WRITERS))
def test_an_output_under_a_file_is_one_sentence(tmp_path, inputs, name):
    f = tmp_path / "a-file"
    f.write_text("not a folder")
    out = _out_in(f, name)
    r = _run(_args(WRITERS[name], inputs, out))
    _one_line_refusal(r, str(out), "cannot be written")
    assert f.read_text() == "not a folder"


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems under tmp_path (root only); unmounted at the end."""
    mounted = []

    def mount(name: str, *opts: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(d)
        return d

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(d: Path) -> None:
    """Fill the file system of d to the last byte."""
    with open(d / "filler", "wb", buffering=0) as f:
        with pytest.raises(OSError) as e:
            while True:
                f.write(b"\0" * 4096)
    assert e.value.errno == errno.ENOSPC


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_read_only_file_system_is_one_sentence(tmp_path, inputs, tmpfs, name):
    ro = tmpfs("ro", "ro", "size=1m")
    out = _out_in(ro, name)
    r = _run(_args(WRITERS[name], inputs, out))
    _one_line_refusal(r, str(out), "cannot be written", "Read-only file system")


@pytest.mark.parametrize("name", [n for n in WRITERS if n not in REFUSE_ONLY])  # these would train first
def test_a_full_disk_is_one_sentence_and_leaves_no_half_output(tmp_path, inputs, tmpfs, name):
    full = tmpfs("full", "size=256k")
    _fill(full)
    out = _out_in(full, name)
    r = _run(_args(WRITERS[name], inputs, out))
    _one_line_refusal(r, str(out), "cannot be written", "No space left on device")
    assert not out.exists() or (out.is_dir() and not any(out.iterdir()))
    assert not [p for p in full.iterdir() if p.name.startswith(".") and not p.name.endswith(".partial")]


def test_a_full_disk_on_overwrite_keeps_the_earlier_output(tmp_path, inputs, tmpfs):
    full = tmpfs("full", "size=4m")
    out = full / "out"
    spec = COMMANDS["extrapolate-jump"][0]
    assert _run(_args(spec, inputs, out)).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    _fill(full)
    r = _run(_args(spec, inputs, out, "--overwrite"))
    _one_line_refusal(r, str(out), "cannot be written", "No space left on device")
    assert (out / "model.safetensors").read_bytes() == before and output_marker(out)["kind"] == "model"
