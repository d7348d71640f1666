"""Scorers under a real 2-process gloo group equal a single process on the same presentations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw
from ddp import run_ddp

pytestmark = pytest.mark.ddp

N, BATCH, EPOCHS, CLASSES = 37, 4, 3, 3  # odd N and uneven last batches on purpose


def _data():
    gen = torch.Generator().manual_seed(7)
    return TensorDataset(
        torch.randn(N, 6, generator=gen), torch.randint(0, CLASSES, (N,), generator=gen)
    )


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def _scorers():
    return {"el2n": sw.EL2N(N), "mis": sw.Misclassified(N), "forget": sw.ForgettingTracker(N)}


def _train(rank, world):
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ds = sw.WithIndex(_data())
    sampler = sw.PrunedSampler(range(N), seed=1)  # num_replicas / rank from the group
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    live, resumed = _scorers(), _scorers()
    log, step, saved, sampler_state = [], 0, None, None
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for x, y, index in loader:
            logits = model(x)
            F.cross_entropy(logits, y).backward()
            opt.step()
            opt.zero_grad()
            for group in (live, resumed):
                for s in group.values():
                    s.update((x, y, index), logits)
            log.append((index.clone(), logits.detach().clone(), y.clone()))
            step += 1
            if epoch == 1 and step == len(loader) + 2:  # mid-epoch: save on every rank
                saved = {k: s.state_dict() for k, s in resumed.items()}
                sampler_state = sampler.state_dict(consumed=2 * BATCH)
                resumed = _scorers()
                for k, s in resumed.items():
                    s.load_state_dict(saved[k])
    # the sampler resumes the same remaining order
    fresh = sw.PrunedSampler(range(N), seed=1)
    fresh.load_state_dict(sampler_state)
    sampler.set_epoch(1)
    expected_rest = list(sampler)[2 * BATCH :]
    return {
        "log": log,
        "live": {k: s.compute() for k, s in live.items()},
        "resumed": {k: s.compute() for k, s in resumed.items()},
        "sampler_resume_ok": list(fresh) == expected_rest,
        "num_batches": len(loader),
    }


def test_scores_equal_single_process_on_the_same_presentations():
    ranks = run_ddp(_train)
    assert ranks[0]["num_batches"] == ranks[1]["num_batches"]
    # ranks agree bit for bit
    for k in ("el2n", "mis", "forget"):
        assert torch.equal(ranks[0]["live"][k].nan_to_num(-1), ranks[1]["live"][k].nan_to_num(-1))
    # one process replaying every presentation in (step, rank, position) order
    single = _scorers()
    for step in range(len(ranks[0]["log"])):
        for r in ranks:
            idx, logits, y = r["log"][step]
            for s in single.values():
                s.update_indexed(idx, logits, y)
    want = {k: s.compute() for k, s in single.items()}
    torch.testing.assert_close(ranks[0]["live"]["el2n"], want["el2n"], rtol=1e-6, atol=0)
    assert torch.equal(ranks[0]["live"]["mis"], want["mis"])
    assert torch.equal(ranks[0]["live"]["forget"], want["forget"])
    # padding duplicates are presentations: every example was seen
    assert not want["el2n"].isnan().any()
    # a run resumed from per-rank state_dicts mid-epoch finishes with the same scores
    for r in ranks:
        assert r["sampler_resume_ok"]
        for k in ("el2n", "mis", "forget"):
            torch.testing.assert_close(
                r["resumed"][k], r["live"][k], equal_nan=True, rtol=0, atol=0
            )


def _grand_shards(rank, world):
    ds = sw.WithIndex(_data())
    model = _model()
    grand, el2n = sw.GraNd(model, N), sw.EL2N(N)
    sampler = sw.PrunedSampler(range(N), shuffle=False, pad=False)  # exact: no padding
    sw.score_dataset(
        model, DataLoader(ds, batch_size=5, sampler=sampler), grand, el2n, progress=False
    )
    return grand.compute(), el2n.compute(), len(sampler)


def test_grand_split_across_ranks_equals_one_process():
    (g0, e0, n0), (g1, e1, n1) = run_ddp(_grand_shards)
    assert n0 + n1 == N
    assert torch.equal(g0, g1) and torch.equal(e0, e1)
    model, ds = _model(), sw.WithIndex(_data())
    grand, el2n = sw.GraNd(model, N), sw.EL2N(N)
    sw.score_dataset(model, DataLoader(ds, batch_size=8), grand, el2n, progress=False)
    torch.testing.assert_close(g0, grand.compute(), rtol=1e-6, atol=0)
    torch.testing.assert_close(e0, el2n.compute(), rtol=1e-6, atol=0)


def _save_merged(rank, world, path):
    s = sw.EL2N(N)
    s.update_indexed(
        torch.arange(rank, N, world),
        torch.randn(len(range(rank, N, world)), 3),
        torch.zeros(len(range(rank, N, world)), dtype=torch.long),
    )
    scores = s.compute()  # collective
    if rank == 0:
        sw.save_scores(path, scores, scorer="el2n", world_size=world)
    return scores


def test_merged_scores_move_to_another_world_size(tmp_path):
    path = str(tmp_path / "scores.npz")
    scores = run_ddp(_save_merged, path)[0]
    loaded, meta = sw.load_scores(path, num_examples=N)
    assert torch.equal(loaded, scores) and meta["world_size"] == 2
    assert not loaded.isnan().any()
