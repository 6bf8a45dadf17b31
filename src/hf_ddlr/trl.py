"""TRL: :class:`MetaSFTTrainer`, ``trl.SFTTrainer`` with per-example learning rates, and :class:`MetaSFTConfig`.

``MetaSFTTrainer(WeightedTRLLoss, MetaLRTrainer, SFTTrainer)``: the meta step and the weighted loss are
:class:`~hf_ddlr.MetaLRTrainer`'s, the data preparation is ``SFTTrainer``'s. The method resolution order is
MetaSFTTrainer → WeightedTRLLoss (the ``compute_loss`` the TRL trainers share) → MetaLRTrainer → SFTTrainer →
transformers.Trainer, so every hook MetaLRTrainer overrides
(``training_step``, ``compute_loss``, ``log``, ``prediction_step``, ...) runs first and hands on to SFTTrainer's
through ``super()``:

- data: ``SFTTrainer.__init__`` prepares the train set (conversational → chat template, tokenisation,
  ``completion_only_loss`` / ``assistant_only_loss`` labels with -100 on the other tokens, truncation to
  ``max_length``). The index column that keys each example's rate is added to the train set as given, before
  that preparation, and its ``map``/``filter``/``shuffle`` calls carry it; TRL's collator keeps only the columns
  it knows, so the collator is wrapped to carry it into the batch. The meta set is prepared by the same
  ``SFTTrainer._prepare_dataset`` (same template, masking and truncation; never packed).
- loss: while training with rates, ``compute_loss`` is MetaLRTrainer's weighted per-example causal-LM loss
  (``Σ e_i ℓ_i / Σ target tokens``, prompt tokens masked to -100 count for nothing), computed from the model's
  full logits; ``SFTTrainer``'s fused LM head is not used for that loss. SFT's training metrics
  (``entropy``, ``mean_token_accuracy``, ``num_tokens``) are computed from the same logits, so they are logged as
  by ``SFTTrainer``. Evaluation, and a run without a meta set, are ``SFTTrainer``'s own.
- refused with rates: ``packing`` and ``padding_free`` (a row, or a batch row, would hold several examples),
  ``loss_type='dft'`` (the weighted loss is the NLL), a model given by name (load it first).

Import it as ``from hf_ddlr import MetaSFTTrainer`` (loaded on first use, so hf_ddlr does not require TRL).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from transformers import TrainingArguments
from transformers.utils import logging

from ._trl_version import require_trl

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - depends on the environment
    require_trl(err)  # missing, too old or broken: the message names the fix
    raise

from .config import MetaLROptions, resolve_meta_options
from .meta.passes import extract_logits
from .trainer import MetaLRTrainer

require_trl()  # an older TRL imports, and would fail later and less clearly
logger = logging.get_logger(__name__)

__all__ = ["MetaSFTConfig", "MetaSFTTrainer"]

TARGET = "labels"  # the preference trainers' column (and batch key) of each pair's targets for the meta step


@dataclass
class MetaSFTConfig(MetaLROptions, SFTConfig):
    """``trl.SFTConfig`` plus the meta options of :class:`~hf_ddlr.config.MetaLROptions` as fields (and, with
    ``HfArgumentParser``, as command-line flags). ``packing`` and ``padding_free`` must stay False when rates
    are learned or replayed."""


class IndexCollator:
    """A collator that carries the index column past ``collator``: TRL's collators build the model's inputs and
    drop every other column, among them the one keying each example's rate.

    Rows carrying ``marker`` (default: the index column itself) are the ones the meta step reads — the train set's
    and, for the preference trainers, the meta set's; their batches get the index column (when the rows have it)
    and whatever :meth:`add_targets` adds. Other batches (evaluation) are ``collator``'s own."""

    marker: str | None = None

    def __init__(self, collator: Any, column: str) -> None:
        self.collator, self.column = collator, column

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features or (self.marker or self.column) not in features[0]:
            return self.collator(features)
        drop = {self.column, self.marker}
        batch = dict(self.collator([{k: v for k, v in f.items() if k not in drop} for f in features]))
        self.add_targets(batch, features)
        if self.column in features[0]:
            batch[self.column] = torch.as_tensor([int(f[self.column]) for f in features], dtype=torch.long)
        return batch

    def add_targets(self, batch: dict[str, Any], features: Sequence[Mapping[str, Any]]) -> None:
        """Put the meta step's targets into ``batch`` (here: nothing; TRL's collator made the labels)."""


