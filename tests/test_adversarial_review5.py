"""Adversarial review 5: sequence scores (TokenBatch, reduce_tokens, token_correct, chunks),
GraNd on sequences, and the state the framework integrations carry (Lightning, Hugging Face).

References are plain float64 loops over every sequence and token.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sampleweights as sw
from sampleweights.errors import StateMismatchError

# -- the float64 reference -----------------------------------------------------------------------


def _token_value(stat: str, x: torch.Tensor, y: int) -> float:
    """One token's statistic from its logits ``x`` (C,) in float64."""
    x = x.double()
    p = torch.softmax(x, 0)
    if stat == "loss":
        return float(-torch.log_softmax(x, 0)[y])
    if stat == "confidence":
        return float(p[y])
    if stat == "entropy":
        return float(-(p * torch.log_softmax(x, 0)).sum())
    if stat == "el2n":
        return float((p - F.one_hot(torch.tensor(y), len(x)).double()).norm())
    others = torch.cat([x[:y], x[y + 1 :]])
    if stat == "aum":
        return float(x[y] - others.max())
    if stat == "margin":
        po = torch.cat([p[:y], p[y + 1 :]])
        return float(p[y] - po.max())
    raise AssertionError(stat)


def _reference(stat, logits, targets, ignore, how):
    """(B,) per-sequence values: a loop over sequences and tokens; NaN without a valid token."""
    out = []
    for b in range(logits.shape[0]):
        vals = [
            _token_value(stat, logits[b, t], int(targets[b, t]))
            for t in range(logits.shape[1])
            if int(targets[b, t]) != ignore
        ]
        if not vals:
            out.append(math.nan)
        elif how == "mean":
            out.append(sum(vals) / len(vals))
        elif how == "sum":
            out.append(sum(vals))
        else:
            out.append(max(vals))
    return torch.tensor(out, dtype=torch.float64)


def _reference_correct(logits, targets, ignore, min_acc):
    """(B,) bool or None (no valid token): hits / count >= min_acc, as Python computes it."""
    out = []
    for b in range(logits.shape[0]):
        valid = [t for t in range(logits.shape[1]) if int(targets[b, t]) != ignore]
        if not valid:
            out.append(None)
            continue
        hits = sum(int(logits[b, t].double().argmax()) == int(targets[b, t]) for t in valid)
        out.append(hits / len(valid) >= min_acc)
    return out


SCORERS = {
    "loss": sw.Loss,
    "confidence": sw.Confidence,
    "entropy": sw.Entropy,
    "el2n": sw.EL2N,
    "aum": sw.AUM,
    "margin": sw.Margin,
}


def _batch(b=5, t=7, c=6, seed=0, ignore=-100, empty=(2,)):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, c, generator=gen) * 3
    targets = torch.randint(0, c, (b, t), generator=gen)
    mask = torch.rand(b, t, generator=gen) < 0.35
    targets[mask] = ignore
    for e in empty:
        targets[e] = ignore
    targets[0, 0] = 1 if ignore != 1 else 0  # at least one valid token in sequence 0
    return logits, targets


def _quiet_compute(s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return s.compute()


def _check(got, ref, rtol=2e-5, atol=2e-6):
    got = got.double()
    assert torch.equal(got.isnan(), ref.isnan()), (got, ref)
    keep = ~ref.isnan()
    torch.testing.assert_close(got[keep], ref[keep], rtol=rtol, atol=atol)


# -- per-example values against the float64 loop ------------------------------------------------


@pytest.mark.parametrize("stat", sorted(SCORERS))
@pytest.mark.parametrize("how", ["mean", "sum", "max"])
@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 6, 7, 8, 13, 1000])
def test_sequence_values_equal_a_float64_loop_for_every_chunk(stat, how, chunk):
    logits, targets = _batch()
    s = SCORERS[stat](5, token_reduce=how, chunk_tokens=chunk)
    s.update_indexed(torch.arange(5), logits, targets)
    assert s.num_empty == 1
    _check(_quiet_compute(s), _reference(stat, logits, targets, -100, how))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 11])
