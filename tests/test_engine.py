"""The engine end to end on planted updates stored as real checkpoints: every metric against the float64
numpy reference (tests/reference.py), stacked MoE experts, fast mode labelled, geometry cache, executors."""

import numpy as np
import pytest
import torch

from opd_dynamics.analysis import AnalysisOptions
from opd_dynamics.analysis.api import analyze
from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries

from builders import llama_like, perturb, write_dir
from reference import planted, random_orthogonal, ref_alignment, ref_geometry, ref_spectrum

M, N = 48, 96
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _planted_series(tmp_path, steps=(1, 2, 4, 8), seed=0, model_type=None):
    """q_proj: ΔW_t = t·U diag(s) Vᵀ + (8−t)·0.002·noise: early steps rotate toward the final subspace.
    Stacked experts: expert e gets a rank-(e+1) update; stored (E, out, in), or (E, in, out) when
    ``model_type`` is one that stores them so (llama4). Returns base and per-step float64 weights, (out, in)."""
    rng = np.random.default_rng(seed)
    w0 = {"model.layers.0.self_attn.q_proj.weight": rng.normal(size=(M, N)) * 0.1,
          "model.layers.0.mlp.experts.gate_up_proj": rng.normal(size=(3, 40, 24)) * 0.1,
          "model.embed_tokens.weight": rng.normal(size=(30, 24))}
    U, V = random_orthogonal(M, 24, rng), random_orthogonal(N, 24, rng)
    core = planted(M, N, np.geomspace(5, 0.05, 24), rng, U, V)  # clear gaps: subspaces well defined
    experts = [planted(40, 24, np.linspace(2, 1, e + 1), rng) for e in range(3)]
    states = {}
    for t in steps:
        noise = rng.normal(size=(M, N))
        st = {k: v.copy() for k, v in w0.items()}
        st["model.layers.0.self_attn.q_proj.weight"] += t * core + (8 - t) * 0.002 * noise
        st["model.layers.0.mlp.experts.gate_up_proj"] += t * np.stack(experts)
        st["model.embed_tokens.weight"] += 0.01 * t * rng.normal(size=(30, 24))
        states[t] = st
    flip = model_type == "llama4"
    t32 = lambda d: {k: torch.tensor(v.swapaxes(1, 2) if (flip and v.ndim == 3) else v, dtype=torch.float32)  # noqa: E731
                     for k, v in d.items()}
    cfg = {"model_type": model_type} if model_type else None
    write_dir(tmp_path / "base", t32(w0), config=cfg)
    for t, st in states.items():
        write_dir(tmp_path / "run" / f"checkpoint-{t}", t32(st), config=cfg)
    as32 = lambda d: {k: v.astype(np.float32).astype(np.float64) for k, v in d.items()}  # noqa: E731
    series = CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base", name="opd")
    return as32(w0), {t: as32(s) for t, s in states.items()}, series


