"""EffOPD's search on planted problems whose answers are known exactly (dyadic numbers: float32 is exact)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from opd_dynamics.effopd import EffOPD, is_power_of_two, make_trigger, select_parameters
from opd_dynamics.effopd.search import TriggerRecord, published_search

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"


class Block(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(h, h, bias=False)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(h, 2 * h, bias=True)
        self.input_layernorm = nn.LayerNorm(h)


class Tiny(nn.Module):
    """HF-style names: embedding, one block (attention, MLP with bias, norm), lm_head."""

    def __init__(self, h: int = 4, vocab: int = 6, dtype=torch.float32):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, h)
        self.model.layers = nn.ModuleList([Block(h)])
        self.model.norm = nn.LayerNorm(h)
        self.lm_head = nn.Linear(h, vocab, bias=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # dyadic values (multiples of 1/8) so every sum below is exact in float32
            for p in self.parameters():
                p.copy_(torch.randint(-16, 16, p.shape, generator=g).double() / 8)
        self.to(dtype)


def params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def move(m: nn.Module, d: dict[str, torch.Tensor]) -> None:
    """A planted 'optimizer step': every parameter (selected or not) moves by d[name]."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(d[n].to(p.dtype))


def dist_score(target: dict[str, torch.Tensor]):
    """−‖W − W*‖² over the selected matrices, in float64: peaks exactly at W*."""
    def score(m: nn.Module) -> float:
        sd = dict(m.named_parameters())
        return -sum(float(((sd[n].double() - target[n]) ** 2).sum()) for n in target)
    return score


def planted_direction(m: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randint(-4, 5, p.shape, generator=g).double() / 16) for n, p in m.named_parameters()}


def test_trigger_schedule():
    assert [t for t in range(0, 70) if is_power_of_two(t)] == [1, 2, 4, 8, 16, 32, 64]
    assert [t for t in range(0, 70) if make_trigger()(t)] == [1, 2, 4, 8, 16, 32, 64]
    assert [t for t in range(0, 100) if make_trigger("pow3")(t)] == [1, 3, 9, 27, 81]
    assert [t for t in range(0, 70) if make_trigger([3, 10])(t)] == [3, 10]
    assert [t for t in range(0, 70) if make_trigger(max_step=10)(t)] == [1, 2, 4, 8]
    assert [t for t in range(0, 20) if make_trigger(lambda s: s % 5 == 0)(t)] == [0, 5, 10, 15]
    with pytest.raises(ValueError):
        make_trigger("every3")


def test_after_step_only_scores_on_trigger_steps():
    m = Tiny()
    calls = []
    e = EffOPD(m, lambda _: calls.append(1) or 0.0, strict=False)
    assert [e.after_step(t) is not None for t in range(1, 9)] == [True, True, False, True, False, False, False, True]
    # each trigger scores W_t, then candidates until the first that does not improve: a constant score with '>='
    # accepts all five, so 6 evaluations per trigger
    assert len(calls) == 4 * 6
    assert [r.step for r in e.records] == [1, 2, 4, 8]


def test_parameter_filter_groups_and_shapes():
    """By default EffOPD's own name rule (a substring of the lowercased name: the MLP's bias moves too, the norms,
    embeddings and head do not); select groups is the toolkit's rule, attention and MLP matrices."""
    m = Tiny()
    assert list(select_parameters(m)) == [Q, UP, "model.layers.0.mlp.up_proj.bias"]
    assert list(select_parameters(m, select="groups")) == [Q, UP]
    assert sorted(select_parameters(m, groups=("mlp",), matrices_only=False)) == [
        "model.layers.0.mlp.up_proj.bias", UP]
    assert sorted(select_parameters(m, groups=("embedding", "lm_head"))) == ["lm_head.weight",
                                                                             "model.embed_tokens.weight"]
    assert list(select_parameters(m, param_filter=lambda n, p: n.startswith("lm_head"))) == ["lm_head.weight"]


