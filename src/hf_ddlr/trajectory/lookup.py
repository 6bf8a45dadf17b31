"""The values of a trajectory at any step or epoch: interpolation between its snapshots, with a cache.

A replay asks for the rates once per optimizer step; stacking the recorded snapshots into tables costs
more than the lookup, so :class:`SnapshotLookup` stacks them once and keeps them. It reads the trajectory
through its public tensor views only; whoever changes the trajectory drops the lookup (``LRTrajectory``
does on every record).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # a lookup only reads the record; importing it here would be a cycle
    from .record import LRTrajectory

INTERPOLATION_MODES = ("linear", "previous", "next")


def interp_rows(xs: torch.Tensor, table: torch.Tensor, x: float, mode: str, what: str) -> torch.Tensor:
    """Row of ``table`` at coordinate ``x`` over sorted snapshot coordinates ``xs``.

    ``mode="linear"`` interpolates between the snapshots around ``x``; ``"previous"`` takes the last
    snapshot at or before ``x``; ``"next"`` the first at or after. Outside the recorded range the
    first/last snapshot is used. At a snapshot coordinate every mode returns that snapshot exactly.
    """
    if table.shape[0] == 0:
        raise ValueError(f"the trajectory has no {what} snapshots: it was recorded at another rate level")
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"mode must be 'linear', 'previous' or 'next', got {mode!r}")
    xs_np = xs.numpy()
    if x <= xs_np[0]:
        return table[0].clone()
    if x >= xs_np[-1]:
        return table[-1].clone()
    hi = int(np.searchsorted(xs_np, x, side="left"))  # xs[hi-1] < x <= xs[hi]
    lo = hi - 1
    if xs_np[hi] == x or mode == "next":
        return table[hi].clone()
    if mode == "previous":
        return table[lo].clone()
    frac = (x - float(xs_np[lo])) / (float(xs_np[hi]) - float(xs_np[lo]))
    return torch.lerp(table[lo], table[hi], float(frac))


class SnapshotLookup:
    """Cached lookups of one (unchanging) trajectory's rates, weight decay and learning rate.

    The semantics of each query are documented on the :class:`~hf_ddlr.trajectory.LRTrajectory` method
    of the same name, which delegates here.
    """

    def __init__(self, trajectory: LRTrajectory) -> None:
        self._trajectory = trajectory
        self._cache: dict[str, torch.Tensor] = {}

    def _cached(self, key: str, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _step_or_epoch(self, step: int | None, epoch: float | None, prefix: str) -> tuple[torch.Tensor, float]:
        """The snapshot coordinates (``class_steps``/``class_epochs`` for ``prefix="class_"``, the per-step
        ``steps``/``epochs`` for ``prefix=""``) and the query coordinate, for whichever of ``step``/``epoch``
        is given."""
        if (step is None) == (epoch is None):
            raise ValueError("pass exactly one of step= or epoch=")
        t = self._trajectory
        if step is not None:
            return self._cached(f"{prefix}steps", lambda: getattr(t, f"{prefix}steps").to(torch.float64)), float(step)
        return self._cached(f"{prefix}epochs", lambda: getattr(t, f"{prefix}epochs")), float(epoch)

    def instance_rates_at(self, epoch: float, mode: str = "linear") -> torch.Tensor:
        """Per-instance rates ``[N]`` at (fractional) ``epoch``, float32."""
        t = self._trajectory
        xs = self._cached("instance_epochs", lambda: t.instance_epochs)
        table = self._cached("instance_rates", lambda: t.instance_rates)
        return interp_rows(xs, table, float(epoch), mode, "instance").float()

    def class_rates_at(self, step: int | None = None, epoch: float | None = None, mode: str = "linear",
                       kind: str = "class") -> torch.Tensor:
        """Per-class rates ``[C]`` (``kind="group"``: per-group rates ``[G]``) at optimizer ``step`` or at
        ``epoch``, float32."""
        xs, x = self._step_or_epoch(step, epoch, f"{kind}_")
        table = self._cached(f"{kind}_rates", lambda: getattr(self._trajectory, f"{kind}_rates"))
        return interp_rows(xs, table, x, mode, kind).float()

    def scalar_at(self, field: str, step: int | None, epoch: float | None, what: str) -> float:
        """The per-step value ``field`` (``"weight_decay"`` or ``"learning_rate"``) at ``step`` or ``epoch``,
        linear between the recorded steps."""
        t = self._trajectory
        if not t.num_steps:
            raise ValueError(f"the trajectory has no per-step records, so no {what} to replay")
        xs, x = self._step_or_epoch(step, epoch, "")
        table = self._cached(field, lambda: getattr(t, field).unsqueeze(1))
        return float(interp_rows(xs, table, x, "linear", what)[0])
