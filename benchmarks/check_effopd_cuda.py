"""EffOPD on a CUDA device: bf16 parameters, anchor on the CPU, exact restore, accelerator memory, and the callback
inside a real TRL DistillationTrainer on the GPU. Prints one line per check and exits non-zero on a failure.

Run: python benchmarks/check_effopd_cuda.py   (needs a CUDA device; on CPU it says so and exits 0)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time

import torch


def main() -> int:
    cuda = torch.cuda.is_available()
    if not cuda and "--cpu" not in sys.argv:
        print("no CUDA device: nothing to check (pass --cpu for a dry run of the same checks)")
        return 0
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd_dynamics.effopd import EffOPD

    dev = torch.device("cuda" if cuda else "cpu")
    print("device", torch.cuda.get_device_name(0) if cuda else "cpu (dry run)", "torch", torch.__version__)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else 0
    failures = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

    # 1. a ~120M-parameter (on cuda) bf16 model: anchor on CPU keeps accelerator memory flat;
    #    exact restore; float32 math
    big = cuda  # the dry run on CPU uses a small model
    vocab = 32000 if big else 1000
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=1024 if big else 128, intermediate_size=2816 if big else 256,
                      num_hidden_layers=8 if big else 2, num_attention_heads=16 if big else 4,
                      num_key_value_heads=8 if big else 2, head_dim=64 if big else 32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(dev, torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = torch.randint(0, vocab, (4, 64), device=dev)

    def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:  # arguments: both are freed below
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for anchor_device in ("cpu", None):
        sync()
        base = allocated()
        e = EffOPD(model, lambda m: 0.0, anchor_device=anchor_device)
        sync()
        grown = allocated() - base
        sel = sum(p.numel() for p in e.params.values())
        check(f"anchor_device={anchor_device}: accelerator memory held by the anchor", True,
              f"{grown / 2**20:.1f} MiB for {sel / 1e6:.1f}M selected params "
              f"(float32 copy would be {sel * 4 / 2**20:.1f} MiB)")
        if anchor_device == "cpu":
            check("anchor on cpu holds no accelerator memory", grown == 0)
            check("anchor tensors are float32 on cpu",
                  all(a.device.type == "cpu" and a.dtype == torch.float32 for a in e.anchor.values()))
        del e

    e = EffOPD(model, lambda m: 0.0, anchor_device="cpu")
    train_step(model, opt)
    wt = {n: p.detach().clone() for n, p in e.params.items()}
    anchor = {n: a.clone() for n, a in e.anchor.items()}
    scores = iter([1.0, 0.5])  # k=1 rejected
    e.score_fn = lambda m: next(scores)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before_peak = allocated()
    rec = e.after_step(1)
    peak = peak() - before_peak
    check("rejected candidate restores bf16 weights bit for bit on cuda",
          rec.k_accepted == 0 and all(torch.equal(p.detach(), wt[n]) for n, p in e.params.items()),
          f"(peak extra accelerator memory during the trigger {peak / 2**20:.1f} MiB, "
          f"extrapolate {rec.extrapolate_s:.3f}s)")

    train_step(model, opt)
    wt = {n: p.detach().clone() for n, p in e.params.items()}
    anchor = {n: a.clone() for n, a in e.anchor.items()}
    scores = iter([0.0, 1.0, 2.0, 1.0])  # k=2 accepted, k=3 rejected
    e.score_fn = lambda m: next(scores)
    t = time.perf_counter()
    rec = e.after_step(2)
    sync()
    dt = time.perf_counter() - t
    n_bad, n_tot, max_ulp = 0, 0, 0
    for n, p in e.params.items():
        ref = (wt[n].double().cpu() + 4.0 * (wt[n].double().cpu() - anchor[n].double())).to(torch.bfloat16)
        got = p.detach().cpu()
        diff = (got.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
        n_bad += int((diff != 0).sum())
        n_tot += got.numel()
        max_ulp = max(max_ulp, int(diff.max()))
    check("accepted k=2: W_t + 4Δ in float32 on cuda vs float64 reference (bf16)", rec.k_accepted == 2 and max_ulp <= 1,
          f"{n_bad}/{n_tot} elements differ, max {max_ulp} ulp (double rounding); trigger wall {dt:.3f}s")
    check("anchor = accepted weights",
          all(torch.equal(e.anchor[n], p.detach().float().cpu()) for n, p in e.params.items()))
    del model, opt, e
    if cuda:
        torch.cuda.empty_cache()

    # 2. the callback inside a real DistillationTrainer on the GPU
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from opd_dynamics.effopd.callback import EffOPDCallback, reverse_kl_scorer, sample_validation
    from opd_dynamics.lab.models import ModelSpec, make_model
    from opd_dynamics.lab.task import build_tokenizer, make_splits

    tok = build_tokenizer()
    spec = ModelSpec(hidden=64, layers=2, heads=4, intermediate=128)
    teacher, student = make_model(spec, tok, 1).to(dev), make_model(spec, tok, 2)
    sp = make_splits(2, 256, 16, 0)
    ds = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in sp.train])
    cb = EffOPDCallback(reverse_kl_scorer(teacher, tok, sample_validation(ds, 50, 0), max_new_tokens=4),
                        anchor_device="cpu")
    run_dir = tempfile.mkdtemp(prefix="effopd-cuda-run-")
    args = DistillationConfig(output_dir=run_dir, max_steps=9, per_device_train_batch_size=16,
                              learning_rate=1e-3, max_completion_length=4, report_to=[], logging_steps=1,
                              save_strategy="no", bf16=False, gradient_checkpointing=False, disable_tqdm=True)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[cb])
    cb.bind(tr)
    t = time.perf_counter()
    tr.train()
    dt = time.perf_counter() - t
    recs = cb.records
    on_gpu = next(tr.model.parameters()).device.type == dev.type
    check("callback in DistillationTrainer on cuda: triggers at 1,2,4,8",
          on_gpu and [r.step for r in recs] == [1, 2, 4, 8],
          f"k={[r.k_accepted for r in recs]} validation {sum(r.validation_s for r in recs):.2f}s of {dt:.1f}s train")
    logged = [h["step"] for h in tr.state.log_history if "effopd/k" in h]
    check("triggers in trainer log_history", logged == [1, 2, 4, 8])
    shutil.rmtree(run_dir, ignore_errors=True)
    print("failures", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
