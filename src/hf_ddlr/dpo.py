"""TRL: :class:`MetaDPOTrainer`, ``trl.DPOTrainer`` with a learning-rate multiplier per preference pair.

Preference data is labelled by people, and people disagree: a share of the pairs has ``chosen`` and ``rejected``
the wrong way round, and DPO then pushes the policy toward the worse answer. ``MetaDPOTrainer(WeightedTRLLoss,
MetaLRTrainer, DPOTrainer)`` learns one rate per pair by :class:`~hf_ddlr.MetaLRTrainer`'s meta step on a small
set of pairs whose order is trusted; the pairs whose gradient disagrees with that set train slower. The method
resolution order is MetaDPOTrainer → WeightedTRLLoss (the ``compute_loss`` the TRL trainers share) →
MetaLRTrainer → DPOTrainer → transformers.Trainer:

- data: ``DPOTrainer.__init__`` prepares the train set (EOS, tokenisation into ``prompt_ids`` / ``chosen_ids`` /
  ``rejected_ids``) and computes the reference model's log-probabilities of every answer once, before training
  (``precompute_ref_log_probs``, switched on when the rates are learned: the weighted loss reads each pair's
  reference margin from its batch; with a frozen reference model it is the same number DPOTrainer computes per
  batch). The index column that keys each pair's rate is added before that and carried by its ``map``. The meta
  set is prepared by the same ``DPOTrainer._prepare_dataset`` and gets its reference log-probabilities the same way.
- loss: while training with rates, ``compute_loss`` is MetaLRTrainer's weighted per-pair loss
  ``Σ e_i ℓ_i / pairs`` with ``ℓ_i`` DPO's sigmoid loss (:func:`hf_ddlr.meta.losses.dpo_loss`): at rates 1,
  DPOTrainer's loss. Its training metrics (rewards, margins, accuracies, log-probabilities, logits, entropy, token
  accuracy, tokens) are computed from the same logits. Evaluation, and a run without a meta set, are DPOTrainer's own.
- a pair spans two rows of the model's batch (TRL's collator stacks the chosen rows, then the rejected ones): the
  per-layer products add each pair's two rows (:class:`~hf_ddlr.meta.layerwise.LayerTape`'s ``rows_per_example``).
- refused with rates: loss types other than ``"sigmoid"`` (DPO's), another ``f_divergence_type``, ``ld_alpha``,
  ``use_weighting``, ``padding_free`` and ``sync_ref_model``.

Import it as ``from hf_ddlr import MetaDPOTrainer`` (loaded on first use, so hf_ddlr does not require TRL).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import TrainingArguments
from transformers.utils import logging

from ._trl_version import require_trl

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as err:  # pragma: no cover - depends on the environment
    require_trl(err)  # missing, too old or broken: the message names the fix
    raise

from .config import MetaLROptions, resolve_meta_options
from .meta import TaskLoss
from .meta.losses import IGNORE_INDEX, dpo_task, pack_dpo_labels
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

__all__ = ["MetaDPOConfig", "MetaDPOTrainer"]


@dataclass
class MetaDPOConfig(MetaLROptions, DPOConfig):
    """``trl.DPOConfig`` plus the meta options of :class:`~hf_ddlr.config.MetaLROptions` as fields (and, with
    ``HfArgumentParser``, as command-line flags). With rates, ``loss_type`` stays ``["sigmoid"]`` and the reference
    log-probabilities are computed before training (``precompute_ref_log_probs``)."""


class _DPOCollator(IndexCollator):
    """TRL's ``DataCollatorForPreference`` makes ``input_ids`` / ``attention_mask`` / ``completion_mask`` and the
    reference log-probabilities. For training and meta batches (rows with the ``labels`` column this trainer adds)
    the completion tokens and the reference log-probabilities become the pairs' packed ``labels``
    (:func:`~hf_ddlr.meta.losses.pack_dpo_labels`), with the index column; evaluation batches are TRL's."""

    marker = TARGET

    def add_targets(self, batch: dict[str, Any], features: Sequence[Mapping[str, Any]]) -> None:
        completion = batch.pop("completion_mask")
        tokens = batch["input_ids"].masked_fill(completion == 0, IGNORE_INDEX)
        ref = torch.stack([batch.pop("ref_chosen_logps"), batch.pop("ref_rejected_logps")], dim=1)
        batch[TARGET] = pack_dpo_labels(tokens, ref)


def _with_marker(dataset: Any, name: str) -> Any:
    """``dataset`` with the ``labels`` column that marks its batches for packed targets."""
    return with_target_column(dataset, name, "MetaDPOTrainer", lambda ds: [0] * len(ds),
                              "'prompt' / 'chosen' / 'rejected'")


