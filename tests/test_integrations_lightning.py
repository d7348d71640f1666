"""sampleweights.integrations.lightning: in-loop scores, scoring passes, checkpoints, samplers.

Run directly (``torchrun --nproc_per_node 2 tests/test_integrations_lightning.py MODE OUT``) this
file is the 2-process Lightning job the DDP tests launch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import sampleweights as sw  # noqa: E402
from ddp import torchrun  # noqa: E402
from sampleweights.integrations.lightning import ScoringCallback  # noqa: E402

N, D, C = 48, 6, 3


def dataset(n: int = N) -> sw.WithIndex:
    gen = torch.Generator().manual_seed(0)
    return sw.WithIndex(
        TensorDataset(torch.randn(n, D, generator=gen), torch.randint(0, C, (n,), generator=gen))
    )


class Net(pl.LightningModule):
    """A linear classifier whose training_step returns {"loss", "logits"}; ``mirror`` (a scorer)
    is updated by hand in training_step, the reference for the callback's updates."""

    def __init__(self, mirror=None, return_logits: bool = True) -> None:
        super().__init__()
        self.net = torch.nn.Linear(D, C)
        self.mirror = mirror
        self.return_logits = return_logits
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self(x)
        self.seen.append(idx.clone())
        if self.mirror is not None:
            self.mirror.update(batch, logits.detach())
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits} if self.return_logits else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def trainer(tmp_path: Path, epochs: int, callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


def scorers(n: int = N) -> sw.ScorerCollection:
    return sw.ScorerCollection(sw.EL2N(n), sw.ForgettingTracker(n))


def test_callback_updates_like_the_hand_written_loop(tmp_path):
    torch.manual_seed(0)
    cb = ScoringCallback(scorers())
    model = Net(mirror=scorers())
    loader = DataLoader(dataset(), batch_size=8, shuffle=True)
    trainer(tmp_path, 3, [cb]).fit(model, loader)
    got, want = cb.scorer.compute(), model.mirror.compute()
    assert cb.scorer["el2n"].num_updates == 3 * N // 8
    for name in ("el2n", "forgetting"):
        torch.testing.assert_close(got[name], want[name], equal_nan=True)


def test_a_loss_only_training_step_is_an_error_that_names_the_contract(tmp_path):
    cb = ScoringCallback(sw.EL2N(N))
    loader = DataLoader(dataset(), batch_size=8)
    with pytest.raises(ValueError, match=r"return \{'loss': loss, 'logits': logits\}"):
        trainer(tmp_path, 1, [cb]).fit(Net(return_logits=False), loader)
    assert cb.scorer.num_updates == 0


def test_scorers_and_sampler_resume_from_a_lightning_checkpoint(tmp_path):
    """Before: scorers were plain objects, absent from checkpoints (0 updates after a reload)."""
    ds = dataset()
    keep = torch.arange(0, N, 2)

    def run(epochs, ckpt=None):
        torch.manual_seed(0)
        cb = ScoringCallback(scorers())
        sampler = sw.PrunedSampler(keep, seed=3)
        t = trainer(tmp_path, epochs, [cb])
        model = Net()
        t.fit(model, DataLoader(ds, batch_size=8, sampler=sampler), ckpt_path=ckpt)
        return t, cb, model, sampler

    t, _, _, _ = run(2)
    t.save_checkpoint(tmp_path / "two.ckpt")
    _, whole, whole_model, _ = run(4)
    _, resumed, model, sampler = run(4, ckpt=tmp_path / "two.ckpt")
    assert resumed.scorer["el2n"].num_updates == 4 * len(keep) // 8  # not 2 epochs' worth
    for name, scores in whole.scorer.compute().items():
        torch.testing.assert_close(resumed.scorer.compute()[name], scores, equal_nan=True)
    assert sampler.epoch == 3
    # the order continued: the resumed run saw epochs 2 and 3 as the uninterrupted run did
    assert torch.equal(torch.cat(model.seen), torch.cat(whole_model.seen[-len(model.seen) :]))


def test_a_checkpoint_for_another_dataset_or_selection_is_refused(tmp_path):
    ds = dataset()
    cb = ScoringCallback(sw.EL2N(N))
    t = trainer(tmp_path, 1, [cb])
    t.fit(Net(), DataLoader(ds, batch_size=8, sampler=sw.PrunedSampler(range(N))))
    t.save_checkpoint(tmp_path / "a.ckpt")
    other = ScoringCallback(sw.EL2N(N + 1))
    with pytest.raises(sw.StateMismatchError, match="num_examples"):
        trainer(tmp_path, 2, [other]).fit(
            Net(), DataLoader(ds, batch_size=8), ckpt_path=tmp_path / "a.ckpt"
        )
    assert other.scorer.num_updates == 0
    again = ScoringCallback(sw.EL2N(N))
    with pytest.raises(sw.StateMismatchError, match="fingerprint"):
        trainer(tmp_path, 2, [again]).fit(
            Net(),
            DataLoader(ds, batch_size=8, sampler=sw.PrunedSampler(range(N - 1))),
            ckpt_path=tmp_path / "a.ckpt",
        )


def test_score_at_epoch_is_score_dataset_on_that_checkpoint(tmp_path):
    ds = dataset()
    ordered = DataLoader(ds, batch_size=16)
    torch.manual_seed(0)
    cb = ScoringCallback(score_at_epoch=2, score_loader=ordered, score_with=sw.EL2N(N))
    model = Net()
    trainer(tmp_path, 3, [cb]).fit(model, DataLoader(ds, batch_size=8))
    torch.manual_seed(0)
    model2 = Net()
    trainer(tmp_path, 2, []).fit(model2, DataLoader(ds, batch_size=8))
    want = sw.EL2N(N)
    sw.score_dataset(model2, ordered, want, progress=False)
    torch.testing.assert_close(cb.scores, want.compute())
    assert not torch.equal(want.compute(), _el2n_now(model, ordered))  # epoch 3 differs


def _el2n_now(model, loader):
    s = sw.EL2N(N)
    sw.score_dataset(model, loader, s, progress=False)
    return s.compute()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scorer": object()}, "sampleweights scorer"),
        ({"score_at_epoch": 0, "score_loader": [], "score_with": sw.EL2N(2)}, "≥ 1"),
        ({"score_at_epoch": 2}, "go together"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ScoringCallback(**kwargs)


# -- two processes (Lightning's ddp strategy under torchrun, gloo on CPU) ---------------------
def _ddp_job(mode: str, out: Path) -> None:
    """One rank of a 2-process fit over a PrunedSampler of 2/3 of the data: record the indices
    every rank trained on, per epoch, and the merged scores."""
    import torch.distributed as dist

    n = 60
    keep = torch.arange(n)[torch.arange(n) % 3 != 0]  # 40 kept
    ds = dataset(n)
    torch.manual_seed(0)
    cb = ScoringCallback(sw.EL2N(n))
    model = Net()
    t = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=(mode == "wrapped"),
        callbacks=[cb],
    )
    loader = DataLoader(ds, batch_size=4, sampler=sw.PrunedSampler(keep, seed=1))
    try:
        t.fit(model, loader)
    except ValueError as err:
        Path(out, f"error{t.global_rank}.txt").write_text(str(err))
        return
    epochs = torch.stack([torch.cat(model.seen[:5]), torch.cat(model.seen[5:])])  # (2, 20)
    gathered = [torch.empty_like(epochs) for _ in range(2)]
    dist.all_gather(gathered, epochs)
    scores = cb.scorer.compute()  # a collective
    if t.global_rank == 0:
        per_epoch = torch.cat(gathered, dim=1)  # (2, 40): both ranks' items of each epoch
        Path(out, "seen.json").write_text(
            json.dumps(
                {
                    "epochs": per_epoch.tolist(),
                    "keep": keep.tolist(),
                    "scored": int((~scores.isnan()).sum()),
                }
            )
        )


def _torchrun(mode: str, out: Path) -> subprocess.CompletedProcess:
    return torchrun(__file__, mode, str(out), cwd=out)


@pytest.mark.ddp
def test_two_processes_see_every_kept_example_once_per_epoch(tmp_path):
    """Before: Lightning's DistributedSampler split our sampler again: 1/2 of the kept set."""
    proc = _torchrun("own", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    for epoch in seen["epochs"]:
        assert sorted(epoch) == seen["keep"]
    assert seen["epochs"][0] != seen["epochs"][1]  # set_epoch reached the sampler
    assert seen["scored"] == len(seen["keep"])


@pytest.mark.ddp
def test_use_distributed_sampler_true_is_refused_not_halved(tmp_path):
    proc = _torchrun("wrapped", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        text = (tmp_path / f"error{rank}.txt").read_text()
        assert "use_distributed_sampler=False" in text and "split" in text
    assert not (tmp_path / "seen.json").exists()


if __name__ == "__main__":
    _ddp_job(sys.argv[1], Path(sys.argv[2]))
