"""The train and meta sets as :class:`~hf_ddlr.MetaLRTrainer` needs them: the checks made at construction
(map-style, integer class labels in the model's label space, the meta set carrying the model's inputs) and
the index column that keys every training example's instance rate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "LABEL_KEYS",
    "check_datasets",
    "check_label_range",
    "check_meta_inputs",
    "first_item",
    "label_values",
    "with_index",
]

LABEL_KEYS = ("labels", "label")


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


META_ROWS_READ = 10_000  # a map-style meta set up to this size has every label checked at construction


def label_values(dataset: Any, read_rows: int = 0) -> torch.Tensor | None:
    """All labels of a `datasets.Dataset`, or of another map-style set of dict items with at most ``read_rows``
    rows (read item by item: worth it for a small meta set, whose bad label would fail mid-run); None when they
    cannot be read cheaply."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        if dataset is None or not 0 < len(dataset) <= read_rows:
            return None
        values = []
        for i in range(len(dataset)):
            item = dataset[i]
            key = next((k for k in LABEL_KEYS if isinstance(item, Mapping) and k in item), None)
            if key is None or _label_type_problem(item[key]) is not None:
                return None  # no labels, or not class ids: the type check says what is wrong
            value = torch.as_tensor(item[key])
            if value.numel() != 1:
                return None
            values.append(int(value.reshape(-1)[0]))
        return torch.as_tensor(values)
    for key in LABEL_KEYS:
        if key in names:
            return torch.as_tensor(dataset.with_format(None)[key])
    return None


def _has_labels(dataset: Any) -> bool:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return any(k in names for k in LABEL_KEYS)
    try:
        item = dataset[0]
    except Exception:  # noqa: BLE001 - an unindexable dataset: let the first batch tell
        return True
    return isinstance(item, Mapping) and any(k in item for k in LABEL_KEYS)


def _raw_item(dataset: Any) -> Any:
    """Row 0 as ``dataset[0]`` returns it, or None when it cannot be read."""
    try:
        return dataset[0]
    except Exception:  # noqa: BLE001 - empty or unindexable: the first batch will tell
        return None


def first_item(dataset: Any) -> Mapping | None:
    """Row 0 as the data loader sees it (after a ``set_transform``), or None when it cannot be read cheaply."""
    item = _raw_item(dataset)
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
    item = first_item(dataset)
    key = next((k for k in LABEL_KEYS if item is not None and k in item), None)
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


def check_datasets(train_dataset: Any, meta_dataset: Any, class_labels: bool = True) -> None:
    """Refuse, at construction, sets the rates cannot be learned or replayed on: no train set, an empty one, streaming
    (iterable) sets and, for a task with class labels (``class_labels``), sets without labels and labels that
    are not integer class ids. Other tasks' labels (multi-hot, float targets, token labels that a collator may
    make) are checked by the loss on the first batch."""
    if train_dataset is None:
        raise ValueError("MetaLRTrainer with a meta_dataset or replay_trajectory needs a train_dataset.")
    for name, ds in (("train_dataset", train_dataset), ("meta_dataset", meta_dataset)):
        if isinstance(ds, Mapping):  # a DatasetDict, or a dict of columns: its len() counts keys, not rows
            keys = sorted(map(str, ds))
            if ds and all(hasattr(v, "column_names") for v in ds.values()):
                raise ValueError(f"The {name.removesuffix('_dataset')} dataset is a {type(ds).__name__} (splits "
                                 f"{keys}): pass one split, e.g. {name}=dataset_dict[{keys[0]!r}].")
            raise ValueError(f"The {name.removesuffix('_dataset')} dataset is a {type(ds).__name__} with keys {keys}, "
                             f"not a dataset of rows: wrap a dict of columns as datasets.Dataset.from_dict(...), a list "
                             f"of rows as datasets.Dataset.from_list(...).")
        if ds is not None and not hasattr(ds, "__len__"):
            raise ValueError(
                f"MetaLRTrainer needs a map-style {name} (datasets.Dataset or a torch Dataset with __len__), "
                f"got {type(ds).__name__}, an iterable (streaming) set: "
                + ("the rates and the trajectory are keyed to the train set's rows (an instance rate per row, a "
                   "replay that looks each row up by its index), which a stream does not number. "
                   if name == "train_dataset" else
                   "meta batches are sampled from it by position, which a stream does not offer. ")
                + "Materialize it first, e.g. datasets.Dataset.from_generator(...) or load_dataset(..., "
                "streaming=False)."
            )
    for name, ds in (("train", train_dataset), ("meta", meta_dataset)):
        if ds is not None and len(ds) == 0:
            raise ValueError(
                f"The {name} dataset is empty. "
                + ("The rates are learned from the loss on the meta set: pass a few clean, trusted examples (for a "
                   "classifier, 10-20 per class, as in the README's matrix), or no meta_dataset to train as the "
                   "Trainer does."
                   if name == "meta" else "Pass the examples to train on as train_dataset.")
            )
    if not class_labels:
        return
    for name, ds in (("train", train_dataset), ("meta", meta_dataset)):
        if ds is None or _has_labels(ds):
            continue
        cols = getattr(ds, "column_names", None)
        row = _raw_item(ds) if cols is None else None
        if row is not None and not isinstance(row, Mapping):  # e.g. a TensorDataset's (x, y) tuples
            raise ValueError(
                f"The {name} dataset's rows are {type(row).__name__}s, not dicts: the Trainer's collators and the "
                f"rates read named fields, the label from 'labels' / 'label'. Return a dict from __getitem__, e.g. "
                f"{{'pixel_values': x, 'labels': y}} with the model's input names, or build a datasets.Dataset "
                f"(datasets.Dataset.from_dict({{'x': ..., 'labels': ...}}))."
            )
        seen = f" (its columns: {cols})" if cols is not None else ""
        raise ValueError(
            f"The {name} dataset has no 'labels'/'label' column{seen}: per-example learning rates need the class "
            f"label of every example, read from that column. If the labels are under another name, rename it, "
            f"e.g. {name}_dataset = {name}_dataset.rename_column('target', 'labels')."
        )
    _check_label_type("train", train_dataset)
    if meta_dataset is not None:
        _check_label_type("meta", meta_dataset)


