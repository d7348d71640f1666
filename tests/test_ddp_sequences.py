"""Sequence batches ((B, T, C) logits, (B, T) targets with ignore_index) under a real 2-process
gloo group: a ScorerCollection equals one process replaying the same presentations, and the
causal-LM selection recipe (score → ``sw.select`` → ``PrunedSampler``) covers the kept set
exactly once per epoch over the ranks. One ``run_ddp`` serves both tests (a process start is
the expensive part)."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw
from ddp import CollectiveCount, run_ddp

pytestmark = pytest.mark.ddp

# -- (a) a collection fed uneven per-rank sequence batches ---------------------------------------

N, VOCAB = 11, 6
EMPTY = N - 1  # the one all-ignored sequence: presented once (rank 1, step 0), never otherwise
# per step, per rank: (batch length, sequence length); uneven B, an empty batch on each rank
# once, and T differing across the ranks in some steps (the exchange carries one value per
# example, not per token, so T need not agree)
SHAPES = [
    ((4, 6), (3, 6)),
    ((2, 5), (5, 3)),
    ((0, 4), (3, 4)),
    ((3, 7), (0, 7)),
    ((5, 2), (2, 8)),
    ((3, 4), (4, 4)),
]


def _scorers() -> list[sw.Scorer]:
    return [
        sw.EL2N(N),
        sw.Loss(N),
        sw.ForgettingTracker(N),
        sw.Misclassified(N),
        sw.DataMaps(N),
    ]


def _schedule() -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per step, per rank: (indices, logits (B, T, C), targets (B, T)) with an ignored prompt
    prefix and right padding (-100); indices repeat within and across ranks."""
    gen = torch.Generator().manual_seed(1)  # every example presented at least twice
    steps = []
    for k, shapes in enumerate(SHAPES):
        parts = []
        for rank, (b, t) in enumerate(shapes):
            idx = torch.randint(0, EMPTY, (b,), generator=gen)
            y = torch.randint(0, VOCAB, (b, t), generator=gen)
            logits = torch.randn(b, t, VOCAB, generator=gen) * 2
            # the target's logit raised at random: each token right about half the time
            bump = torch.randn(b, t, generator=gen) * 2 + 1.5
            logits.scatter_add_(-1, y[..., None], bump[..., None])
            start = torch.randint(0, 2, (b, 1), generator=gen)  # an ignored prompt token
            stop = torch.randint(1, t + 1, (b, 1), generator=gen)  # right padding from here
            pos = torch.arange(t)
            y[(pos < start) | (pos >= stop.clamp_min(start + 1))] = -100
            if k == 0 and rank == 1:
                idx[0] = EMPTY
                y[0] = -100  # no valid token: no value, counted in num_empty
            parts.append((idx, logits, y))
        steps.append(parts)
    return steps


