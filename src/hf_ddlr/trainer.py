"""`MetaLRTrainer`: the Hugging Face wiring around the meta step of :mod:`hf_ddlr.meta`.

The trainer keeps the Trainer's own loop. Once per optimizer step it runs the meta step on the unwrapped model
with pure functional passes and lets ``Trainer.training_step`` do every real forward/backward, so gradient
accumulation, ``no_sync``, mixed precision, clipping and logging stay the Trainer's. The only change to the
real step is the loss: ``Σ e_i L_i / N_window`` with the learned example weights ``e_i``. Where in the step the
meta step runs depends on the configuration: :mod:`hf_ddlr.schedules` holds one class per schedule, and the
Trainer hooks here hand each step to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from ._batches import MetaSetSampler, probe_batches
from ._checkpoint import META_STATE_NAME, load_best_meta_state, load_meta_state, save_meta_state, save_rates
from ._datasets import (
    LABEL_KEYS,
    check_datasets,
    check_label_range,
    check_meta_inputs,
    first_item,
    label_values,
    with_index,
)
from ._groups import Groups, check_same_groups, read_groups
from ._meta_check import MetaSetCheck, check_meta_set
from ._meta_parameters import instance_centering_choice, instance_rate_at_cap_choice
from ._recording import AppliedInstanceRates, MetaLog, TrajectoryRecorder, new_trajectory
from ._tasks import check_task_options, resolve_task, warn_unweighted_terms
from .config import MetaLROptions, rate_metric_choice, resolve_meta_options
from .meta import MicroBatch, RateTable, TaskLoss, param_specs, replay_rng
from .meta.averaging import GradientSecondMoment, MetaGradientAverage
from .meta.layerwise import LayerwiseCheck
from .meta.passes import RngState, compiled_like_eager, is_compiled
from .schedules import Schedule, schedule_for
from .trajectory import TRAJECTORY_CONFIG_NAME, TRAJECTORY_TENSORS_NAME, LRTrajectory, TrajectoryReplayer
from .trajectory.signature import label_names_of

logger = logging.get_logger(__name__)

__all__ = ["MetaLRTrainer", "META_STATE_NAME"]


def _members(table: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """The entries of a table of lines ``how name(parameter, ...)``; ``attribute`` lines list names only."""
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for line in table.strip().splitlines():
        how, rest = line.split(None, 1)
        if how == "attribute":
            out += [(name, how, ()) for name in rest.split()]
            continue
        name, params = rest.strip().rstrip(")").split("(")
        out.append((name, how, tuple(p.strip() for p in params.split(",") if p.strip())))
    return tuple(out)


# What MetaLRTrainer (this module and the modules it is built from: hf_ddlr.schedules, ._batches, ...) overrides,
# calls or reads of transformers.Trainer, in one place so that tests/test_transformers_contract.py can check it
# against the installed transformers (a private member can change in any release). Each entry is
# (member, how, parameter names):
#   "override"  - MetaLRTrainer overrides it and the Trainer calls it: the Trainer's parameters (without self)
#                 must be exactly these, in this order (our override takes and forwards them);
#   "call"      - MetaLRTrainer calls it (or reads these keyword arguments in a pass-through override): these
#                 names must be parameters of it, in this order;
#   "attribute" - MetaLRTrainer reads it: a class attribute, or one the Trainer sets (`self.<name> = ...`).
# Changing a use means changing its entry here.
_TRAINER_MEMBERS_USED = _members("""
    call      __init__(model, args, data_collator, train_dataset, eval_dataset, processing_class)
    override  train(resume_from_checkpoint, trial, ignore_keys_for_eval)
    override  _set_signature_columns_if_needed()
    override  prediction_step(model, inputs, prediction_loss_only, ignore_keys)
    override  create_optimizer(model)
    override  get_batch_samples(epoch_iterator, num_batches, device)
    override  training_step(model, inputs, num_items_in_batch)
    override  compute_loss(model, inputs, return_outputs, num_items_in_batch)
    override  log(logs, start_time)
    override  _save(output_dir, state_dict)
    override  _save_checkpoint(model, trial)
    override  _push_from_checkpoint(checkpoint_folder)
    override  _save_optimizer_and_scheduler(output_dir)
    override  _load_best_model()
    override  _load_optimizer_and_scheduler(checkpoint)
    call      create_model_card(model_name, dataset)
    call      push_to_hub()
    call      save_model(output_dir, _internal_call)
    call      _remove_unused_columns(dataset, description)
    call      _get_collator_with_removed_columns(data_collator, description)
    call      _prepare_inputs(inputs)
    call      get_decay_parameter_names(model)
    call      get_optimizer_cls_and_kwargs(args, model)
    call      get_train_dataloader()
    call      add_callback(callback)
    call      is_world_process_zero()
    attribute _signature_columns _train_batch_size current_gradient_accumulation_steps loss_is_scaled_for_ga
    attribute is_deepspeed_enabled is_fsdp_enabled is_fsdp_xla_enabled hub_model_id accelerator optimizer state
    attribute args model train_dataset data_collator optimizer_cls_and_kwargs
