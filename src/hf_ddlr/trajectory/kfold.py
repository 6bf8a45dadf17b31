"""Averaging the trajectories of k folds into one to replay (paper §3.1).

Each fold learns rates on its own train part; the replay on the full train set uses, per example, the mean
over the folds that trained on it. :func:`average_records` returns the result in the stored form
(``metadata``, ``tensors``, as :meth:`LRTrajectory.metadata` / :meth:`LRTrajectory.tensors` give them), so
:meth:`LRTrajectory.average` builds the averaged trajectory with :meth:`LRTrajectory.from_stored` and this
module does not depend on the record class.

Warnings name the caller of ``LRTrajectory.average`` (``stacklevel`` counts the frames in between).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # averaging reads trajectories through their public views only
    from .record import LRTrajectory

Indices = Sequence[torch.Tensor | Sequence[int]]
# settings a replay reads to know which rates each step applied: runs averaged together must share them
REPLAY_SETTINGS = ("meta_update", "probe_batches")
# frames between a warning raised in a helper of average_records and the caller of LRTrajectory.average
_CALLER = 4


def average_records(
    trajectories: Sequence[LRTrajectory],
    *,
    instance_indices: Indices | None = None,
    dataset: dict[str, Any] | None = None,
    epoch_atol: float = 0.01,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of the average of ``trajectories`` (see :meth:`LRTrajectory.average`)."""
    trajs = _checked_runs(trajectories, instance_indices, dataset)
    first = trajs[0]
    metadata = {
        "dataset": dict(dataset if dataset is not None else first.dataset),
        "label_names": first.label_names,
        "config": {**first.config, "averaged_over_runs": len(trajs)},
        "model_name": first.model_name,
    }
    levels = {(t.has_instance_rates, t.has_class_rates, t.has_group_rates) for t in trajs}
    if len(levels) > 1:
        raise ValueError("the runs learned rates at different levels (instance, class, group tables: "
                         f"{sorted(levels)}); average runs of one rate level")
    for key in REPLAY_SETTINGS:
        values = [t.config.get(key) for t in trajs]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"the runs have different {key} ({values}), which decides how a replay reads the "
                             f"rates: average runs of one {key}")
    if instance_indices is None and any(t.has_instance_rates for t in trajs):
        _check_same_train_set(trajs)  # (before the schedules: other train sets have other steps per epoch too)
    for i, t in enumerate(trajs[1:], start=1):
        if t.label_names != first.label_names:
            raise ValueError(f"trajectory {i} has label names {t.label_names}, trajectory 0 has {first.label_names}")
    tensors = _average_steps(trajs, epoch_atol)
    tensors.update(_average_table_snapshots(trajs, epoch_atol, "class"))
    if any(t.has_group_rates for t in trajs):
        metadata["groups"] = _common_groups(trajs)  # (checked first: group g must be the same group everywhere)
        tensors.update(_average_table_snapshots(trajs, epoch_atol, "group"))
    if any(t.has_instance_rates for t in trajs):
        tensors.update(_average_instance_snapshots(trajs, epoch_atol, instance_indices, metadata["dataset"]))
        if metadata["dataset"].get("num_examples") is None:
            metadata["dataset"]["num_examples"] = tensors["instance_rates"].shape[1]
    elif all(t.noise_mask is not None for t in trajs) and instance_indices is None:
        tensors["noise_mask"] = first.noise_mask.clone()
    return metadata, tensors


def _checked_runs(
    trajectories: Sequence[LRTrajectory], instance_indices: Indices | None, dataset: dict[str, Any] | None
) -> list[LRTrajectory]:
    trajs = list(trajectories)
    if not trajs:
        raise ValueError("LRTrajectory.average needs at least one trajectory")
    if instance_indices is not None and len(instance_indices) != len(trajs):
        raise ValueError(
            f"got {len(instance_indices)} instance_indices for {len(trajs)} trajectories; pass one per fold"
        )
    if instance_indices is not None and dataset is None:
        raise ValueError(
            "average(..., instance_indices=...) needs dataset=<full train set signature> "
            "(e.g. dataset_signature(full_train)): the folds' own signatures describe their subsets"
        )
    return trajs


def _average_steps(trajs: list[LRTrajectory], epoch_atol: float) -> dict[str, torch.Tensor]:
    """Per-step records: steps and epochs of the first run, mean LR and weight decay, NaN-aware mean meta loss."""
    n = min(t.num_steps for t in trajs)
    if any(t.num_steps != n for t in trajs):
        warnings.warn(
            f"averaging runs of {[t.num_steps for t in trajs]} steps: truncated to the shortest ({n})",
            stacklevel=_CALLER,
        )
    if not n:
        return {}
    steps = [t.steps[:n] for t in trajs]
    _check_aligned("step", [s.to(torch.float64) for s in steps], 0.0)
    _check_aligned("epoch (per step)", [t.epochs[:n] for t in trajs], epoch_atol)
    return {
        "steps": steps[0],
        "epochs": trajs[0].epochs[:n],
        "learning_rate": torch.stack([t.learning_rate[:n] for t in trajs]).mean(0),
        "weight_decay": torch.stack([t.weight_decay[:n] for t in trajs]).mean(0),
        "meta_loss": torch.stack([t.meta_loss[:n] for t in trajs]).nanmean(0),
    }