@pytest.mark.parametrize("device", DEVICES)
def test_exact_metrics_match_reference(tmp_path, device):
    w0, states, series = _planted_series(tmp_path)
    rep = analyze(series, geometry=True, device=device, progress=False, cache_dir=tmp_path / "cache")
    q = "model.layers.0.self_attn.q_proj.weight"
    d_final = states[8][q] - w0[q]
    for t, st in states.items():
        d = st[q] - w0[q]
        spec = rep.spectrum.query("tensor == @q and step == @t").iloc[0]
        for col, v in ref_spectrum(d).items():
            tol = 1e-3 if col == "effective_rank" else 1e-4
            assert spec[col] == pytest.approx(v, rel=tol, abs=1e-9), (t, col)
        assert spec["svd_method"].startswith("exact")
        al = rep.alignment.query("tensor == @q and step == @t").iloc[0]
        for col, v in ref_alignment(d, d_final).items():
            assert al[col] == pytest.approx(v, abs=1e-3), (t, col)
        assert al["ref_step"] == 8
        geo = rep.geometry.query("tensor == @q and step == @t").iloc[0]
        for col, v in ref_geometry(w0[q], st[q]).items():
            assert geo[col] == pytest.approx(v, abs=1e-4, rel=1e-4), (t, col)
    al = rep.alignment.query("tensor == @q").set_index("step")
    assert al.loc[8, "subspace_overlap_u"] == pytest.approx(1.0, abs=1e-9)
    assert al.loc[1, "direction_cosine"] < al.loc[4, "direction_cosine"] < al.loc[8, "direction_cosine"]
    sv = rep.singular_values.query("tensor == @q and step == 8")
    assert list(sv["index"]) == list(range(1, 49))
    assert sv["sigma"].to_numpy() == pytest.approx(np.linalg.svd(d_final, compute_uv=False), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("model_type", [None, "llama4"])
def test_stacked_experts_are_split_per_expert(tmp_path, model_type):
    """Each expert is analysed as its (out, in) matrix whichever way the architecture stacks them."""
    w0, states, series = _planted_series(tmp_path, steps=(1, 2), model_type=model_type)
    rep = analyze(series, geometry=True, progress=False, cache_dir=tmp_path / "cache")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    s = rep.spectrum.query("tensor == @name and step == 2").set_index("expert")
    assert list(s.index) == [0, 1, 2]
    assert list(s["rank90"]) == [1, 2, 3]
    assert s.loc[0, "energy_top1"] == pytest.approx(1.0, abs=1e-9)
    a = rep.module_allocation.query("tensor == @name and step == 2").set_index("expert")
    geo = rep.geometry.query("tensor == @name and step == 1").set_index("expert")
    for e in range(3):
        d = states[2][name][e] - w0[name][e]
        assert a.loc[e, "update_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-5)
        assert a.loc[e, "shape"] == "40x24"
        for col, v in ref_geometry(w0[name][e], states[1][name][e]).items():  # left and right sides differ
            assert geo.loc[e, col] == pytest.approx(v, abs=1e-4, rel=1e-4), (e, col)


def test_fast_mode_is_labelled_and_close(tmp_path):
    w0, states, series = _planted_series(tmp_path, steps=(4, 8))
    rep = analyze(series, svd="fast", progress=False)
    q = "model.layers.0.self_attn.q_proj.weight"
    spec = rep.spectrum.query("tensor == @q and step == 8").iloc[0]
    ref = ref_spectrum(states[8][q] - w0[q])
    assert spec["svd_method"].startswith("randomized")
    for k in (1, 4, 16):
        assert spec[f"energy_top{k}"] == pytest.approx(ref[f"energy_top{k}"], abs=1e-2)
    assert np.isnan(spec["effective_rank"])


def test_base_decomposition_is_cached_on_disk(tmp_path):
    _, _, series = _planted_series(tmp_path, steps=(1, 2))
    cache = tmp_path / "cache"
    first = analyze(series, geometry=True, progress=False, cache_dir=cache)
    files = sorted((cache / "base").rglob("*.safetensors"))
    assert len(files) == 1 + 3  # q_proj and three experts
    stamps = [f.stat().st_mtime_ns for f in files]
    second = analyze(series, geometry=True, progress=False, cache_dir=cache)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    cols = ["principal_energy_1pct", "principal_rotation_deg", "spectral_drift"]
    assert np.allclose(first.geometry[cols].to_numpy(float), second.geometry[cols].to_numpy(float))


def test_base_cache_tells_apart_bases_with_the_same_header(tmp_path):
    """A Base and its Instruct share every header byte; the second must not get the first's decomposition."""
    w0, states, series = _planted_series(tmp_path, steps=(1, 2))
    q = "model.layers.0.self_attn.q_proj.weight"
    other = {k: torch.tensor(v * 1.5, dtype=torch.float32) for k, v in w0.items()}
    write_dir(tmp_path / "base2", other)
    cache = tmp_path / "cache"
    analyze(series, geometry=True, progress=False, cache_dir=cache)
    second = CheckpointSeries.from_list(series.steps, base=tmp_path / "base2")
    rep = analyze(second, geometry=True, progress=False, cache_dir=cache)
    geo = rep.geometry.query("tensor == @q and step == 2").iloc[0]
    w0b = other[q].double().numpy()
    for col, v in ref_geometry(w0b, states[2][q]).items():
        assert geo[col] == pytest.approx(v, abs=1e-4, rel=1e-4), col


def test_two_runs_in_one_report_and_float64_option(tmp_path):
    w0, states, series = _planted_series(tmp_path, steps=(1, 2))
    other = CheckpointSeries.from_list(list(reversed(series.steps)), base=series.base, name="rl")
    rep = analyze([series, other], dtype="float64", progress=False)
    assert set(rep.module_allocation["run"]) == {"opd", "rl"}
    assert rep.meta["dtype"] == {"asked": "float64", "used": "float64; norms and cosines summed in float64"}
    q = "model.layers.0.self_attn.q_proj.weight"  # float32-stored weights, ΔW formed in float64: exact
    d = states[2][q] - w0[q]
    assert rep.spectrum.query("tensor == @q and step == 2 and run == 'opd'")["spectral_norm"].item() == \
        pytest.approx(np.linalg.norm(d, 2), rel=1e-12)
    t1 = rep.summary.query("aggregate == 'table1'")
    assert set(t1["metric"]) == {"spectral_norm", "spectral_ratio", "effective_rank", "top1pct_norm_ratio",
                                 "n_matrices"}
    assert set(t1["run"]) == {"opd", "rl"}
    lay = rep.summary.query("aggregate == 'layer' and metric == 'energy_share'")
    assert set(lay["group"]) == {"attention", "mlp"}


def test_ref_step_is_honoured_and_an_unknown_one_refused(tmp_path):
    w0, states, series = _planted_series(tmp_path, steps=(1, 2, 4))
    q = "model.layers.0.self_attn.q_proj.weight"
    rep = analyze(series, ref_step=2, progress=False)
    al = rep.alignment.query("tensor == @q").set_index("step")
    assert set(al["ref_step"]) == {2}
    for t in (1, 4):
        ref = ref_alignment(states[t][q] - w0[q], states[2][q] - w0[q])
        assert al.loc[t, "subspace_overlap_u"] == pytest.approx(ref["subspace_overlap_u"], abs=1e-3)
    with pytest.raises(InputError, match="ref_step 7 is not a step of run 'opd'"):
        analyze(series, ref_step=7, progress=False)


def test_summary_and_energy_share_match_reference_with_a_frozen_matrix(tmp_path):
    """Table 1 is the mean over the updated attention/MLP matrices (a frozen k_proj is left out of every
    metric alike); energy_share is F^2 / sum F^2 per step; the group rows sum F^2 within the group.
    r = 200 for q_proj, so the top-1% ratio keeps 2 values (not 1, not 3)."""
    sd = llama_like(n_layers=1, hidden=200, inter=256, kv=100, vocab=40, dtype=torch.float32)
    step = perturb(sd, 0.01, 1)
    frozen = "model.layers.0.self_attn.k_proj.weight"
    step[frozen] = sd[frozen].clone()
    write_dir(tmp_path / "base", sd)
    write_dir(tmp_path / "run" / "checkpoint-3", step)
    rep = analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), progress=False)
    d = {k: step[k].double().numpy() - sd[k].double().numpy() for k in sd}
    f2 = {k: float(np.sum(v * v)) for k, v in d.items()}
    a = rep.module_allocation.set_index("tensor")
    for k in sd:
        assert a.loc[k, "energy_share"] == pytest.approx(f2[k] / sum(f2.values()), rel=1e-6), k
    groups = a["group"].to_dict()
    summ = rep.summary
    g = summ[(summ["aggregate"] == "group") & (summ["metric"] == "update_norm")].set_index("group")["value"]
    for grp in set(groups.values()):
        assert g[grp] == pytest.approx(np.sqrt(sum(f2[k] for k in sd if groups[k] == grp)), rel=1e-6), grp
    updated = [k for k in sd if groups[k] in ("attention", "mlp") and k != frozen]
    refs = {k: ref_spectrum(d[k]) for k in updated}
    assert refs["model.layers.0.self_attn.q_proj.weight"]["top1pct_norm_ratio"] == pytest.approx(
        rep.spectrum.set_index("tensor").loc["model.layers.0.self_attn.q_proj.weight", "top1pct_norm_ratio"], rel=1e-6)
    t1 = summ[summ["aggregate"] == "table1"].set_index("metric")["value"]
    assert t1["n_matrices"] == len(updated) == 6
    for col in ("spectral_norm", "spectral_ratio", "effective_rank", "top1pct_norm_ratio"):
        assert t1[col] == pytest.approx(np.mean([refs[k][col] for k in updated]), rel=1e-4), col


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_parallel_executors_give_identical_tables(tmp_path, executor):
    _, _, series = _planted_series(tmp_path, steps=(1, 2))
    opts = AnalysisOptions()
    serial = analyze(series, options=opts, progress=False)
    par = analyze(series, options=opts, executor=executor, workers=2, progress=False)
    for name, df in serial.tables.items():
        a = df.sort_values(list(df.columns[:8])).reset_index(drop=True)
        b = par.tables[name].sort_values(list(df.columns[:8])).reset_index(drop=True)
        assert a.equals(b), name
    assert par.meta["device"]["used"] == "cpu"  # reported by the workers that computed the tensors