def test_chunked_values_are_the_same_bits_as_unchunked(chunk):
    logits, targets = _batch(b=6, t=9, c=11, seed=3)
    whole = sw.ScorerCollection(sw.Loss(6), sw.EL2N(6), sw.Entropy(6), sw.AUM(6), sw.Margin(6))
    parts = sw.ScorerCollection(
        *(cls(6, chunk_tokens=chunk) for cls in (sw.Loss, sw.EL2N, sw.Entropy, sw.AUM, sw.Margin))
    )
    for sc in (whole, parts):
        sc.update_indexed(torch.arange(6), logits, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a, b = whole.compute(), parts.compute()
    for k in a:
        assert torch.equal(a[k].nan_to_num(-7.0), b[k].nan_to_num(-7.0)), k


def test_one_token_sequences_with_a_chunk_of_one():
    logits, targets = _batch(b=4, t=1, c=5, empty=(3,))
    for how in ("mean", "sum", "max"):
        s = sw.Loss(4, token_reduce=how, chunk_tokens=1)
        s.update_indexed(torch.arange(4), logits, targets)
        _check(_quiet_compute(s), _reference("loss", logits, targets, -100, how))
        assert s.num_empty == int((targets == -100).all(1).sum())


def test_a_batch_of_only_ignored_tokens_scores_nothing_and_counts_every_sequence():
    logits = torch.randn(3, 4, 5)
    targets = torch.full((3, 4), -100)
    for chunk in (None, 1, 3):
        s = sw.ScorerCollection(sw.Loss(3, chunk_tokens=chunk), sw.Misclassified(3))
        s.update_indexed([0, 1, 2], logits, targets)
        for sc in s:
            assert sc.num_empty == 3
            assert all(
                torch.equal(a, b)
                for a, b in zip(
                    sc.state_dict()["state"].values(),
                    type(sc)(3).state_dict()["state"].values(),
                    strict=True,
                )
            )
        with pytest.warns(RuntimeWarning, match="without a valid token"):
            out = s.compute()
        assert bool(out["loss"].isnan().all())


@pytest.mark.parametrize("ignore", [0, 2, 5, 1000])
def test_ignore_index_equal_to_a_real_class_or_positive(ignore):
    """A positive ignore_index (a real class id, or beyond the vocabulary) drops those tokens."""
    logits, targets = _batch(c=6, ignore=ignore)
    for how in ("mean", "max"):
        s = sw.Loss(5, ignore_index=ignore, token_reduce=how, chunk_tokens=4)
        s.update_indexed(torch.arange(5), logits, targets)
        _check(_quiet_compute(s), _reference("loss", logits, targets, ignore, how))
    # -100 is an ordinary (bad) target under another ignore_index: refused, naming targets
    bad = targets.clone()
    bad[0, 0] = -100
    s = sw.Loss(5, ignore_index=ignore)
    before = copy.deepcopy(s.state_dict())
    with pytest.raises(ValueError, match="targets"):
        s.update_indexed(torch.arange(5), logits, bad)
    assert s.num_updates == 0 and s.num_empty == 0
    assert all(
        torch.equal(a, b)
        for a, b in zip(before["state"].values(), s.state_dict()["state"].values(), strict=True)
    )


@pytest.mark.parametrize(
    "convert",
    [
        lambda t: t.to(torch.int32),
        lambda t: t.to(torch.int16),
        lambda t: t.to(torch.int8),
        lambda t: t.numpy(),
        lambda t: t.numpy().astype(np.int32),
        lambda t: t.tolist(),
    ],
    ids=["int32", "int16", "int8", "numpy64", "numpy32", "list"],
)
def test_targets_of_other_integer_types_give_the_same_scores(convert):
    logits, targets = _batch()
    ref = sw.Loss(5)
    ref.update_indexed(torch.arange(5), logits, targets)
    s = sw.Loss(5)
    s.update_indexed(torch.arange(5), logits, convert(targets))
    assert torch.equal(_quiet_compute(s).nan_to_num(-1.0), _quiet_compute(ref).nan_to_num(-1.0))
    assert s.num_empty == ref.num_empty == 1


def test_uint8_targets_with_a_positive_ignore_index():
    logits, targets = _batch(ignore=255, c=6)
    s = sw.EL2N(5, ignore_index=255)
    s.update_indexed(torch.arange(5), logits, targets.to(torch.uint8))
    _check(_quiet_compute(s), _reference("el2n", logits, targets, 255, "mean"))


@pytest.mark.parametrize("targets_dtype", [torch.float32, torch.bool, torch.complex64])
def test_non_integer_targets_are_refused_naming_targets(targets_dtype):
    logits, targets = _batch()
    s = sw.Loss(5)
    with pytest.raises(TypeError, match="targets"):
        s.update_indexed(torch.arange(5), logits, targets.clamp_min(0).to(targets_dtype))
    assert s.num_updates == 0


def test_non_contiguous_and_transposed_logits_give_the_same_bits():
    logits, targets = _batch(b=4, t=6, c=9, seed=5)
    ref = sw.ScorerCollection(sw.Loss(4), sw.AUM(4), sw.Misclassified(4))
    ref.update_indexed(torch.arange(4), logits, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = ref.compute()
    variants = {
        "transposed": logits.transpose(0, 1).contiguous().transpose(0, 1),
        "class-strided": torch.stack([logits, logits], dim=-1)[..., 0],
    }
    for name, view in variants.items():
        assert not view.is_contiguous(), name
        for chunk in (None, 1, 5, 6):
            sc = sw.ScorerCollection(sw.Loss(4, chunk_tokens=chunk), sw.AUM(4), sw.Misclassified(4))
            sc.update_indexed(torch.arange(4), view, targets)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = sc.compute()
            for k in expected:
                assert torch.equal(
                    got[k].float().nan_to_num(-9.0), expected[k].float().nan_to_num(-9.0)
                ), (name, chunk, k)


def test_class_major_logits_chunked_give_the_same_bits():
    """Before: class-major logits (permute(2,0,1).contiguous().permute(1,2,0)), chunk_tokens=5 <
    T=6: expected the same bits as unchunked (docs/recipes/language_models.md: 'the scores are
    the same bits'), got sequence 3's loss 6.2694091796875 vs 6.269408702850342 (1 ulp):
    TokenBatch.values reshapes a one-sequence block into a (rows, C) view with class stride B*T,
    reduced in another order"""
    logits, targets = _batch(b=4, t=6, c=9, seed=5)
    view = logits.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    ref = sw.Loss(4)
    ref.update_indexed(torch.arange(4), logits, targets)
    s = sw.Loss(4, chunk_tokens=5)
    s.update_indexed(torch.arange(4), view, targets)
    assert torch.equal(_quiet_compute(s).nan_to_num(-1), _quiet_compute(ref).nan_to_num(-1))


def test_expanded_logits_of_one_sequence_for_a_whole_batch():
    """Stride-0 logits (one sequence broadcast over the batch) and duplicated indices."""
    one, targets = _batch(b=1, t=5, c=7, empty=())
    logits = one.expand(3, 5, 7)
    tgt = targets.expand(3, 5)
    s = sw.Loss(2, chunk_tokens=2)
    s.update_indexed([1, 1, 0], logits, tgt)
    ref = _reference("loss", one, targets, -100, "mean")[0]
    got = s.compute()
    _check(got, torch.stack([ref, ref]))
    assert int(s.state_dict()["state"]["count"][1]) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 3])