""")
# Attributes of the Trainer's `accelerate.Accelerator` read here (fp16 loss scale, sharded/split set-ups).
_ACCELERATOR_MEMBERS_USED: tuple[str, ...] = ("scaler", "parallelism_config")


class MetaLRTrainer(Trainer):
    """A :class:`transformers.Trainer` that learns per-example / per-class learning-rate multipliers and the
    weight decay by a one-step-lookahead meta-gradient on ``meta_dataset`` (Saxena, Vyas & DeCoste).

    Without ``meta_dataset`` (and without ``replay_trajectory``) it is exactly ``Trainer``. The learned values
    are in :attr:`rates` (``.instance``, ``.per_class`` or ``.per_group``, ``.weight_decay``), their history in
    :attr:`lr_trajectory` (saved with every checkpoint and the final model, and pushed to the Hub with it).

    Args:
        model (`PreTrainedModel` or `torch.nn.Module`, *optional*):
            The model to train, as for ``Trainer``. Its forward gets the training batch's inputs without
            the labels and the index column; its outputs must hold the logits (``.logits``, a dict's
            ``"logits"`` or the first element of a tuple). Its task (single- or multi-label classification,
            regression, token classification, causal or sequence-to-sequence LM) is read from its class and
            config and picks the per-example loss (:mod:`hf_ddlr._tasks`).
        args (`TrainingArguments`, *optional*):
            A :class:`~hf_ddlr.MetaLRConfig`, or any other ``TrainingArguments`` (a subclass with its own fields,
            TRL's configs). It stays :attr:`args` as given (its class, fields and ``to_dict()`` are saved with
            checkpoints); the meta options are read from it once, here, into :attr:`meta_args` (a
            :class:`~hf_ddlr.config.MetaLROptions`: ``args``' attribute of each option's name where it has one,
            MetaLRConfig's default otherwise).
        data_collator (`DataCollator`, *optional*):
            As for ``Trainer``; it also collates the meta batches.
        train_dataset (`datasets.Dataset` or `torch.utils.data.Dataset`, *optional*):
            The training set: map-style, with a ``labels``/``label`` column (integer class ids for single-label
            classification; a collator may make token labels). Needed when learning or
            replaying rates. The index column (``meta_args.index_column``) is added when missing: instance rates
            are keyed by row.
        eval_dataset (`datasets.Dataset`, `torch.utils.data.Dataset` or a dict of them, *optional*):
            As for ``Trainer``.
        meta_dataset (`datasets.Dataset` or `torch.utils.data.Dataset`, *optional*):
            The held-out set whose loss the rates are learned to lower, preprocessed like the train set and
            labelled with the same label ids. Without it (and without ``replay_trajectory``) nothing is learned.
        processing_class (`PreTrainedTokenizerBase` or another processor, *optional*):
            As for ``Trainer`` (saved with the model).
        num_labels (`int`, *optional*):
            The number of classes (the size of the class-rate table). Default: ``model.config.num_labels``,
            else the train set's largest label + 1.
        **kwargs:
            Passed on to ``Trainer`` (``callbacks``, ``compute_metrics``, ``optimizers``, ...).

    Example:

    ```python
    from hf_ddlr import MetaLRConfig, MetaLRTrainer

    args = MetaLRConfig(output_dir="out", lr_level="both", learn_weight_decay=True, weight_decay=5e-4)
    trainer = MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta, num_labels=10)
    trainer.train()
    trainer.rates.instance  # one learned multiplier per training example
    trainer.lr_trajectory.save_pretrained("out")  # also written with every checkpoint
    ```
    """

    _saving_checkpoint = False  # True while the Trainer writes a checkpoint (its model is saved with the rates)
    _optional_meta_columns: tuple[str, ...] = ()  # signature columns a meta row may lack (see check_meta_inputs)

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        meta_dataset: Any = None,
        processing_class: Any = None,
        num_labels: int | None = None,
        **kwargs: Any,
    ) -> None:
        if args is not None and not isinstance(args, TrainingArguments):
            raise TypeError(
                f"args must be a TrainingArguments (MetaLRConfig, or any subclass such as TRL's configs), got "
                f"{type(args).__name__}."
            )
        # The user's args object stays self.args, untouched (its class, extra fields and to_dict() are what
        # checkpoints save); the meta options are read once, here, into self.meta_args.
        self.meta_args: MetaLROptions = resolve_meta_options(args)
        meta = self.meta_args
        self.meta_dataset = meta_dataset
        self.replay: TrajectoryReplayer | None = None
        if meta.replay_trajectory is not None:
            if meta_dataset is not None:
                raise ValueError(
                    "Pass either meta_dataset (learn the rates) or replay_trajectory (replay learned rates), not both."
                )
            self.replay = TrajectoryReplayer(
                meta.replay_trajectory, train_dataset, check_fingerprint=meta.check_fingerprint
            )
            meta.learn_weight_decay = self.replay.replays_weight_decay(meta.learn_weight_decay)
        self._meta_active = meta_dataset is not None or self.replay is not None
        other_labels = [n for n in (getattr(args, "label_names", None) or []) if n not in LABEL_KEYS]
        if self._meta_active and other_labels:
            raise ValueError(
                f"MetaLRTrainer reads each example's label from a 'labels' or 'label' column; label_names="
                f"{args.label_names} names {other_labels}, which it does not read. Rename the column in the train and "
                f"meta sets, e.g. dataset.rename_column({other_labels[0]!r}, 'labels'), and drop label_names."
            )
        if self._meta_active and kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "MetaLRTrainer does not use compute_loss_func: the rates weight each example's loss, and "
                "compute_loss_func returns one loss for the whole batch. The loss weighted is the model's own, "
                "chosen from the model and its labels (README, \"Tasks\"). Drop compute_loss_func, or train "
                "with transformers.Trainer if that custom loss is what you need."
            )
        # after a learning run: the trained model on the meta set (single-label classification; see _meta_check)
        self.meta_set_check: MetaSetCheck | None = None
        self.rates: RateTable | None = None
        self._groups: Groups | None = None  # the train set's groups (group-level rates), read at construction
        self.lr_trajectory: LRTrajectory | None = None
        self._schedule: Schedule | None = None  # resolved when train() starts
        if self._meta_active:
            # the task's loss is what is weighted; chosen again from the final model in _init_meta (model_init)
            self._task = self._resolve_task(model, train_dataset)
            check_datasets(train_dataset, meta_dataset, class_labels=self._task.class_labels)
            self._source_train_dataset = train_dataset
            train_dataset = with_index(train_dataset, meta.index_column)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if self._meta_active:
            if meta_dataset is not None:
                self.meta_dataset = self._prepare_meta_dataset(meta_dataset)
                self._check_supported_parallelism()
                self._check_meta_inputs()
            self._groups = self._read_groups()
            self._init_meta(num_labels)
            self.add_callback(TrajectoryRecorder(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any):
        """``Trainer.train``. A second call is a new run (as in ``hyperparameter_search``): it starts again from
        rates 1 and an empty trajectory, or, with ``resume_from_checkpoint``, from what the checkpoint holds. The
        schedule of the meta step (:func:`hf_ddlr.schedules.schedule_for`) and the meta-gradient average are
        made here, once per call."""
        if self._meta_active and getattr(self, "_has_trained", False):  # a resume then loads the checkpoint's state
            self._init_meta(self.num_labels)
        self._has_trained = True
        self._compiled = self._meta_active and self._compiles()  # the schedule then records nothing in the forward
        self._schedule = schedule_for(self) if self._meta_active else None
        if self._meta_active:
            self._meta_grad_average = self._fresh_average()
            self._rate_metric = GradientSecondMoment() if rate_metric_choice(self.meta_args) == "adam" else None
            self._applied_instance = self._fresh_applied()
        with compiled_like_eager(self._compiled):
            output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        if self._meta_active and self.replay is None:  # what the rates followed, as the trained model sees it
            self.meta_set_check = check_meta_set(self)
        return output

    def _compiles(self) -> bool:
        """Whether this run's forward will run compiled: ``torch_compile=True``, accelerate's dynamo backend
        (``accelerate config`` / ``ACCELERATE_DYNAMO_BACKEND``), or a model handed over compiled."""
        plugin = getattr(self.accelerator.state, "dynamo_plugin", None)
        backend = str(getattr(plugin, "backend", "NO") or "NO").rsplit(".", 1)[-1].upper()
        return bool(self.args.torch_compile) or backend != "NO" or is_compiled(self.model)

    def _fresh_applied(self) -> AppliedInstanceRates | None:
        """The record of the instance rates each example was trained with, when that is not the table: probes move
        rates between an example's visits (``probe_batches``), or the applied rates are the table divided by its
        median (``instance_rate_normalization``); learning at an instance level only, None otherwise."""
        divided = self.meta_args.instance_rate_normalization != "none"
        if self.replay is not None or self.rates.instance is None or not (probe_batches(self) or divided):
            return None
        return AppliedInstanceRates(self.rates.instance)

    def _fresh_average(self) -> MetaGradientAverage | None:
        """An empty running average of the meta gradient for this run (None when off). A span in epochs
        (``meta_grad_average_epochs``) sets its factor from the optimizer steps per epoch, known once the
        train dataloader is: ``1 − meta_interval / (span × steps per epoch)``."""
        meta = self.meta_args
        if meta.meta_grad_average_epochs:
            meta_steps = meta.meta_grad_average_epochs * self._steps_per_epoch() / meta.meta_interval
            return MetaGradientAverage(max(0.0, 1.0 - 1.0 / meta_steps))
        return MetaGradientAverage(meta.meta_grad_average) if meta.meta_grad_average else None

    @property
    def _window(self) -> list[MicroBatch]:
        """The micro-batches of the current optimizer step, with their weights (for tests and diagnostics)."""
        return self._schedule.window if self._schedule is not None else []

    @property
    def _layerwise(self) -> str:
        """The per-layer products' state: "unchecked" | "verified" | "off" (for tests and diagnostics)."""
        return self._layerwise_check.state

    # ------------------------------------------------------------------ set-up
    def _check_supported_parallelism(self) -> None:
        """Refuse, at start-up, the parallel set-ups the meta step does not support.

        The meta step runs functional passes over the full, unsharded parameters of ``self.model`` on every
        process, so it works for one process (CPU or one GPU) and for multi-process data parallelism (DDP),
        not with sharded or split parameters, nor with single-process multi-GPU ``DataParallel``.
        """
        pc = getattr(self.accelerator, "parallelism_config", None)
        split = {k: getattr(pc, k, 1) or 1 for k in ("tp_size", "cp_size", "dp_shard_size")} if pc is not None else {}
        problems = [
            (self.is_deepspeed_enabled, "DeepSpeed"),
            (self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False), "FSDP"),
            (any(v > 1 for v in split.values()), f"a parallelism_config that shards or splits the model ({split})"),
            (self.args.n_gpu > 1, f"torch.nn.DataParallel over {self.args.n_gpu} GPUs in one process"),
        ]
        found = [what for bad, what in problems if bad]
        if found:
            raise ValueError(
                f"MetaLRTrainer (learning rates with a meta_dataset) does not support {' and '.join(found)}: the "
                "meta step needs the full, unsharded parameters on every process. Supported: a single process "
                "(CPU or one GPU) and multi-process DistributedDataParallel, e.g. `torchrun --nproc_per_node N "
                "train.py` or `accelerate launch --multi_gpu --num_processes N train.py` (without a DeepSpeed/FSDP "
                "config). For several GPUs in one process, launch one process per GPU that way instead of "
                "DataParallel (or set CUDA_VISIBLE_DEVICES to one GPU)."
            )

    def _prepare_meta_dataset(self, meta_dataset: Any) -> Any:
        """The meta set as the meta step reads it, prepared once the Trainer is built. Here: as given (it must be
        preprocessed like the train set). A subclass whose Trainer prepares the train set itself (TRL's
        ``SFTTrainer``: chat template, tokenisation, completion-only labels) prepares the meta set the same way."""
        return meta_dataset

    def _check_meta_inputs(self) -> None:
        """Refuse, at construction, a meta set without the model inputs the train set gives: the train set's
        row-0 keys that are arguments of the model's forward (what the Trainer's column removal keeps)."""
        self._set_signature_columns_if_needed()
        check_meta_inputs(first_item(self._source_train_dataset), first_item(self.meta_dataset),
                          self._signature_columns, self.meta_args.index_column, type(self.model).__name__,
                          optional=self._optional_meta_columns)

    def _read_groups(self) -> Groups | None:
        """The train set's groups by ``group_column`` (group-level rates; None without it). A replayed trajectory
        must have learned its group rates on the same groups (they are keyed by the sorted distinct values)."""
        meta = self.meta_args
        if not meta.group_column:
            return None
        groups = read_groups(self.train_dataset, meta.group_column, meta.index_column)
        if self.replay is not None:
            check_same_groups(self.replay.trajectory.groups, groups)
        return groups.to(self.args.device)

    def _infer_num_labels(self, num_labels: int | None) -> int:
        if num_labels is not None:
            return int(num_labels)
        cfg = getattr(self.model, "config", None)
        if cfg is not None and getattr(cfg, "num_labels", None):
            return int(cfg.num_labels)
        if not self._task.class_labels:
            return 1  # no class-rate table (class-level rates need class labels)
        labels = label_values(self.train_dataset)
        if labels is not None:
            return int(labels.max()) + 1
        raise ValueError("Cannot tell the number of classes: pass num_labels=... to MetaLRTrainer.")

    def _resolve_task(self, model: torch.nn.Module | None, train_dataset: Any) -> TaskLoss:
        """The loss the rates weight, chosen from the model and the train set (a trainer whose data has a loss of
        its own, such as preference pairs, overrides this)."""
        return resolve_task(model, train_dataset)

    def _init_meta(self, num_labels: int | None) -> None:
        """The state of a run: rates at 1, an empty trajectory and log (the meta-gradient average: train())."""
        args, meta = self.args, self.meta_args
        self._task = self._resolve_task(self.model, self._source_train_dataset)
        check_task_options(self._task, meta.lr_level, meta.meta_strategy, args.label_smoothing_factor,
                           meta.group_column,
                           # (unset, centring asked for by the median alone: the split's is single-label only)
                           meta.center_instance_rates or (meta.center_instance_rates is None
                                                          and meta.instance_rate_center == "median"),
                           meta.instance_rate_scale, meta.instance_signal)
        warn_unweighted_terms(self.model)
        self.num_labels = self._infer_num_labels(num_labels)
        if self.replay is not None and meta.lr_level in ("class", "both"):
            self.replay.check_classes(self.num_labels, label_names_of(self._source_train_dataset, None))
        if self._task.class_labels:
            check_label_range((("meta", self.meta_dataset), ("train", self.train_dataset)), self.num_labels)
        centring = instance_centering_choice(self)  # (with instance_signal resolved: the model's head is known)
        self.rates = RateTable(
            len(self._source_train_dataset),  # the rows as given (a subclass's preparation may drop some)
            self.num_labels,
            meta.lr_level,
            num_groups=len(self._groups) if self._groups is not None else None,
            weight_decay=args.weight_decay,
            learn_weight_decay=meta.learn_weight_decay,
            meta_lr=meta.meta_lr,
            meta_wd_lr=meta.weight_decay_meta_lr,
            scaling=meta.meta_lr_scaling,
            max_rate=meta.max_rate,
            max_instance_rate=meta.max_instance_rate,
            instance_gradient=meta.instance_rate_gradient,
            center_instance=centring[0],
            center=centring[1],
            at_cap=instance_rate_at_cap_choice(self),
            instance_scale=meta.instance_rate_scale,
            instance_normalization=meta.instance_rate_normalization,
            device=args.device,
        )
        self._meta_grad_average: MetaGradientAverage | None = None  # made empty when train() starts
        self._rate_metric: GradientSecondMoment | None = None  # rate_metric resolved to "adam": likewise
        self._applied_instance: AppliedInstanceRates | None = None  # likewise (probe runs)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-window mean; the Trainer divides by GA
        self._meta_set = MetaSetSampler(self, self.meta_dataset)
        self._meta_log = MetaLog(args.learning_rate, self._groups.names if self._groups is not None else None)
        self._layerwise_check = LayerwiseCheck()
        self._spe: int | None = None  # optimizer steps per epoch, computed on first use
        self.lr_trajectory = new_trajectory(self, self._source_train_dataset)

    # ------------------------------------------------------------------ columns
    def _set_signature_columns_if_needed(self) -> None:
        """The Trainer's columns to keep (the model's forward arguments and the label names), plus the index
        column when the rates are learned or replayed: training batches must carry it to key each example's
        rate. The Trainer keeps one list for every dataset, so evaluation and meta batches keep the column too
        (when their set has it); :meth:`prediction_step` and the meta step drop it before the model sees it."""
        super()._set_signature_columns_if_needed()
        col = self.meta_args.index_column
        if self._meta_active and col not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, col]

    @property
    def _rate_columns(self) -> tuple[str, ...]:
        """The batch columns that key the rates and never reach the model: the index column, and the group column
        when a batch can carry it (``remove_unused_columns=False``) unless it is a label or a forward argument of
        the model (the model takes those anyway). The group ids themselves are looked up from the index."""
        meta = self.meta_args
        col = meta.group_column
        if not col or col in LABEL_KEYS:
            return (meta.index_column,)
        self._set_signature_columns_if_needed()
        return (meta.index_column,) if col in self._signature_columns else (meta.index_column, col)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The Trainer's, without the index column (kept by the column removal, see
        :meth:`_set_signature_columns_if_needed`; ``hf_ddlr.data`` splits carry it on every split) and the other
        :attr:`_rate_columns`."""
        if self._meta_active and any(c in inputs for c in self._rate_columns):
            inputs = {k: v for k, v in inputs.items() if k not in self._rate_columns}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        if self._meta_active:
            self._tag_decay_groups(opt)
        return opt

    def _tag_decay_groups(self, opt) -> None:
        """Mark each param group of ``opt`` with whether the weight decay applies to it (``hf_ddlr_decay``); the
        decay names are looked up only when a group is not marked yet (a group added since)."""
        if all("hf_ddlr_decay" in g for g in opt.param_groups):
            return
        decay = set(self.get_decay_parameter_names(self.model))
        ids = {id(p) for n, p in self.model.named_parameters() if n in decay}
        for g in opt.param_groups:
            if "hf_ddlr_decay" not in g:
                g["hf_ddlr_decay"] = bool(g["params"]) and all(id(p) in ids for p in g["params"])

    def _apply_weight_decay(self) -> None:
        """The learned weight decay into the optimizer's decay groups (learn_weight_decay=True)."""
        if not self.meta_args.learn_weight_decay:
            return
        self._tag_decay_groups(self.optimizer)
        for g in self.optimizer.param_groups:
            if g.get("hf_ddlr_decay"):
                g["weight_decay"] = self.rates.weight_decay

    def _lookahead_specs(self, params: dict[str, torch.nn.Parameter]) -> dict:
        """The lookahead's view of the optimizer: each parameter's update rule and whether it decays."""
        self._tag_decay_groups(self.optimizer)
        decay_ids = {id(q) for g in self.optimizer.param_groups if g.get("hf_ddlr_decay") for q in g["params"]}
        decay = {n for n, p in params.items() if id(p) in decay_ids}
        raw = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper around the optimizer
        return param_specs(raw, params, decay, mode=self.meta_args.lookahead,
                           step_fraction=self.meta_args.lookahead_step)

    # ------------------------------------------------------------------ one optimizer step (hf_ddlr.schedules)
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._schedule is not None and batch_samples:
            self._schedule.begin_window(batch_samples)
        return batch_samples, num_items

    def _set_replayed_rates(self) -> None:
        """Rates of the replayed trajectory for the coming step (see :meth:`TrajectoryReplayer.set_rates`)."""
        self.replay.set_rates(
            self.rates, self.state.global_step, self._steps_per_epoch(), self._epoch_after,
            weight_decay=self.meta_args.learn_weight_decay, default_weight_decay=self.args.weight_decay,
        )

    def _steps_per_epoch(self) -> int:
        if self._spe is None:
            self._batches = len(self.get_train_dataloader())
            self._spe = max(1, -(-self._batches // self.args.gradient_accumulation_steps))
        return self._spe

    def _epoch_after(self, step: int) -> float:
        """``state.epoch`` as the Trainer reports it after optimizer step ``step`` (micro-batches done / per
        epoch): with gradient accumulation the last window of an epoch can be shorter than the others."""
        spe = self._steps_per_epoch()
        e, k = divmod(step, spe)
        return e + min(k * self.args.gradient_accumulation_steps, self._batches) / self._batches

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._schedule is None:
            return super().training_step(model, inputs, num_items_in_batch)
        mb = self._schedule.next_micro_batch()
        inputs = dict(inputs)
        for col in self._rate_columns:
            inputs.pop(col, None)
        # the real forward draws its dropout masks from the run's own stream, as the Trainer's does (a run at
        # rates 1 is then the Trainer's, masks included), and the meta step's passes replay the state it starts
        # from. Where the meta step ran first (a window of several micro-batches), its passes learned that state
        # (the meta.passes.RngChain) and this forward starts from it; where the state is not captured (an
        # accelerator other than CUDA) every pass and this forward run from the step's seed
        if mb.chain is not None and mb.chain.states[mb.position] is not None:
            mb.rng = mb.chain.states[mb.position]
            mb.rng.restore()  # (where the run's stream stands already, if the passes drew as this forward does)
        else:
            mb.chain, mb.rng = None, RngState.capture()
        replay = contextlib.nullcontext() if mb.rng is not None else replay_rng(mb.seed)
        self._weighted_loss_taken = False
        with self._schedule.running(mb), replay:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._weighted_loss_taken:
            raise RuntimeError(
                f"{type(self).__name__}.compute_loss returned a training loss without calling "
                "MetaLRTrainer.compute_loss, so no rate was applied and none learned (the weighted per-example loss, "
                "and with it the meta step, are made there). Call super().compute_loss(model, inputs, "
                "return_outputs, num_items_in_batch) while model.training, and customise only the evaluation "
                "loss; or train with transformers.Trainer if the custom loss is what you need."
            )
        self._schedule.after_backward(mb)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The weighted loss ``Σ e_i L_i / N_window`` of a training micro-batch (:meth:`Schedule.loss
        <hf_ddlr.schedules.Schedule.loss>`; with one micro-batch per step the meta step runs there, between the
        real forward and its backward); the Trainer's loss otherwise (evaluation, no meta set)."""
        mb = self._schedule.current if self._schedule is not None else None
        if mb is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = self._schedule.loss(model, inputs, mb)
        self._weighted_loss_taken = True
        # The loss is already the window's mean (÷ N_window); with loss_is_scaled_for_ga=False the Trainer divides
        # it by the window's micro-batches k, so it is multiplied back here. Not replaced by loss_is_scaled_for_ga=
        # True because x·k/k is not always x in floating point (the logged loss at k=3, the gradient at k=41, ...):
        # this keeps training and logs bit-identical to earlier releases.
        loss = loss * self.current_gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._meta_active and "loss" in logs and self.rates is not None:
            logs.update(self.meta_metrics())
        super().log(logs, start_time)

    def meta_metrics(self) -> dict[str, float]:
        """Scalar summaries of the meta state since the last call (what goes to log_history / reporters)."""
        return self._meta_log.metrics(self.rates)

    # ------------------------------------------------------------------ checkpoints and the Hub
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self._meta_active and self.args.should_save:
            out = output_dir if output_dir is not None else self.args.output_dir
            self.lr_trajectory.save_pretrained(out)
            if self._saving_checkpoint:  # the rates go with a checkpoint's model (save_only_model included)
                save_rates(self, out)

    def _save_checkpoint(self, model, trial) -> None:
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._meta_active and self.is_world_process_zero():
            for name in (TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME):
                src = os.path.join(checkpoint_folder, name)
                if os.path.isfile(src):
                    shutil.copy(src, os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's card plus the learned-trajectory section, plots and replay instructions."""
        super().create_model_card(*args, **kwargs)
        if self._meta_active and self.is_world_process_zero():
            from .hub import write_artifacts

            _mend_trainer_card(os.path.join(self.args.output_dir, "README.md"))
            dataset = kwargs.get("dataset")  # Trainer.create_model_card's name(s) of the training data
            check = self.meta_set_check
            extra = {} if check is None else {"meta set, as the trained model sees it": check.card_text()}
            model_type = str(getattr(getattr(self.model, "config", None), "model_type", ""))
            if model_type.startswith("hf_ddlr_"):  # one of hf_ddlr.models: the Auto classes know it once imported
                extra["loading the model"] = (f"`import hf_ddlr.models` before `AutoModel*.from_pretrained`: it "
                                              f"registers the model type `{model_type}` with the Auto classes")
            write_artifacts(
                self.lr_trajectory, self.args.output_dir, repo_id=self._repo_id(),
                model_name=kwargs.get("model_name"),
                dataset_name=dataset if dataset is None or isinstance(dataset, str) else ", ".join(dataset),
                extra=extra or None,
            )

    def _repo_id(self) -> str:
        return self.hub_model_id or self.args.hub_model_id or os.path.basename(os.path.normpath(self.args.output_dir))

    def push_to_hub(self, *args: Any, **kwargs: Any):
        """``Trainer.push_to_hub`` (model, trajectory, plots, card). On failure the output folder is complete and
        the error says how to retry: the model and the card (with the trajectory and plots) are written before
        the push, which creates the Hub repo before it saves anything (the push then saves them once more)."""
        if self._meta_active:
            self.save_model(_internal_call=True)  # every process, as in the push (a save can be collective)
            if self.is_world_process_zero():
                self.create_model_card(model_name=kwargs.get("model_name") or self._repo_id().split("/")[-1])
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as err:
            if not self._meta_active or not _is_transfer_error(err):
                raise
            from .hub import HubUploadError, retry_command

            repo = self._repo_id()
            raise HubUploadError(
                f"Pushing {self.args.output_dir} to {repo} failed: {type(err).__name__}: {err}. The folder is "
                f"complete locally (model, {TRAJECTORY_TENSORS_NAME}, plots, README.md); retry with "
                f"`{retry_command(self.args.output_dir, repo)}` or trainer.push_to_hub().",
                folder_path=self.args.output_dir, repo_id=repo,
            ) from err

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._meta_active and self._applied_instance is not None:  # every process: the merge is collective
            self._applied_instance.merged()
        if self._meta_active and self.args.should_save:
            save_meta_state(self, output_dir)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the rates and the trajectory go back to the best checkpoint too."""
        super()._load_best_model()
        if self._meta_active:
            load_best_meta_state(self)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._meta_active and checkpoint is not None:
            load_meta_state(self, checkpoint)


def _mend_trainer_card(path: str) -> None:
    """The Trainer's card of a model built from a config (``_name_or_path`` "") and a train set without a name
    says "a fine-tuned version of [](https://huggingface.co/) on the None dataset": written as what it is."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    mended = (text.replace("This model is a fine-tuned version of [](https://huggingface.co/) on ",
                           "This model was trained from scratch on ")
              .replace(" on the None dataset.", " on an unnamed dataset."))
    if mended != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(mended)


def _is_transfer_error(err: BaseException) -> bool:
    """An error of the network / Hub layer (whichever HTTP client huggingface_hub uses), not of our code."""
    if isinstance(err, OSError):
        return True
    clients = {"httpx", "httpx2", "requests", "urllib3", "huggingface_hub", "aiohttp"}
    return any(c.__module__.split(".")[0] in clients for c in type(err).__mro__)