def test_reading_ahead_on_a_thread_changes_no_number(tmp_path, monkeypatch):
    """Steps are read ahead on a thread only for tensors of PREFETCH_MIN_NUMEL elements and more (a thread
    per tiny tensor costs more than it saves). The planted tensors are smaller, so they are read on the
    caller's thread; forcing the read-ahead for all of them moves the reads and leaves every table equal."""
    import threading

    from opd_dynamics.analysis import deltas

    _, _, series = _planted_series(tmp_path)
    readers: set[int] = set()
    real = deltas.read_step

    def spy(*a, **kw):
        readers.add(threading.get_ident())
        return real(*a, **kw)

    monkeypatch.setattr(deltas, "read_step", spy)
    plain = analyze(series, geometry=True, progress=False, cache_dir=tmp_path / "cache")
    assert readers == {threading.get_ident()}
    readers.clear()
    monkeypatch.setattr(deltas, "PREFETCH_MIN_NUMEL", 0)
    ahead = analyze(series, geometry=True, progress=False, cache_dir=tmp_path / "cache")
    assert readers and threading.get_ident() not in readers
    for name, df in plain.tables.items():
        assert df.equals(ahead.tables[name]), name


def test_a_reader_kept_from_an_earlier_analysis_is_reopened_when_its_files_were_rewritten(tmp_path):
    """A Ray worker keeps its readers between analyses. Each job carries the identity of the inputs as the
    analysis started; a kept reader of other files is opened afresh (and a reader that still differs, a
    checkpoint rewritten during the run, is refused), instead of stat'ing every file for every tensor."""
    import os

    from opd_dynamics.analysis.deltas import SeriesReader
    from opd_dynamics.analysis.readers import reader_for, readers_released

    w0, states, series = _planted_series(tmp_path, steps=(1, 2))
    q = "model.layers.0.self_attn.q_proj.weight"
    kept = reader_for(series)  # as a worker holds it after a first analysis
    ckpt = tmp_path / "run" / "checkpoint-1" / "model.safetensors"
    stamp = ckpt.stat().st_mtime_ns
    new = {k: torch.tensor(v + 1.0, dtype=torch.float32) for k, v in states[1].items()}
    write_dir(tmp_path / "run" / "checkpoint-1", new)
    os.utime(ckpt, ns=(stamp + 10**9, stamp + 10**9))
    try:
        now = SeriesReader(series).identity  # what the next analysis starts from
        assert now != kept.identity
        fresh = reader_for(series, now)
        assert fresh is not kept and torch.equal(fresh.steps[1].get(q), new[q])
        with pytest.raises(InputError, match="changed on disk after the analysis started"):
            reader_for(series, kept.identity)
    finally:
        with readers_released([series]):  # closes what the test opened
            pass