def with_target_column(dataset: Any, name: str, trainer: str, values: Callable[[Any], Sequence[Any]],
                       rows: str) -> Any:
    """``dataset`` with the ``labels`` column a preference trainer keeps its targets (or their marker) in, their
    ``values(dataset)`` read once the set is known to be a ``datasets.Dataset``; refused when the data has a
    ``labels`` column of its own (``rows``: what the trainer's rows hold, for the message)."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        raise TypeError(f"{trainer} needs the {name} set as a datasets.Dataset, got {type(dataset).__name__}.")
    if TARGET in names:
        raise ValueError(
            f"The {name} set has a {TARGET!r} column; {trainer} keeps each pair's targets there. Preference pairs "
            f"are {rows}: rename or remove {TARGET!r}."
        )
    return dataset.add_column(TARGET, list(values(dataset)))


class WeightedTRLLoss:
    """The ``compute_loss`` of a TRL trainer with rates (first in the bases, before MetaLRTrainer): while training
    with rates, MetaLRTrainer's weighted per-example loss, plus the TRL trainer's training metrics from the same
    logits (:meth:`_record_train_metrics`); otherwise (evaluation, no meta set) the TRL trainer's loss. With
    ``target_column`` set, the Trainer's column removal keeps that column when the rates are learned or replayed."""

    target_column: str | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._schedule is None or self._schedule.current is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, {**inputs, "use_cache": False}, True, num_items_in_batch)
        self._record_train_metrics(extract_logits(outputs), inputs)
        return (loss, outputs) if return_outputs else loss

    def _record_train_metrics(self, logits: torch.Tensor, inputs: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        col = self.target_column
        if col is not None and self._meta_active and col not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, col]


def as_trl_config(args: TrainingArguments | None, base: type, meta_config: type) -> TrainingArguments | None:
    """``args`` as a TRL config (``base``, e.g. ``SFTConfig``): TRL's trainers rebuild any other
    ``TrainingArguments`` as a plain ``base`` from its ``to_dict()``, which fails on, or loses, the meta options
    of a ``MetaLRConfig``; ``meta_config`` (``base`` plus the meta options) keeps them."""
    if args is None or isinstance(args, base):
        return args
    known = {f.name for f in fields(meta_config) if f.init}
    given = {k: v for k, v in args.to_dict().items() if k in known}
    given["hub_token"] = args.hub_token  # to_dict hides it
    return meta_config(**given)


def check_prepared_index(trainer: MetaLRTrainer, why_dropped: str) -> None:
    """The index column survived a TRL trainer's preparation of the train set: each prepared row is one row of
    the train set as given, at most once. Rows the preparation dropped (``why_dropped`` says what drops them)
    keep rate 1."""
    col, n = trainer.meta_args.index_column, len(trainer._source_train_dataset)
    names = getattr(trainer.train_dataset, "column_names", None) or []
    idx = np.asarray(trainer.train_dataset.with_format(None)[col], dtype=np.int64) if col in names else None
    name = type(trainer).__name__
    if idx is None or len(np.unique(idx)) != len(idx) or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
        raise ValueError(
            f"{name}'s preparation of the train set did not keep one row per example with its {col!r} index (rows "
            f"0..{n - 1}), which keys each example's learning rate. Pass the dataset unpacked (packing=False) and "
            f"without a with_transform, or set index_column to a name the data does not use."
        )
    if len(idx) < n:
        logger.warning(f"{name}: the preparation of the train set dropped {n - len(idx)} of the {n} training "
                       f"examples ({why_dropped}); their rates stay at 1.")


def check_prepared_meta(trainer: Any, given: Any, prepared: Any, why_dropped: str) -> None:
    """The meta set a TRL trainer's preparation left: every trusted row it dropped (``why_dropped`` says what
    drops them) is said, and a meta set left empty is refused here rather than failing inside TRL at the first
    meta step."""
    n, m, name = len(given), len(prepared), type(trainer).__name__
    if m == 0:
        raise ValueError(f"{name}'s preparation of the meta set dropped all of its {n} rows ({why_dropped}): no "
                         f"trusted example is left to learn the rates on. Raise max_length, or give trusted examples "
                         f"that fit it.")
    if m < n:
        logger.warning(f"{name}: the preparation of the meta set dropped {n - m} of its {n} trusted rows "
                       f"({why_dropped}); the rates learn on the {m} left.")