def test_planted_linear_trajectory_finds_known_k_and_updates_anchor():
    """W_1 = W_0 + D; the score peaks at W_0 + 7D = W_1 + 2·3·D, so k = 3 is accepted; then the anchor is that,
    and a second planted move E with a peak at W_2 + 4E gives k = 2."""
    m = Tiny()
    w0 = params(m)
    d = planted_direction(m, 1)
    target = {n: w0[n].double() + 7 * d[n] for n in (Q, UP)}
    e = EffOPD(m, dist_score(target), select="groups")  # the matrices Q and UP move
    move(m, d)  # step 1
    rec = e.after_step(1)
    assert rec.k_accepted == 3 and rec.coef == 6.0
    assert rec.coefs == [0, 2, 4, 6, 8]  # stopped at the first candidate that is worse (k = 4)
    dd = sum(float((d[n] ** 2).sum()) for n in (Q, UP))
    assert rec.scores == [-36 * dd, -16 * dd, -4 * dd, 0.0, -4 * dd]
    for n in (Q, UP):
        assert torch.equal(dict(m.named_parameters())[n].detach().double(), target[n])
        assert torch.equal(e.anchor[n].double(), target[n])  # anchor = accepted weights
    for n in w0:
        if n not in (Q, UP):  # norms, embeddings, lm_head, biases moved by training only, never extrapolated
            assert torch.equal(dict(m.named_parameters())[n].detach().double(), w0[n].double() + d[n])
    # step 2: Δ = W_2 − anchor = E; peak at W_2 + 4E → k = 2
    e2 = planted_direction(m, 2)
    move(m, e2)
    w2 = params(m)
    e.score_fn = dist_score({n: w2[n].double() + 4 * e2[n] for n in (Q, UP)})
    rec2 = e.after_step(2)
    assert rec2.k_accepted == 2 and rec2.coefs == [0, 2, 4, 6]
    assert rec2.delta_norm == pytest.approx(sum(float((e2[n] ** 2).sum()) for n in (Q, UP)) ** 0.5, rel=1e-12)
    for n in (Q, UP):
        assert torch.equal(dict(m.named_parameters())[n].detach().double(), w2[n].double() + 4 * e2[n])


def test_tie_accepts_with_geq_and_rejects_with_strict(caplog):
    for strict, k_expected in ((False, 5), (True, 0)):
        m = Tiny()
        d = planted_direction(m, 3)
        e = EffOPD(m, lambda _: 1.0, strict=strict)
        move(m, d)
        wt = params(m)
        caplog.clear()
        with caplog.at_level("WARNING", logger="opd_dynamics.effopd.search"):
            rec = e.after_step(1)
        assert rec.k_accepted == k_expected
        assert rec.tie is (not strict)  # a jump no score could justify is reported, in the log and the CSV row
        assert ("on a tie: every score was 1" in caplog.text) is (not strict)
        assert e.records_frame()["tie"].tolist() == [not strict]
        assert rec.scores == ([1.0] * 6 if not strict else [1.0, 1.0])
        for n in (Q, UP):
            expect = wt[n].double() + 2 * k_expected * d[n]
            assert torch.equal(dict(m.named_parameters())[n].detach().double(), expect)


@pytest.mark.parametrize("scores, k, tie", [([0.5, 0.6, 0.6, 0.4], 2, False), ([0.0, 0.0, 0.0], 2, True),
                                           ([0.3, 0.2], 0, False), ([0.3, 0.3, 0.2], 1, True)])
def test_a_tie_is_a_jump_no_candidate_scored_above_w_t_for(scores, k, tie):
    it = iter(scores)
    k_acc, got = published_search(lambda _: next(it), len(scores) - 1, strict=False)
    rec = TriggerRecord(step=1, scores=got, coefs=[], k_accepted=k_acc, coef=2.0 * k_acc, delta_norm=1.0,
                        validation_s=0.0, extrapolate_s=0.0)
    assert (rec.k_accepted, rec.tie) == (k, tie)
    assert replace(rec, mode="fixed").tie is False  # a fixed jump is not a search


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rejected_candidates_restore_exact_bits(dtype):
    m = Tiny(dtype=dtype)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # arbitrary (non-dyadic) values: the restore must still be exact
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(dtype))
    e = EffOPD(m, lambda _: 0.0, anchor_device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 1e-3).to(dtype))
    before = params(m)
    scores = iter([0.5, 0.4])  # W_t 0.5, candidate k=1 worse → rejected
    e.score_fn = lambda _: next(scores)
    rec = e.after_step(1)
    assert rec.k_accepted == 0 and rec.coefs == [0, 2]
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.dtype == dtype
    for n in (Q, UP):
        assert e.anchor[n].dtype == torch.float32 and e.anchor[n].device.type == "cpu"
        assert torch.equal(e.anchor[n], before[n].float())