def test_more_than_one_worker_means_worker_processes_and_serial_refuses_them(tmp_path):
    """--workers 2 alone used to run serially (run.json: serial, 2 workers); now it picks processes, and
    options an explicitly named executor would ignore are refused."""
    _, _, series = _planted_series(tmp_path, steps=(1,))
    rep = analyze(series, workers=2, progress=False)
    assert rep.meta["executor"] == {"kind": "process", "workers": 2, "ray_address": None}
    with pytest.raises(InputError, match="workers 2 needs executor process or ray"):
        analyze(series, executor="serial", workers=2, progress=False)
    with pytest.raises(InputError, match="ray_address is for executor ray, not process"):
        analyze(series, executor="process", ray_address="127.0.0.1:1", progress=False)


@pytest.mark.parametrize("asked, gpus, want", [("cpu", 0, ("cpu", 0)), ("cpu", 4, ("cpu", 0)),
                                               ("auto", 0, ("cpu", 0)), ("auto", 2, ("cuda", 1)),
                                               ("cuda", 1, ("cuda", 1))])
def test_ray_tasks_ask_for_a_gpu_exactly_when_they_run_on_cuda(asked, gpus, want):
    from opd_dynamics.analysis.executors import ray_task_device

    assert ray_task_device(asked, gpus) == want