def _with_rates_options(args: DPOConfig | None) -> DPOConfig | None:
    """``args`` checked for what the per-pair loss supports, with the reference log-probabilities precomputed."""
    if args is None:
        return None
    refused = [
        (list(args.loss_type) != ["sigmoid"], f"loss_type={args.loss_type!r}", "loss_type='sigmoid' (DPO's loss)"),
        (args.f_divergence_type != "reverse_kl", f"f_divergence_type={args.f_divergence_type!r}",
         "f_divergence_type='reverse_kl'"),
        (args.loss_weights is not None and [float(w) for w in args.loss_weights] != [1.0],
         f"loss_weights={args.loss_weights}", "loss_weights=None (a weight on the one loss: scale learning_rate)"),
        (args.ld_alpha is not None, f"ld_alpha={args.ld_alpha}", "ld_alpha=None"),
        (args.use_weighting, "use_weighting=True", "use_weighting=False"),
        (args.padding_free, "padding_free=True (a batch row would hold several answers)", "padding_free=False"),
        (args.sync_ref_model, "sync_ref_model=True (the reference log-probabilities are computed once)",
         "sync_ref_model=False"),
    ]
    bad = [(what, fix) for on, what, fix in refused if on]
    if bad:
        raise ValueError(
            "MetaDPOTrainer learns a rate per pair of DPO's sigmoid loss, each pair's loss from the policy's and the "
            f"reference's log-probabilities; not supported with rates: {', '.join(w for w, _ in bad)}. Set "
            f"{', '.join(f for _, f in bad)}."
        )
    if not args.precompute_ref_log_probs:
        logger.info("MetaDPOTrainer: the reference log-probabilities are computed once, before training "
                    "(precompute_ref_log_probs=True): each pair's batch carries them to the weighted loss.")
        args = dataclasses.replace(args, precompute_ref_log_probs=True)
    return args