def _average_table_snapshots(trajs: list[LRTrajectory], epoch_atol: float, kind: str) -> dict[str, torch.Tensor]:
    """Class (``kind="class"``) or group snapshots: the i-th snapshots of every run averaged, at the first
    run's steps and epochs."""
    has = [getattr(t, f"has_{kind}_rates") for t in trajs]
    if not any(has):
        return {}
    if not all(has):
        raise ValueError(f"some trajectories have {kind} rates and some do not; average runs of one rate level")
    m = _common_length([getattr(t, f"num_{kind}_snapshots") for t in trajs], f"{kind} snapshots")
    _check_aligned(f"{kind} snapshot step", [getattr(t, f"{kind}_steps")[:m].to(torch.float64) for t in trajs], 0.0)
    _check_aligned(f"{kind} snapshot epoch", [getattr(t, f"{kind}_epochs")[:m] for t in trajs], epoch_atol)
    return {
        f"{kind}_rates": torch.stack([getattr(t, f"{kind}_rates")[:m] for t in trajs]).mean(0),
        f"{kind}_steps": getattr(trajs[0], f"{kind}_steps")[:m],
        f"{kind}_epochs": getattr(trajs[0], f"{kind}_epochs")[:m],
    }


def _common_groups(trajs: list[LRTrajectory]) -> dict[str, Any]:
    """The groups of the averaged group rates: every run's column and names must agree (group ``g`` is the same
    group in every run). The per-group example counts are kept when the runs agree on them; fold runs train
    on different parts, so they usually do not, and the counts of the full train set are unknown here."""
    first = trajs[0].groups or {}
    for i, t in enumerate(trajs[1:], start=1):
        g = t.groups or {}
        if (g.get("column"), g.get("names")) != (first.get("column"), first.get("names")):
            raise ValueError(
                f"cannot average group rates: trajectory {i} has the groups {g.get('names')} of column "
                f"{g.get('column')!r}, trajectory 0 has {first.get('names')} of {first.get('column')!r}. Fold runs "
                f"must see every group (and the same group column)."
            )
    sizes = first.get("sizes") if all((t.groups or {}).get("sizes") == first.get("sizes") for t in trajs) else None
    return {"column": first.get("column"), "names": first.get("names"), "sizes": sizes}


def _average_instance_snapshots(
    trajs: list[LRTrajectory], epoch_atol: float, instance_indices: Indices | None, dataset: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Instance snapshots: per example, the mean over the folds that trained on it; how many did is the
    ``instance_coverage``, and examples no fold trained on get the neutral rate 1.0 (with a warning)."""
    if not all(t.has_instance_rates for t in trajs):
        raise ValueError("some trajectories have instance rates and some do not; average runs of one rate level")
    e = _common_length([t.num_instance_snapshots for t in trajs], "instance snapshots")
    _check_aligned("instance snapshot epoch", [t.instance_epochs[:e] for t in trajs], epoch_atol)
    tables, noise = _full_tables(trajs, e, instance_indices, dataset)
    mean, coverage = _mean_over_folds(tables)
    uncovered = int((coverage == 0).sum())
    if uncovered:
        warnings.warn(
            f"{uncovered} examples were trained on by no fold; their averaged rate is the neutral 1.0",
            stacklevel=_CALLER,
        )
        mean[:, coverage == 0] = 1.0
    out = {
        "instance_rates": mean.float(),
        "instance_steps": trajs[0].instance_steps[:e],
        "instance_epochs": trajs[0].instance_epochs[:e],
        "instance_coverage": coverage,
    }
    if noise is not None:
        out["noise_mask"] = noise
    return out


def _mean_over_folds(tables: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-aware mean of the folds' ``[E, N]`` tables and, per example, how many folds trained on it.

    Running sums over the folds (NaN where a fold did not train): memory of two tables, not of all K
    folds stacked.
    """
    summed = count = None
    for table in tables:
        valid = ~torch.isnan(table)
        if summed is None:
            summed, count = torch.zeros_like(table), torch.zeros(table.shape, dtype=torch.int32)
        summed += torch.where(valid, table, torch.zeros((), dtype=table.dtype))
        count += valid
    coverage = count[0].clone()  # coverage does not change over epochs
    return summed / count.clamp(min=1), coverage


def _common_length(lengths: list[int], what: str) -> int:
    m = min(lengths)
    if any(x != m for x in lengths):
        warnings.warn(
            f"averaging runs with {lengths} {what}: truncated to the shortest ({m})", stacklevel=_CALLER + 1
        )
    return m


def _check_aligned(what: str, columns: list[torch.Tensor], atol: float) -> None:
    ref = columns[0]
    for i, col in enumerate(columns[1:], start=1):
        bad = (col - ref).abs() > atol
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"cannot average: record {j} is at {what} {ref[j].item():g} in trajectory 0 but "
                f"{col[j].item():g} in trajectory {i}. Fold runs must use the same schedule "
                f"(batch size, logging steps, epochs) to be averaged."
            )


