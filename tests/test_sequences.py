"""Sequence batches: (B, T, C) logits, (B, T) targets with ignore_index, one value per example."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import sampleweights as sw
from buffers import LiveBuffers
from conftest import all_logit_scorers, assert_same_state, snapshot


def batches(seed, n=6, steps=4, batch=5, length=7, classes=9, dtype=torch.float32):
    """Sequence batches with padding (-100) and one sequence without any valid token."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        logits = (torch.randn(batch, length, classes, generator=gen) * 3).to(dtype)
        y = torch.randint(0, classes, (batch, length), generator=gen)
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)
        y[torch.arange(length) >= lengths[:, None]] = -100
        y[0] = -100  # no valid token
        out.append((idx, logits, y))
    return out


def token_reference(logits, y, stat):
    """Per-token statistic by plain torch, reduced to the mean over valid tokens."""
    x = logits.float()
    valid = y != -100
    safe = torch.where(valid, y, 0)
    p = x.softmax(-1)
    p_y = p.gather(-1, safe[..., None])[..., 0]
    x_y = x.gather(-1, safe[..., None])[..., 0]
    other = x.scatter(-1, safe[..., None], -torch.inf).amax(-1)
    onehot = F.one_hot(safe, x.shape[-1]).float()
    value = {
        "loss": -x.log_softmax(-1).gather(-1, safe[..., None])[..., 0],
        "el2n": (p - onehot).norm(dim=-1),
        "confidence": p_y,
        "aum": x_y - other,
        "margin": p_y - p.scatter(-1, safe[..., None], -1.0).amax(-1),
        "entropy": -(p * x.log_softmax(-1)).sum(-1),
    }[stat]
    total = torch.where(valid, value, 0.0).sum(1)
    return total / valid.sum(1)


# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "stat"),
    [
        (sw.Loss, "loss"),
        (sw.EL2N, "el2n"),
        (sw.Confidence, "confidence"),
        (sw.Margin, "margin"),
        (sw.AUM, "aum"),
        (sw.Entropy, "entropy"),
    ],
)
def test_float_scores_are_the_mean_over_valid_tokens(cls, stat):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 11, generator=gen) * 3
    y = torch.randint(0, 11, (4, 6), generator=gen)
    y[1, 2:] = -100
    y[3, :5] = -100
    s = cls(4)
    s.update_indexed(torch.arange(4), logits, y)
    torch.testing.assert_close(s.compute(), token_reference(logits, y, stat), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_sequences_equal_the_row_path_bit_for_bit(dtype):
    """(B, 1, C) with every token valid is exactly the (B, C) batch: the same rows."""
    for s_rows, s_seq in zip(all_logit_scorers(6), all_logit_scorers(6), strict=True):
        for idx, logits, y in batches(3, length=1, dtype=dtype):
            y = y.clamp_min(0)  # every token valid
            s_rows.update_indexed(idx, logits[:, 0], y[:, 0])
            s_seq.update_indexed(idx, logits, y)
        assert torch.equal(s_rows.compute().nan_to_num(7.0), s_seq.compute().nan_to_num(7.0))


def test_token_reduce_sum_and_max():
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 0] = 5.0  # token 1 of sequence 0: confidently wrong for target 2
    y = torch.tensor([[1, 2, -100], [0, -100, -100]])
    per_token = F.cross_entropy(logits.view(-1, 4), y.view(-1), reduction="none").view(2, 3)
    for how, expected in (
        ("sum", torch.stack([per_token[0, :2].sum(), per_token[1, 0]])),
        ("max", torch.stack([per_token[0, :2].max(), per_token[1, 0]])),
        ("mean", torch.stack([per_token[0, :2].mean(), per_token[1, 0]])),
    ):
        s = sw.Loss(2, token_reduce=how)
        s.update_indexed([0, 1], logits, y)
        torch.testing.assert_close(s.compute(), expected)


def _hits(pattern):
    """Logits (B, T, 3) whose arg-max is the target exactly where ``pattern`` is 1; targets 0."""
    pattern = torch.tensor(pattern)
    logits = torch.zeros(*pattern.shape, 3)
    logits[..., 0] = torch.where(pattern.bool(), 2.0, -2.0)
    return logits, torch.zeros(pattern.shape, dtype=torch.long)


