"""The groups of group-level rates (``lr_level="group"``, or ``"both"`` with ``group_column``): which group every
training example belongs to, read once from the train set's ``group_column``.

The distinct values of the column (ints or strings: data source, domain, task, language) are sorted and numbered
``0..G-1``; that id keys the example's group rate. The id is not carried as a batch column: it is looked up from
the index column that every training batch already carries (``Groups.ids(indices)``), so the model, the
collator and the Trainer's column removal never see it, whatever the column holds. The meta set needs no groups:
a group's rate moves by the meta-gradients of its training examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MAX_GROUPS", "Groups", "check_same_groups", "read_groups"]

MAX_GROUPS = 1000  # more distinct values is most likely an id / text column chosen by mistake


@dataclass
class Groups:
    """The groups of the train set: their names (in id order), sizes and every example's group id."""

    column: str
    names: list[str]  # str() of each distinct value (a ClassLabel's name), in id order
    sizes: list[int]  # training examples per group
    row_ids: torch.Tensor  # [N] int64: group id of the example whose index-column value is i

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device: torch.device | str) -> Groups:
        """These groups with the per-example ids on ``device`` (where the batches' indices are)."""
        return Groups(self.column, self.names, self.sizes, self.row_ids.to(device))

    def ids(self, indices: torch.Tensor) -> torch.Tensor:
        """The group id of every example of a batch, from its index-column values."""
        return self.row_ids[indices.to(self.row_ids.device)].to(indices.device)


def _rows(dataset: Any, column: str, index_column: str) -> tuple[list[Any], list[int], list[str] | None]:
    """(the column's values, the index-column values, the value names of a ``ClassLabel``) of every row."""
    names = getattr(dataset, "column_names", None)
    if names is not None:  # a datasets.Dataset: read the columns without its format or transform
        if column not in names:
            raise _missing(column, names, index_column)
        raw = dataset.with_format(None)
        feature = (getattr(dataset, "features", None) or {}).get(column)
        return list(raw[column]), [int(i) for i in raw[index_column]], getattr(feature, "names", None)
    values, index = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, Mapping) or column not in item:
            raise _missing(column, sorted(item) if isinstance(item, Mapping) else [], index_column, row=i)
        value = item[column]
        values.append(value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value)
        index.append(int(item[index_column]))
    return values, index, None


def _missing(column: str, columns: Sequence[str], index_column: str, row: int | None = None) -> ValueError:
    """The refusal of a missing group column, listing the user's columns (not the trainer's own index column)."""
    where = f"row {row} of the train set" if row is not None else "The train set"
    columns = [c for c in columns if c != index_column]
    return ValueError(
        f"group_column={column!r}: {where} has no {column!r} column (columns: {columns}). Add the group of "
        f"every training example as a column (e.g. train_dataset.add_column({column!r}, sources)), or set "
        f"group_column to the name of an existing categorical column."
    )


def _distinct(values: list[Any], column: str) -> list[Any]:
    """The sorted distinct values of the column (refusing values that are not one category per example)."""
    try:
        distinct = sorted(set(values))
    except TypeError as err:  # unhashable (lists, dicts) or unorderable (ints mixed with strings, None)
        kinds = sorted({type(v).__name__ for v in values})
        raise ValueError(
            f"group_column={column!r} holds {', '.join(kinds)} values: a group column holds one categorical value "
            f"per example, all ints or all strings (no lists, no missing values). Map it to such a column first."
        ) from err
    if len(distinct) > MAX_GROUPS:
        raise ValueError(
            f"group_column={column!r} has {len(distinct)} distinct values, more than {MAX_GROUPS}: that looks like "
            f"an id or text column, not a group. Use a categorical column (data source, domain, task, language), "
            f"or lr_level='instance' for one rate per example."
        )
    return distinct


def read_groups(dataset: Any, column: str, index_column: str) -> Groups:
    """The groups of ``dataset`` (the train set with its index column) by the values of ``column``."""
    values, index, value_names = _rows(dataset, column, index_column)
    distinct = _distinct(values, column)
    id_of = {v: g for g, v in enumerate(distinct)}
    ids = torch.tensor([id_of[v] for v in values], dtype=torch.int64)
    row_ids = torch.empty(len(values), dtype=torch.int64)
    row_ids[torch.tensor(index, dtype=torch.int64)] = ids
    names = [
        value_names[v] if value_names and isinstance(v, int) and 0 <= v < len(value_names) else str(v)
        for v in distinct
    ]
    sizes = torch.bincount(ids, minlength=len(distinct)).tolist()
    return Groups(column, names, sizes, row_ids)


def check_same_groups(recorded: Mapping[str, Any] | None, groups: Groups) -> None:
    """Refuse to replay group rates learned on other groups: ``recorded`` is a trajectory's ``groups`` metadata
    (None when it learned none), ``groups`` this train set's."""
    names = list((recorded or {}).get("names") or [])
    if names != groups.names:
        raise ValueError(
            f"The replayed trajectory's group rates are keyed by the groups {names or 'of no group column'}, this "
            f"train set's {groups.column!r} column has the groups {groups.names}. Replay on a train set with the "
            f"same groups (the sorted distinct values of the group column), or with the lr_level it recorded."
        )
