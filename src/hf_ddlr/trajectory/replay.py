"""Replaying a learned trajectory in a new training run, step by step.

:class:`TrajectoryReplayer` is what :class:`~hf_ddlr.MetaLRTrainer` holds when it is given a
``replay_trajectory``: it loads the trajectory, refuses a train set the trajectory does not belong to, and
before every optimizer step sets the rate table to the values the original run used at that point of
training (through the trajectory's cached lookups, :mod:`.lookup`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .record import LRTrajectory

if TYPE_CHECKING:  # duck-typed: the replayer sets the table's public fields only
    from ..meta.rates import RateTable

logger = logging.getLogger(__name__)


class TrajectoryReplayer:
    """Replays ``trajectory`` (an :class:`LRTrajectory`, or a local folder / Hub repo id to load one from).

    With ``train_dataset`` the trajectory is checked against it (:meth:`LRTrajectory.check_dataset`;
    ``check_fingerprint=False`` compares the size only).
    """

    def __init__(
        self,
        trajectory: LRTrajectory | str | os.PathLike,
        train_dataset: Any = None,
        *,
        check_fingerprint: bool = True,
    ) -> None:
        self.trajectory = (
            trajectory if isinstance(trajectory, LRTrajectory) else LRTrajectory.from_pretrained(trajectory)
        )
        if train_dataset is not None:
            self.trajectory.check_dataset(train_dataset, check_fingerprint=check_fingerprint)
        t = self.trajectory  # the last epoch it recorded anything at (read once: each view copies its records)
        ends = [float(e[-1]) for e in (t.epochs, t.instance_epochs, t.class_epochs, t.group_epochs) if len(e)]
        self._last_epoch = max(ends, default=0.0)
        self._warned_past_end = False

    def check_classes(self, num_labels: int, label_names: list[str] | None) -> None:
        """Refuse a train set whose classes are not the trajectory's: class rates are keyed by label id, so on
        another number of classes they do not fit, and on other class names (where the trajectory and the train
        set both name them) each rate would land on another class."""
        t = self.trajectory
        if not t.has_class_rates:
            return
        k, recorded = int(t.class_rates.shape[-1]), t.label_names
        named = recorded is not None and list(recorded) != [str(c) for c in range(k)]  # not just the ids
        about = f" ({', '.join(map(str, recorded))})" if named else ""
        fix = ("replay it on a train set with the trajectory's classes in the same label order (e.g. "
               "dataset.align_labels_with_mapping), or learn new rates with a meta_dataset instead of replay_trajectory.")
        if k != num_labels:
            raise ValueError(f"The replayed trajectory's class rates cover {k} classes{about}; this run has "
                             f"{num_labels}: {fix}")
        if named and label_names is not None and list(label_names) != list(recorded):
            raise ValueError(f"The replayed trajectory's classes are {list(recorded)}; the train set's are "
                             f"{list(label_names)}. Its class rates would land on other classes: {fix}")

    def _warn_past_end(self, epoch: float, step: int) -> None:
        """Once per run: the run trains on past the trajectory's end, where it can only keep the last rates."""
        last = self._last_epoch
        if self._warned_past_end or epoch <= last + 1e-6:
            return
        self._warned_past_end = True
        logger.warning(
            f"replay_trajectory ends at epoch {last:g}, and this run trains past it (step {step + 1} ends at epoch "
            f"{epoch:g}): from there on every step keeps the trajectory's last rates, which the original run never "
            f"applied there. Replay the trajectory of a run as long as this one (its final save, not an earlier "
            f"checkpoint), or stop this run at epoch {last:g} (num_train_epochs / max_steps)."
        )

    def replays_weight_decay(self, requested: bool) -> bool:
        """Whether the run sets the weight decay from the trajectory: when ``requested``, and also when the
        trajectory learned it (it is part of the schedule, so it is replayed too)."""
        if self.trajectory.config.get("learn_weight_decay") and not requested:
            logger.info("replay_trajectory learned the weight decay: replaying it (learn_weight_decay=True).")
            return True
        return requested

    def set_rates(
        self,
        rates: RateTable,
        step: int,
        steps_per_epoch: int,
        epoch_after: Callable[[int], float],
        *,
        weight_decay: bool,
        default_weight_decay: float,
    ) -> None:
        """Set ``rates`` to the trajectory's values for the optimizer step that follows global step ``step``.

        Values are looked up by epoch, so a trajectory learned on a k-fold subset (fewer steps per epoch)
        replays on the full train set; ``epoch_after(s)`` is ``state.epoch`` after optimizer step ``s`` in
        this run. Instance rates: a same-step run applied, during epoch e, the value its table holds at the
        end of epoch e (each example is visited once per epoch); a delayed run applied the value from the
        start of the epoch; a run with probes (``probe_batches``), whose rates also move between visits, recorded
        at the end of epoch e the values applied during it. Class (or group) rates and weight decay (when ``weight_decay``): the values recorded for
        this step (interpolated when the replay has more steps per epoch than the original run); before
        the first record a delayed run used its starting weight decay (``default_weight_decay`` when the
        trajectory does not name it).
        """
        t = self.trajectory
        delayed = t.config.get("meta_update") == "delayed"
        mid = (step + 0.5) / steps_per_epoch  # strictly inside the current epoch
        # The original run recorded, at the end of step s, the values after that step's meta update: a
        # same-step run had applied them in step s itself, a delayed one applies them from step s + 1 on.
        end = epoch_after(step if delayed else step + 1)
        self._warn_past_end(epoch_after(step + 1), step)
        # A run with probes recorded at each epoch's end the rates its examples were trained with in that epoch.
        mode = "previous" if delayed and not t.config.get("probe_batches") else "next"
        if rates.instance is not None:
            if not t.has_instance_rates:
                raise ValueError(f"The replayed trajectory has no instance rates; set lr_level to what it recorded "
                                 f"({t.config.get('lr_level')!r}).")
            rates.instance.copy_(t.instance_rates_at(mid, mode=mode).to(rates.instance.device))
        if rates.per_class is not None:
            if not t.has_class_rates:
                raise ValueError(f"The replayed trajectory has no class rates; set lr_level to what it recorded "
                                 f"({t.config.get('lr_level')!r}).")
            rates.per_class.copy_(t.class_rates_at(epoch=end).to(rates.per_class.device))
        if rates.per_group is not None:
            if not t.has_group_rates:
                raise ValueError("The replayed trajectory has no group rates; set lr_level and group_column to what "
                                 f"it recorded ({t.config.get('lr_level')!r}, {t.config.get('group_column')!r}).")
            rates.per_group.copy_(t.group_rates_at(epoch=end).to(rates.per_group.device))
        if weight_decay and t.num_steps:
            if delayed and step == 0:  # before the first record: the original run's starting value
                rates.weight_decay = float(t.config.get("weight_decay", default_weight_decay))
            else:
                rates.weight_decay = t.weight_decay_at(epoch=end)