@pytest.mark.parametrize(("threshold", "wrong"), [(0.5, [False, True]), (1.0, [True, True])])
def test_a_sequence_is_correct_when_enough_tokens_are(threshold, wrong):
    logits, y = _hits([[1, 1, 0, 1], [1, 0, 0, 1]])  # 3/4 and 2/4 right... second: exactly half
    y[1, 3] = -100  # second: 1 of 3 valid tokens right
    mis = sw.Misclassified(2, min_token_accuracy=threshold)
    mis.update_indexed([0, 1], logits, y)
    assert mis.compute().bool().tolist() == wrong
    maps = sw.DataMaps(2, min_token_accuracy=threshold)
    maps.update_indexed([0, 1], logits, y)
    got = maps.compute_all()
    assert got["correctness"].tolist() == [float(not w) for w in wrong]
    p = logits.softmax(-1)[..., 0]
    torch.testing.assert_close(got["confidence"], torch.stack([p[0].mean(), p[1, :3].mean()]))


def test_exactly_half_the_tokens_is_correct_by_default():
    logits, y = _hits([[1, 0], [0, 0]])
    s = sw.Misclassified(2)
    s.update_indexed([0, 1], logits, y)
    assert s.compute().tolist() == [0.0, 1.0]


def test_forgetting_events_of_sequences():
    right, y = _hits([[1, 1, 0]])
    wrong, _ = _hits([[1, 0, 0]])
    s = sw.ForgettingTracker(1)
    for logits in (right, wrong, right, wrong):
        s.update_indexed([0], logits, y)
    assert s.compute().tolist() == [2.0]


# -- sequences without a valid token ---------------------------------------------------------


@pytest.mark.parametrize("cls", [sw.EL2N, sw.Loss, sw.DataMaps, sw.ForgettingTracker])
def test_a_sequence_without_valid_tokens_is_counted_not_scored(cls):
    s = cls(3)
    logits = torch.randn(2, 4, 5)
    y = torch.tensor([[1, 2, 3, -100], [-100] * 4])
    s.update_indexed([0, 1], logits, y)
    s.update_indexed([0, 1], logits, y)
    assert s.num_empty == 2
    with pytest.warns(RuntimeWarning, match="2 presentation.*without a valid token"):
        scores = s.compute()
    assert not bool(scores[0].isnan()) and bool(scores[1:].isnan().all())  # 1: never scored
    assert "count" not in s._state or int(s._state["count"][1]) == 0
    sd = s.state_dict()
    assert int(sd["num_empty"]) == 2
    fresh = cls(3)
    fresh.load_state_dict(sd)
    assert fresh.num_empty == 2
    fresh.reset()
    assert fresh.num_empty == 0
    bad = dict(sd, num_empty=-1)
    with pytest.raises(sw.StateMismatchError, match="num_empty"):
        fresh.load_state_dict(bad)


def test_mean_of_a_sequence_without_valid_tokens_is_nan():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    valid = torch.tensor([[True, False], [False, False]])
    from sampleweights.scorers.base import reduce_tokens

    for how in ("mean", "sum", "max"):
        out = reduce_tokens(values, valid, how)
        assert out[0] == 1.0 and bool(out[1].isnan())


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logits", "targets", "match"),
    [
        (torch.randn(2, 3, 4), torch.tensor([[0, 4, 1], [0, 0, 0]]), r"\[0, 4\).*ignore_index"),
        (torch.randn(2, 3, 4), torch.tensor([[0, -1, 1], [0, 0, 0]]), r"ignore_index=-100"),
        (torch.randn(2, 3, 4), torch.zeros(2, 2, dtype=torch.long), "shapes"),
        (torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long), "shapes"),
        (torch.randn(3, 3, 4), torch.zeros(3, 3, dtype=torch.long), "shapes"),
    ],
)
def test_bad_sequence_batches_are_rejected_and_change_nothing(logits, targets, match):
    for s in all_logit_scorers(4):
        s.update_indexed([0, 1], torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
        before = snapshot(s)
        with pytest.raises(ValueError, match=match):
            s.update_indexed([0, 1], logits, targets)
        assert_same_state(before, snapshot(s))
    c = sw.ScorerCollection(*all_logit_scorers(4))
    with pytest.raises(ValueError, match=match):
        c.update_indexed([0, 1], logits, targets)


def test_row_batches_still_reject_ignore_labels():
    with pytest.raises(ValueError, match="targets"):
        sw.EL2N(2).update_indexed([0, 1], torch.randn(2, 3), torch.tensor([0, -100]))


def test_custom_ignore_index():
    s = sw.Loss(1, ignore_index=0)
    logits = torch.randn(1, 3, 4)
    s.update_indexed([0], logits, torch.tensor([[2, 0, 0]]))
    torch.testing.assert_close(s.compute(), F.cross_entropy(logits[0, :1], torch.tensor([2]))[None])
    with pytest.raises(ValueError, match="ignore_index=0"):
        s.update_indexed([0], logits, torch.tensor([[2, -100, 0]]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"ignore_index": True}, TypeError, "ignore_index"),
        ({"token_reduce": "median"}, ValueError, "token_reduce"),
        ({"min_token_accuracy": 0.0}, ValueError, "min_token_accuracy"),
        ({"min_token_accuracy": 1.5}, ValueError, "min_token_accuracy"),
        ({"min_token_accuracy": "half"}, TypeError, "min_token_accuracy"),
        ({"chunk_tokens": 0}, ValueError, "chunk_tokens"),
    ],
)
def test_sequence_options_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        sw.EL2N(3, **kwargs)


