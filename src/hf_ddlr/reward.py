"""TRL: :class:`MetaRewardTrainer`, ``trl.RewardTrainer`` with a learning-rate multiplier per preference pair.

Preference data is labelled by people, and people disagree: a share of the pairs has ``chosen`` and ``rejected``
the wrong way round. ``MetaRewardTrainer(WeightedTRLLoss, MetaLRTrainer, RewardTrainer)`` learns one rate per
pair by :class:`~hf_ddlr.MetaLRTrainer`'s meta step on a small set of pairs whose order is trusted; the pairs
whose gradient disagrees with that set train slower. The method resolution order is MetaRewardTrainer →
WeightedTRLLoss (the ``compute_loss`` the TRL trainers share) → MetaLRTrainer → RewardTrainer →
transformers.Trainer:

- data: ``RewardTrainer.__init__`` prepares the train set (EOS, tokenisation into ``chosen_ids`` /
  ``rejected_ids``, the ``max_length`` filter); the index column that keys each pair's rate is added before that
  and carried by its ``map`` / ``filter``. The meta set is prepared by the same ``RewardTrainer._prepare_dataset``.
  Both get a ``labels`` column, the pair's ``margin`` (0 without), which the meta step reads as the pair's target.
- loss: while training with rates, ``compute_loss`` is MetaLRTrainer's weighted per-pair loss
  ``Σ e_i ℓ_i / pairs`` with ``ℓ_i = −log σ(r_chosen − r_rejected − margin) [+ center·(r_chosen + r_rejected)²]``
  (:func:`hf_ddlr.meta.losses.preference_loss`): at rates 1, RewardTrainer's loss. Its training metrics (rewards,
  accuracy, margin, tokens) are computed from the same rewards. Evaluation, and a run without a meta set, are
  RewardTrainer's own.
- a pair spans two rows of the model's batch (TRL's collator stacks the chosen rows, then the rejected ones): the
  per-layer products add each pair's two rows (:class:`~hf_ddlr.meta.layerwise.LayerTape`'s ``rows_per_example``).

Import it as ``from hf_ddlr import MetaRewardTrainer`` (loaded on first use, so hf_ddlr does not require TRL).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from ._trl_version import require_trl

try:
    from trl import RewardConfig, RewardTrainer
except ImportError as err:  # pragma: no cover - depends on the environment
    require_trl(err)  # missing, too old or broken: the message names the fix
    raise

from .config import MetaLROptions
from .meta import TaskLoss
from .meta.losses import preference_task
from .trainer import MetaLRTrainer
from .trl import (
    PAIR_TEXT_COLUMNS,
    TARGET,
    IndexCollator,
    WeightedTRLLoss,
    as_trl_config,
    check_meta_rows,
    check_prepared_index,
    check_prepared_meta,
    with_target_column,
)

logger = logging.get_logger(__name__)

__all__ = ["MetaRewardConfig", "MetaRewardTrainer"]


@dataclass
class MetaRewardConfig(MetaLROptions, RewardConfig):
    """``trl.RewardConfig`` plus the meta options of :class:`~hf_ddlr.config.MetaLROptions` as fields (and, with
    ``HfArgumentParser``, as command-line flags)."""


class _PreferenceCollator(IndexCollator):
    """TRL's ``DataCollatorForPreference`` keeps the token columns and ``margin`` only. For training and meta
    batches (rows with the ``labels`` column this trainer adds) each pair's margin goes into ``labels`` (the model
    never sees ``margin``), with the index column; evaluation batches are TRL's own."""

    marker = TARGET

    def add_targets(self, batch: dict[str, Any], features: Sequence[Mapping[str, Any]]) -> None:
        batch.pop("margin", None)
        batch[TARGET] = torch.as_tensor([float(f[TARGET]) for f in features], dtype=torch.float32)


def _with_targets(dataset: Any, name: str) -> Any:
    """``dataset`` with a ``labels`` column: each pair's ``margin``, 0 without one."""
    def margins(ds: Any) -> list[float]:
        return [float(m) for m in ds["margin"]] if "margin" in ds.column_names else [0.0] * len(ds)

    return with_target_column(dataset, name, "MetaRewardTrainer", margins,
                              "'chosen' / 'rejected' (and an optional 'margin')")


