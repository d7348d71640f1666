"""Hugging Face ``Trainer``: scores and loss weights in ``compute_loss``, samplers kept whole.

``pip install "sampleweights[hf]"``. One ``Trainer`` subclass, :class:`ScoringTrainer`, removes
three frictions of using sampleweights with a stock ``transformers.Trainer`` (for a ``Trainer``
subclass of your own, :class:`ScoringTrainerMixin` adds the same to it):

* **The index survives ``remove_unused_columns``.** With its default
  ``remove_unused_columns=True``, ``Trainer`` drops every batch key that the model's ``forward``
  does not name, so the ``"index"`` added by :class:`~sampleweights.WithIndex` never reaches
  ``compute_loss`` and nothing can be scored, without any error. ``ScoringTrainer`` adds the
  index key to the columns it keeps, pops it in ``compute_loss`` (the model never sees it) and
  raises if a training batch arrives without it.
* **Scores and loss weights in ``compute_loss``.** After the forward, the scorer (``sw.EL2N(n)``,
  ``sw.ForgettingTracker(n)``, a :class:`~sampleweights.ScorerCollection`…) is updated with the
  batch's logits and ``labels``; with ``reweighter=sw.LossReweighter(w)`` (JTT's loss-weight
  variant) the loss is ``reweighter(loss_fn(logits, labels), index)`` instead of the model's
  mean loss. Evaluation batches are neither scored nor weighted.
* **Our samplers are not split twice.** ``train_sampler=sw.PrunedSampler(...)`` (or
  ``UpsampleSampler``, ``JTTSampler``) becomes the training loader's sampler. Under accelerate
  with several processes, ``accelerator.prepare`` wraps every map-style loader's batches in a
  ``BatchSamplerShard`` that gives each process every R-th batch, so a sampler that already
  yields only this rank's share is split again and the ranks together see about ``1/R`` of the
  selection, without any error. ``ScoringTrainer`` makes that wrapper a passthrough (as
  ``transformers`` itself does for its rank-aware ``BatchRebalanceSampler``), and refuses
  loaders it cannot make whole (``dispatch_batches=True``). The sampler's epoch is set at every
  epoch start, also on a mid-epoch resume, where accelerate's batch skipping hides the sampler
  from ``set_epoch``.

**Checkpoints carry the scorer.** On every save each rank writes its scorer's ``state_dict``
(per-rank sums, with the scorer's provenance: scorer, ``num_examples``, world size, rank) and its
sampler's state to ``checkpoint-{step}/sampleweights_rank{r}.pt`` (as ``Trainer`` writes
``rng_state_{r}.pth``); ``train(resume_from_checkpoint=...)`` loads them back before training
continues, refusing a checkpoint written by another number of processes, for other scorers or
another selection. The sampler's position needs no restoring: ``Trainer`` replays the epoch's
order (a function of seed and epoch) and skips the batches already trained.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sampleweights.data import logits_of
from sampleweights.distributed import world
from sampleweights.errors import StateMismatchError
from sampleweights.integrations._state import AnyScorer, check_scorer, is_sw_sampler, to_cpu
from sampleweights.reweight import LossReweighter
from sampleweights.scorers.collection import ScorerCollection

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sampleweights.integrations.hf needs Hugging Face transformers and accelerate: "
        'pip install "sampleweights[hf]".'
    ) from err

# the mixin's methods extend Trainer's: type-check them as a Trainer subclass, build it on object
if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object

__all__ = ["STATE_FILE", "ScoringTrainer", "ScoringTrainerMixin"]

#: the per-rank state file in a checkpoint folder (``{rank}`` is the process index)
STATE_FILE = "sampleweights_rank{rank}.pt"
_FORMAT = 1


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example cross-entropy of ``(B, C)`` logits, in float32."""
    if logits.dim() != 2:
        raise ValueError(
            f"The default loss_fn takes (B, C) classification logits, but the model returned "
            f"logits of shape {tuple(logits.shape)}: pass loss_fn=lambda logits, labels: ... "
            "returning one loss per example, shape (B,)."
        )
    return F.cross_entropy(logits.float(), labels, reduction="none")


