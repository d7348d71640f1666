"""Scorers under a real 2-process gloo group equal a single process on the same presentations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw
from ddp import run_ddp, torchrun

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


# -- runs, out-of-step ranks, a destroyed group, bytes on the wire -------------------------------


def _random_batch(gen, size):
    idx = torch.randint(0, N, (size,), generator=gen)
    return (
        idx,
        torch.randn(size, CLASSES, generator=gen),
        torch.randint(0, CLASSES, (size,), generator=gen),
    )


def _runs(rank, world):
    """Two runs of random presentations; new_run between them; resume mid-run 2."""
    live = _scorers()
    resumed = _scorers()
    log = []
    for run in range(2):
        for group in (live, resumed):
            for s in group.values():
                s.new_run()
        log.append("new_run")
        for step in range(6):
            gen = torch.Generator().manual_seed(1000 * run + 10 * step + rank)
            batch = _random_batch(gen, 3 + rank)  # uneven batch sizes across ranks
            for group in (live, resumed):
                for s in group.values():
                    s.update_indexed(*batch)
            log.append(batch)
            if run == 1 and step == 2:
                saved = {k: s.state_dict() for k, s in resumed.items()}
                resumed = _scorers()
                for k, s in resumed.items():
                    s.load_state_dict(saved[k])
    return {
        "log": log,
        "live": {k: s.compute() for k, s in live.items()},
        "resumed": {k: s.compute() for k, s in resumed.items()},
        "runs": live["forget"].num_runs,
    }


def test_runs_under_ddp_equal_one_process_and_resume_bit_identical():
    ranks = run_ddp(_runs, timeout=60)
    single = _scorers()
    for step in range(len(ranks[0]["log"])):
        for r in ranks:
            entry = r["log"][step]
            for s in single.values():
                if isinstance(entry, str):
                    if r is ranks[0]:
                        s.new_run()
                else:
                    s.update_indexed(*entry)
    assert ranks[0]["runs"] == single["forget"].num_runs == 2
    for k in ("el2n", "mis", "forget"):
        want = single[k].compute()
        for r in ranks:
            torch.testing.assert_close(r["live"][k], want, equal_nan=True, rtol=1e-6, atol=0)
            torch.testing.assert_close(
                r["resumed"][k], r["live"][k], equal_nan=True, rtol=0, atol=0
            )


def _out_of_step(rank, world, scenario):
    tracker = sw.ForgettingTracker(N)
    logits, y = torch.randn(2, CLASSES), torch.zeros(2, dtype=torch.long)
    try:
        if scenario == "extra_update":  # rank 0 makes one update more, then all compute
            for _ in range(3 + (rank == 0)):
                tracker.update_indexed(torch.tensor([rank, rank + 3]), logits, y)
            tracker.compute()
        elif scenario == "skipped_step":  # the last rank skips step 1 of 3
            for step in range(3):
                if not (rank == world - 1 and step == 1):
                    tracker.update_indexed(torch.tensor([rank, rank + 3]), logits, y)
            tracker.compute()
        elif scenario == "uneven_shards":  # pad=False shards of 19 and 18, batches of 6: 4 vs 3
            sampler = sw.PrunedSampler(range(N), shuffle=False, pad=False)
            loader = DataLoader(sw.WithIndex(_data()), batch_size=6, sampler=sampler)
            for x, yb, index in loader:
                tracker.update((x, yb, index), torch.randn(len(index), CLASSES))
            tracker.compute()
        return None
    except sw.DistributedMismatchError as err:
        return str(err)


@pytest.mark.parametrize(
    ("scenario", "world", "fragments"),
    [
        ("extra_update", 2, ["rank 0: update() #4", "rank 1: compute() after 3 update(s)"]),
        ("extra_update", 3, ["rank 0: update() #4", "rank 2: compute() after 3 update(s)"]),
        ("skipped_step", 3, ["rank 1: update() #3", "rank 2: compute() after 2 update(s)"]),
        ("uneven_shards", 2, ["rank 0: update() #4 (run 1, batch of 1)", "rank 1: compute()"]),
    ],
)
def test_unequal_update_counts_fail_fast_on_every_rank(scenario, world, fragments):
    # a short timeout: before the header, this waited for the process-group timeout
    messages = run_ddp(_out_of_step, scenario, world=world, timeout=20)
    for message in messages:
        assert message is not None
        for fragment in fragments:
            assert fragment in message
        assert "empty batch" in message  # says what to do
    # every rank raises, from the same collective, and each message lists every rank
    assert all(f"rank {r}:" in m for m in messages for r in range(world))


def _empty_batch_remedy(rank, world):
    """pad=False shards of unequal batch counts; the short rank presents empty batches."""
    tracker, wrong = sw.ForgettingTracker(N), sw.Misclassified(N)
    sampler = sw.PrunedSampler(range(N), shuffle=False, pad=False)
    loader = DataLoader(sw.WithIndex(_data()), batch_size=6, sampler=sampler)
    gen = torch.Generator().manual_seed(rank)
    batches = [
        (index, torch.randn(len(index), CLASSES, generator=gen), yb) for _, yb, index in loader
    ]
    longest = [torch.tensor(len(batches))]
    torch.distributed.all_reduce(longest[0], op=torch.distributed.ReduceOp.MAX)
    empty = (
        torch.empty(0, dtype=torch.long),
        torch.empty(0, CLASSES),
        torch.empty(0, dtype=torch.long),
    )
    for _epoch in range(2):
        for step in range(int(longest[0])):
            batch = batches[step] if step < len(batches) else empty
            tracker.update_indexed(*batch)
            wrong.update_indexed(*batch)
    return batches, tracker.compute(), wrong.compute()


def test_an_empty_update_keeps_ranks_with_fewer_batches_in_step():
    ranks = run_ddp(_empty_batch_remedy, timeout=20)
    assert len(ranks[0][0]) != len(ranks[1][0])  # really unequal batch counts
    single_t, single_m = sw.ForgettingTracker(N), sw.Misclassified(N)
    for _ in range(2):
        for step in range(max(len(r[0]) for r in ranks)):
            for batches, _, _ in ranks:
                if step < len(batches):
                    single_t.update_indexed(*batches[step])
                    single_m.update_indexed(*batches[step])
    for _, forget, mis in ranks:
        assert torch.equal(forget.nan_to_num(-1), single_t.compute().nan_to_num(-1))
        assert torch.equal(mis.nan_to_num(-1), single_m.compute().nan_to_num(-1))


def _misclassified_skips(rank, world):
    import warnings

    right, bad = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    y = torch.tensor([0])
    # global step 1: rank 1 sees example 0 (right), rank 0 skips; step 2: rank 0 sees example 0
    # (wrong: the true latest), rank 1 sees example 5
    mis = sw.Misclassified(N)
    if rank == 1:
        mis.update_indexed(torch.tensor([0]), right, y)
        mis.update_indexed(torch.tensor([5]), right, y)
    else:
        mis.update_indexed(torch.tensor([0]), bad, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = mis.compute()
    # a pad=False scoring pass: one presentation per example, unequal counts, always exact
    exact = sw.Misclassified(N)
    for i in range(rank, 7 + rank, world):
        exact.update_indexed(torch.tensor([i]), right, y)
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        exact_scores = exact.compute()
    return scores, [str(w.message) for w in caught], exact_scores, [str(w.message) for w in quiet]


def test_misclassified_says_precisely_when_latest_is_ambiguous():
    (scores, caught, exact, quiet), _ = run_ddp(_misclassified_skips, timeout=20)
    # update numbers cannot order example 0's presentations: the warning names it, and only it
    assert len(caught) == 1
    assert "1 example(s)" in caught[0] and "rank 0: 1, rank 1: 2" in caught[0]
    assert scores[5] == 0.0
    # unequal counts but one presentation per example: exact, and no warning (it used to warn)
    assert quiet == [] and not exact[:8].isnan().any()


def _after_destroy(rank, world):
    import torch.distributed as dist

    el2n, mis, forget = sw.EL2N(N), sw.Misclassified(N), sw.ForgettingTracker(N)
    batch = (torch.tensor([rank, 2 + rank]), torch.randn(2, CLASSES), torch.tensor([0, 1]))
    for s in (el2n, mis, forget):
        s.update_indexed(*batch)
    merged = el2n.compute()
    dist.destroy_process_group()
    errors = []
    for s in (el2n, mis):
        try:
            s.compute()
        except RuntimeError as err:
            errors.append(str(err))
    local = el2n.compute(local=True)
    forgetting_ok = torch.equal(
        forget.compute().nan_to_num(-1), forget.compute(local=True).nan_to_num(-1)
    )
    return errors, merged, local, forgetting_ok


def test_compute_after_destroy_process_group_refuses_partial_scores(tmp_path):
    ranks = run_ddp(_after_destroy, timeout=20)
    for rank, (errors, merged, local, forgetting_ok) in enumerate(ranks):
        assert len(errors) == 2
        assert all("destroy_process_group" in e and "local=True" in e for e in errors)
        assert f"rank {rank} of a process group of 2" in errors[0]
        assert (~local.isnan()).sum() == 2 and (~merged.isnan()).sum() == 4
        assert forgetting_ok  # replicated state: complete on every rank


def _wire_bytes(rank, world):
    import sampleweights.distributed as swd

    sent = []
    real = swd.dist.all_gather

    def spy(parts, tensor, group=None):
        sent.append(tensor.numel() * tensor.element_size())
        return real(parts, tensor, group=group)

    swd.dist.all_gather = spy
    tracker = sw.ForgettingTracker(1000)
    tracker.update_indexed(
        torch.arange(64), torch.randn(64, CLASSES), torch.zeros(64, dtype=torch.long)
    )
    swd.dist.all_gather = real
    return sent


def test_forgetting_exchange_sends_4_bytes_per_example():
    sent, _ = run_ddp(_wire_bytes, timeout=20)
    header, data = sent  # one header (6 int64), one data gather: no separate length gather
    assert header == 48
    assert data / 64 == 4  # index and correctness packed into one int32 (was 16 bytes)


def _load_other_rank(rank, world):
    el2n, forget = sw.EL2N(N), sw.ForgettingTracker(N)
    for s in (el2n, forget):
        s.update_indexed(torch.tensor([rank]), torch.randn(1, CLASSES), torch.tensor([0]))
    states = [None] * world
    torch.distributed.all_gather_object(states, (el2n.state_dict(), forget.state_dict()))
    other = states[1 - rank]
    try:
        sw.EL2N(N).load_state_dict(other[0])
        el2n_error = None
    except sw.StateMismatchError as err:
        el2n_error = str(err)
    replica = sw.ForgettingTracker(N)
    replica.load_state_dict(other[1])  # replicated state: the same on every rank
    return el2n_error, torch.equal(
        replica.compute().nan_to_num(-1), forget.compute().nan_to_num(-1)
    )


def test_per_rank_state_of_another_rank_is_refused():
    for rank, (error, replica_ok) in enumerate(run_ddp(_load_other_rank, timeout=20)):
        assert error is not None and f"rank {1 - rank} of a process group of 2" in error
        assert replica_ok


def test_ddp_recipe_runs_under_torchrun(tmp_path):
    """docs/recipes/ddp.md's script, unchanged, under `torchrun --nproc_per_node 2`."""
    import re
    from pathlib import Path

    recipe = (Path(__file__).resolve().parents[1] / "docs/recipes/ddp.md").read_text()
    (script,) = re.findall(r"^```python\n(.*?)^```", recipe, re.S | re.M)
    (tmp_path / "ddp_scores.py").write_text(script)
    done = torchrun("ddp_scores.py", cwd=tmp_path, timeout=240, standalone=True)
    assert done.returncode == 0, done.stderr[-3000:]
    scores, meta = sw.load_scores(str(tmp_path / "el2n.npz"))
    assert meta["world_size"] == 2 and not scores.isnan().any()
