"""What :class:`~hf_ddlr.MetaLRTrainer` records of the meta step: the values that go to the Trainer's logs
(:class:`MetaLog`) and the learned LR trajectory (:class:`TrajectoryRecorder`, with the settings it stores).

The Trainer is reached as ``trainer`` / ``self.trainer`` so that tests/test_transformers_contract.py sees the
uses of its members.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from ._batches import HALF_META_BATCH_TASKS, meta_batch_size, probe_batches
from ._meta_parameters import (
    instance_centering_choice,
    instance_rate_at_cap_choice,
    instance_signal_choice,
    meta_objective_choice,
    meta_parameters_choice,
)
from .config import rate_metric_choice
from .meta import RateTable
from .meta.distributed import world_size
from .trajectory import LRTrajectory

if TYPE_CHECKING:
    from .trainer import MetaLRTrainer

logger = logging.get_logger("hf_ddlr.trainer")

__all__ = ["AppliedInstanceRates", "MetaLog", "TrajectoryRecorder", "meta_settings", "new_trajectory"]

_META_KEYS = ("lr_level", "meta_lr", "meta_lr_scaling", "learn_weight_decay", "weight_decay_meta_lr", "keep_history",
              "meta_strategy", "meta_update", "meta_interval", "meta_batch_size", "lookahead", "meta_grad_average",
              "meta_grad_average_epochs", "meta_dropout", "max_rate", "max_instance_rate",
              "class_rate_direction")
MAX_LOGGED_GROUPS = 8  # group rates logged one by one (group_rate/<name>) up to this many groups
_TRAIN_KEYS = ("learning_rate", "weight_decay", "max_grad_norm", "optim", "lr_scheduler_type",
               "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed")


class MetaLog:
    """The meta step's values: of the current optimizer step (its learning rate and meta loss, for the
    trajectory) and summed since the last log line (mean meta loss, skipped steps, for ``log_history``)."""

    def __init__(self, learning_rate: float, group_names: list[str] | None = None) -> None:
        self.step_lr = float(learning_rate)
        self.group_names = group_names
        self.step_meta_loss: float | None = None
        self._meta_loss_sum, self._meta_steps, self._skipped = 0.0, 0, 0

    def begin_step(self, lr: float) -> None:
        self.step_lr, self.step_meta_loss = lr, None

    def record(self, meta_loss: float) -> None:
        """A meta step that updated the rates."""
        self.step_meta_loss = meta_loss
        self._meta_loss_sum += meta_loss
        self._meta_steps += 1

    def record_skipped(self, step: int, meta_loss: float) -> None:
        """A meta step whose meta loss or gradient was not finite (the rates were left unchanged)."""
        self._skipped += 1
        logger.warning(
            f"Step {step}: the meta loss or its gradient is not finite "
            f"(meta loss {meta_loss}); the rates are left unchanged for this step."
        )

    def metrics(self, rates: RateTable) -> dict[str, float]:
        """Scalar summaries since the last call (the sums start again) and of the current rates: mean / min / max /
        zero fraction of each table, and, with at most :data:`MAX_LOGGED_GROUPS` groups, every group's rate as
        ``group_rate/<name>`` (the data-mixture weights)."""
        m: dict[str, float] = {}
        if self._meta_steps:
            m["meta_loss"] = round(self._meta_loss_sum / self._meta_steps, 6)
        if self._skipped:
            m["meta_skipped_steps"] = self._skipped
        self._meta_loss_sum, self._meta_steps, self._skipped = 0.0, 0, 0
        for name, t in (("rate", rates.instance), ("class_rate", rates.per_class), ("group_rate", rates.per_group)):
            if t is not None:
                m[f"{name}_mean"] = float(t.mean())
                m[f"{name}_min"] = float(t.min())
                m[f"{name}_max"] = float(t.max())
                m[f"{name}_zero_frac"] = float((t <= 1e-6).float().mean())
        if rates.per_group is not None and self.group_names and len(self.group_names) <= MAX_LOGGED_GROUPS:
            m.update({f"group_rate/{n}": float(v) for n, v in zip(self.group_names, rates.per_group.tolist())})
        m["meta_weight_decay"] = float(rates.weight_decay)
        return m


def meta_settings(trainer: MetaLRTrainer) -> dict[str, Any]:
    """The run's settings stored with its trajectory (meta options, the training arguments that shape it)."""
    out = {k: getattr(trainer.meta_args, k) for k in _META_KEYS}
    out.update({k: getattr(trainer.args, k) for k in _TRAIN_KEYS})
    out["optim"] = str(out["optim"].value if hasattr(out["optim"], "value") else out["optim"])
    out["lr_scheduler_type"] = str(getattr(out["lr_scheduler_type"], "value", out["lr_scheduler_type"]))
    out["mode"] = "replay" if trainer.replay is not None else "learn"
    if out["mode"] == "learn" and getattr(trainer, "_task", None) is not None:  # (the value the run used)
        out["probe_batches"] = probe_batches(trainer)
        out["meta_parameters"] = meta_parameters_choice(trainer)
        objective = meta_objective_choice(trainer, out["meta_parameters"])
        rates = getattr(trainer, "rates", None)  # (resolved once, when the run's table was made)
        at_cap = rates.at_cap if rates is not None else instance_rate_at_cap_choice(trainer, out["meta_parameters"])
        if at_cap != "clamp":  # only then, likewise
            out["instance_rate_at_cap"] = at_cap
        if objective != "loss":  # only then: the settings of every other run stay as they were
            out["meta_objective"] = objective
    out["meta_set_size"] = len(trainer.meta_dataset) if trainer.meta_dataset is not None else None
    if trainer.meta_args.group_column:  # only then: the settings of every other run stay as they were
        out["group_column"] = trainer.meta_args.group_column
    if trainer.meta_args.lookahead_step != 1.0:  # likewise
        out["lookahead_step"] = trainer.meta_args.lookahead_step
    metric = rate_metric_choice(trainer.meta_args)
    if metric != "optimizer":  # likewise ("adam": under Adam/AdamW the same metric)
        out["rate_metric"] = metric
    if trainer.meta_args.instance_rate_scale != "batch":  # likewise
        out["instance_rate_scale"] = trainer.meta_args.instance_rate_scale
    if out["mode"] == "learn" and getattr(trainer, "_task", None) is not None:  # as the run resolved them
        signal = instance_signal_choice(trainer)
        centred, center = instance_centering_choice(trainer, signal)
        if signal != "mean":  # only then, likewise
            out["instance_signal"] = signal
        if centred:  # likewise
            out["center_instance_rates"] = True
            if center != "mean":
                out["instance_rate_center"] = center
    if trainer.meta_args.instance_rate_normalization != "none":  # likewise
        out["instance_rate_normalization"] = trainer.meta_args.instance_rate_normalization
    task = getattr(trainer, "_task", None)
    if out["meta_batch_size"] is None and task is not None and task.task in HALF_META_BATCH_TASKS:
        out["meta_batch_size"] = meta_batch_size(trainer)  # not the training batch: say which it was
    return out