class MetaRewardTrainer(WeightedTRLLoss, MetaLRTrainer, RewardTrainer):
    """``trl.RewardTrainer`` that learns a learning-rate multiplier per preference pair (and optionally the weight
    decay) by :class:`~hf_ddlr.MetaLRTrainer`'s meta step on ``meta_dataset``, a small set of pairs whose order is
    trusted.

    Args:
        model (`PreTrainedModel` or `str`): the reward model (a sequence classifier with ``num_labels=1``), or its
            name, loaded by ``RewardTrainer``.
        args (`RewardConfig`, *optional*): a :class:`MetaRewardConfig` (the meta options as fields), a plain
            ``RewardConfig`` (meta options at their defaults), or another ``TrainingArguments`` (converted to a
            ``MetaRewardConfig``, keeping its meta options).
        **kwargs: everything else, by keyword (MetaLRTrainer's and RewardTrainer's positional orders differ):
            ``train_dataset``, ``eval_dataset``, ``data_collator``, ``processing_class``, ``peft_config``, ...
            as for ``RewardTrainer`` (``chosen`` / ``rejected`` rows, with ``prompt`` or conversational, or
            tokenised as ``chosen_ids`` / ``rejected_ids``; optional ``margin``), the rates indexed by the rows of
            ``train_dataset`` as given; ``meta_dataset``, the trusted pairs in the train set's format, prepared
            like it.

    Example:

    ```python
    from hf_ddlr import MetaRewardConfig, MetaRewardTrainer

    args = MetaRewardConfig(output_dir="rm", learning_rate=5e-5, num_train_epochs=2)
    trainer = MetaRewardTrainer(model=model, args=args, train_dataset=pairs, meta_dataset=trusted_pairs,
                                processing_class=tokenizer)
    trainer.train()
    trainer.rates.instance  # one multiplier per pair of `pairs`: low for pairs the trusted ones contradict
    ```
    """

    _optional_meta_columns = ("margin",)  # optional in RewardTrainer: a trusted pair without one has margin 0

    target_column = TARGET  # each pair's margin, kept by the Trainer's column removal

    def __init__(self, model: torch.nn.Module | str, args: TrainingArguments | None = None, **kwargs: Any) -> None:
        super().__init__(model=model, args=as_trl_config(args, RewardConfig, MetaRewardConfig), **kwargs)
        if self._meta_active:
            self.data_collator = _PreferenceCollator(self.data_collator, self.meta_args.index_column)
            self.train_dataset = _with_targets(self.train_dataset, "train")
            check_prepared_index(self, f"a chosen or rejected answer longer than max_length={self.args.max_length}")

    def _resolve_task(self, model: torch.nn.Module | str | None, train_dataset: Any) -> TaskLoss:
        """The pairs' Bradley-Terry loss, with RewardTrainer's ``center_rewards_coefficient``."""
        args = getattr(self, "args", None)  # (None while MetaLRTrainer.__init__ checks the sets: resolved again)
        return preference_task(getattr(args, "center_rewards_coefficient", None) or 0.0)

    def _prepare_meta_dataset(self, meta_dataset: Any) -> Any:
        """The trusted pairs prepared as ``RewardTrainer`` prepared the train set, with their margins as targets."""
        check_meta_rows(self._source_train_dataset, meta_dataset, PAIR_TEXT_COLUMNS)
        prepared = self._prepare_dataset(meta_dataset, self.processing_class, self.args, "meta")
        check_prepared_meta(self, meta_dataset, prepared,
                            f"a chosen or rejected answer longer than max_length={self.args.max_length}")
        return _with_targets(prepared, "meta")

    @torch.no_grad()
    def _record_train_metrics(self, logits: torch.Tensor, inputs: Mapping[str, Any]) -> None:
        """``min/mean/max_reward``, ``accuracy``, ``margin`` and ``num_tokens`` as RewardTrainer logs them."""
        gather, metrics = self.accelerator.gather_for_metrics, self._metrics["train"]
        rewards = self.accelerator.gather(logits)
        chosen, rejected = torch.chunk(logits.squeeze(-1), chunks=2)
        metrics["min_reward"].append(rewards.min().item())
        metrics["mean_reward"].append(rewards.mean().item())
        metrics["max_reward"].append(rewards.max().item())
        metrics["accuracy"].append(gather((chosen > rejected).float().mean()).mean().item())
        metrics["margin"].append(gather((chosen - rejected).mean()).mean().item())
        self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