def test_collection_needs_one_ignore_index():
    c = sw.ScorerCollection(sw.EL2N(2), sw.Loss(2, ignore_index=0))
    with pytest.raises(ValueError, match="ignore_index"):
        c.update_indexed([0], torch.randn(1, 2, 3), torch.tensor([[1, 1]]))
    c.update_indexed([0], torch.randn(1, 3), torch.tensor([1]))  # rows: as before


def test_nonfinite_logits_at_ignored_tokens_do_not_count():
    logits = torch.randn(2, 3, 4)
    logits[0, 2] = float("nan")
    y = torch.tensor([[1, 1, -100], [1, 1, 1]])
    s = sw.EL2N(2)
    s.update_indexed([0, 1], logits, y)  # the NaN is at an ignored token
    assert bool(s.compute().isfinite().all())
    y[0, 2] = 1
    before = snapshot(s)
    with pytest.raises(ValueError, match="NaN or inf at valid tokens of 1 of 2"):
        s.update_indexed([0, 1], logits, y)
    assert_same_state(before, snapshot(s))
    skip = sw.EL2N(2, nonfinite="skip")
    skip.update_indexed([0, 1], logits, y)
    assert skip.num_skipped == 1
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert skip.compute().isnan().tolist() == [True, False]


# -- collection, chunks, memory -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 3, 7, 15])
def test_collection_and_chunks_equal_separate_scorers_bit_for_bit(dtype, chunk):
    data = batches(5, dtype=dtype)
    alone = all_logit_scorers(6)
    for s in alone:
        for idx, logits, y in data:
            s.update_indexed(idx, logits, y)
    together = sw.ScorerCollection(*all_logit_scorers(6, chunk_tokens=chunk))
    for idx, logits, y in data:
        together.update_indexed(idx, logits, y)
    for s in alone:
        other = together[s.name]
        a, b = s.state_dict(), other.state_dict()
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), (s.name, key)
        assert int(a["num_empty"]) == int(b["num_empty"]) == 4
    chunked = [type(s)(6, chunk_tokens=chunk) for s in alone[:-3]]  # each alone, chunked
    for s in chunked:
        for idx, logits, y in data:
            s.update_indexed(idx, logits, y)
        a, b = s.state_dict()["state"], together[s.name].state_dict()["state"]
        assert all(torch.equal(a[key], b[key]) for key in a), s.name


def test_non_contiguous_logits_give_the_same_values():
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(3, 6, 5, generator=gen)
    y = torch.randint(0, 5, (3, 5), generator=gen)
    a, b = sw.EL2N(3), sw.EL2N(3, chunk_tokens=2)
    a.update_indexed([0, 1, 2], full[:, :-1], y)  # a slice: not a view of (B·T, C) rows
    b.update_indexed([0, 1, 2], full[:, :-1].contiguous(), y)
    assert torch.equal(a.compute(), b.compute())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_sequence_collection_holds_one_tokens_by_vocabulary_buffer(dtype, nonfinite):
    batch, length, vocab = 2, 8, 20_000
    logits = (torch.randn(batch, length, vocab) * 3).to(dtype)
    y = torch.randint(0, vocab, (batch, length))
    y[1, 5:] = -100
    c = sw.ScorerCollection(*all_logit_scorers(2, nonfinite=nonfinite))
    with LiveBuffers(logits, batch * length * vocab) as counter:
        c.update_indexed([0, 1], logits, y)
    assert counter.peak == 1
    # chunks: no buffer of the whole batch, one of a chunk
    c = sw.ScorerCollection(*all_logit_scorers(2, nonfinite=nonfinite, chunk_tokens=4))
    with LiveBuffers(logits, 4 * vocab + 1) as counter:
        c.update_indexed([0, 1], logits, y)
    assert counter.peak == 0
    with LiveBuffers(logits, 4 * vocab) as counter:
        c.update_indexed([0, 1], logits, y)
    assert counter.peak == 1