def _randomize(m: nn.Module, seed: int, scale: float = 1.0) -> None:
    """Arbitrary values: each parameter ← its value + scale·noise, summed in float64, rounded once."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((p.double() + torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype))


def test_bf16_extrapolation_is_formed_in_float32_and_rounded_once():
    """Accept k=1 then stop at k=2: on arbitrary bf16 values the model holds W_t + 2Δ formed in float32 and
    rounded to bf16 once, which here differs from the same formula evaluated in bf16."""
    m = Tiny(h=16, dtype=torch.bfloat16)
    _randomize(m, 11)
    w0 = params(m)
    scores = iter([0.0, 1.0, 0.5])
    e = EffOPD(m, lambda _: next(scores))
    _randomize(m, 12, scale=0.3)  # large enough that W_t − W_0 is not exact in bf16
    wt = params(m)
    rec = e.after_step(1)
    assert rec.k_accepted == 1 and rec.scores == [0.0, 1.0, 0.5]
    for n in (Q, UP):
        w, a = wt[n].float(), w0[n].float()
        ref = (w + 2 * (w - a)).to(torch.bfloat16)
        assert torch.equal(dict(m.named_parameters())[n].detach(), ref)
        in_bf16 = wt[n] + 2 * (wt[n] - w0[n])
        assert not torch.equal(in_bf16, ref)  # the test can tell 16-bit arithmetic apart


def test_float64_parameters_are_extrapolated_in_float64():
    m = Tiny(dtype=torch.float64)
    w0 = params(m)
    e = EffOPD(m, None, fixed_k=1)
    _randomize(m, 13, scale=1e-9)  # an update float32 could not even represent against these weights
    wt = params(m)
    e.after_step(1)
    for n in (Q, UP):
        assert torch.equal(dict(m.named_parameters())[n].detach(), wt[n] + 2 * (wt[n] - w0[n]))
        assert not torch.equal(wt[n], w0[n])


def test_a_failing_scorer_leaves_the_exact_w_t():
    m = Tiny(dtype=torch.bfloat16)
    _randomize(m, 14)
    calls = iter([0.5])

    def score(_):
        try:
            return next(calls)
        except StopIteration:
            raise RuntimeError("out of memory while scoring") from None
    e = EffOPD(m, score)
    _randomize(m, 15, scale=1e-2)
    wt = params(m)
    with pytest.raises(RuntimeError, match="out of memory"):
        e.after_step(1)  # W_t scored, candidate k=1 set, then its scoring raised
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), wt[n]), n
    assert e.records == []


def test_peft_models_are_refused():
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT"):
        EffOPD(m, lambda _: 0.0)


def test_fixed_k_needs_no_score_and_always_jumps():
    m = Tiny()
    w0 = params(m)
    d = planted_direction(m, 9)
    e = EffOPD(m, None, fixed_k=2)
    move(m, d)
    rec = e.after_step(1)
    assert (rec.mode, rec.k_accepted, rec.coef, rec.scores, rec.validation_s) == ("fixed", 2, 4.0, [], 0.0)
    for n in (Q, UP):
        assert torch.equal(dict(m.named_parameters())[n].detach().double(), w0[n].double() + 5 * d[n])
    with pytest.raises(ValueError):
        EffOPD(m, None)


def test_score_fn_runs_without_grad_and_mode_is_restored():
    m = Tiny()
    m.train()
    seen = []

    def score(mod):
        seen.append(torch.is_grad_enabled())
        mod.eval()
        return 0.0

    e = EffOPD(m, score, k_max=1)
    e.after_step(1)
    assert seen == [False, False] and m.training
    frame = e.records_frame()
    assert list(frame["step"]) == [1] and frame.loc[0, "scores"] == "[0.0, 0.0]"


def test_the_published_rule_is_the_default_and_a_tuple_score_breaks_ties():
    """Strict > by default (the authors' code); a score (accuracy, −reverse KL) compares its second element only
    when the first ties, so an accuracy stuck at one value can still rank candidates by their KL."""
    from opd_dynamics.effopd import EffOPDOptions

    assert EffOPDOptions().strict is True
    it = iter([0.5, 0.5, 0.5])
    assert published_search(lambda _: next(it), 2)[0] == 0
    it = iter([(0.5, -3.0), (0.5, -2.0), (0.6, -9.0), (0.6, -9.5)])
    k, got = published_search(lambda _: next(it), 3)
    assert (k, got) == (2, [(0.5, -3.0), (0.5, -2.0), (0.6, -9.0), (0.6, -9.5)])
    it = iter([(0.5, -1.0), (float("nan"), 0.0)])
    assert published_search(lambda _: next(it), 1)[0] == 0
    rec = TriggerRecord(step=1, scores=got, coefs=[], k_accepted=k, coef=4.0, delta_norm=1.0, validation_s=0.0,
                        extrapolate_s=0.0)
    assert rec.as_log()["effopd/score_k1"] == 0.5 and rec.tie is False
