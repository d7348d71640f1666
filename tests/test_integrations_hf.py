"""sampleweights.integrations.hf: the index through remove_unused_columns, scores and loss weights
in compute_loss, checkpoints, and samplers under accelerate.

Run directly (``torchrun --nproc_per_node 2 tests/test_integrations_hf.py OUT``) this file is the
2-process Trainer job the DDP test launches.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import sampleweights as sw  # noqa: E402
from ddp import torchrun  # noqa: E402
from sampleweights.integrations.hf import (  # noqa: E402
    STATE_FILE,
    ScoringTrainer,
    ScoringTrainerMixin,
)

N, T, V, C = 48, 6, 30, 2


def dataset(n: int = N, index: bool = True):
    """Dict samples of random tokens; the label is whether token 0 is in the upper half."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, V, (n, T), generator=gen)
    labels = (tokens[:, 0] >= V // 2).long()
    rows = [
        {
            "input_ids": tokens[i],
            "attention_mask": torch.ones(T, dtype=torch.long),
            "labels": labels[i],
        }
        for i in range(n)
    ]
    return sw.WithIndex(rows) if index else rows


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=T,
        num_labels=C,
        hidden_dropout_prob=0.0,  # deterministic: a resumed run can equal an uninterrupted one
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def args(out: Path, **kwargs) -> transformers.TrainingArguments:
    defaults = {
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": 8,
        "num_train_epochs": 1,
        "learning_rate": 1e-2,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    return transformers.TrainingArguments(str(out), **{**defaults, **kwargs})


class Recording(ScoringTrainer):
    """Records the indices of every training batch compute_loss receives."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.seen: list[torch.Tensor] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and "index" in inputs:
            self.seen.append(inputs["index"].detach().cpu().clone())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def el2n_of(net: torch.nn.Module, ds) -> torch.Tensor:
    """EL2N of every example under ``net`` as it is now (a plain loop, the reference)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    scorer = sw.EL2N(len(ds))
    sw.score_dataset(net, loader, scorer, progress=False)
    return scorer.compute()


# -- the index through remove_unused_columns --------------------------------------------------
def test_stock_trainer_drops_the_index_column(tmp_path):
    """The friction: with remove_unused_columns=True (the default) the batch has no index."""
    trainer = transformers.Trainer(model(), args(tmp_path), train_dataset=dataset())
    batch = next(iter(trainer.get_train_dataloader()))
    assert "index" not in batch and "input_ids" in batch


def test_every_example_is_scored_with_remove_unused_columns_on(tmp_path):
    """With learning_rate=0 the model never changes: the in-loop EL2N must equal the EL2N of
    the model, example by example (no dropout)."""
    ds = dataset()
    trainer = ScoringTrainer(
        model(), args(tmp_path, learning_rate=0.0), train_dataset=ds, scorer=sw.EL2N(N)
    )
    assert trainer.args.remove_unused_columns
    trainer.train()
    assert trainer.scorer.num_updates == N // 8
    torch.testing.assert_close(trainer.scorer.compute(), el2n_of(trainer.model, ds))


class AuxLossTrainer(transformers.Trainer):
    """A user's own Trainer subclass (as trl's SFTTrainer is): its compute_loss adds a penalty on
    the logits and counts its calls."""

    calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        AuxLossTrainer.calls += 1
        assert "index" not in inputs  # the mixin pops it before the user's code sees it
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        loss = loss + 0.5 * outputs.logits.square().mean()
        return (loss, outputs) if return_outputs else loss


class ScoringAuxLossTrainer(ScoringTrainerMixin, AuxLossTrainer):
    pass


def test_the_mixin_scores_through_a_users_own_trainer_subclass(tmp_path):
    """Before: only ScoringTrainer itself; a user with a Trainer subclass of their own could not
    have both. The mixin scores every example, keeps the index, and the user's loss (with its
    penalty) is the one trained on: the same weights as the user's trainer alone."""
    ds = dataset()
    AuxLossTrainer.calls = 0
    mixed = ScoringAuxLossTrainer(
        model(), args(tmp_path / "a"), train_dataset=ds, scorer=sw.EL2N(N)
    )
    assert mixed.args.remove_unused_columns
    mixed.train()
    assert AuxLossTrainer.calls == N // 8 and mixed.scorer.num_updates == N // 8
    assert not mixed.scorer.compute().isnan().any()
    plain = AuxLossTrainer(model(), args(tmp_path / "b"), train_dataset=dataset(index=False))
    plain.train()
    for p, q in zip(mixed.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    # the penalty mattered: without it the weights differ
    stock = transformers.Trainer(model(), args(tmp_path / "c"), train_dataset=dataset(index=False))
    stock.train()
    assert any(
        not torch.allclose(p, q)
        for p, q in zip(stock.model.parameters(), plain.model.parameters(), strict=True)
    )


def test_the_mixin_without_a_trainer_is_refused():
    class Lonely(ScoringTrainerMixin):
        pass

    with pytest.raises(TypeError, match=r"ScoringTrainerMixin without transformers\.Trainer"):
        Lonely(scorer=sw.EL2N(N))


def test_a_batch_without_index_is_an_error_not_silence(tmp_path):
    trainer = ScoringTrainer(
        model(), args(tmp_path), train_dataset=dataset(index=False), scorer=sw.EL2N(N)
    )
    with pytest.raises(ValueError, match=r"needs `index`.*sw.WithIndex"):
        trainer.train()
    assert trainer.scorer.num_updates == 0


def test_evaluation_is_neither_scored_nor_weighted(tmp_path):
    ds = dataset()
    rw = sw.LossReweighter(torch.linspace(0.1, 5.0, N))
    trainer = ScoringTrainer(
        model(), args(tmp_path), train_dataset=ds, eval_dataset=ds, scorer=sw.EL2N(N), reweighter=rw
    )
    metrics = trainer.evaluate()
    assert trainer.scorer.num_updates == 0
    with torch.no_grad():
        logits = trainer.model.eval()(input_ids=torch.stack([r["input_ids"] for r in ds]))
    want = F.cross_entropy(logits.logits, torch.stack([r["labels"] for r in ds]))
    assert metrics["eval_loss"] == pytest.approx(float(want), rel=1e-4)


# -- loss weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_training_loss_is_the_reweighted_loss(tmp_path, accumulate):
    """The friction: Trainer's loss is the model's mean; JTT's weights need compute_loss. With
    learning_rate=0 the logged training loss is the mean of the weighted batch losses (with
    gradient accumulation too: Trainer divides each by the accumulation steps)."""
    ds = dataset()
    weights = sw.jtt_weights(torch.arange(0, N, 5), N, 6.0)
    keep = torch.arange(N)
    trainer = ScoringTrainer(
        model(),
        args(tmp_path, learning_rate=0.0, gradient_accumulation_steps=accumulate),
        train_dataset=ds,
        reweighter=sw.LossReweighter(weights),
        train_sampler=sw.PrunedSampler(keep, shuffle=False),
    )
    loss = trainer.train().training_loss
    net = trainer.model.eval()
    ids = torch.stack([r["input_ids"] for r in ds])
    labels = torch.stack([r["labels"] for r in ds])
    with torch.no_grad():
        per_example = F.cross_entropy(net(input_ids=ids).logits, labels, reduction="none")
    batches = keep.split(8)
    rw = sw.LossReweighter(weights)
    want = torch.stack([rw(per_example[b], b) for b in batches]).mean()
    assert loss == pytest.approx(float(want), rel=1e-5)
    assert loss != pytest.approx(float(per_example.mean()), rel=1e-3)


# -- checkpoints ------------------------------------------------------------------------------
def scorers(n: int = N) -> sw.ScorerCollection:
    return sw.ScorerCollection(sw.EL2N(n), sw.ForgettingTracker(n))


KEEP = torch.arange(N)[torch.arange(N) % 3 != 0]  # 32 kept: 4 steps of 8 per epoch


def resumable(out: Path, keep=KEEP, **kw) -> Recording:
    return Recording(
        model(),
        args(out, num_train_epochs=3, save_strategy="steps", save_steps=6),
        train_dataset=dataset(),
        scorer=scorers(),
        train_sampler=sw.PrunedSampler(keep, seed=3),
        **kw,
    )


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """Before: the scorers were plain objects, absent from checkpoints, so a resumed run scored
    only the steps after the resume. Step 6 is mid-epoch (epoch 1, step 2)."""
    whole = resumable(tmp_path / "a")
    whole.train()
    ckpt = tmp_path / "a" / "checkpoint-6"
    assert (ckpt / STATE_FILE.format(rank=0)).is_file()
    resumed = resumable(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.scorer["el2n"].num_updates == 12  # not 6
    for name, scores in whole.scorer.compute().items():
        torch.testing.assert_close(resumed.scorer.compute()[name], scores, equal_nan=True)
    # the sampler's order continued: steps 7..12 saw what the uninterrupted run saw
    assert torch.equal(torch.cat(resumed.seen), torch.cat(whole.seen[6:]))
    epochs = torch.cat(whole.seen).view(3, -1)
    assert all(sorted(e.tolist()) == KEEP.tolist() for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])  # set_epoch reached the sampler


def test_a_checkpoint_for_another_selection_or_without_state_is_refused(tmp_path):
    whole = resumable(tmp_path / "a")
    whole.train()
    ckpt = tmp_path / "a" / "checkpoint-6"
    other = resumable(tmp_path / "b", keep=KEEP[1:])
    with pytest.raises(sw.StateMismatchError, match="fingerprint"):
        other.train(resume_from_checkpoint=str(ckpt))
    assert other.scorer["el2n"].num_updates == 0 and other.state.global_step == 0
    (ckpt / STATE_FILE.format(rank=0)).unlink()  # as a plain Trainer's checkpoint
    again = resumable(tmp_path / "c")
    with pytest.raises(sw.StateMismatchError, match="does not exist"):
        again.train(resume_from_checkpoint=str(ckpt))
    assert again.scorer["el2n"].num_updates == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scorer": object()}, TypeError, "sampleweights scorer"),
        ({"reweighter": torch.ones(N)}, TypeError, "LossReweighter"),
        ({"loss_fn": F.cross_entropy}, ValueError, "reweighter="),
        ({"index_key": 0}, TypeError, "index_key"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        ScoringTrainer(model(), args(tmp_path), train_dataset=dataset(), **kwargs)


def test_reweighter_with_label_smoothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing"):
        ScoringTrainer(
            model(),
            args(tmp_path, label_smoothing_factor=0.1),
            train_dataset=dataset(),
            reweighter=sw.LossReweighter(torch.ones(N)),
        )


def test_api_page_names_the_integration_names():
    """The integrations are not re-exported from sampleweights, so the package-wide check of
    docs/api.md does not see them."""
    import sampleweights.integrations.hf as hf

    page = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    names = [f"integrations.hf.{n}" for n in hf.__all__]
    if importlib.util.find_spec("lightning") is not None:
        import sampleweights.integrations.lightning as lightning

        names += [f"integrations.lightning.{n}" for n in lightning.__all__]
    missing = [n for n in names if f"`sampleweights.{n}" not in page]
    assert not missing, f"docs/api.md does not mention {missing}"


# -- two processes (accelerate under torchrun, gloo on CPU) ----------------------------------
DDP_N = 150
DDP_KEEP = [i for i in range(DDP_N) if i % 3 != 0]  # 100 kept; 50 per rank: 7 batches of 8


def _ddp_job(out: Path) -> None:
    """One rank of a 2-epoch run over a PrunedSampler, then of a run resumed from its
    mid-epoch checkpoint (step 10 = epoch 1, step 3): record the indices each trained on."""
    import torch.distributed as dist

    def run(name: str, resume: str | None = None) -> Recording:
        trainer = Recording(
            model(),
            args(out / name, num_train_epochs=2, save_strategy="steps", save_steps=10),
            train_dataset=dataset(DDP_N),
            scorer=sw.EL2N(DDP_N),
            train_sampler=sw.PrunedSampler(torch.tensor(DDP_KEEP), seed=1),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run("whole")
    resumed = run("resumed", resume=str(out / "whole" / "checkpoint-10"))
    seen = [torch.cat(t.seen).tolist() for t in (whole, resumed)]
    gathered: list = [None, None]
    dist.all_gather_object(gathered, seen)
    scores = [t.scorer.compute() for t in (whole, resumed)]  # collectives
    if dist.get_rank() == 0:
        result = {
            "ranks": [g[0] for g in gathered],
            "resumed": [g[1] for g in gathered],
            "scored": int((~scores[0].isnan()).sum()),
            "same_scores": torch.allclose(*scores, rtol=1e-5, atol=1e-7, equal_nan=True),
        }
        Path(out, "seen.json").write_text(json.dumps(result))


@pytest.mark.ddp
def test_two_processes_see_every_kept_example_once_per_epoch(tmp_path):
    """Before: accelerate's BatchSamplerShard split our (already per-rank) sampler again: per
    epoch the ranks saw 64 items, 52 distinct of the 100 kept (every other batch, padded), no
    error. A mid-epoch resume continues each rank's order and scores exactly."""
    proc = torchrun(__file__, str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert [len(r) for r in seen["ranks"]] == [100, 100]  # 2 epochs × 50 per rank
    epochs = [r[e * 50 : (e + 1) * 50] for e in (0, 1) for r in seen["ranks"]]
    for epoch in (epochs[0] + epochs[1], epochs[2] + epochs[3]):
        assert sorted(epoch) == DDP_KEEP
    assert epochs[0] != epochs[2]  # set_epoch reached the sampler
    assert seen["scored"] == len(DDP_KEEP)
    # resumed after 10 batches per rank (epoch 0's 7, holding 50 items, and 3 of 8): the rest of
    # each rank's order, the same scores
    assert seen["resumed"] == [r[74:] for r in seen["ranks"]]
    assert seen["same_scores"]


if __name__ == "__main__":
    import torch.distributed as dist

    _ddp_job(Path(sys.argv[1]))
    dist.destroy_process_group()
