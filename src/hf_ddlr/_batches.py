"""The meta step's batches, built from what the Trainer gives: the micro-batches of a training window
(:class:`~hf_ddlr.meta.MicroBatch`, keyed to their rows' rates) and the meta batch of a meta step
(:class:`~hf_ddlr.meta.MetaBatch`, drawn from the meta set prepared the way the Trainer prepares its train set).

The Trainer is reached as ``trainer`` / ``self.trainer`` so that tests/test_transformers_contract.py sees the
uses of its members.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import DataCollatorWithPadding, DefaultDataCollator, default_data_collator

from ._tasks import model_batch
from .meta import MetaBatch, MicroBatch

if TYPE_CHECKING:
    from .trainer import MetaLRTrainer

__all__ = ["MetaSetSampler", "ProbeSampler", "probe_batches", "step_seed", "to_microbatch"]


def step_seed(trainer: MetaLRTrainer, kind: int, k: int = 0, step: int | None = None, shared: bool = False) -> int:
    """A seed for this optimizer step (or ``step``), process and use (``kind`` 0: micro-batch ``k``'s dropout
    replay, 1: the order of the meta set, 2: the meta batch's passes); ``shared``: the same on every process."""
    return (
        trainer.args.seed * 1_000_003
        + (trainer.state.global_step if step is None else step) * 7_919
        + k * 104_729
        + kind * 86_028_121
        + (0 if shared else trainer.args.process_index * 15_485_863)
    ) % (2**62)


def cycled_indices(trainer: MetaLRTrainer, n: int, m: int) -> torch.Tensor:
    """This process's rows of this meta step's meta batch: ``m`` of the meta set's ``n``. The meta steps take
    the meta set in turn from one shuffled order, shared by all processes, ``m × world_size`` places a step
    (process ``r`` the ``r``-th ``m`` of them), so that every ``ceil(n / (m × world_size))`` consecutive meta
    steps see every meta example (the last batch of a pass wraps to the start of the same order), each pass in a
    new order. Independent draws would leave some examples out of the running average of the meta gradient for
    many steps and count others several times, and orders of their own would have the processes score the
    same examples in one step: the rank-averaged meta gradient is then that of one process whose meta batch is
    the ranks' together. A function of the step and the seed, so a resumed run draws the same."""
    world, rank = max(1, trainer.args.world_size), trainer.args.process_index
    per_step = m * world
    per_pass, interval = -(-n // per_step), max(1, trainer.meta_args.meta_interval)
    p, j = divmod(trainer.state.global_step // interval, per_pass)  # the pass, and this meta step's place in it
    first = p * per_pass * interval  # the optimizer step of the pass's first meta step: its seed orders the pass
    seed = step_seed(trainer, kind=1, step=first, shared=True)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[(j * per_step + rank * m + torch.arange(m)) % n]


def to_microbatch(trainer: MetaLRTrainer, raw: Mapping[str, Any], k: int) -> MicroBatch:
    """Micro-batch ``k`` of the window, on the device, without its index column and labels among the model's
    inputs, with its examples' group ids (looked up by index) when the rates are per group. Its ``weights`` are
    left unset: the schedule sets them for the whole window (``Schedule._refresh``)."""
    col = trainer.meta_args.index_column
    if col not in raw:
        raise KeyError(
            f"The training batch has no '{col}' column. If the train set uses set_transform, return "
            f"'{col}' from the transform (it is added to the dataset automatically)."
        )
    batch = trainer._prepare_inputs(dict(raw))
    idx = batch.pop(col)
    for other in trainer._rate_columns[1:]:  # the group column, when the batch carries it
        batch.pop(other, None)
    labels = batch.pop("labels", None)
    if labels is None:
        raise KeyError("The training batch has no 'labels'; per-example learning rates need labels.")
    batch, labels = model_batch(trainer.model, batch, labels, trainer._task)
    groups = trainer._groups.ids(idx) if trainer._groups is not None else None
    return MicroBatch(batch, labels, None, seed=step_seed(trainer, kind=0, k=k), indices=idx, groups=groups)


# A meta set up to this many rows keeps the rows it has read (meta sets are small by design): reading a row of a
# ``datasets.Dataset`` costs far more than collating it, and a meta step reads a meta batch's worth of them.
MAX_CACHED_ROWS = 16384
# A train set whose Arrow table is at most this large is read whole, once, for the probes: reading the 64 rows of a
# probe batch one by one costs ~5 ms (MNIST, 784 floats a row: a 12 MB table) where one read of all 3,800 rows costs
# ~7 ms. Read as tensors or arrays it takes about the table's size in memory; a set read as Python lists takes up to
# ten times that, so its bound is an eighth of this.
MAX_BULK_BYTES = 64 * 2**20


def _reads_are_deterministic(ds: Any) -> bool:
    """Whether reading a row of ``ds`` twice gives the same values: a ``datasets.Dataset`` without a
    ``set_transform`` / ``with_transform`` (whose transform may draw random augmentations on every read)."""
    fmt = getattr(ds, "format", None)
    return hasattr(ds, "column_names") and isinstance(fmt, dict) and fmt.get("type") != "custom"


def _is_deterministic_collator(collate: Any) -> bool:
    """Whether ``collate`` gives the same batch for the same rows: the collators the Trainer uses by default."""
    return collate is default_data_collator or isinstance(collate, (DataCollatorWithPadding, DefaultDataCollator))


# tasks whose default meta batch is half the training examples of a step (see default_meta_batch_size)
HALF_META_BATCH_TASKS = ("causal_lm",)


def default_meta_batch_size(per_step: int, task: str | None) -> int:
    """The meta batch when ``meta_batch_size`` is unset: the examples of one optimizer step and device, half of
    them (rounded up) for a causal LM. There the meta pass — a forward and backward through the vocabulary-wide
    output layer at θ' — costs as much as a plain training step; half the meta batch measured faster and, over
    five seeds of the SFT example, as good, while the running average of the meta gradient still spans many
    meta batches (docs/speed.md, "The causal LM's meta batch")."""
    return max(1, -(-per_step // 2)) if task in HALF_META_BATCH_TASKS else per_step


def probe_batches(trainer: Any) -> float:
    """The run's ``probe_batches``: the option when set, else 1 for a task with one loss per example and 0 for a
    task whose logits are per token (causal LM, seq2seq, token classification, DPO: a forward-mode pass through the vocabulary costs a
    whole training step there, and those runs are long, with many visits per example already). 0 without history
    (``keep_history=False``): a probed rate would be reset before its example is trained with it."""
    if not trainer.meta_args.keep_history:  # the no-history ablation resets every rate before the next step
        return 0.0
    if trainer.meta_args.probe_batches is not None:
        return float(trainer.meta_args.probe_batches)
    task = getattr(trainer, "_task", None)
    return 0.0 if task is not None and task.token_outputs else 1.0


def _per_device_batch(trainer: Any) -> int:
    """The train micro-batch per device (``_train_batch_size`` follows ``auto_find_batch_size``)."""
    return getattr(trainer, "_train_batch_size", None) or trainer.args.per_device_train_batch_size


def meta_batch_size(trainer: Any) -> int:
    """The run's meta batch per device: ``meta_batch_size`` when set, else :func:`default_meta_batch_size` of
    the micro-batches of one optimizer step."""
    if trainer.meta_args.meta_batch_size:
        return trainer.meta_args.meta_batch_size
    task = getattr(trainer, "_task", None)
    return default_meta_batch_size(_per_device_batch(trainer) * trainer.args.gradient_accumulation_steps,
                                   task.task if task is not None else None)


def prepared_for_reading(trainer: MetaLRTrainer, dataset: Any, description: str) -> tuple[Any, Any]:
    """``dataset`` and a collate function as the Trainer prepares a train set: the columns the model does not take
    removed from a ``datasets.Dataset``, or dropped at collation for a torch dataset."""
    ds, collate = dataset, trainer.data_collator
    if hasattr(ds, "column_names"):
        if trainer.args.remove_unused_columns:
            ds = trainer._remove_unused_columns(ds, description=description)
    else:
        collate = trainer._get_collator_with_removed_columns(trainer.data_collator, description=description)
    return ds, collate


def probe_indices(n: int, per_step: int, meta_step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This process's probe rows at meta step ``meta_step``: the step's ``per_step`` consecutive places (over all
    processes) in a sequence of shuffled passes over the ``n`` training rows — each pass a new order drawn from
    ``seed`` and the pass number — process ``rank`` taking every ``world``-th of them. Consecutive meta steps
    take consecutive places, so the probes go through every training row once per pass."""
    places = meta_step * per_step + torch.arange(per_step)
    passes, at = places // n, places % n
    out = torch.empty(per_step, dtype=torch.long)
    for p in passes.unique().tolist():
        mask = passes == p
        out[mask] = _pass_order(n, seed, p)[at[mask]]
    return out[rank::world]


@functools.lru_cache(maxsize=4)
def _pass_order(n: int, seed: int, p: int) -> torch.Tensor:
    """The shuffled order of probe pass ``p`` (kept: a meta step would otherwise draw a permutation of the whole
    train set)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + p * 7_919) % 2**62))


class ProbeSampler:
    """The probe micro-batches of a meta step (``probe_batches``): training rows scored outside the step, so that
    every example's rate is updated ``1 + probe_batches`` times per epoch instead of once. ``probe_batches`` times
    the step's examples per process (``per_device_train_batch_size`` × ``gradient_accumulation_steps``), read from
    the train set as the Trainer prepares it and collated in micro-batches of the per-device batch size. Which rows
    is a function of the seed and the step (:func:`probe_indices`), so a resumed run probes the same rows."""

    def __init__(self, trainer: MetaLRTrainer) -> None:
        self.trainer = trainer
        self._prepared: tuple[Any, Any] | None = None
        self._columns: dict[str, Any] | None = None  # the whole train set's columns, when read at once
        self._bulk_checked = False

    def per_step(self) -> int:
        """Probe rows per meta step on this process."""
        trainer = self.trainer
        return round(probe_batches(trainer) * _per_device_batch(trainer) * trainer.args.gradient_accumulation_steps)

    def take(self, first_k: int) -> list[MicroBatch]:
        """This meta step's probe micro-batches (dropout replay seeds ``first_k``, ``first_k + 1``, ...)."""
        trainer = self.trainer
        m = self.per_step()
        if m == 0:
            return []
        if self._prepared is None:
            self._prepared = prepared_for_reading(trainer, trainer.train_dataset, "training")
        ds, collate = self._prepared
        world, rank = trainer.args.world_size, trainer.args.process_index
        meta_step = trainer.state.global_step // max(1, trainer.meta_args.meta_interval)
        idx = probe_indices(len(ds), m * world, meta_step, trainer.args.seed + 1, rank, world)
        return [to_microbatch(trainer, collate(self._read(ds, chunk.tolist())), first_k + k)
                for k, chunk in enumerate(idx.split(_per_device_batch(trainer)))]

    def _read(self, ds: Any, rows: list[int]) -> list[Any]:
        """Rows ``rows`` as the Trainer's DataLoader reads them: from the whole train set read at once where that
        gives the same rows (:func:`_read_whole`, decided on first use), else row by row."""
        if not self._bulk_checked:
            self._bulk_checked = True
            read = _read_rows(ds, rows)
            self._columns = _read_whole(ds, rows, read)
            return read
        if self._columns is not None:
            return [_row_of(self._columns, i) for i in rows]
        return _read_rows(ds, rows)


def _read_whole(ds: Any, rows: list[int], read: list[Any]) -> dict[str, Any] | None:
    """The columns of ``ds`` read at once, if reading them gives ``read`` (rows ``rows`` read one by one) and ``ds``
    is a ``datasets.Dataset`` without a transform whose table is at most ``MAX_BULK_BYTES`` (an eighth of it when
    read as Python lists); None otherwise."""
    if not _reads_are_deterministic(ds):
        return None
    limit = MAX_BULK_BYTES if ds.format.get("type") in ("torch", "numpy") else MAX_BULK_BYTES // 8
    if not 0 < _table_bytes(ds) <= limit:
        return None
    columns = ds[:]
    if not isinstance(columns, Mapping) or not all(_same_value(_row_of(columns, i), row) for i, row in zip(rows, read)):
        return None
    return dict(columns)


def _table_bytes(ds: Any) -> int:
    """Size of a ``datasets.Dataset``'s Arrow table (0 when it does not say)."""
    try:
        return int(ds.data.nbytes)
    except (AttributeError, TypeError, ValueError):
        return 0


def _row_of(columns: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Row ``i`` of a dataset read whole (its columns: tensors, arrays or lists)."""
    return {k: col[i] for k, col in columns.items()}


def _same_value(a: Any, b: Any) -> bool:
    """Whether two rows (or values) hold the same values of the same types."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys()
                and all(_same_value(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b)))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def _read_rows(ds: Any, rows: list[int]) -> list[Any]:
    """Rows ``rows`` of ``ds``, read as a DataLoader reads a batch (``__getitems__`` when the dataset has it)."""
    getitems = getattr(ds, "__getitems__", None)
    return list(getitems(rows)) if getitems is not None else [ds[i] for i in rows]


class MetaSetSampler:
    """The meta set, prepared on first use as the Trainer prepares its train set (columns the model does not
    take removed, or dropped at collation for a torch dataset), and one meta batch per meta step.

    What does not change from step to step is read once: the rows of a small ``datasets.Dataset`` without a
    transform (kept as read), and, when every meta batch is the whole set in the same order (a meta set no
    larger than the meta batch) and the collator is one of the Trainer's own, the collated batch on the device.
    The batches are the same as when every step reads and collates its rows."""

    def __init__(self, trainer: MetaLRTrainer, dataset: Any) -> None:
        self.trainer, self.dataset = trainer, dataset
        self._prepared: tuple[Any, Any] | None = None  # (dataset, collate function)
        self._rows: dict[int, Any] | None = None  # rows read so far (None: rows are read on every use)
        self._whole: tuple[dict[str, Any], torch.Tensor] | None = None  # the whole set, collated and prepared

    def _prepare(self) -> tuple[Any, Any]:
        if self._prepared is None:
            ds, collate = prepared_for_reading(self.trainer, self.dataset, "Meta")
            self._prepared = ds, collate
            if _reads_are_deterministic(ds) and len(ds) <= MAX_CACHED_ROWS:
                self._rows = {}
        return self._prepared

    def _row(self, ds: Any, i: int) -> Any:
        """Row ``i`` (a shallow copy of the kept one, so that a collator may rename its keys)."""
        if self._rows is None:
            return ds[i]
        if i not in self._rows:
            self._rows[i] = ds[i]
        row = self._rows[i]
        return dict(row) if isinstance(row, Mapping) else row

    def read(self, idx: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """The model inputs and labels of rows ``idx``, collated and on the device."""
        ds, collate = self._prepare()
        batch = self.trainer._prepare_inputs(collate([self._row(ds, int(i)) for i in idx]))
        for col in self.trainer._rate_columns:  # the index column, and the group column when there is one
            batch.pop(col, None)
        labels = batch.pop("labels", None)
        if labels is None:
            labels = batch.pop("label")
        return model_batch(self.trainer.model, batch, labels, self.trainer._task)

    def _collated(self, idx: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """The rows of a meta batch (:meth:`read`; the meta step's own reads go through here)."""
        return self.read(idx)

    def sample(self) -> MetaBatch:
        """This step's meta batch: ``meta_batch_size`` examples drawn without replacement (the whole set when it
        is smaller), collated and on the device."""
        trainer, meta = self.trainer, self.trainer.meta_args
        ds, collate = self._prepare()
        m = meta_batch_size(trainer)
        if m <= len(ds):
            batch, labels = self._collated(cycled_indices(trainer, len(ds), m))
        else:  # a meta set smaller than the meta batch is used whole (drawing with replacement would only add noise)
            whole = self._whole
            if whole is None:
                whole = self._collated(torch.arange(len(ds)))
                if self._rows is not None and _is_deterministic_collator(collate):
                    self._whole = whole
            batch, labels = dict(whole[0]), whole[1]
        return MetaBatch(batch, labels, seed=step_seed(trainer, kind=2), dropout=meta.meta_dropout)