class _SamplerEpochAndState(TrainerCallback):
    """ScoringTrainer's own callback: the sampler's epoch at each epoch start, the per-rank state
    file at each save."""

    def __init__(self, trainer: ScoringTrainerMixin) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sampler = self.trainer.train_sampler
        if sampler is not None and hasattr(sampler, "set_epoch"):
            # state.epoch is e + steps/steps_in_epoch: e at an epoch start, e + f mid-epoch
            sampler.set_epoch(int(state.epoch + 1e-9))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise RuntimeError(
                f"ScoringTrainer expected the checkpoint folder {folder} that Trainer just saved, "
                "but it does not exist (a hyperparameter search writes its checkpoints "
                "elsewhere): save the scorer with scorer.state_dict() yourself in that case."
            )
        self.trainer.save_scoring_state(folder)


class ScoringTrainerMixin(_TrainerBase):
    """What :class:`ScoringTrainer` adds to ``transformers.Trainer``, for a ``Trainer`` subclass
    of your own (trl's ``SFTTrainer``, a custom ``compute_loss``): put it first among the bases,
    ``class MyScoringTrainer(ScoringTrainerMixin, MyTrainer)``, and build it with
    :class:`ScoringTrainer`'s keyword arguments. Its ``compute_loss`` calls your class's
    ``compute_loss`` (``super()``) with the index key removed and reads the logits from the
    outputs, so your loss is the training loss (unless ``reweighter`` replaces it).

    Raises:
        TypeError: the class does not derive from ``transformers.Trainer`` too.

    Example:
        >>> from transformers import Trainer
        >>> from sampleweights.integrations.hf import ScoringTrainerMixin
        >>> class AuxLossTrainer(Trainer):      # your own Trainer subclass
        ...     def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        ...         return super().compute_loss(model, inputs, return_outputs, **kwargs)
        >>> class ScoringAuxLossTrainer(ScoringTrainerMixin, AuxLossTrainer):
        ...     pass                            # takes scorer=, reweighter=, train_sampler=, ...
    """

    def __init__(
        self,
        *args: Any,
        scorer: AnyScorer | None = None,
        reweighter: LossReweighter | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        train_sampler: Any = None,
        index_key: str = "index",
        label_key: str = "labels",
        shift_labels: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if scorer is not None:
            check_scorer(scorer, "scorer")
        if reweighter is not None and not isinstance(reweighter, LossReweighter):
            raise TypeError(
                f"Expected `reweighter` to be a sw.LossReweighter (e.g. "
                f"sw.LossReweighter(sw.jtt_weights(errors, n, upweight))), but got "
                f"{type(reweighter).__name__}."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"Expected `loss_fn` to be callable (logits, labels) -> per-example losses (B,), "
                f"but got {type(loss_fn).__name__}."
            )
        if loss_fn is not None and reweighter is None:
            raise ValueError(
                "`loss_fn` gives the per-example losses that `reweighter` weights: pass "
                "reweighter=sw.LossReweighter(weights) with it, or drop loss_fn."
            )
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise TypeError(
                f"Expected `shift_labels` to be True, False or None (decide from the model), but "
                f"got {type(shift_labels).__name__}."
            )
        for name, key in (("index_key", index_key), ("label_key", label_key)):
            if not isinstance(key, str):
                raise TypeError(
                    f"Expected `{name}` to be a str (a key of the batch dict), but got "
                    f"{type(key).__name__}."
                )
        if not isinstance(self, Trainer):
            raise TypeError(
                f"{type(self).__name__} uses ScoringTrainerMixin without transformers.Trainer "
                "among its bases: class MyScoringTrainer(ScoringTrainerMixin, MyTrainer), where "
                "MyTrainer derives from transformers.Trainer."
            )
        super().__init__(*args, **kwargs)
        if reweighter is not None:
            if self.compute_loss_func is not None:
                raise ValueError(
                    "`reweighter` weights per-example losses, but `compute_loss_func` returns "
                    "one reduced loss: pass loss_fn=(logits, labels) -> (B,) losses instead."
                )
            if self.label_smoother is not None:
                raise ValueError(
                    f"`reweighter` replaces Trainer's loss, so label_smoothing_factor="
                    f"{self.args.label_smoothing_factor} would be ignored: pass loss_fn="
                    "lambda logits, labels: F.cross_entropy(logits, labels, reduction='none', "
                    "label_smoothing=...) and label_smoothing_factor=0."
                )
            # the weighted loss is a per-batch mean: Trainer divides it by the accumulation steps
            self.loss_is_scaled_for_ga = False
            self.model_accepts_loss_kwargs = False
        self.scorer = scorer
        self.reweighter = reweighter
        self.loss_fn = loss_fn if loss_fn is not None else _cross_entropy
        self.train_sampler = train_sampler
        self.index_key = index_key
        self.label_key = label_key
        self.shift_labels = shift_labels
        self.add_callback(_SamplerEpochAndState(self))

    # -- the index through remove_unused_columns ---------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        columns: Any = self._signature_columns  # the keys RemoveColumnsCollator keeps
        if columns is not None and self.index_key not in columns:
            columns.append(self.index_key)

    # -- samplers ---------------------------------------------------------------------------------
    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(*args, **kwargs)

    def get_train_dataloader(self) -> Any:
        """``Trainer``'s training loader, with accelerate's per-process split undone for a
        sampler of ours that splits by rank itself.

        Raises:
            ValueError: accelerate dispatches batches from rank 0 (``dispatch_batches=True``),
                which would split our sampler's share again.
        """
        loader = super().get_train_dataloader()
        sampler = self.train_sampler
        if is_sw_sampler(sampler) and sampler.num_replicas > 1:
            _undo_accelerate_split(loader, sampler)
        return loader

    # -- scores and loss weights ------------------------------------------------------------------
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """``Trainer.compute_loss`` without the index key; in training, also update the scorer
        with the logits and weight the loss with ``reweighter``.

        Raises:
            ValueError: a training batch has no index key (or no ``labels``) while a scorer or
                reweighter needs it.
        """
        training = model.training and (self.scorer is not None or self.reweighter is not None)
        if self.index_key not in inputs or self.label_key not in inputs:
            if training:
                missing = self.index_key if self.index_key not in inputs else self.label_key
                raise ValueError(
                    f"ScoringTrainer needs `{missing}` in every training batch, but the batch "
                    f"has keys {sorted(inputs)}: build the training set as sw.WithIndex(dataset) "
                    f"over dict samples with '{self.label_key}' (or pass index_key=/label_key=)."
                )
            inputs = {k: v for k, v in inputs.items() if k != self.index_key}
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inputs = dict(inputs)
        index = inputs.pop(self.index_key)
        if not training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs[self.label_key]
        if self.reweighter is None:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            logits = logits_of(outputs)
        else:
            outputs = model(**{k: v for k, v in inputs.items() if k != self.label_key})
            logits = logits_of(outputs)
            loss = self.reweighter(self.loss_fn(logits, labels), index)
        if self.scorer is not None:
            if logits.dim() == 3 and labels.dim() == 2:
                labels = self._token_targets(model, labels)
            self.scorer.update_indexed(index, logits.detach(), labels)
        return (loss, outputs) if return_outputs else loss

    def _token_targets(self, model: torch.nn.Module, labels: Tensor) -> Tensor:
        """The scorer's ``(B, T)`` targets for ``(B, T, C)`` logits: a causal LM's ``logits[t]``
        predict ``labels[t + 1]`` (the model shifts its labels inside, so the batch holds them
        unshifted): shifted left, the last position ignored. Other models' are aligned."""
        if not self._shifts(model):
            return labels
        ignore = _ignore_index(self.scorer)
        return F.pad(labels[:, 1:], (0, 1), value=ignore)

    def _shifts(self, model: torch.nn.Module) -> bool:
        if self.shift_labels is not None:
            return self.shift_labels
        from transformers.models.auto import modeling_auto

        inner = model
        while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
            inner = inner.module  # DDP / accelerate wrappers
        name = type(inner).__name__
        if name in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            return True
        aligned = (
            modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
            modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
            modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        )
        if any(name in names.values() for names in aligned):
            return False
        raise ValueError(
            f"{type(self).__name__} cannot tell whether {name}'s (B, T, C) logits predict the "
            "next token (a causal LM, whose labels are shifted inside the model) or their own "
            "position (token classification, masked or seq2seq LM): pass shift_labels=True for "
            "the first, False for the second."
        )

    # -- checkpoints ------------------------------------------------------------------------------
    def save_scoring_state(self, folder: str) -> str:
        """Write this rank's scorer and sampler state to ``folder/sampleweights_rank{r}.pt``
        (called on every rank at each checkpoint); returns the path."""
        size, rank = world()
        state = {
            "format": _FORMAT,
            "world_size": size,
            "rank": rank,
            "scorer": None if self.scorer is None else to_cpu(self.scorer.state_dict()),
            "sampler": self.train_sampler.state_dict()
            if is_sw_sampler(self.train_sampler)
            else None,
        }
        path = os.path.join(folder, STATE_FILE.format(rank=rank))
        torch.save(state, path)
        return path

    def load_scoring_state(self, folder: str) -> None:
        """Restore this rank's scorer from ``folder`` (a checkpoint of a ScoringTrainer run) and
        check that the training sampler is the saved run's.

        Raises:
            StateMismatchError: the folder has no state for this rank, was written by another
                number of processes, holds no (or another) scorer, or the sampler's selection,
                seed or settings differ; nothing changes.
        """
        size, rank = world()
        path = os.path.join(folder, STATE_FILE.format(rank=rank))
        if not os.path.isfile(path):
            raise StateMismatchError(
                f"Cannot resume the scorer: {path} does not exist (the checkpoint was written by "
                f"a plain Trainer, or by fewer than {size} processes). Resume from a "
                "ScoringTrainer checkpoint with the same number of processes."
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if (
            not isinstance(saved, dict)
            or saved.get("format") != _FORMAT
            or not {"world_size", "rank", "scorer", "sampler"} <= set(saved)
        ):
            raise StateMismatchError(f"{path} is not a sampleweights ScoringTrainer state file.")
        if saved["world_size"] != size:
            raise StateMismatchError(
                f"The scorer state in {folder} was saved by {saved['world_size']} process(es); "
                f"this run has {size}. Per-rank scorer state resumes only in a job of the same "
                "size: resume with the same number of processes."
            )
        for name, ours, theirs in (
            ("scorer", self.scorer, saved["scorer"]),
            ("train_sampler", self.train_sampler, saved["sampler"]),
        ):
            has = ours is not None and (name == "scorer" or is_sw_sampler(ours))
            if has != (theirs is not None):
                raise StateMismatchError(
                    f"The checkpoint {'has' if theirs is not None else 'has no'} `{name}` state "
                    f"of sampleweights, but this ScoringTrainer {'has' if has else 'has no'} "
                    f"`{name}`: build the trainer as in the saved run."
                )
        if saved["sampler"] is not None:
            # the checks only (selection, seed, settings, world); Trainer replays the position
            copy.deepcopy(self.train_sampler).load_state_dict(saved["sampler"])
        if self.scorer is not None:
            self.scorer.load_state_dict(saved["scorer"])

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; resuming from a checkpoint also restores the scorer (see
        :meth:`load_scoring_state`)."""
        if resume_from_checkpoint is True:
            found = get_last_checkpoint(self.args.output_dir)  # type: ignore[no-untyped-call]
            resume_from_checkpoint = found if found is not None else True  # Trainer's own error
        if isinstance(resume_from_checkpoint, str) and (
            self.scorer is not None or is_sw_sampler(self.train_sampler)
        ):
            self.load_scoring_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)


class ScoringTrainer(ScoringTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that scores examples, weights their loss and keeps our samplers.

    Use it as ``Trainer`` (same positional and keyword arguments) with a training set over
    :class:`~sampleweights.WithIndex` whose samples are dicts (``{"input_ids": …, "labels": …,
    "index": i}``), plus the keyword-only arguments below. The model's output must carry
    ``logits`` (``(B, C)`` for the default ``loss_fn``).

    Args:
        scorer: a logit scorer or a :class:`~sampleweights.ScorerCollection`, updated in every
            training ``compute_loss`` with ``update_indexed(index, logits, labels)``; None for
            none. Per rank under several processes; ``compute()`` merges (a collective).
        reweighter: a :class:`~sampleweights.LossReweighter`; the training loss becomes
            ``reweighter(loss_fn(logits, labels), index)``. None: the model's own loss.
        loss_fn: ``loss_fn(logits, labels) -> (B,)`` per-example losses for ``reweighter``
            (default: float32 cross-entropy of ``(B, C)`` logits).
        train_sampler: the training loader's sampler (``sw.PrunedSampler(keep)``,
            ``sw.JTTSampler(...)``…); None: ``Trainer``'s own.
        index_key: the batch key of the dataset indices (``WithIndex``'s default ``"index"``).
        label_key: the batch key of the targets (``"labels"``, as HF models name it).
        shift_labels: for ``(B, T, C)`` logits, whether ``logits[t]`` predicts ``labels[t + 1]``
            (a causal LM, which shifts its unshifted labels inside): the scorer then gets the
            labels shifted left with the last position ignored. None (default): True for the
            model classes of ``AutoModelForCausalLM``, False for token classification, masked
            and seq2seq LMs, and an error for any other model with ``(B, T, C)`` logits.

    Raises:
        TypeError: ``scorer`` is not a logit scorer, ``reweighter`` not a ``LossReweighter``,
            ``loss_fn`` not callable, or a key not a str.
        ValueError: ``loss_fn`` without ``reweighter``; ``reweighter`` together with
            ``compute_loss_func`` or label smoothing (pass a ``loss_fn`` that smooths).

    Example:
        >>> import tempfile, torch, sampleweights as sw
        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> from sampleweights.integrations.hf import ScoringTrainer
        >>> cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
        ...                  num_attention_heads=2, intermediate_size=8, num_labels=2)
        >>> ds = sw.WithIndex([{"input_ids": torch.arange(4), "labels": i % 2} for i in range(6)])
        >>> args = TrainingArguments(tempfile.mkdtemp(), use_cpu=True, report_to=[],
        ...                          num_train_epochs=1, per_device_train_batch_size=3,
        ...                          save_strategy="no")
        >>> trainer = ScoringTrainer(BertForSequenceClassification(cfg), args, train_dataset=ds,
        ...                          scorer=sw.EL2N(len(ds)))
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> bool(trainer.scorer.compute().isnan().any())   # every example scored
        False
    """


def _ignore_index(scorer: AnyScorer | None) -> int:
    """The ignored-target id of a scorer or of a collection's scorers (they share one)."""
    first = next(iter(scorer)) if isinstance(scorer, ScorerCollection) else scorer
    return -100 if first is None else int(first.ignore_index)


def _undo_accelerate_split(loader: Any, sampler: Any) -> None:
    """Make accelerate's ``BatchSamplerShard`` over ``sampler`` a passthrough, in place."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher

    if isinstance(loader, DataLoaderDispatcher):
        raise ValueError(
            f"accelerate dispatches the training batches from rank 0 (dispatch_batches=True), "
            f"which would split the {type(sampler).__name__} (already this rank's "
            f"1/{sampler.num_replicas} of the epoch) again: leave dispatch_batches unset for a "
            "map-style dataset."
        )
    shard = getattr(loader, "batch_sampler", None)
    if not isinstance(shard, BatchSamplerShard):
        return  # one process: accelerate left the loader's batches alone
    inner = getattr(shard.batch_sampler, "sampler", None)
    if inner is not sampler:
        raise ValueError(
            f"accelerate wrapped the training loader in a way sampleweights does not recognise "
            f"(expected BatchSamplerShard over a BatchSampler of the {type(sampler).__name__}, "
            f"got {type(shard.batch_sampler).__name__}): the epoch could be split twice. Build "
            f"the sampler with num_replicas=1 to let accelerate do the only split."
        )
    # every process reads all of its own batches; the last, short one too (not padded from
    # the epoch's start, which even_batches would do)
    shard.num_processes = 1
    shard.process_index = 0
    shard.split_batches = False
    shard.even_batches = False
