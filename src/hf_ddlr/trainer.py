"""`MetaLRTrainer`: the Hugging Face wiring around the meta step of :mod:`hf_ddlr.meta`.

The trainer keeps the Trainer's own loop. Once per optimizer step (before the first micro-batch of the
gradient-accumulation window) it runs the meta step on the unwrapped model with pure functional passes,
then lets ``Trainer.training_step`` do every real forward/backward, so gradient accumulation, ``no_sync``,
mixed precision, clipping and logging stay the Trainer's. The only change to the real step is the loss:
``Σ e_i L_i / N_window`` with the learned example weights ``e_i``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .config import MetaLROptions, resolve_meta_options
from .meta import (
    MetaBatch,
    MetaGradients,
    MicroBatch,
    RateTable,
    find_output_layer,
    meta_gradients,
    param_specs,
    per_example_loss,
    replay_rng,
)
from .meta.averaging import MetaGradientAverage
from .meta.distributed import all_gather_varlen, all_ranks_true, all_reduce_mean_
from .meta.layerwise import LayerTape, LayerwiseUnsupported, record_layers, unsupported_reason
from .meta.passes import extract_logits
from .meta.primal_reuse import record_outputs
from .trajectory import TRAJECTORY_CONFIG_NAME, TRAJECTORY_TENSORS_NAME, LRTrajectory, TrajectoryReplayer

logger = logging.get_logger(__name__)

__all__ = ["MetaLRTrainer", "META_STATE_NAME"]

META_STATE_NAME = "meta_state.safetensors"
META_GRAD_AVERAGE_NAME = "meta_grad_average.safetensors"
_LABEL_KEYS = ("labels", "label")

# What this module overrides, calls or reads of transformers.Trainer, in one place so that
# tests/test_transformers_contract.py can check it against the installed transformers (a private member can
# change in any release). Each entry is (member, how, parameter names):
#   "override"  - MetaLRTrainer overrides it and the Trainer calls it: the Trainer's parameters (without self)
#                 must be exactly these, in this order (our override takes and forwards them);
#   "call"      - MetaLRTrainer calls it (or reads these keyword arguments in a pass-through override): these
#                 names must be parameters of it, in this order;
#   "attribute" - MetaLRTrainer reads it: a class attribute, or one the Trainer sets (`self.<name> = ...`).
# Changing a use in this module means changing its entry here.
_TRAINER_MEMBERS_USED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("__init__", "call", ("model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class")),
    ("train", "override", ("resume_from_checkpoint", "trial", "ignore_keys_for_eval")),
    ("_set_signature_columns_if_needed", "override", ()),
    ("prediction_step", "override", ("model", "inputs", "prediction_loss_only", "ignore_keys")),
    ("create_optimizer", "override", ("model",)),
    ("get_batch_samples", "override", ("epoch_iterator", "num_batches", "device")),
    ("training_step", "override", ("model", "inputs", "num_items_in_batch")),
    ("compute_loss", "override", ("model", "inputs", "return_outputs", "num_items_in_batch")),
    ("log", "override", ("logs", "start_time")),
    ("_save", "override", ("output_dir", "state_dict")),
    ("_push_from_checkpoint", "override", ("checkpoint_folder",)),
    ("_save_optimizer_and_scheduler", "override", ("output_dir",)),
    ("_load_best_model", "override", ()),
    ("_load_optimizer_and_scheduler", "override", ("checkpoint",)),
    ("create_model_card", "call", ("model_name", "dataset")),
    ("push_to_hub", "call", ()),
    ("_remove_unused_columns", "call", ("dataset", "description")),
    ("_get_collator_with_removed_columns", "call", ("data_collator", "description")),
    ("_prepare_inputs", "call", ("inputs",)),
    ("get_decay_parameter_names", "call", ("model",)),
    ("get_train_dataloader", "call", ()),
    ("add_callback", "call", ("callback",)),
    ("is_world_process_zero", "call", ()),
    ("_signature_columns", "attribute", ()),
    ("_train_batch_size", "attribute", ()),
    ("current_gradient_accumulation_steps", "attribute", ()),
    ("loss_is_scaled_for_ga", "attribute", ()),
    ("is_deepspeed_enabled", "attribute", ()),
    ("is_fsdp_enabled", "attribute", ()),
    ("is_fsdp_xla_enabled", "attribute", ()),
    ("hub_model_id", "attribute", ()),
    ("accelerator", "attribute", ()),
    ("optimizer", "attribute", ()),
    ("state", "attribute", ()),
    ("args", "attribute", ()),
    ("model", "attribute", ()),
    ("train_dataset", "attribute", ()),
    ("data_collator", "attribute", ()),
)
# Attributes of the Trainer's `accelerate.Accelerator` read here (fp16 loss scale, sharded/split set-ups).
_ACCELERATOR_MEMBERS_USED: tuple[str, ...] = ("scaler", "parallelism_config")


class _IndexedDataset(Dataset):
    """Adds the row index to every item of a map-style dataset of dicts."""

    def __init__(self, base: Dataset, column: str) -> None:
        self.base, self.column = base, column

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        if not isinstance(item, Mapping):
            raise TypeError(
                f"MetaLRTrainer needs dataset items that are dicts (got {type(item).__name__}) to attach the "
                f"'{self.column}' index; return a dict like {{'pixel_values': ..., 'labels': ...}}."
            )
        return {**item, self.column: i}


def _label_values(dataset: Any) -> torch.Tensor | None:
    """All labels of a `datasets.Dataset` (None when they cannot be read cheaply)."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        return None
    for key in _LABEL_KEYS:
        if key in names:
            return torch.as_tensor(dataset.with_format(None)[key])
    return None