# -- GraNd on causal language models ----------------------------------------------------------


def _lm_batch(vocab, batch=4, length=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)  # shift the labels, not the logits
    labels[1, 5:] = -100  # a shorter sequence
    return ids, labels


def _reference_grand(model, ids, labels):
    """One example at a time: the mean token cross-entropy's gradient norm."""
    out = []
    for i in range(ids.shape[0]):
        model.zero_grad()
        logits = model(ids[i : i + 1]).logits.float()[0]
        valid = labels[i] != -100
        F.cross_entropy(logits[valid], labels[i][valid]).backward()
        sq = sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)
        out.append(sq.sqrt())
    model.zero_grad()
    return torch.stack(out).float()


def _tiny_lms():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=40,
            n_positions=16,
            n_embd=16,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    return {"gpt2": gpt2, "llama": llama}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_grand_on_a_causal_lm_equals_a_one_example_backward_loop(arch, engine):
    torch.manual_seed(0)
    model = _tiny_lms()[arch].eval()
    ids, labels = _lm_batch(40)
    g = sw.GraNd(model, 4, engine=engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's vmap fallback notes
        g.update_indexed(torch.arange(4), ids, labels)
    got, ref = g.compute(), _reference_grand(model, ids, labels)
    assert float(((got - ref).abs() / ref).max()) <= 1e-4
    assert all(p.grad is None for p in model.parameters())


def test_grand_default_loss_on_sequences():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    y = torch.tensor([[1, -100, 2], [-100, -100, -100]])
    loss = sw.scorers.grand.cross_entropy_fp32(logits, y)
    expected = F.cross_entropy(logits[0, [0, 2]], y[0, [0, 2]])
    torch.testing.assert_close(loss, torch.stack([expected, torch.zeros(())]))


def test_grand_counts_sequences_without_valid_tokens_and_checks_targets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7))
    ids = torch.randint(0, 7, (3, 5))
    y = torch.randint(0, 7, (3, 5))
    y[1] = -100
    y[2, 3:] = -100
    g = sw.GraNd(model, 3, engine="loop")
    g.update_indexed([0, 1, 2], ids, y)
    assert g.num_empty == 1
    with pytest.warns(RuntimeWarning, match="without a valid token"):
        scores = g.compute()
    assert scores.isnan().tolist() == [False, True, False]
    before = copy.deepcopy(g.state_dict())
    y[0, 0] = -5
    with pytest.raises(ValueError, match="ignore_index=-100"):
        g.update_indexed([0, 1, 2], ids, y)
    assert_same_state(before, g.state_dict())
    with pytest.raises(ValueError, match=r"≥ 0.*-100.*loss_fn"):  # rows: as before
        g.update_indexed([0], torch.randn(1, 7), torch.tensor([-100]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sequences_on_cuda_match_cpu_without_a_host_sync():
    data = batches(7)
    cpu = sw.ScorerCollection(*all_logit_scorers(6))
    gpu = sw.ScorerCollection(
        *all_logit_scorers(6, validate=False, nonfinite="skip", chunk_tokens=9)
    )
    for idx, logits, y in data:
        cpu.update_indexed(idx, logits, y)
    on_gpu = [(idx.cuda(), logits.cuda(), y.cuda()) for idx, logits, y in data]
    gpu.update_indexed(*on_gpu[0])  # the first claims the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # (the copies above are the test's, not ours)
    try:
        for batch in on_gpu[1:]:
            gpu.update_indexed(*batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the empty sequences
        want, got = cpu.compute(), gpu.compute()
    for name in want:
        torch.testing.assert_close(
            got[name].cpu(), want[name], rtol=1e-5, atol=1e-5, equal_nan=True
        )