def new_trajectory(trainer: MetaLRTrainer, train_dataset: Any) -> LRTrajectory:
    """An empty trajectory for a run on ``train_dataset`` (the set as given, without the index column)."""
    traj = LRTrajectory.for_dataset(
        train_dataset, config=meta_settings(trainer),
        model_name=getattr(getattr(trainer.model, "config", None), "_name_or_path", None) or None,
    )
    if traj.label_names is None and trainer.rates.per_class is not None:
        traj.label_names = [str(c) for c in range(trainer.num_labels)]
    groups = trainer._groups
    if groups is not None:
        traj.groups = {"column": groups.column, "names": list(groups.names), "sizes": list(groups.sizes)}
    return traj


class AppliedInstanceRates:
    """The instance rate every example was last trained with, for the trajectory of a run with probes.

    Without probes an example's rate moves only at its own visits, so the table at an epoch's end holds what each
    example was trained with in that epoch (same-step update) or from the next one on (delayed). Probes move rates
    between visits; the trajectory then records these values instead, so that a replay applies exactly what the
    run applied. Each process notes its own micro-batches (:meth:`note`, at every step); :meth:`merged` combines the
    processes' rows at a snapshot (two all-reduces per epoch)."""

    def __init__(self, live: torch.Tensor) -> None:
        self.values = live.detach().clone()
        self.seen = torch.zeros_like(self.values, dtype=torch.bool)  # rows noted on this process since the merge

    def note(self, indices: torch.Tensor, rates: torch.Tensor) -> None:
        """The rows ``indices`` are trained with instance rates ``rates`` in this step."""
        idx = indices.to(self.values.device)
        self.values[idx] = rates.to(self.values.device)
        self.seen[idx] = True

    def merged(self) -> torch.Tensor:
        """Every process's noted rows combined (a row nobody trained since the last merge keeps its value)."""
        if world_size() > 1:
            total, count = self.values * self.seen, self.seen.to(self.values.dtype)
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
            self.values = torch.where(count > 0, total / count.clamp(min=1), self.values)
        self.seen.zero_()
        return self.values

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.cpu(), "seen": self.seen.cpu()}

    @classmethod
    def resumed(cls, live: torch.Tensor, saved: Mapping[str, torch.Tensor] | None) -> AppliedInstanceRates:
        """The record a resumed run continues: a checkpoint's (``saved``), or, when it has none (a checkpoint of a
        run without probes, whose rates moved at visits only) or one of another train set, a new one from the
        resumed rates ``live``."""
        out = cls(live)
        if saved is not None and saved["values"].shape == out.values.shape:
            out.values = saved["values"].to(out.values.device, out.values.dtype)
            out.seen = saved["seen"].to(out.values.device, torch.bool)
        else:
            logger.info("No record of the applied instance rates for this train set in the checkpoint: it starts "
                        "from the checkpoint's rates.")
        return out