def test_half_logits_are_scored_in_float32_of_their_values(dtype, chunk):
    logits, targets = _batch(c=50)
    half = logits.to(dtype)
    for stat in ("loss", "el2n", "entropy", "aum"):
        s = SCORERS[stat](5, chunk_tokens=chunk)
        s.update_indexed(torch.arange(5), half, targets)
        _check(_quiet_compute(s), _reference(stat, half.float(), targets, -100, "mean"), rtol=1e-5)


def test_a_huge_vocabulary_with_a_tiny_chunk():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 60000, generator=gen)
    targets = torch.tensor([[5, -100, 59999], [-100, 0, 30000]])
    s1 = sw.ScorerCollection(sw.Loss(2, chunk_tokens=1), sw.EL2N(2), sw.Misclassified(2))
    s2 = sw.ScorerCollection(sw.Loss(2), sw.EL2N(2), sw.Misclassified(2))
    for s in (s1, s2):
        s.update_indexed([0, 1], logits, targets)
    a, b = s1.compute(), s2.compute()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _check(a["loss"], _reference("loss", logits, targets, -100, "mean"))
    _check(a["el2n"], _reference("el2n", logits, targets, -100, "mean"))


@pytest.mark.parametrize("chunk", [None, 2])
def test_duplicated_sequences_in_a_batch_are_consecutive_presentations(chunk):
    logits, targets = _batch(b=6, t=4, c=5, seed=9, empty=(4,))
    targets[5, 0] = 2
    idx = torch.tensor([0, 1, 0, 0, 1, 2])  # row 4 (empty) duplicates index 1
    vals = _reference("loss", logits, targets, -100, "sum")
    s = sw.Loss(3, token_reduce="sum", chunk_tokens=chunk)
    s.update_indexed(idx, logits, targets)
    expected = torch.tensor(
        [(vals[0] + vals[2] + vals[3]) / 3, vals[1], vals[5]], dtype=torch.float64
    )
    _check(_quiet_compute(s), expected)
    assert s.state_dict()["state"]["count"].tolist() == [3, 1, 1]
    assert s.num_empty == 1
    # EMA: presentations in batch order, the empty one not a presentation
    e = sw.Loss(3, token_reduce="sum", chunk_tokens=chunk, ema=0.5)
    e.update_indexed(idx, logits, targets)
    w = [0.25, 0.5, 1.0]
    ref0 = (w[0] * vals[0] + w[1] * vals[2] + w[2] * vals[3]) / sum(w)
    _check(_quiet_compute(e)[:1], torch.tensor([ref0], dtype=torch.float64))
    _check(_quiet_compute(e)[1:2], vals[1:2])