class MetaDPOTrainer(WeightedTRLLoss, MetaLRTrainer, DPOTrainer):
    """``trl.DPOTrainer`` that learns a learning-rate multiplier per preference pair (and optionally the weight decay)
    by :class:`~hf_ddlr.MetaLRTrainer`'s meta step on ``meta_dataset``, a small set of pairs whose order is trusted.

    Args:
        model (`PreTrainedModel` or `str`): the policy (a causal LM), or its name, loaded by ``DPOTrainer``.
        ref_model (`PreTrainedModel`, *optional*): the reference policy, as for ``DPOTrainer`` (None: the model
            itself before training, or a PEFT model with its adapter off).
        args (`DPOConfig`, *optional*): a :class:`MetaDPOConfig` (the meta options as fields), a plain
            ``DPOConfig`` (meta options at their defaults), or another ``TrainingArguments`` (converted to a
            ``MetaDPOConfig``, keeping its meta options).
        **kwargs: everything else, by keyword (MetaLRTrainer's and DPOTrainer's positional orders differ):
            ``train_dataset``, ``eval_dataset``, ``data_collator``, ``processing_class``, ``peft_config``, ...
            as for ``DPOTrainer`` (``prompt`` / ``chosen`` / ``rejected`` rows, plain text or conversational, or
            tokenised), the rates indexed by the rows of ``train_dataset`` as given; ``meta_dataset``, the trusted
            pairs in the train set's format, prepared like it.

    Example:

    ```python
    from hf_ddlr import MetaDPOConfig, MetaDPOTrainer

    args = MetaDPOConfig(output_dir="dpo", learning_rate=5e-7, beta=0.1)
    trainer = MetaDPOTrainer(model=policy, args=args, train_dataset=pairs, meta_dataset=trusted_pairs,
                             processing_class=tokenizer)
    trainer.train()
    trainer.rates.instance  # one multiplier per pair of `pairs`: low for pairs the trusted ones contradict
    ```
    """

    target_column = TARGET  # marks the rows whose batches carry packed targets; kept by the column removal

    def __init__(self, model: torch.nn.Module | str, ref_model: torch.nn.Module | None = None,
                 args: TrainingArguments | None = None, **kwargs: Any) -> None:
        args = as_trl_config(args, DPOConfig, MetaDPOConfig)
        if kwargs.get("meta_dataset") is not None or resolve_meta_options(args).replay_trajectory is not None:
            args = _with_rates_options(args if args is not None else MetaDPOConfig(output_dir="trainer_output"))
        super().__init__(model=model, ref_model=ref_model, args=args, **kwargs)
        if self._meta_active:
            self.data_collator = _DPOCollator(self.data_collator, self.meta_args.index_column)
            self.train_dataset = _with_marker(self.train_dataset, "train")
            check_prepared_index(self, f"an answer truncated to nothing by max_length={self.args.max_length}")
            if self.aux_loss_enabled:
                logger.warning("MetaDPOTrainer: the weighted loss has no MoE router auxiliary loss; set "
                               "router_aux_loss_coef=0 to silence this.")

    def _resolve_task(self, model: torch.nn.Module | str | None, train_dataset: Any) -> TaskLoss:
        """DPO's per-pair sigmoid loss with DPOConfig's ``beta``."""
        args = getattr(self, "args", None)  # (None while MetaLRTrainer.__init__ checks the sets: resolved again)
        return dpo_task(getattr(args, "beta", 0.1))

    def _prepare_meta_dataset(self, meta_dataset: Any) -> Any:
        """The trusted pairs prepared as ``DPOTrainer`` prepared the train set, with the reference model's
        log-probabilities of their answers."""
        check_meta_rows(self._source_train_dataset, meta_dataset, PAIR_TEXT_COLUMNS)
        prepared = self._prepare_dataset(meta_dataset, self.processing_class, self.args, "meta")
        check_prepared_meta(self, meta_dataset, prepared,
                            f"an answer truncated to nothing by max_length={self.args.max_length}")
        batch = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        return _with_marker(self._precompute_ref_logps(prepared, "meta", batch), "meta")

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        """DPOTrainer's, except for a dataset held in memory under several processes: DPOTrainer writes the
        reference log-probabilities to a cache file in the main process's temporary directory, which the other
        processes cannot open; here every process adds the gathered log-probabilities as columns itself."""
        if self.accelerator.num_processes == 1 or getattr(dataset, "cache_files", None):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory))
        model, chosen, rejected = self.ref_model or self.model, [], []
        for batch in tqdm(loader, desc=f"Computing reference log probs for {name} dataset",
                          disable=not self.accelerator.is_local_main_process):
            pair = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(pair[0].float().cpu())
            rejected.append(pair[1].float().cpu())
        return (dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
                .add_column("ref_rejected_logps", torch.cat(rejected).tolist()))

    @torch.no_grad()
    def _record_train_metrics(self, logits: torch.Tensor, inputs: Mapping[str, Any]) -> None:
        """The training metrics DPOTrainer logs (``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``,
        ``mean_token_accuracy``, ``num_tokens``), from the policy's logits and the pairs' packed targets."""
        packed = inputs[TARGET]
        B, T = packed.shape[0], (packed.shape[1] - 2) // 2
        tokens = torch.cat([packed[:, :T], packed[:, T:2 * T]]).round().long()[:, 1:]  # the next tokens
        z = logits[:, logits.shape[1] - T:][:, :-1]
        mask = tokens != IGNORE_INDEX
        # row by row, so that one row's (tokens, vocabulary) at a time is upcast and normalised
        token_logps, entropy, top1, mean_logits = (torch.empty(tokens.shape, device=z.device) for _ in range(4))
        for r in range(z.shape[0]):
            row = z[r].float()
            logp = torch.log_softmax(row, dim=-1)
            token_logps[r] = logp.gather(-1, tokens[r].clamp(min=0).unsqueeze(-1)).squeeze(-1)
            entropy[r] = -(logp.exp() * logp).sum(-1)
            top1[r] = (row.argmax(-1) == tokens[r]).float()
            mean_logits[r] = row.mean(-1)
        seq_logps = (token_logps * mask).sum(1)
        chosen_rewards = self.beta * (seq_logps[:B] - packed[:, -2].float())
        rejected_rewards = self.beta * (seq_logps[B:] - packed[:, -1].float())
        gather, sum_of = self.accelerator.gather, lambda t: self.accelerator.gather_for_metrics(t).sum()
        metrics = self._metrics["train"]
        n_tokens = sum_of(mask.sum())
        per_token = {"entropy": entropy, "mean_token_accuracy": top1}
        for key, values in per_token.items():
            rows = mask if key == "entropy" else mask[:B]  # token accuracy: the chosen answers'
            picked = values if key == "entropy" else values[:B]
            count = n_tokens if key == "entropy" else sum_of(rows.sum())
            metrics[key].append((sum_of(picked[rows].sum()) / count).item() if count > 0 else 0.0)
        for half, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
            count = sum_of(mask[rows].sum())
            metrics[f"logits/{half}"].append((sum_of(mean_logits[rows][mask[rows]].sum()) / count).item()
                                             if count > 0 else 0.0)
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(seq_logps[:B]).mean().item())
        metrics["logps/rejected"].append(gather(seq_logps[B:]).mean().item())
        self._total_train_tokens += sum_of(inputs["attention_mask"].sum()).item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