def _has_labels(dataset: Any) -> bool:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return any(k in names for k in _LABEL_KEYS)
    try:
        item = dataset[0]
    except Exception:  # noqa: BLE001 - an unindexable dataset: let the first batch tell
        return True
    return isinstance(item, Mapping) and any(k in item for k in _LABEL_KEYS)


def _first_item(dataset: Any) -> Mapping | None:
    """Row 0 as the data loader sees it (after a ``set_transform``), or None when it cannot be read cheaply."""
    try:
        item = dataset[0]
    except Exception:  # noqa: BLE001 - empty or unindexable: the first batch will tell
        return None
    return item if isinstance(item, Mapping) else None


def _label_type_problem(value: Any) -> str | None:
    """Why ``value`` (one example's label) is not an integer class id, or None when it is one."""
    if isinstance(value, (str, bytes)) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], str)):
        return "strings"
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        ok = not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
        return None if ok else f"{dtype} values"
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind in "US":
            return "strings"
        return None if value.dtype.kind in "iu" else f"{value.dtype} values"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return f"{type(value).__name__} values"
    return None


def _check_label_type(name: str, dataset: Any) -> None:
    """Refuse, at construction, labels that are not integer class ids (they would fail inside the loss)."""
    item = _first_item(dataset)
    key = next((k for k in _LABEL_KEYS if item is not None and k in item), None)
    if key is None:
        return
    problem = _label_type_problem(item[key])
    if problem is None:
        return
    var = f"{name}_dataset"
    if name == "meta":
        fix = (f"Map them with the train set's label mapping: {var} = {var}.cast_column({key!r}, "
               f"train_dataset.features[{key!r}]) when the train set's label is a ClassLabel, or "
               f"{var}.map(lambda r: {{{key!r}: label2id[r[{key!r}]]}}) with the label2id used for the train set "
               f"(model.config.label2id).")
    else:
        fix = (f"Map them to integer ids, e.g. {var} = {var}.class_encode_column({key!r}) (a ClassLabel), and use "
               f"the same mapping for the meta set and model.config.label2id.")
    raise ValueError(
        f"The {name} dataset's {key!r} column holds {problem} (row 0: {item[key]!r}): per-example learning rates "
        f"need integer class ids 0..num_labels-1. {fix}"
    )