@pytest.mark.parametrize("min_acc", [0.3, 1 / 3, 0.5, 2 / 3, 0.75, 1.0])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_min_token_accuracy_matches_python_fractions(min_acc, chunk):
    gen = torch.Generator().manual_seed(4)
    b, t, c = 40, 6, 3
    logits = torch.randn(b, t, c, generator=gen)
    targets = logits.argmax(-1)
    wrong = torch.rand(b, t, generator=gen) < 0.5
    targets[wrong] = (targets[wrong] + 1) % c
    targets[torch.rand(b, t, generator=gen) < 0.3] = -100
    targets[7] = -100
    ref = _reference_correct(logits, targets, -100, min_acc)
    m = sw.Misclassified(b, min_token_accuracy=min_acc, chunk_tokens=chunk)
    f = sw.ForgettingTracker(b, min_token_accuracy=min_acc, chunk_tokens=chunk)
    col = sw.ScorerCollection(
        sw.Misclassified(b, min_token_accuracy=min_acc),
        sw.ForgettingTracker(b, min_token_accuracy=min_acc, chunk_tokens=chunk),
    )
    m.update_indexed(torch.arange(b), logits, targets)
    f.update_indexed(torch.arange(b), logits, targets)
    col.update_indexed(torch.arange(b), logits, targets)
    got = _quiet_compute(m)
    for i, r in enumerate(ref):
        if r is None:
            assert math.isnan(float(got[i]))
        else:
            assert float(got[i]) == float(not r), (i, r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert torch.equal(col.compute()["misclassified"].nan_to_num(-1), got.nan_to_num(-1))
    assert torch.equal(
        f.state_dict()["state"]["last_correct"],
        col["forgetting"].state_dict()["state"]["last_correct"],
    )


def test_forgetting_events_on_sequences_follow_the_threshold():
    # two tokens of one sequence: first update both right, then one right (1/2 = 0.5 → correct
    # by default), then none right: one forgetting event between the second and third
    x = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])
    f = sw.ForgettingTracker(1)
    f.update_indexed([0], x, torch.tensor([[0, 0]]))
    f.update_indexed([0], x, torch.tensor([[0, 1]]))
    f.update_indexed([0], x, torch.tensor([[0, -100]]))  # still correct: 1/1
    f.update_indexed([0], x, torch.tensor([[1, 1]]))
    f.update_indexed([0], x, torch.tensor([[-100, -100]]))  # empty: no presentation
    f.update_indexed([0], x, torch.tensor([[0, 0]]))
    f.update_indexed([0], x, torch.tensor([[1, 1]]))
    assert float(f.compute()) == 2.0