def check_label_range(datasets: Iterable[tuple[str, Any]], num_labels: int) -> None:
    """Refuse labels outside ``0..num_labels-1`` in the named sets (where they can be read cheaply; the meta set,
    small, item by item when it is not a `datasets.Dataset`)."""
    for name, ds in datasets:
        if ds is None:
            continue
        labels = label_values(ds, read_rows=META_ROWS_READ if name == "meta" else 0)
        if labels is not None and labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
            bad = sorted({int(v) for v in labels[(labels < 0) | (labels >= num_labels)].unique()[:10]})
            fix = ("Use the same label mapping as the train set (and num_labels / model.config.num_labels)."
                   if name == "meta" else "Set num_labels / model.config.num_labels to the number of classes.")
            if -100 in bad:  # the ignored-example label of a plain Trainer run: no rate can weight "no loss"
                col = "label" if "label" in (getattr(ds, "column_names", None) or ()) else "labels"
                fix = (f"-100 marks an example the loss ignores, which has no class and no rate here: drop those "
                       f"rows first, e.g. {name}_dataset.filter(lambda r: r[{col!r}] != -100). " + fix)
            raise ValueError(
                f"The {name} dataset has labels {bad} outside the model's label space 0..{num_labels - 1}. {fix}"
            )


def check_meta_inputs(train: Mapping | None, meta: Mapping | None, model_inputs: Iterable[str], index_column: str,
                      model_name: str, optional: Iterable[str] = ()) -> None:
    """Refuse a meta set without the model inputs the train set gives (e.g. raw text that was never tokenised):
    its first meta batch would fail deep inside the model. ``train`` / ``meta``: row 0 of each set;
    ``model_inputs``: the Trainer's signature columns (the model's forward arguments); ``optional``: signature
    columns a meta row may lack (e.g. a reward pair's ``margin``, which the collator takes out)."""
    if train is None or meta is None:
        return
    skip = {*LABEL_KEYS, "label_ids", index_column, *optional}
    needed = (set(train) & set(model_inputs)) - skip
    missing = sorted(needed - set(meta))
    if missing:
        raise ValueError(
            f"The meta dataset has no {', '.join(map(repr, missing))} column{'s' if len(missing) > 1 else ''}: "
            f"the train set gives {sorted(needed)} to {model_name}.forward, the meta set only "
            f"{sorted(meta)}, so its first meta step would fail inside the model. Preprocess the meta set with "
            f"the same function as the train set, e.g. meta_dataset = meta_dataset.map(tokenize, batched=True) "
            f"with the tokenizer call used for the train set (or the same set_transform)."
        )


def with_index(dataset: Any, column: str) -> Any:
    """``dataset`` with ``column`` holding each row's position (the key of its instance rate)."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        return _IndexedDataset(dataset, column)
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