class MetaLRTrainer(Trainer):
    """A :class:`transformers.Trainer` that learns per-example / per-class learning-rate multipliers and the
    weight decay by a one-step-lookahead meta-gradient on ``meta_dataset`` (Saxena, Vyas & DeCoste).

    Without ``meta_dataset`` (and without ``replay_trajectory``) it is exactly ``Trainer``.
    The learned values are in :attr:`rates` (``.instance``, ``.per_class``, ``.weight_decay``).

    ``args`` may be a :class:`~hf_ddlr.MetaLRConfig` or any other ``TrainingArguments`` (a subclass with its
    own fields, TRL's configs): it stays :attr:`args` as given (its class, fields and ``to_dict()`` are saved
    with checkpoints), and the meta options are read from it at construction into :attr:`meta_args` (a
    :class:`~hf_ddlr.config.MetaLROptions`: ``args``' attribute of each option's name where it has one,
    MetaLRConfig's default otherwise).
    """

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
        self.rates: RateTable | None = None
        self.lr_trajectory: LRTrajectory | None = None
        if self._meta_active:
            if train_dataset is None:
                raise ValueError("MetaLRTrainer with a meta_dataset or replay_trajectory needs a train_dataset.")
            for name, ds in (("train_dataset", train_dataset), ("meta_dataset", meta_dataset)):
                if ds is not None and not hasattr(ds, "__len__"):
                    raise ValueError(
                        f"MetaLRTrainer needs a map-style {name} (datasets.Dataset or a torch Dataset with __len__): "
                        f"per-example rates are indexed by row and meta batches are sampled by position, which an "
                        f"{type(ds).__name__} (streaming/iterable) does not offer. Materialize it first, e.g. "
                        f"datasets.Dataset.from_generator(...) or load_dataset(..., streaming=False)."
                    )
            if not _has_labels(train_dataset):
                raise ValueError(
                    "The train dataset has no 'labels'/'label' column: per-example learning rates need the "
                    "class label of every example."
                )
            if meta_dataset is not None and not _has_labels(meta_dataset):
                raise ValueError("The meta dataset has no 'labels'/'label' column; add the labels of its examples.")
            _check_label_type("train", train_dataset)
            if meta_dataset is not None:
                _check_label_type("meta", meta_dataset)
            self._source_train_dataset = train_dataset
            train_dataset = self._with_index(train_dataset, meta.index_column)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self._meta_active:
            if meta_dataset is not None:
                self._check_supported_parallelism()
                self._check_meta_inputs()
            self._init_meta(num_labels)
            self.add_callback(_TrajectoryRecorder(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any):
        """``Trainer.train``. A second call without ``resume_from_checkpoint`` is a new run (as in
        ``hyperparameter_search``): it starts again from rates 1 and an empty trajectory."""
        if self._meta_active and getattr(self, "_has_trained", False) and not resume_from_checkpoint:
            self._init_meta(self.num_labels)
        self._has_trained = True
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

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

    def _check_meta_inputs(self) -> None:
        """Refuse, at construction, a meta set without the model inputs the train set gives (e.g. raw text that
        was never tokenised): its first meta batch would fail deep inside the model. The inputs are the train
        set's row-0 keys that are arguments of the model's forward (what the Trainer's column removal keeps),
        without the labels and the index column."""
        train, meta = _first_item(self._source_train_dataset), _first_item(self.meta_dataset)
        if train is None or meta is None:
            return
        self._set_signature_columns_if_needed()
        skip = {*_LABEL_KEYS, "label_ids", self.meta_args.index_column}
        needed = (set(train) & set(self._signature_columns)) - skip
        missing = sorted(needed - set(meta))
        if missing:
            raise ValueError(
                f"The meta dataset has no {', '.join(map(repr, missing))} column{'s' if len(missing) > 1 else ''}: "
                f"the train set gives {sorted(needed)} to {type(self.model).__name__}.forward, the meta set only "
                f"{sorted(meta)}, so its first meta step would fail inside the model. Preprocess the meta set with "
                f"the same function as the train set, e.g. meta_dataset = meta_dataset.map(tokenize, batched=True) "
                f"with the tokenizer call used for the train set (or the same set_transform)."
            )

    @staticmethod
    def _with_index(dataset: Any, column: str) -> Any:
        """``dataset`` with ``column`` holding each row's position (the key of its instance rate)."""
        names = getattr(dataset, "column_names", None)
        if names is not None:
            if column in names:
                values = np.asarray(dataset.with_format(None)[column], dtype=np.int64)
                if len(values) == len(dataset) and np.array_equal(np.sort(values), np.arange(len(dataset))):
                    return dataset  # a permutation of the row positions (e.g. from hf_ddlr.data): keep it
                raise ValueError(
                    f"The train set's {column!r} column is not a permutation of the row positions 0..{len(dataset) - 1} "
                    f"(values {values.min() if len(values) else '-'}..{values.max() if len(values) else '-'}), e.g. "
                    f"after .select()/.filter()/train_test_split: instance rates are indexed by it. Drop it with "
                    f"train_dataset.remove_columns({column!r}) and MetaLRTrainer adds a fresh one, or set "
                    f"index_column to another name."
                )
            fmt = dataset.format
            out = dataset.add_column(column, list(range(len(dataset))))
            if fmt.get("type") == "custom":  # keep a user's set_transform, and let it see the new column
                cols = fmt.get("columns")
                out.set_transform(fmt["format_kwargs"]["transform"], columns=None if cols is None else [*cols, column],
                                  output_all_columns=fmt.get("output_all_columns", False))
            return out
        return _IndexedDataset(dataset, column)

    def _infer_num_labels(self, num_labels: int | None) -> int:
        if num_labels is not None:
            return int(num_labels)
        cfg = getattr(self.model, "config", None)
        if cfg is not None and getattr(cfg, "num_labels", None):
            return int(cfg.num_labels)
        labels = _label_values(self.train_dataset)
        if labels is not None:
            return int(labels.max()) + 1
        raise ValueError("Cannot tell the number of classes: pass num_labels=... to MetaLRTrainer.")

    def _init_meta(self, num_labels: int | None) -> None:
        args, meta = self.args, self.meta_args
        self.num_labels = self._infer_num_labels(num_labels)
        for name, ds in (("meta", self.meta_dataset), ("train", self.train_dataset)):
            if ds is None:
                continue
            labels = _label_values(ds)
            if labels is not None and labels.numel() and (labels.min() < 0 or labels.max() >= self.num_labels):
                bad = sorted({int(v) for v in labels[(labels < 0) | (labels >= self.num_labels)].unique()[:10]})
                raise ValueError(
                    f"The {name} dataset has labels {bad} outside the model's label space 0..{self.num_labels - 1}. "
                    "Use the same label mapping as the train set (and num_labels / model.config.num_labels)."
                )
        self.rates = RateTable(
            len(self.train_dataset),
            self.num_labels,
            meta.lr_level,
            weight_decay=args.weight_decay,
            learn_weight_decay=meta.learn_weight_decay,
            meta_lr=meta.meta_lr,
            meta_wd_lr=meta.weight_decay_meta_lr,
            scaling=meta.meta_lr_scaling,
            max_rate=meta.max_rate,
            device=args.device,
        )
        self._meta_grad_average = MetaGradientAverage(meta.meta_grad_average) if meta.meta_grad_average else None
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-window mean; the Trainer divides by GA
        self._window: list[MicroBatch] = []
        self._window_pos = 0
        self._fused = False
        self._layerwise = "unchecked"  # per-layer dots: "unchecked" | "verified" | "off"
        self._window_normalizer = 1.0
        self._current_weights: torch.Tensor | None = None
        self._meta_log: dict[str, float] = {"meta_loss_sum": 0.0, "meta_steps": 0, "skipped": 0}
        self._warned: set[str] = set()
        self._meta_data = None
        self._spe: int | None = None  # optimizer steps per epoch, computed on first use
        self._step_meta_loss: float | None = None
        self._step_lr = float(args.learning_rate)
        self.lr_trajectory = LRTrajectory.for_dataset(
            self._source_train_dataset, config=self._meta_settings(),
            model_name=getattr(getattr(self.model, "config", None), "_name_or_path", None) or None,
        )
        if self.lr_trajectory.label_names is None and self.rates.per_class is not None:
            self.lr_trajectory.label_names = [str(c) for c in range(self.num_labels)]

    def _meta_settings(self) -> dict[str, Any]:
        meta_keys = ("lr_level", "meta_lr", "meta_lr_scaling", "learn_weight_decay", "weight_decay_meta_lr",
                     "keep_history", "meta_strategy", "meta_update", "meta_interval", "meta_batch_size", "lookahead",
                     "meta_grad_average", "meta_dropout", "max_rate")
        train_keys = ("learning_rate", "weight_decay", "max_grad_norm", "optim", "lr_scheduler_type",
                      "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                      "seed")
        out = {k: getattr(self.meta_args, k) for k in meta_keys}
        out.update({k: getattr(self.args, k) for k in train_keys})
        out["optim"] = str(out["optim"].value if hasattr(out["optim"], "value") else out["optim"])
        out["lr_scheduler_type"] = str(getattr(out["lr_scheduler_type"], "value", out["lr_scheduler_type"]))
        out["mode"] = "replay" if self.replay is not None else "learn"
        out["meta_set_size"] = len(self.meta_dataset) if self.meta_dataset is not None else None
        return out

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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The Trainer's, without the index column (kept by the column removal, see
        :meth:`_set_signature_columns_if_needed`; ``hf_ddlr.data`` splits carry it on every split)."""
        if self._meta_active and self.meta_args.index_column in inputs:
            inputs = {k: v for k, v in inputs.items() if k != self.meta_args.index_column}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        if self._meta_active:
            self._tag_decay_groups(opt)
        return opt

    def _decay_names(self) -> set[str]:
        return set(self.get_decay_parameter_names(self.model))

    def _tag_decay_groups(self, opt) -> None:
        decay = self._decay_names()
        ids = {id(p) for n, p in self.model.named_parameters() if n in decay}
        for g in opt.param_groups:
            if "hf_ddlr_decay" not in g:
                g["hf_ddlr_decay"] = bool(g["params"]) and all(id(p) in ids for p in g["params"])

    def _raw_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _apply_weight_decay(self) -> None:
        if not self.meta_args.learn_weight_decay:
            return
        self._tag_decay_groups(self.optimizer)
        for g in self.optimizer.param_groups:
            if g.get("hf_ddlr_decay"):
                g["weight_decay"] = self.rates.weight_decay

    # ------------------------------------------------------------------ the meta step
    def _seed(self, kind: int, k: int = 0) -> int:
        return (
            self.args.seed * 1_000_003
            + self.state.global_step * 7_919
            + k * 104_729
            + kind * 86_028_121
            + self.args.process_index * 15_485_863
        ) % (2**62)

    def _meta_batch(self) -> MetaBatch:
        if self._meta_data is None:
            ds, collate = self.meta_dataset, self.data_collator
            if hasattr(ds, "column_names"):
                if self.args.remove_unused_columns:
                    ds = self._remove_unused_columns(ds, description="Meta")
            else:  # a torch dataset: drop the keys the model does not take at collation, as the Trainer does
                collate = self._get_collator_with_removed_columns(self.data_collator, description="Meta")
            self._meta_data, self._meta_collate = ds, collate
        ds = self._meta_data
        # default: the micro-batches of one optimizer step (_train_batch_size follows auto_find_batch_size)
        per_device = getattr(self, "_train_batch_size", None) or self.args.per_device_train_batch_size
        m = self.meta_args.meta_batch_size or per_device * self.args.gradient_accumulation_steps
        g = torch.Generator().manual_seed(self._seed(kind=1))
        # a meta set smaller than the meta batch is used whole (drawing with replacement would only add noise)
        idx = torch.randperm(len(ds), generator=g)[:m] if m <= len(ds) else torch.arange(len(ds))
        batch = self._prepare_inputs(self._meta_collate([ds[int(i)] for i in idx]))
        batch.pop(self.meta_args.index_column, None)
        labels = batch.pop("labels", None)
        if labels is None:
            labels = batch.pop("label")
        return MetaBatch(batch, labels, seed=self._seed(kind=2), dropout=self.meta_args.meta_dropout)

    def _to_microbatch(self, raw: Mapping[str, Any], k: int) -> MicroBatch:
        col = self.meta_args.index_column
        if col not in raw:
            raise KeyError(
                f"The training batch has no '{col}' column. If the train set uses set_transform, return "
                f"'{col}' from the transform (it is added to the dataset automatically)."
            )
        batch = self._prepare_inputs(dict(raw))
        idx = batch.pop(col)
        labels = batch.pop("labels", None)
        if labels is None:
            raise KeyError("The training batch has no 'labels'; per-example learning rates need labels.")
        weights = self.rates.effective(idx, labels)
        return MicroBatch(batch, labels, weights, seed=self._seed(kind=0, k=k), indices=idx)

    def _meta_step_due(self) -> bool:
        return self.replay is None and self.state.global_step % self.meta_args.meta_interval == 0

    def _strategy(self) -> str:
        s = self.meta_args.meta_strategy
        if s == "finite_difference" and (self.args.bf16 or self.args.fp16):
            if "fd" not in self._warned:
                warnings.warn(
                    "meta_strategy='finite_difference' is unreliable in half precision (the perturbation drowns "
                    "in rounding); using 'jvp' instead.",
                    stacklevel=2,
                )
                self._warned.add("fd")
            return "jvp"
        return s

    def _run_meta_step(
        self, grads: dict[str, torch.Tensor] | None = None, layer_tape: LayerTape | None = None,
        check_layer_tape: float | None = None,
    ) -> MetaGradients:
        args, meta = self.args, self.meta_args
        model = self.model
        model.train()
        params = self._trainable_params()
        self._tag_decay_groups(self.optimizer)
        decay_ids = {id(q) for g in self.optimizer.param_groups if g.get("hf_ddlr_decay") for q in g["params"]}
        decay = {n for n, p in params.items() if id(p) in decay_ids}
        specs = param_specs(self._raw_optimizer(), params, decay, mode=meta.lookahead)
        res = meta_gradients(
            model,
            params,
            self._window,
            self._meta_batch(),
            specs,
            weight_decay=self.rates.weight_decay if meta.learn_weight_decay else args.weight_decay,
            normalizer=self._window_normalizer,
            strategy=self._strategy(),
            grads=grads,
            label_smoothing=args.label_smoothing_factor,
            fd_eps=meta.fd_epsilon,
            loss_scale=self._loss_scale(),
            num_labels=self.num_labels,
            layer_tape=layer_tape,
            check_layer_tape=check_layer_tape,
            # the optimizer-aware lookahead clips like the real step; the paper's plain-SGD one does not
            max_grad_norm=args.max_grad_norm if meta.lookahead == "optimizer" else None,
            average=self._meta_grad_average,
            weight_decay_grad_needed=meta.learn_weight_decay,
        )
        if not all_ranks_true(res.finite, self.args.device):  # every rank skips together (no hanging gather)
            self._meta_log["skipped"] += 1
            logger.warning(
                f"Step {self.state.global_step}: the meta loss or its gradient is not finite "
                f"(meta loss {res.meta_loss}); the rates are left unchanged for this step."
            )
            return res
        idx = all_gather_varlen(torch.cat([mb.indices for mb in self._window]))
        labels = all_gather_varlen(torch.cat([mb.labels for mb in self._window]))
        grad = all_gather_varlen(res.example_grad.to(labels.device))
        self.rates.update(idx, labels, grad, res.weight_decay_grad)
        self._step_meta_loss = res.meta_loss
        self._meta_log["meta_loss_sum"] += res.meta_loss
        self._meta_log["meta_steps"] += 1
        self.last_meta_gradients = res
        return res

    def _loss_scale(self) -> float:
        """The fp16 GradScaler's current scale (1 otherwise): the meta passes run on scaled losses too."""
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._meta_active and batch_samples:
            self._begin_window(batch_samples)
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

    def _begin_window(self, batch_samples: list) -> None:
        self._step_meta_loss = None
        self._step_lr = float(self.optimizer.param_groups[0]["lr"])
        if self.replay is not None:
            self._set_replayed_rates()
        if not self.meta_args.keep_history and self._meta_step_due() and self.meta_args.meta_update == "same_step":
            self.rates.reset()
        self._window = [self._to_microbatch(b, k) for k, b in enumerate(batch_samples)]
        self._window_pos = 0
        self._window_normalizer = float(sum(mb.labels.shape[0] for mb in self._window))
        same_step = self.meta_args.meta_update == "same_step" and self._meta_step_due()
        # One micro-batch per step: the meta step reuses the real forward (see compute_loss), one forward less.
        self._fused = same_step and len(self._window) == 1 and self._strategy() != "exact"
        if same_step and not self._fused:
            self._run_meta_step()
            for mb in self._window:
                mb.weights = self.rates.effective(mb.indices, mb.labels)
        self._apply_weight_decay()

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._meta_active:
            return super().training_step(model, inputs, num_items_in_batch)
        k = self._window_pos
        if k >= len(self._window):
            raise RuntimeError("training_step was called outside the Trainer's loop; use trainer.train().")
        self._window_pos += 1
        mb = self._window[k]
        inputs = dict(inputs)
        inputs.pop(self.meta_args.index_column, None)
        self._current_weights = mb.weights.detach()
        try:
            with replay_rng(mb.seed):
                loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._current_weights = None
        if self._last_losses is not None:
            mb.losses = self._last_losses
        if self.meta_args.meta_update == "delayed" and k == len(self._window) - 1 and self._meta_step_due():
            self._delayed_meta_step()
        return loss

    _last_losses: torch.Tensor | None = None

    def _delayed_meta_step(self) -> None:
        scale = self._loss_scale()
        # The engine only reads these, so fp32 gradients at scale 1 are passed as they are: a copy would
        # cost a full gradient's worth of memory at the step's peak.
        def real_grad(p: torch.Tensor) -> torch.Tensor:
            if p.grad is None:
                return torch.zeros_like(p)
            g = p.grad.detach()
            if scale == 1.0 and g.dtype == torch.float32:
                return g
            return g.float() / scale

        grads = {n: real_grad(p) for n, p in self._trainable_params().items()}
        if not self.meta_args.keep_history:
            self.rates.reset()
        self._run_meta_step(grads=grads)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The weighted loss ``Σ e_i L_i / N_window`` of a training micro-batch (the Trainer's loss otherwise).

        With one micro-batch per optimizer step and ``meta_update="same_step"`` the meta step happens here,
        between the real forward and its backward: the lookahead gradient is ``autograd.grad`` on the real
        forward's retained graph and the backward then uses the freshly updated weights (one forward
        fewer than running the meta step on its own). The forward-mode pass takes its conv / linear primal
        values from this forward; on models the per-layer products serve (``layerwise_dots``), they replace
        the forward-mode pass and the second backward altogether.
        """
        w = self._current_weights if self._meta_active else None
        if w is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs.pop(self.meta_args.index_column, None)
        mb = self._window[self._window_pos - 1]
        box: dict[str, torch.Tensor] = {}
        layerwise = self._layerwise_applies()
        # forward mode at this step: its pass can take the layers' primal values from this forward
        reuse = self._fused and not layerwise and self._strategy() == "jvp"
        with contextlib.ExitStack() as stack:
            if self._strategy() == "last_layer" and (self._fused or self.meta_args.meta_update == "delayed"):
                _, head = find_output_layer(self.model, self.num_labels)
                hook = head.register_forward_hook(lambda mod, inp, out: box.__setitem__("h", inp[0]))
                stack.callback(hook.remove)
            tape = stack.enter_context(record_layers(self.model, self._param_names(), labels.shape[0])) \
                if layerwise else None
            mb.outputs = stack.enter_context(record_outputs(self.model)) if reuse else None
            outputs = model(**inputs)
        logits = extract_logits(outputs)
        L = per_example_loss(logits, labels, self.args.label_smoothing_factor)
        self._last_losses = L.detach()
        if "h" in box:
            mb.features = (box["h"].detach(), logits.detach())
        ga = self.current_gradient_accumulation_steps
        if self._fused:
            mb.losses = L.detach()
            layerwise = tape is not None and self._layerwise_meta_step(tape, w, L)
            if not layerwise:
                self._run_meta_step(grads=self._fused_lookahead_grad(w, L))
            mb.outputs = None
            self._apply_weight_decay()
            w = mb.weights = self.rates.effective(mb.indices, mb.labels)
            if layerwise and self._layerwise == "verified":
                loss = self._loss_from_tape(tape, w, L) * ga
                return (loss, outputs) if return_outputs else loss
        loss = (w.to(L.dtype) * L).sum() / self._window_normalizer * ga
        return (loss, outputs) if return_outputs else loss

    def _loss_from_tape(self, tape: LayerTape, w: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        """A loss whose gradient is the real step's ``Σ e_i ∇L_i / N``, assembled from the recorded layers (no
        second backward through the model), and whose value is the weighted loss (what the Trainer logs)."""
        G = tape.weighted_grads(w / self._window_normalizer)
        params = self._trainable_params()
        S = sum((params[n] * g.to(params[n].dtype)).sum() for n, g in G.items())
        return (S - S.detach()) + (w.to(L.dtype) * L.detach()).sum() / self._window_normalizer

    def _trainable_params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _param_names(self) -> dict[int, str]:
        return {id(p): n for n, p in self._trainable_params().items()}

    def _layerwise_applies(self) -> bool:
        """Whether this step's meta step takes its dots from the recorded layers (see ``layerwise_dots``)."""
        args = self.args
        if not (self._fused and self.meta_args.layerwise_dots and self._strategy() == "jvp") or self._layerwise == "off":
            return False
        if self._layerwise == "unchecked":
            reason = unsupported_reason(self.model)
            checkpointing = args.gradient_checkpointing or any(
                getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()
            )
            if reason is None and checkpointing:
                reason = "gradient checkpointing recomputes the layers during the backward"
            if reason is not None:
                self._layerwise_off(reason, warn=False)
                return False
        return True

    def _layerwise_off(self, reason: str, warn: bool) -> None:
        self._layerwise = "off"
        msg = f"meta_strategy='jvp' uses forward mode for this model: {reason}."
        if warn:
            warnings.warn(msg + " (layerwise_dots=False skips this check.)", stacklevel=3)
        else:
            logger.info(msg)

    def _layerwise_meta_step(self, tape: LayerTape, w: torch.Tensor, L: torch.Tensor) -> bool:
        """The meta step from the recorded layers; False when they cannot serve (nothing was done then, and
        the real forward's graph is intact). Until it has passed once, the lookahead gradient and the dots are
        checked against autograd and forward mode (a step whose values overflow, as early fp16 steps do, does
        not count); on a mismatch the checked step keeps the reference values and every later step uses
        forward mode."""
        check = self._layerwise == "unchecked"
        half = bool(self.args.bf16 or self.args.fp16)
        problem = None
        try:
            tape.backward(L, self._loss_scale(), retain_graph=check)
        except LayerwiseUnsupported as e:
            problem = str(e)
        if check and not all_ranks_true(problem is None, self.args.device):  # every rank takes the same path
            self._layerwise_off(problem or "the recorded forward could not be decomposed on another process",
                                warn=True)
            return False
        grads = None
        if problem is None:
            got = tape.weighted_grads(w / self._window_normalizer)
            grads = {n: got[n] if n in got else torch.zeros_like(p, dtype=torch.float32)
                     for n, p in self._trainable_params().items()}
            all_reduce_mean_(list(grads.values()))
            if check:
                ref = self._fused_lookahead_grad(w, L)
                if not all(bool(torch.isfinite(r).all()) for r in ref.values()):
                    return False  # an fp16 overflow (the same on every rank): this step has no check; next one
                problem = _compare_grads(grads, ref, 2e-2 if half else 1e-3)
        if check and not all_ranks_true(problem is None, self.args.device):
            self._layerwise_off(problem or "the check failed on another process", warn=True)
            return False
        if problem is not None:  # a later step that cannot be decomposed (e.g. an unusual batch)
            self._layerwise_off(problem, warn=True)
            return False
        res = self._run_meta_step(grads=grads, layer_tape=tape,
                                  check_layer_tape=(0.999 if half else 0.9999) if check else None)
        if check and all_ranks_true(res.finite, self.args.device):  # (non-finite: skipped; checked next step)
            if all_ranks_true(res.layerwise_mismatch is None, self.args.device):
                self._layerwise = "verified"
                logger.info("meta_strategy='jvp': per-layer products match forward mode; using them.")
            else:
                self._layerwise_off(res.layerwise_mismatch or "the check failed on another process", warn=True)
        return True

    def _fused_lookahead_grad(self, w: torch.Tensor, L: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """(1/N) Σ e_i ∇L_i from the real forward's graph (kept for the real backward), averaged over ranks."""
        if self._strategy() == "last_layer":
            return None  # the closed form needs only the head's input, captured during the forward
        params = self._trainable_params()
        scale = self._loss_scale()
        total = (w.to(L.dtype) * L).sum() * (scale / self._window_normalizer)
        gs = torch.autograd.grad(total, list(params.values()), retain_graph=True, allow_unused=True)
        grads = {n: (g / scale if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), gs)}
        all_reduce_mean_(list(grads.values()))
        return grads

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._meta_active and "loss" in logs and self.rates is not None:
            logs.update(self.meta_metrics())
        super().log(logs, start_time)

    def meta_metrics(self) -> dict[str, float]:
        """Scalar summaries of the meta state since the last call (what goes to log_history / reporters)."""
        m: dict[str, float] = {}
        n = self._meta_log["meta_steps"]
        if n:
            m["meta_loss"] = round(self._meta_log["meta_loss_sum"] / n, 6)
        if self._meta_log["skipped"]:
            m["meta_skipped_steps"] = self._meta_log["skipped"]
        self._meta_log.update(meta_loss_sum=0.0, meta_steps=0, skipped=0)
        for name, t in (("rate", self.rates.instance), ("class_rate", self.rates.per_class)):
            if t is not None:
                m[f"{name}_mean"] = float(t.mean())
                m[f"{name}_min"] = float(t.min())
                m[f"{name}_max"] = float(t.max())
                m[f"{name}_zero_frac"] = float((t <= 1e-6).float().mean())
        m["meta_weight_decay"] = float(self.rates.weight_decay)
        return m

    # ------------------------------------------------------------------ checkpoints and the Hub
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self._meta_active and self.args.should_save:
            self.lr_trajectory.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

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

            dataset = kwargs.get("dataset")  # Trainer.create_model_card's name(s) of the training data
            write_artifacts(
                self.lr_trajectory, self.args.output_dir, repo_id=self._repo_id(),
                model_name=kwargs.get("model_name"),
                dataset_name=dataset if dataset is None or isinstance(dataset, str) else ", ".join(dataset),
            )

    def _repo_id(self) -> str:
        return self.hub_model_id or self.args.hub_model_id or os.path.basename(os.path.normpath(self.args.output_dir))

    def push_to_hub(self, *args: Any, **kwargs: Any):
        """``Trainer.push_to_hub`` (model, trajectory, plots, card). On failure the output folder is complete and
        the error says how to retry."""
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
        if self._meta_active and self.args.should_save:
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in self.rates.state_dict().items()},
                os.path.join(output_dir, META_STATE_NAME),
            )
            if self._meta_grad_average is not None:
                safetensors.torch.save_file(
                    self._meta_grad_average.state_dict(), os.path.join(output_dir, META_GRAD_AVERAGE_NAME)
                )

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the rates and the trajectory go back to the best checkpoint too, so that
        ``trainer.rates``, ``save_model`` and ``push_to_hub`` describe the model that is kept."""
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if not self._meta_active or not best or not os.path.isfile(os.path.join(best, META_STATE_NAME)):
            return
        self.rates.load_state_dict(safetensors.torch.load_file(os.path.join(best, META_STATE_NAME)))
        if os.path.isfile(os.path.join(best, TRAJECTORY_TENSORS_NAME)):
            self.lr_trajectory = LRTrajectory.from_pretrained(best)
        logger.info(f"Loaded the rates and LR trajectory of the best checkpoint {best} with its model.")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if not self._meta_active or checkpoint is None:
            return
        path = os.path.join(checkpoint, META_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(
                f"{path} is missing: the learned rates restart from 1 (the checkpoint was not written by "
                "MetaLRTrainer, or with save_only_model=True). Training is not an exact continuation.",
                stacklevel=2,
            )
            return
        self.rates.load_state_dict(
            safetensors.torch.load_file(path), allow_resize=self.meta_args.resize_rates_on_resume
        )
        self._apply_weight_decay()
        avg_path = os.path.join(checkpoint, META_GRAD_AVERAGE_NAME)
        if self._meta_grad_average is not None:
            if os.path.isfile(avg_path):
                self._meta_grad_average.load_state_dict(safetensors.torch.load_file(avg_path), self.args.device)
            else:  # empty, as the warning says (a second train() would otherwise carry its first run's average)
                self._meta_grad_average = MetaGradientAverage(self.meta_args.meta_grad_average)
                warnings.warn(
                    f"{avg_path} is missing (a checkpoint written without meta_grad_average): the running average "
                    "of the meta gradient starts again from this step. Training is not an exact continuation.",
                    stacklevel=2,
                )
        if os.path.isfile(os.path.join(checkpoint, TRAJECTORY_TENSORS_NAME)):
            # the trajectory now describes this run (its schedule may be longer than the checkpointed one's)
            self.lr_trajectory = self.lr_trajectory.resume_from(
                checkpoint, self.state.global_step, config=self._meta_settings()
            )


def _compare_grads(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], tol: float) -> str | None:
    """Why ``got`` differs from ``ref`` beyond ``tol`` (relative, per tensor, with a floor for ~zero tensors)."""
    floor = 1e-3 * max(float(r.float().norm()) for r in ref.values())
    for n, r in ref.items():
        err = float((got[n].float() - r.float()).norm())
        if not err <= tol * (float(r.float().norm()) + floor):
            return f"the per-layer gradient of '{n}' differs from autograd's by {err:.3g} (norm {float(r.norm()):.3g})"
    return None


def _is_transfer_error(err: BaseException) -> bool:
    """An error of the network / Hub layer (whichever HTTP client huggingface_hub uses), not of our code."""
    if isinstance(err, OSError):
        return True
    clients = {"httpx", "httpx2", "requests", "urllib3", "huggingface_hub", "aiohttp"}
    return any(c.__module__.split(".")[0] in clients for c in type(err).__mro__)


class _TrajectoryRecorder(TrainerCallback):
    """Feeds :attr:`MetaLRTrainer.lr_trajectory`: per-step LR / weight decay / meta loss and class rates,
    instance rates at the start and at every epoch end."""

    def __init__(self, trainer: MetaLRTrainer) -> None:
        self.trainer = trainer

    def _snapshot(self, state, instance: bool) -> None:
        t, rates = self.trainer.lr_trajectory, self.trainer.rates
        if rates.per_class is not None:
            t.record_class_rates(state.global_step, state.epoch or 0.0, rates.per_class)
        if instance and rates.instance is not None:
            t.record_instance_rates(state.global_step, state.epoch or 0.0, rates.instance)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.lr_trajectory.num_steps == 0 and state.global_step == 0:
            self._snapshot(state, instance=True)

    def on_step_end(self, args, state, control, **kwargs):
        tr = self.trainer
        wd = tr.rates.weight_decay if tr.meta_args.learn_weight_decay else args.weight_decay
        tr.lr_trajectory.record_step(state.global_step, state.epoch or 0.0, tr._step_lr, wd, tr._step_meta_loss)
        self._snapshot(state, instance=False)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._snapshot(state, instance=True)