def _concatenated(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One process's batch of a step: the ranks' batches in rank order, right-padded to the
    longest T (padding: ignored targets, zero logits)."""
    t = max(logits.shape[1] for _, logits, _ in parts)
    idx = torch.cat([i for i, _, _ in parts])
    logits = torch.cat([F.pad(x, (0, 0, 0, t - x.shape[1])) for _, x, _ in parts])
    y = torch.cat([F.pad(y, (0, t - y.shape[1]), value=-100) for _, _, y in parts])
    return idx, logits, y


def _compute(collection: sw.ScorerCollection) -> tuple[dict, dict, list[str]]:
    """Scores, DataMaps' three statistics, and the warnings compute() raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = collection.compute()
        maps = collection["datamaps"].compute_all()
    return scores, maps, [str(w.message) for w in caught]


def _collection_part(rank: int) -> dict:
    collection = sw.ScorerCollection(*_scorers())
    alone = sw.Loss(N)  # the scorer's own compute(), outside a collection
    per_update = []
    for parts in _schedule():
        with CollectiveCount() as count:
            collection.update_indexed(*parts[rank])
        per_update.append(count.calls)
        alone.update_indexed(*parts[rank])
    scores, maps, caught = _compute(collection)
    with warnings.catch_warnings(record=True) as alone_caught:
        warnings.simplefilter("always")
        alone.compute()
    return {
        "scores": scores,
        "maps": maps,
        "warned": caught,
        "alone_warned": [str(w.message) for w in alone_caught],
        "num_empty": {s.name: s.num_empty for s in collection},
        "num_updates": {s.name: s.num_updates for s in collection},
        "per_update": per_update,
    }


def _single_process() -> dict:
    collection = sw.ScorerCollection(*_scorers())
    for parts in _schedule():
        collection.update_indexed(*_concatenated(parts))
    scores, maps, caught = _compute(collection)
    return {
        "scores": scores,
        "maps": maps,
        "warned": caught,
        "num_empty": {s.name: s.num_empty for s in collection},
    }


# -- (b) the causal-LM selection recipe ----------------------------------------------------------

LM_N, LM_VOCAB, LM_LENGTH, LM_RANDOM = 30, 16, 8, 10  # the last LM_RANDOM sequences: random


def _lm_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences counting up (easy: the next token follows from this one) and random ones
    (hard), of random lengths, right-padded; labels shifted left, -100 where no next token."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randint(1, LM_VOCAB, (LM_N, 1), generator=gen)
    ids = (start + torch.arange(LM_LENGTH)) % (LM_VOCAB - 1) + 1
    ids[-LM_RANDOM:] = torch.randint(1, LM_VOCAB, (LM_RANDOM, LM_LENGTH), generator=gen)
    lengths = torch.randint(4, LM_LENGTH + 1, (LM_N,), generator=gen)
    padded = torch.arange(LM_LENGTH) >= lengths[:, None]
    ids[padded] = 0
    labels = F.pad(ids[:, 1:], (0, 1), value=0)
    labels[F.pad(padded[:, 1:], (0, 1), value=True)] = -100
    return ids, labels


def _lm() -> nn.Module:
    """A bigram causal LM, trained the same way (full batch, fixed seed) on every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(LM_VOCAB, 16), nn.Linear(16, LM_VOCAB))
    ids, labels = _lm_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        loss = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _lm_scores(model: nn.Module, sampler: torch.utils.data.Sampler | None) -> dict:
    ds = sw.WithIndex(TensorDataset(*_lm_data()))
    scorers = sw.ScorerCollection(sw.Loss(LM_N), sw.EL2N(LM_N))
    sw.score_dataset(model, DataLoader(ds, batch_size=4, sampler=sampler), scorers, progress=False)
    return scorers.compute()


def _selection_part(rank: int) -> dict:
    model = _lm()
    ds = sw.WithIndex(TensorDataset(*_lm_data()))
    # scoring pass: each rank its shard, once each (pad=False); compute() merges the ranks
    shard = sw.PrunedSampler(range(LM_N), shuffle=False, pad=False)
    scores = _lm_scores(model, shard)
    keep = sw.select(scores["loss"], keep=0.5, strategy="hardest")
    epochs: dict[bool, list[list[int]]] = {}
    lengths: dict[bool, int] = {}
    for pad in (False, True):
        sampler = sw.PrunedSampler(keep, num_examples=LM_N, pad=pad, seed=3)
        loader = DataLoader(ds, batch_size=4, sampler=sampler)
        epochs[pad], lengths[pad] = [], len(sampler)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            seen = []
            for x, y, index in loader:
                # each batch is the dataset's rows of its indices
                assert torch.equal(x, ds.dataset.tensors[0][index])
                assert torch.equal(y, ds.dataset.tensors[1][index])
                seen += index.tolist()
            epochs[pad].append(seen)
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "scores": scores,
        "keep": keep,
        "epochs": epochs,
        "lengths": lengths,
    }


def _both(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    return {"collection": _collection_part(rank), "selection": _selection_part(rank)}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ddp(_both, world=2, timeout=60)


def _bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))


# -- the tests -----------------------------------------------------------------------------------


def test_sequence_collection_under_ddp_equals_one_process(ranks):
    want = _single_process()
    got = [r["collection"] for r in ranks]
    # the ranks agree bit for bit, on every scorer and every DataMaps statistic
    for name in want["scores"]:
        assert _bits(got[0]["scores"][name], got[1]["scores"][name]), name
    for stat in want["maps"]:
        assert _bits(got[0]["maps"][stat], got[1]["maps"][stat]), stat
    for r in got:
        # integer decisions (forgetting events, latest error): the same bits as one process;
        # float means (EL2N, Loss, DataMaps): summed in another order, equal to fp32 precision
        for name in ("forgetting", "misclassified"):
            assert _bits(r["scores"][name], want["scores"][name]), name
        for name in ("el2n", "loss", "datamaps"):
            torch.testing.assert_close(
                r["scores"][name], want["scores"][name], rtol=1e-6, atol=1e-7, equal_nan=True
            )
        for stat in ("confidence", "variability", "correctness"):
            torch.testing.assert_close(
                r["maps"][stat], want["maps"][stat], rtol=1e-6, atol=1e-7, equal_nan=True
            )
        # the all-ignored sequence was never scored (its only presentation went to the trash
        # slot, through the exchange too); every other example was (forgetting: inf = never
        # learned, a score)
        for name, s in r["scores"].items():
            assert bool(s[EMPTY].isnan()), name
            assert not bool(s[:EMPTY].isnan().any()), name
        assert all(n == len(SHAPES) for n in r["num_updates"].values())
        # one exchange per update (for the order-dependent ForgettingTracker): a header and one
        # all-gather of one row per example, whatever B (0 included) or T (different on the
        # two ranks included)
        assert all(calls == ["all_gather", "all_gather"] for calls in r["per_update"])
    # the schedule does make forgetting events and mixed errors (the comparison is not vacuous)
    assert float(want["scores"]["forgetting"][:EMPTY].max()) >= 1
    assert 0 < float(want["scores"]["misclassified"][:EMPTY].sum()) < EMPTY
    # num_empty is this process's count: rank 1 presented the all-ignored sequence, rank 0
    # none. compute() sums the ranks' counts, so it warns on every rank with one process's count
    assert set(want["num_empty"].values()) == {1}
    assert set(got[0]["num_empty"].values()) == {0}
    assert got[1]["num_empty"] == want["num_empty"]
    for who in (got[0], got[1], want):
        empty = [m for m in who["warned"] if "without a valid token" in m]
        # one per scorer in compute(), one more for DataMaps.compute_all()
        assert len(empty) == len(_scorers()) + 1
        assert all(m.split(":")[1].strip().startswith("1 presentation") for m in empty)
    for who in got:
        (message,) = [m for m in who["alone_warned"] if "without a valid token" in m]
        assert message.startswith("Loss: 1 presentation"), message


def test_causal_lm_selection_covers_the_kept_set_once_per_epoch_over_two_ranks(ranks):
    got = [r["selection"] for r in ranks]
    for key, value in got[0]["params"].items():
        assert torch.equal(value, got[1]["params"][key]), key  # the same model on both ranks
    # the merged scores: the same bits on both ranks, one process's scores to fp32 precision
    model = nn.Sequential(nn.Embedding(LM_VOCAB, 16), nn.Linear(16, LM_VOCAB))
    model.load_state_dict(got[0]["params"])
    want = _lm_scores(model.eval(), None)
    for name in want:
        assert torch.equal(got[0]["scores"][name], got[1]["scores"][name]), name
        assert bool(got[0]["scores"][name].isfinite().all()), name
        torch.testing.assert_close(got[0]["scores"][name], want[name], rtol=1e-6, atol=1e-7)
    keep = got[0]["keep"]
    assert torch.equal(keep, got[1]["keep"])
    assert torch.equal(keep, sw.select(want["loss"], keep=0.5, strategy="hardest"))
    assert keep.numel() == LM_N // 2 == 15  # odd: padding makes one duplicate
    # the hardest half holds the random sequences (the bigram model cannot predict them)
    assert int((keep >= LM_N - LM_RANDOM).sum()) >= LM_RANDOM - 1
    kept = keep.tolist()
    # pad=False: uneven shards (8 + 7), their union each epoch the kept set, each index once
    assert [r["lengths"][False] for r in got] == [8, 7]
    for epoch in range(2):
        r0, r1 = (r["epochs"][False][epoch] for r in got)
        assert (len(r0), len(r1)) == (8, 7)
        assert sorted(r0 + r1) == kept
    # pad=True: 8 each; the one padding duplicate is the epoch's first item (rank 0's first),
    # appended at the end of the shuffled epoch, so rank 1 yields it last
    assert [r["lengths"][True] for r in got] == [8, 8]
    for epoch in range(2):
        r0, r1 = (r["epochs"][True][epoch] for r in got)
        assert (len(r0), len(r1)) == (8, 8)
        assert r1[-1] == r0[0]
        assert sorted(r0 + r1[:-1]) == kept
        assert Counter(r0 + r1) == Counter(kept) + Counter([r0[0]])
    # set_epoch reshuffles: the epochs' orders differ (on each rank, and in the pooled order)
    for pad in (False, True):
        first, second = ([r["epochs"][pad][e] for r in got] for e in range(2))
        assert first != second
        assert all(a != b for a, b in zip(first, second, strict=True))