SFT_TEXT_COLUMNS = ("messages", "prompt", "completion", "text")  # the row formats SFTTrainer prepares
PAIR_TEXT_COLUMNS = ("prompt", "chosen", "rejected")  # the preference rows RewardTrainer and DPOTrainer prepare


def _row_format(dataset: Any, columns: Sequence[str]) -> tuple[list[str], bool] | None:
    """The text columns of ``columns`` that ``dataset`` has and whether its row 0 is conversational; None for a set
    given already tokenised (none of those columns) or not a `datasets.Dataset`."""
    from trl.data_utils import is_conversational

    names = getattr(dataset, "column_names", None)
    if not isinstance(names, list) or len(dataset) == 0:
        return None
    present = [c for c in columns if c in names]
    return (present, is_conversational(dataset[0])) if present else None


def check_meta_rows(train: Any, meta: Any, columns: Sequence[str]) -> None:
    """Refuse a meta set whose rows are not in the train set's format, before TRL prepares it: the meta set is
    prepared by the train set's function with its settings, so a conversational set beside a plain-text one (or a
    missing ``prompt``) would be templated and masked otherwise than the train set — the rates would follow another
    objective, silently — and a missing or empty column fails deep inside TRL's preparation without naming the meta
    set. ``columns``: the text columns of the format (:data:`SFT_TEXT_COLUMNS`, :data:`PAIR_TEXT_COLUMNS`)."""
    import datasets

    if not isinstance(meta, datasets.Dataset):  # (a DatasetDict is refused before, by MetaLRTrainer's check_datasets)
        raise TypeError(f"The meta dataset is a {type(meta).__name__}: TRL prepares it as the train set, which needs "
                        "a datasets.Dataset in the train set's format, e.g. datasets.Dataset.from_list(rows).")
    got, want = _row_format(meta, columns), _row_format(train, columns)
    if want is None:
        return  # a tokenised train set: the meta set's inputs are checked like any Trainer's
    cols, conversational = want
    kind = "conversational (lists of {'role', 'content'} messages)" if conversational else "plain text"
    if got is None or got[0] != cols:
        has = sorted(getattr(meta, "column_names", None) or []) if got is None else got[0]
        raise ValueError(
            f"The meta dataset's columns {has} are not the train set's text columns {cols}: TRL prepares the meta "
            f"set with the train set's function and settings, so it needs the same format. Give the meta set the "
            f"columns {cols}, {kind} like the train set's."
        )
    if got[1] != conversational:
        other = "plain text" if conversational else "conversational (lists of {'role', 'content'} messages)"
        raise ValueError(
            f"The train set's rows are {kind} but the meta set's are {other}: the meta set would get another "
            f"chat template and masking than the train set, and the rates would follow another objective. Give "
            f"the meta set in the train set's format."
        )
    for i, row in enumerate(meta.select_columns(cols)):
        empty = [c for c in cols if row[c] is None]
        if empty:
            raise ValueError(f"Row {i} of the meta dataset has no value in {empty} (None): every trusted row needs "
                             f"all of {cols}.")


def _refuse_with_rates(model: Any, args: TrainingArguments | None) -> None:
    """Refuse, before any preparation, what breaks the one-row-one-example keying of the rates or their loss."""
    if isinstance(model, str):
        raise TypeError(
            f"MetaSFTTrainer needs the model object, not its name {model!r}: the per-example loss is chosen from "
            f"the model's class before SFTTrainer would load it. Load it first, e.g. "
            f"model = AutoModelForCausalLM.from_pretrained({model!r})."
        )
    if getattr(args, "packing", False):
        raise ValueError(
            "packing=True is not supported with per-example learning rates: packing concatenates several training "
            "examples into one row, so a row is no longer one example and its rate (keyed by the example's row) "
            "cannot weight it. Set packing=False in the SFTConfig / MetaSFTConfig (batches are then padded)."
        )
    if getattr(args, "padding_free", False):
        raise ValueError(
            "padding_free=True is not supported with per-example learning rates: it concatenates the examples of "
            "a batch into one sequence, so the loss cannot be split by example. Set padding_free=False."
        )
    if getattr(args, "loss_type", "nll") != "nll":
        raise ValueError(
            f"loss_type={args.loss_type!r} is not supported with per-example learning rates: the rates weight each "
            "example's negative log-likelihood. Set loss_type='nll'."
        )