def _full_tables(
    trajs: list[LRTrajectory], e: int, instance_indices: Indices | None, dataset: dict[str, Any]
) -> tuple[Iterator[torch.Tensor], torch.Tensor | None]:
    """Every fold's ``[E, N_full]`` instance table (NaN where it did not train), built one at a time so
    that averaging holds two tables, not K, and the full noise mask."""
    if instance_indices is None:
        return _same_set_tables(trajs, e)
    return _indexed_tables(trajs, e, instance_indices, dataset)


def _check_same_train_set(trajs: list[LRTrajectory]) -> None:
    """Runs averaged row by row (no ``instance_indices``) must have learned on one train set: the same
    fingerprint where both have one, tables of one size."""
    prints = [t.dataset.get("fingerprint") for t in trajs]
    for k, fp in enumerate(prints[1:], start=1):
        if prints[0] and fp and fp != prints[0]:
            raise ValueError(
                f"trajectory {k} was learned on another train set than trajectory 0 (fingerprint {fp!r} vs "
                f"{prints[0]!r}), so row i of their instance tables is not the same example. Pass "
                f"instance_indices=[each fold's full-train positions, ...] and dataset=<full train "
                f"signature> (as examples/kfold_replay.py does), or average runs on the same train set."
            )
    sizes = {t.final_instance_rates.numel() for t in trajs}
    if len(sizes) != 1:
        raise ValueError(
            f"instance tables have sizes {sorted(sizes)}: the runs trained on train sets of other sizes. Index them "
            f"by full train position (NaN where a fold did not train) or pass instance_indices=[fold positions, ...]"
        )


def _same_set_tables(trajs: list[LRTrajectory], e: int) -> tuple[Iterator[torch.Tensor], torch.Tensor | None]:
    """The folds' tables as they are: each already indexed by full train position (checked by
    :func:`_check_same_train_set`)."""
    prints = [t.dataset.get("fingerprint") for t in trajs]
    if len(trajs) > 1 and not all(prints):
        warnings.warn(
            "averaging instance rates of runs whose train sets have no fingerprint (e.g. a torch Dataset): row i "
            "is taken to be the same example in every run, which cannot be checked. For folds on different rows, "
            "pass instance_indices=[each fold's full-train positions, ...] and dataset=<full train signature>.",
            stacklevel=_CALLER + 2,
        )
    masks = [t.noise_mask for t in trajs]
    noise = masks[0].clone() if all(m is not None for m in masks) else None
    return (t.instance_rates[:e].to(torch.float64) for t in trajs), noise


def _indexed_tables(
    trajs: list[LRTrajectory], e: int, instance_indices: Indices, dataset: dict[str, Any]
) -> tuple[Iterator[torch.Tensor], torch.Tensor | None]:
    """The folds' tables spread to full train positions ``instance_indices[k]`` (NaN elsewhere)."""
    n_full = dataset.get("num_examples") if dataset else None
    if n_full is None:
        raise ValueError("average(..., instance_indices=...) needs dataset=<full train set signature> for N")
    positions = []
    noise = torch.zeros(n_full, dtype=torch.bool)
    noise_known = torch.zeros(n_full, dtype=torch.bool)
    for k, (t, idx) in enumerate(zip(trajs, instance_indices)):
        idx = torch.as_tensor(idx, dtype=torch.int64)
        width = t.final_instance_rates.numel()
        if idx.numel() != width:
            raise ValueError(
                f"instance_indices[{k}] has {idx.numel()} positions but trajectory {k} has {width} instance rates"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_full):
            raise ValueError(f"instance_indices[{k}] has positions outside the full train set of {n_full}")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"instance_indices[{k}] names a full-train position more than once: each of the fold's "
                             f"{width} rows is one example of the full train set, so its positions are distinct")
        positions.append(idx)
        if t.noise_mask is not None:
            noise[idx] = t.noise_mask
            noise_known[idx] = True

    def tables() -> Iterator[torch.Tensor]:
        for t, idx in zip(trajs, positions):
            full = torch.full((e, n_full), float("nan"), dtype=torch.float64)
            full[:, idx] = t.instance_rates[:e].to(torch.float64)
            yield full

    return tables(), (noise if bool(noise_known.all()) else None)