def test_nonfinite_skip_with_empty_and_duplicates():
    logits, targets = _batch(b=4, t=5, c=4, seed=2, empty=(3,))
    logits = logits.clone()
    v = (targets[1] != -100).nonzero()[0, 0]
    logits[1, v, 2] = math.nan  # a valid token of row 1
    s = sw.Loss(2, nonfinite="skip", chunk_tokens=3)
    s.update_indexed([0, 1, 0, 1], logits, targets)  # rows 1 (NaN) and 3 (empty) hit index 1
    vals = _reference("loss", logits, targets, -100, "mean")
    with pytest.warns(RuntimeWarning):
        got = s.compute()
    _check(got[:1], ((vals[0] + vals[2]) / 2).reshape(1))
    assert math.isnan(float(got[1]))
    assert s.num_skipped == 1 and s.num_empty == 1
    assert s.state_dict()["state"]["count"].tolist() == [2, 0]


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda lg, tg: (lg, tg.clone().fill_(6)), ValueError, "targets"),
        (lambda lg, tg: (lg, tg[:, :-1]), ValueError, "targets"),
        (lambda lg, tg: (lg.to(torch.int64), tg), TypeError, "logits"),
        (lambda lg, tg: (lg[:, :, :0], tg), ValueError, "class"),
    ],
)
def test_bad_sequence_batches_change_nothing_in_a_collection(mutate, error, match):
    logits, targets = _batch()
    sc = sw.ScorerCollection(
        sw.Loss(5, chunk_tokens=2), sw.ForgettingTracker(5), sw.Misclassified(5)
    )
    sc.update_indexed(torch.arange(5), logits, targets)
    before = copy.deepcopy(sc.state_dict())
    lg, tg = mutate(logits, targets)
    with pytest.raises(error, match=match):
        sc.update_indexed(torch.arange(5), lg, tg)
    after = sc.state_dict()
    for name in before["scorers"]:
        a, b = before["scorers"][name], after["scorers"][name]
        assert a["num_updates"] == b["num_updates"] and int(a["num_empty"]) == int(b["num_empty"])
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), (name, k)


# -- GraNd on sequences --------------------------------------------------------------------------


class TinyLM(nn.Module):
    def __init__(self, vocab=11, dim=8, attention=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attention = attention
        if attention:
            self.block = nn.TransformerEncoderLayer(
                dim, 2, dim_feedforward=16, dropout=0.0, batch_first=True
            )
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        if self.attention:
            t = ids.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(t)
            h = self.block(h, src_mask=mask, is_causal=True)
        return self.head(h)


def _grand_reference(model, ids, targets, ignore):
    """One sequence at a time, plain autograd, float64 norm: the mean token loss's gradient."""
    out = []
    for i in range(ids.shape[0]):
        model.zero_grad()
        logits = model(ids[i : i + 1])[0].float()
        valid = targets[i] != ignore
        if not bool(valid.any()):
            out.append(math.nan)
            continue
        F.cross_entropy(logits[valid], targets[i][valid].long()).backward()
        sq = sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)
        out.append(float(sq.sqrt()))
    model.zero_grad(set_to_none=True)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("engine", ["auto", "hooks", "vmap", "loop"])
@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("ignore", [-100, 0, 3])
def test_grand_on_sequences_equals_a_one_sequence_backward(engine, attention, ignore):
    if engine == "hooks" and attention:
        pytest.skip("the hooks engine has no rule for attention (an error by design)")
    torch.manual_seed(0)
    model = TinyLM(attention=attention).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (5, 6), generator=gen)
    targets = torch.randint(0, 11, (5, 6), generator=gen)
    targets[torch.rand(5, 6, generator=gen) < 0.3] = ignore
    targets[3] = ignore  # no valid token
    targets[0, 0] = 7
    g = sw.GraNd(model, 4, engine=engine, ignore_index=ignore)
    idx = torch.tensor([0, 1, 2, 3, 1])  # index 1 twice (rows 1 and 4), index 3 empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        g.update_indexed(idx, ids, targets)
    ref = _grand_reference(model, ids, targets, ignore)
    expected = torch.tensor([ref[0], (ref[1] + ref[4]) / 2, ref[2], math.nan], dtype=torch.float64)
    assert g.num_empty == 1
    _check(_quiet_compute(g), expected, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_grand_one_token_sequences_and_int32_targets():
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 11, (4, 1))
    targets = torch.tensor([[3], [-100], [10], [0]], dtype=torch.int32)
    g = sw.GraNd(model, 4)
    g.update_indexed(torch.arange(4), ids, targets)
    _check(_quiet_compute(g), _grand_reference(model, ids, targets, -100), rtol=1e-4)