class TrajectoryRecorder(TrainerCallback):
    """Feeds :attr:`MetaLRTrainer.lr_trajectory`: per-step LR / weight decay / meta loss and class (or group) rates,
    instance rates at the start and at every epoch end."""

    def __init__(self, trainer: MetaLRTrainer) -> None:
        self.trainer = trainer
        self._instance_step: int | None = None  # the step of the last instance snapshot

    def _snapshot(self, state, instance: bool) -> None:
        t, rates = self.trainer.lr_trajectory, self.trainer.rates
        if rates.per_class is not None:
            t.record_class_rates(state.global_step, state.epoch or 0.0, rates.per_class)
        if rates.per_group is not None:
            t.record_group_rates(state.global_step, state.epoch or 0.0, rates.per_group)
        if instance and rates.instance is not None:
            applied = self.trainer._applied_instance
            t.record_instance_rates(state.global_step, state.epoch or 0.0,
                                    rates.instance if applied is None else applied.merged())
            self._instance_step = state.global_step

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.lr_trajectory.num_steps == 0 and state.global_step == 0:
            self._snapshot(state, instance=True)

    def on_step_end(self, args, state, control, **kwargs):
        trainer, log = self.trainer, self.trainer._meta_log
        wd = trainer.rates.weight_decay if trainer.meta_args.learn_weight_decay else args.weight_decay
        trainer.lr_trajectory.record_step(state.global_step, state.epoch or 0.0, log.step_lr, wd, log.step_meta_loss)
        # the step that ends an epoch records the epoch's instance table here, not at on_epoch_end: the Trainer
        # saves a checkpoint due at this step (save_strategy="steps") before it calls on_epoch_end, and the
        # checkpoint's trajectory must hold the epoch it finished (its replay, and a run resumed from it, need it)
        epoch = state.epoch or 0.0
        self._snapshot(state, instance=epoch > 0 and epoch == int(epoch))

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._instance_step != state.global_step:  # a stop within an epoch (max_steps, should_training_stop)
            self._snapshot(state, instance=True)