@pytest.mark.parametrize("asked, message", [("cuda", "the Ray cluster has no GPU"),
                                            ("cuda:1", "cannot be used with executor ray")])
def test_ray_refuses_a_cuda_device_it_cannot_give(asked, message):
    from opd_dynamics.analysis.executors import ray_task_device

    with pytest.raises(InputError, match=message):
        ray_task_device(asked, 0)


def test_ray_tasks_on_a_cluster_with_a_gpu_run_there_not_on_the_drivers_device(tmp_path):
    """A real local Ray instance that declares one GPU (this machine has none): with --device auto the
    tasks ask Ray for it and try CUDA on the card Ray assigned. Before, the driver resolved auto to its own
    CPU and the tasks, which Ray hides every GPU from unless they ask, ran there."""
    import ray
    _, _, series = _planted_series(tmp_path, steps=(1,))
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(InputError, match=r"torch sees no CUDA device \(CUDA_VISIBLE_DEVICES='0'\)"):
            analyze(series, device="auto", executor="ray", workers=1, progress=False)
    finally:
        ray.shutdown()


def test_a_non_finite_tensor_has_no_energy_share_and_leaves_the_others_theirs():
    from opd_dynamics.analysis.report import build_tables

    rows = [dict(run="r", step=1, tensor=t, layer=0, group="mlp", module=t, expert=None, update_norm=v)
            for t, v in (("a", 3.0), ("b", 4.0), ("c", float("inf")))]
    a = build_tables({"module_allocation": rows})["module_allocation"].set_index("tensor")
    assert a.loc["a", "energy_share"] == pytest.approx(9 / 25) and a.loc["b", "energy_share"] == pytest.approx(16 / 25)
    assert np.isnan(a.loc["c", "energy_share"])


def test_an_analysis_reads_through_its_own_reader_cache(tmp_path, monkeypatch):
    """`analyze` makes one ReaderCache per pass and passes it to the plans and the serial run: a reader this
    process's worker cache holds is neither used nor closed by it, and the pass's own readers are all closed."""
    from opd_dynamics.analysis import readers

    _, _, series = _planted_series(tmp_path, steps=(1,))
    kept = readers.reader_for(series)  # the worker cache exists before the spy counts caches made
    made = []
    real = readers.ReaderCache.__init__

    def spy(self):
        real(self)
        made.append(self)

    monkeypatch.setattr(readers.ReaderCache, "__init__", spy)
    try:
        analyze(series, progress=False)
        assert readers.is_open(series) and readers.reader_for(series) is kept
        assert len(made) == 1 and not made[0].is_open(series)
    finally:
        with readers.readers_released([series]):
            pass
    assert not readers.is_open(series)