def test_grand_sequence_target_beyond_the_vocabulary_changes_nothing():
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 11, (2, 3))
    targets = torch.tensor([[1, 2, 3], [4, 11, -100]])
    g = sw.GraNd(model, 2, engine="loop")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        g.update_indexed([0, 1], ids, targets)
    assert g.num_updates == 0 and g.num_empty == 0
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


# -- Lightning: ScoringCallback state ------------------------------------------------------------


def _seq_collection(n=5, **kw):
    return sw.ScorerCollection(
        sw.Loss(n, chunk_tokens=2, **kw), sw.Misclassified(n, **kw), sw.ForgettingTracker(n, **kw)
    )


def _feed(scorer, seeds=(0, 1)):
    for seed in seeds:
        logits, targets = _batch(seed=seed)
        scorer.update_indexed(torch.arange(5), logits, targets)


def _same_state(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and set(a) == set(b)
            and all(_same_state(a[k], b[k]) for k in a if k != "version")
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_lightning_callback_round_trip_through_a_saved_file(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from sampleweights.integrations.lightning import ScoringCallback

    cb = ScoringCallback(_seq_collection())
    _feed(cb.scorer)
    path = tmp_path / "cb.pt"
    torch.save(cb.state_dict(), path)
    fresh = ScoringCallback(_seq_collection())
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert _same_state(cb.scorer.state_dict(), fresh.scorer.state_dict())
    assert fresh.scorer["loss"].num_empty == 2
    # resumed updates equal an uninterrupted run
    _feed(cb.scorer, seeds=(2,))
    _feed(fresh.scorer, seeds=(2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a, b = cb.scorer.compute(), fresh.scorer.compute()
    for k in a:
        assert torch.equal(a[k].nan_to_num(-1), b[k].nan_to_num(-1)), k


def test_lightning_callback_refuses_other_scorers_and_changes_nothing():
    pytest.importorskip("lightning.pytorch")
    from sampleweights.integrations.lightning import ScoringCallback

    saved = ScoringCallback(_seq_collection())
    _feed(saved.scorer)
    state = saved.state_dict()
    other = ScoringCallback(sw.ScorerCollection(sw.Loss(5), sw.EL2N(5)))
    _feed(other.scorer, seeds=(3,))
    before = copy.deepcopy(other.scorer.state_dict())
    with pytest.raises(StateMismatchError):
        other.load_state_dict(state)
    assert _same_state(before, other.scorer.state_dict())
    # other sequence options (ignore_index) are not part of the state: a plain scorer of the
    # same name and size loads it (documented per-scorer checks: name and num_examples)
    with pytest.raises(StateMismatchError):
        ScoringCallback(sw.Loss(6)).load_state_dict(ScoringCallback(sw.Loss(5)).state_dict())


def test_lightning_callback_partial_failure_rolls_back_the_first_scorer():
    pytest.importorskip("lightning.pytorch")
    from sampleweights.integrations.lightning import ScoringCallback

    loader = [None]
    src = ScoringCallback(
        _seq_collection(), score_at_epoch=1, score_loader=loader, score_with=sw.Loss(5)
    )
    _feed(src.scorer)
    _feed(src.score_with, seeds=(4,))
    state = copy.deepcopy(src.state_dict())
    state["sampleweights"]["ranks"][0]["score_with"]["num_examples"] = 6  # corrupt the second

    dst = ScoringCallback(
        _seq_collection(), score_at_epoch=1, score_loader=loader, score_with=sw.Loss(5)
    )
    _feed(dst.scorer, seeds=(7,))
    dst.scorer.new_run()
    before = copy.deepcopy(dst.scorer.state_dict())
    with pytest.raises(StateMismatchError):
        dst.load_state_dict(state)
    assert _same_state(before, dst.scorer.state_dict())
    assert dst.scores is None and dst._pending is None


@pytest.mark.parametrize(
    "state",
    [{}, {"scores": None}, {"sampleweights": {"world_size": 2, "ranks": [{}, {}]}}],
    ids=["empty", "no-ours", "two-ranks"],
)
def test_lightning_callback_checkpoint_without_our_state_is_refused(state):
    pytest.importorskip("lightning.pytorch")
    from sampleweights.integrations.lightning import ScoringCallback

    cb = ScoringCallback(sw.Loss(5))
    _feed(cb.scorer)
    before = copy.deepcopy(cb.scorer.state_dict())
    with pytest.raises(StateMismatchError):
        cb.load_state_dict(state)
    assert _same_state(before, cb.scorer.state_dict())


def _lightning_fit(tmp_path, callback, ckpt_path=None, epochs=1):
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            logits = self.lin(x)
            return {"loss": F.cross_entropy(logits, y), "logits": logits}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(0)
    ds = sw.WithIndex(TensorDataset(torch.randn(8, 3, generator=gen), torch.arange(8) % 2))
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[] if callback is None else [callback],
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), DataLoader(ds, batch_size=4), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("saved_with", ["el2n", "none"])
def test_lightning_resume_with_other_scorers_is_refused_not_silently_fresh(tmp_path, saved_with):
    """Before: resuming a Lightning checkpoint saved with ScoringCallback[el2n] into
    ScoringCallback[el2n,aum]: expected StateMismatchError (documented: 'holds other scorers'),
    got a silent fresh start (state_key differs, Lightning never calls load_state_dict; only its
    own warning). Same for a checkpoint of a run without the callback (hf.py refuses that case)"""
    from sampleweights.integrations.lightning import ScoringCallback

    first = _lightning_fit(tmp_path, ScoringCallback(sw.EL2N(8)) if saved_with == "el2n" else None)
    ckpt = tmp_path / "a.ckpt"
    first.save_checkpoint(str(ckpt))
    with pytest.raises(StateMismatchError):
        _lightning_fit(
            tmp_path,
            ScoringCallback(sw.ScorerCollection(sw.EL2N(8), sw.AUM(8))),
            ckpt_path=str(ckpt),
            epochs=2,
        )


# -- Hugging Face: save_scoring_state / load_scoring_state ----------------------------------------


def _hf_trainer(tmp_path, scorer, train_sampler=None, model=None, **kwargs):
    transformers = pytest.importorskip("transformers")
    from sampleweights.integrations.hf import ScoringTrainer

    args = transformers.TrainingArguments(
        str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True
    )
    return ScoringTrainer(
        model if model is not None else nn.Linear(2, 2),
        args,
        scorer=scorer,
        train_sampler=train_sampler,
        **kwargs,
    )


def test_hf_scoring_state_round_trip_of_sequence_scorers(tmp_path):
    t1 = _hf_trainer(tmp_path, _seq_collection())
    _feed(t1.scorer)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    t1.save_scoring_state(str(folder))
    t2 = _hf_trainer(tmp_path, _seq_collection())
    t2.load_scoring_state(str(folder))
    assert _same_state(t1.scorer.state_dict(), t2.scorer.state_dict())
    assert t2.scorer["loss"].num_empty == 2


def test_hf_load_into_other_scorers_or_a_plain_checkpoint_changes_nothing(tmp_path):
    t1 = _hf_trainer(tmp_path, _seq_collection())
    _feed(t1.scorer)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    t1.save_scoring_state(str(folder))
    t2 = _hf_trainer(tmp_path, sw.ScorerCollection(sw.Loss(5), sw.EL2N(5)))
    _feed(t2.scorer, seeds=(5,))
    before = copy.deepcopy(t2.scorer.state_dict())
    with pytest.raises(StateMismatchError):
        t2.load_scoring_state(str(folder))
    assert _same_state(before, t2.scorer.state_dict())
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(StateMismatchError, match="does not exist"):
        t2.load_scoring_state(str(plain))
    # a checkpoint with a sampler while this trainer has none: refused before the scorer loads
    keep = sw.PrunedSampler(torch.arange(3), num_examples=5)
    t3 = _hf_trainer(tmp_path, _seq_collection(), train_sampler=keep)
    _feed(t3.scorer)
    folder3 = tmp_path / "ckpt3"
    folder3.mkdir()
    t3.save_scoring_state(str(folder3))
    t4 = _hf_trainer(tmp_path, _seq_collection())
    _feed(t4.scorer, seeds=(6,))
    before = copy.deepcopy(t4.scorer.state_dict())
    with pytest.raises(StateMismatchError, match="train_sampler"):
        t4.load_scoring_state(str(folder3))
    assert _same_state(before, t4.scorer.state_dict())


def test_hf_malformed_state_file_is_a_state_mismatch(tmp_path):
    """Before: a state file with format=1 but no 'world_size'/'scorer' keys: expected
    StateMismatchError, got KeyError (hf.py load_scoring_state indexes saved[...] unchecked)"""
    t = _hf_trainer(tmp_path, sw.Loss(5))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"format": 1}, folder / "sampleweights_rank0.pt")
    with pytest.raises(StateMismatchError):
        t.load_scoring_state(str(folder))


class _CausalLM(nn.Module):
    """A Hugging Face-style causal LM: ``labels`` are the input ids; the model shifts them."""

    def __init__(self, vocab=7):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.head = nn.Linear(4, vocab)

    def forward(self, input_ids, labels=None):
        from transformers.modeling_outputs import CausalLMOutput

        logits = self.head(self.emb(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)


def test_hf_scoring_trainer_on_a_causal_lm_scores_next_token_loss(tmp_path):
    """Before: ScoringTrainer + a HF causal LM (labels = input_ids, shifted inside the model):
    expected the per-sequence next-token loss, got the loss of logits[t] against labels[t]
    (hf.py compute_loss passes unshifted labels to scorer.update_indexed; no error)"""
    torch.manual_seed(0)
    model = _CausalLM().train()
    t = _hf_trainer(tmp_path, sw.Loss(3), model=model, shift_labels=True)
    ids = torch.randint(0, 7, (3, 5))
    t.compute_loss(model, {"input_ids": ids, "labels": ids, "index": torch.arange(3)})
    with torch.no_grad():
        logits = model(ids).logits
    shifted = F.pad(ids[:, 1:], (0, 1), value=-100)
    ref = _reference("loss", logits, shifted, -100, "mean")
    _check(t.scorer.compute(), ref, rtol=1e-5)


def _gpt2(vocab: int = 11):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).train()


def test_hf_a_transformers_causal_lm_is_shifted_without_being_told(tmp_path):
    """GPT2LMHeadModel (an AutoModelForCausalLM class): the scorer gets next-token targets."""
    model = _gpt2()
    t = _hf_trainer(tmp_path, sw.Loss(3), model=model)
    ids = torch.randint(0, 11, (3, 6))
    t.compute_loss(model, {"input_ids": ids, "labels": ids, "index": torch.arange(3)})
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ref = _reference("loss", logits, F.pad(ids[:, 1:], (0, 1), value=-100), -100, "mean")
    _check(t.scorer.compute(), ref, rtol=1e-5)


def test_hf_token_classification_labels_stay_aligned(tmp_path):
    """BertForTokenClassification: logits[t] is position t's class, no shift."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=11,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForTokenClassification(config).train()
    t = _hf_trainer(tmp_path, sw.Loss(3), model=model)
    ids, labels = torch.randint(0, 11, (3, 6)), torch.randint(0, 3, (3, 6))
    labels[0, 4:] = -100
    t.compute_loss(model, {"input_ids": ids, "labels": labels, "index": torch.arange(3)})
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    _check(t.scorer.compute(), _reference("loss", logits, labels, -100, "mean"), rtol=1e-5)


def test_hf_an_unknown_sequence_model_must_say_whether_to_shift(tmp_path):
    """A custom module with (B, T, C) logits: no guess, a clear error, nothing scored."""
    model = _CausalLM().train()
    t = _hf_trainer(tmp_path, sw.Loss(3), model=model)
    ids = torch.randint(0, 7, (3, 5))
    with pytest.raises(ValueError, match="shift_labels=True"):
        t.compute_loss(model, {"input_ids": ids, "labels": ids, "index": torch.arange(3)})
    assert t.scorer.num_updates == 0
    with pytest.raises(TypeError, match="shift_labels"):
        _hf_trainer(tmp_path, sw.Loss(3), model=model, shift_labels="yes")