class MetaSFTTrainer(WeightedTRLLoss, MetaLRTrainer, SFTTrainer):
    """``trl.SFTTrainer`` that learns a learning-rate multiplier per training example (and optionally the weight
    decay) by :class:`~hf_ddlr.MetaLRTrainer`'s meta step on ``meta_dataset``.

    Args:
        model (`PreTrainedModel`): a causal LM object (not a name: load it first).
        args (`SFTConfig`, *optional*): a :class:`MetaSFTConfig` (the meta options as fields), a plain
            ``SFTConfig`` (meta options at their defaults), or another ``TrainingArguments`` (converted to a
            ``MetaSFTConfig``, keeping its meta options). ``packing`` / ``padding_free`` must be False when
            learning or replaying rates.
        **kwargs: everything else, by keyword (MetaLRTrainer's and SFTTrainer's positional orders differ):
            ``train_dataset``, ``eval_dataset``, ``data_collator``, ``processing_class`` as for ``SFTTrainer``
            (language-modeling, prompt-completion or conversational rows; raw or tokenised), the rates indexed
            by the rows of ``train_dataset`` as given; ``meta_dataset``, the clean held-out set in the train
            set's format, prepared by ``SFTTrainer``'s preparation with the train set's options (same chat
            template, same completion-only masking; without it and without ``replay_trajectory`` this is
            ``SFTTrainer``); MetaLRTrainer's ``num_labels``; SFTTrainer's ``peft_config``, ``formatting_func``,
            ``callbacks``, ...

    Example:

    ```python
    from hf_ddlr import MetaSFTConfig, MetaSFTTrainer

    args = MetaSFTConfig(output_dir="out", meta_lr=0.1, max_length=512)
    trainer = MetaSFTTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta,
                             processing_class=tokenizer)
    trainer.train()
    trainer.rates.instance  # one multiplier per row of `train`
    ```
    """

    def __init__(self, model: torch.nn.Module, args: TrainingArguments | None = None, **kwargs: Any) -> None:
        # the rest by keyword: MetaLRTrainer's and SFTTrainer's positional orders differ after train_dataset
        args = as_trl_config(args, SFTConfig, MetaSFTConfig)
        if kwargs.get("meta_dataset") is not None or resolve_meta_options(args).replay_trajectory is not None:
            _refuse_with_rates(model, args)
        super().__init__(model=model, args=args, **kwargs)
        if self._meta_active:
            self.data_collator = IndexCollator(self.data_collator, self.meta_args.index_column)
            check_prepared_index(self, f"no target token left after truncation to max_length={self.args.max_length}")
            if self.aux_loss_enabled:
                logger.warning("MetaSFTTrainer: the weighted loss has no MoE router auxiliary loss; set "
                               "router_aux_loss_coef=0 to silence this.")

    def _prepare_meta_dataset(self, meta_dataset: Any) -> Any:
        """The meta set prepared as ``SFTTrainer`` prepared the train set (chat template, tokenisation, labels with
        the same completion-/assistant-only masking, truncation), never packed."""
        if self._skip_prepare_dataset:
            return meta_dataset
        check_meta_rows(self._source_train_dataset, meta_dataset, SFT_TEXT_COLUMNS)
        prepared = self._prepare_dataset(meta_dataset, self.processing_class, self.args, False, self._formatting_func,
                                         "meta")
        check_prepared_meta(self, meta_dataset, prepared,
                            f"no target token left after truncation to max_length={self.args.max_length}")
        return prepared

    @torch.no_grad()
    def _record_train_metrics(self, logits: torch.Tensor, inputs: Mapping[str, Any]) -> None:
        """``entropy``, ``mean_token_accuracy`` (over the target tokens) and ``num_tokens`` as SFTTrainer logs them."""
        logits, labels = logits[:, :-1].float(), inputs["labels"][:, 1:]
        mask = labels != -100
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        correct = logits.argmax(-1) == labels  # never at a -100 label
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(mask.sum()).sum()
        metrics = self._metrics["train"]
        metrics["entropy"].append((gather(entropy[mask].sum()).sum() / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((gather(correct.sum()).sum() / num_valid).item() if num_valid > 0 else 0.0)
        self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
