"""Train / meta / test variants of a CIFAR-100-schema ``DatasetDict`` (clean, noisy, superclass, k-fold).

Input: any ``DatasetDict`` with ``train`` and ``test`` splits in the ``uoft-cs/cifar100`` schema —
``img`` (Image), ``fine_label`` (ClassLabel), optionally ``coarse_label`` (ClassLabel). The same code
therefore runs on CIFAR-100 from the Hub and on the embedded offline datasets.

Output splits all share one schema, the one the trainer and models consume:

* ``img`` — the image, unchanged;
* ``label`` — ClassLabel over the fine classes: the *training* label (after label noise, if any).
  It is named ``label`` because ``transformers.default_data_collator`` turns ``label`` into the
  ``labels`` key that models and the trainer read;
* ``coarse_label`` — ClassLabel, kept when the input has it;
* ``clean_label`` — ClassLabel over the fine classes: the true label (equal to the input ``fine_label``);
* ``is_noisy`` — bool, ``label != clean_label``;
* ``sample_index`` — int64, the row position inside its own split (0..n-1), so per-example
  learning-rate tables can be indexed by it;
* ``source_index`` — int64, the row position in the split the example came from (input ``train`` for
  the train and meta splits, input ``test`` for the test split), so trajectories from different
  folds or variants can be matched back to the same image.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import datasets
import numpy as np

VARIANTS: tuple[str, ...] = ("clean", "noisy", "superclass")
NOISE_MODES: tuple[str, ...] = ("uniform", "flip", "pair")
OUTPUT_COLUMNS: tuple[str, ...] = (
    "img",
    "label",
    "coarse_label",
    "clean_label",
    "is_noisy",
    "sample_index",
    "source_index",
)


def _class_label(ds: datasets.Dataset, column: str, where: str) -> datasets.ClassLabel:
    if column not in ds.column_names:
        raise ValueError(
            f"{where} has no {column!r} column (columns: {ds.column_names}); expected the uoft-cs/cifar100 schema "
            "('img', 'fine_label', 'coarse_label')."
        )
    feature = ds.features[column]
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"{where}: column {column!r} is {feature!r}, not a ClassLabel; cast it with "
            f"dataset.cast_column({column!r}, datasets.ClassLabel(names=[...])) first."
        )
    return feature


def _check_input(dataset_dict: datasets.DatasetDict) -> datasets.ClassLabel:
    if not isinstance(dataset_dict, (datasets.DatasetDict, dict)) or not {"train", "test"} <= set(
        dataset_dict
    ):
        got = list(dataset_dict) if isinstance(dataset_dict, dict) else type(dataset_dict).__name__
        raise ValueError(f"make_variant needs a DatasetDict with 'train' and 'test' splits, got {got}.")
    fine = _class_label(dataset_dict["train"], "fine_label", "the train split")
    fine_test = _class_label(dataset_dict["test"], "fine_label", "the test split")
    if fine.names != fine_test.names:
        raise ValueError(
            "train and test splits have different fine_label names; they must share one ClassLabel."
        )
    if "img" not in dataset_dict["train"].column_names:
        raise ValueError(
            f"the train split has no 'img' column (columns: {dataset_dict['train'].column_names})."
        )
    return fine


def _flat(ds: datasets.Dataset) -> datasets.Dataset:
    """Materialise a lazy index mapping once (quietly), so that adding columns does not redo it per split."""
    if getattr(ds, "_indices", None) is None:
        return ds
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return ds.flatten_indices()
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _build_split(
    source: datasets.Dataset,
    indices: np.ndarray,
    label: np.ndarray,
    clean_label: np.ndarray,
    source_index: np.ndarray,
    fine: datasets.ClassLabel,
) -> datasets.Dataset:
    """Select ``indices`` of ``source`` (keeping img / coarse_label) and attach the output label columns.

    The new columns are scattered into full-length arrays and added *before* the selection, so the
    result is a lazy index mapping over the source table (no copy of the image bytes).
    """
    keep = [c for c in ("img", "coarse_label") if c in source.column_names]
    ds = source.select_columns(keep)
    n, full = len(indices), len(source)

    def scatter(values: np.ndarray, dtype) -> list:
        out = np.zeros(full, dtype=dtype)
        out[indices] = values
        return out.tolist()

    columns = {
        "label": (scatter(label, np.int64), fine),
        "clean_label": (scatter(clean_label, np.int64), fine),
        "is_noisy": (scatter(label != clean_label, bool), datasets.Value("bool")),
        "sample_index": (scatter(np.arange(n), np.int64), datasets.Value("int64")),
        "source_index": (scatter(source_index, np.int64), datasets.Value("int64")),
    }
    for name, (values, feature) in columns.items():
        ds = ds.add_column(name, values, feature=feature)
    ds = ds.select_columns([c for c in OUTPUT_COLUMNS if c in ds.column_names])
    return ds.select(np.asarray(indices, dtype=np.int64).tolist())


def resolve_superclass(coarse: datasets.ClassLabel, superclass: str | int) -> int:
    """Return the coarse class id for a name or id, with an error listing the valid names."""
    if isinstance(superclass, (int, np.integer)) and not isinstance(superclass, bool):
        if 0 <= int(superclass) < coarse.num_classes:
            return int(superclass)
    elif isinstance(superclass, str) and superclass in coarse.names:
        return coarse.names.index(superclass)
    raise ValueError(
        f"unknown superclass {superclass!r}; pass a coarse class id in [0, {coarse.num_classes}) or one of "
        f"the names: {', '.join(coarse.names)}."
    )


def apply_label_noise(
    labels: np.ndarray,
    noise_rate: float | Sequence[float],
    num_classes: int,
    *,
    mode: str = "uniform",
    seed: int = 0,
) -> np.ndarray:
    """Return a copy of ``labels`` with an exact, seeded number of rows relabelled.

    ``noise_rate`` is either one rate for the whole array or, for *class-dependent* noise, a sequence of
    ``num_classes`` rates indexed by the true class:

    * a float ``r`` — exactly ``round(r * len(labels))`` rows, chosen uniformly without replacement
      over the whole array, are relabelled (class counts of the corrupted rows then vary with the seed);
    * a per-class sequence ``[r_0, ..., r_{K-1}]`` — exactly ``round(r_c * n_c)`` of the ``n_c`` rows of
      true class ``c`` are relabelled, for every class (e.g. ``[0.1] * 5 + [0.5] * 5``: classes 0-4 at
      10 %, 5-9 at 50 %). Real annotators confuse some classes far more often than others; this is
      the asymmetric setting where a single global noise estimate is wrong for every class.

    Fixing the count (rather than flipping each row with probability ``r``) keeps the corruption level
    from fluctuating with the seed. ``mode`` decides the new label of a chosen row with true label ``c``:

    * ``"uniform"`` — drawn uniformly from *all* classes, so it may equal ``c`` (Meta-Weight-Net's
      "uniform noise"; the realised wrong-label rate is ``r * (1 - 1/num_classes)``);
    * ``"flip"`` — drawn uniformly from the *other* classes, so exactly the chosen rows are wrong;
    * ``"pair"`` — ``(c + 1) % num_classes`` (pair / asymmetric flip noise, Han et al. 2018's "pair
      flipping"): every wrong label of a class is the same neighbour class, a structured corruption
      that a model can fit consistently and that uniform-noise detectors handle worst.

    The chosen rows depend only on ``seed`` and the rates, not on ``mode``.
    """
    _check_noise(noise_rate, mode, num_classes)
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={num_classes}.")
    rng = np.random.default_rng([seed, 1])
    labels = np.asarray(labels, dtype=np.int64)
    out = labels.copy()
    if np.ndim(noise_rate) == 0:
        rows = rng.choice(len(labels), size=int(round(float(noise_rate) * len(labels))), replace=False)
    else:
        rows = np.concatenate(
            [
                rng.choice(members, size=int(round(float(r) * len(members))), replace=False)
                for r, members in ((r, np.flatnonzero(labels == c)) for c, r in enumerate(noise_rate))
            ]
        ).astype(np.int64)
    if mode == "uniform":
        out[rows] = rng.integers(0, num_classes, size=len(rows))
    elif mode == "pair":
        out[rows] = (labels[rows] + 1) % num_classes
    else:
        out[rows] = (labels[rows] + rng.integers(1, num_classes, size=len(rows))) % num_classes
    return out


def _has_noise(noise_rate: float | Sequence[float]) -> bool:
    """Whether any rate (scalar or per-class) is positive."""
    return bool(np.any(np.asarray(noise_rate, dtype=float) > 0))


def _check_noise(noise_rate: float | Sequence[float], mode: str, num_classes: int | None = None) -> None:
    """Validate a scalar or per-class noise rate (each in [0, 1)) and the noise mode."""
    rates = [noise_rate] if np.ndim(noise_rate) == 0 else list(np.asarray(noise_rate).ravel())
    if np.ndim(noise_rate) > 1 or not rates:
        raise ValueError(f"noise_rate must be a float or a 1-D per-class sequence, got {noise_rate!r}.")
    for r in rates:
        if isinstance(r, (bool, np.bool_)) or not (isinstance(r, numbers.Real) and 0.0 <= float(r) < 1.0):
            raise ValueError(
                f"noise_rate must be in [0, 1), got {noise_rate!r}; e.g. 0.4 for 40% label noise, or one "
                "rate per class for class-dependent noise."
            )
    if np.ndim(noise_rate) == 1 and num_classes is not None and len(rates) != num_classes:
        raise ValueError(
            f"a per-class noise_rate needs one rate per class: got {len(rates)} rates for {num_classes} classes."
        )
    if mode not in NOISE_MODES:
        raise ValueError(f"unknown noise_mode {mode!r}; choose one of {NOISE_MODES}.")


def make_variant(
    dataset_dict: datasets.DatasetDict,
    variant: str = "clean",
    *,
    noise_rate: float | Sequence[float] = 0.0,
    noise_mode: str = "uniform",
    superclass: str | int | None = None,
    meta_size: int = 1000,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Build a ``DatasetDict`` with ``train`` / ``meta`` / ``test`` splits from a CIFAR-100-schema dataset.

    Variants:

    * ``"clean"`` — a class-balanced meta split of ``meta_size`` clean images (``meta_size /
      num_classes`` per class) is held out of train; test is unchanged. The paper keeps 1,000.
    * ``"noisy"`` — as "clean", then label noise at ``noise_rate`` on the remaining train rows (see
      :func:`apply_label_noise` for ``noise_mode`` "uniform" / "flip" / "pair" and for a per-class
      ``noise_rate`` sequence, i.e. class-dependent noise). Meta and test stay clean; ``clean_label``
      and ``is_noisy`` record the corruption.
    * ``"superclass"`` — personalization: the meta split is ``meta_size`` images held out of train,
      balanced over the fine classes of the coarse class ``superclass`` (name or id), and the test
      split is restricted to that coarse class. Train keeps all classes. ``noise_rate`` may be
      combined with it (noise on train only).

    The meta split depends only on ``seed`` (and ``meta_size`` / ``superclass``), not on the noise
    settings, so runs at different noise rates share their meta set. Column layout: see the module
    docstring (``img``, ``label``, ``coarse_label``, ``clean_label``, ``is_noisy``, ``sample_index``,
    ``source_index``).
    """
    _check_variant(variant, noise_rate, noise_mode, superclass)
    fine = _check_input(dataset_dict)
    train, test = _flat(dataset_dict["train"]), _flat(dataset_dict["test"])
    train_fine = np.asarray(train["fine_label"], dtype=np.int64)
    test_fine = np.asarray(test["fine_label"], dtype=np.int64)

    if variant == "superclass":
        meta_classes, test_rows = _superclass_rows(train, test, train_fine, superclass)
    else:
        meta_classes, test_rows = np.arange(fine.num_classes), np.arange(len(test))

    meta_rows = _balanced_holdout(train_fine, meta_classes, meta_size, seed, fine)
    train_rows = np.setdiff1d(np.arange(len(train)), meta_rows)
    clean = train_fine[train_rows]
    noisy = (
        apply_label_noise(clean, noise_rate, fine.num_classes, mode=noise_mode, seed=seed)
        if _has_noise(noise_rate)
        else clean
    )

    return datasets.DatasetDict(
        train=_build_split(train, train_rows, noisy, clean, train_rows, fine),
        meta=_build_split(train, meta_rows, train_fine[meta_rows], train_fine[meta_rows], meta_rows, fine),
        test=_build_split(test, test_rows, test_fine[test_rows], test_fine[test_rows], test_rows, fine),
    )


def _check_variant(
    variant: str, noise_rate: float | Sequence[float], noise_mode: str, superclass: str | int | None
) -> None:
    """Refuse a variant that does not exist or options it does not take."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}.")
    _check_noise(noise_rate, noise_mode)
    if variant == "clean" and _has_noise(noise_rate):
        raise ValueError(
            f"variant='clean' takes no label noise (got noise_rate={noise_rate}); use variant='noisy'."
        )
    if variant != "superclass" and superclass is not None:
        raise ValueError(
            f"superclass={superclass!r} is only used by variant='superclass' (got variant={variant!r})."
        )


def _superclass_rows(
    train: datasets.Dataset, test: datasets.Dataset, train_fine: np.ndarray, superclass: str | int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The "superclass" variant's fine classes of the meta split and its test rows (those of the coarse class)."""
    if superclass is None:
        raise ValueError("variant='superclass' needs superclass=<coarse class name or id>.")
    if "coarse_label" not in train.column_names or "coarse_label" not in test.column_names:
        raise ValueError(
            "variant='superclass' needs a 'coarse_label' ClassLabel column in train and test; this dataset "
            f"has {train.column_names}. Add one (see hf_ddlr.data.load_embedded for a grouping) or use 'clean'."
        )
    coarse = _class_label(train, "coarse_label", "the train split")
    target = resolve_superclass(coarse, superclass)
    train_coarse = np.asarray(train["coarse_label"], dtype=np.int64)
    meta_classes = np.unique(train_fine[train_coarse == target])
    test_rows = np.flatnonzero(np.asarray(test["coarse_label"], dtype=np.int64) == target)
    if len(meta_classes) == 0 or len(test_rows) == 0:
        raise ValueError(f"superclass {coarse.names[target]!r} has no examples in train or test.")
    return meta_classes, test_rows


def _balanced_holdout(
    labels: np.ndarray, classes: np.ndarray, meta_size: int, seed: int, fine: datasets.ClassLabel
) -> np.ndarray:
    """Pick ``meta_size / len(classes)`` rows of each class (seeded); returns sorted row positions."""
    n_classes = len(classes)
    if not isinstance(meta_size, (int, np.integer)) or meta_size <= 0 or meta_size % n_classes:
        lo = (
            max(n_classes, (int(meta_size) // n_classes) * n_classes)
            if isinstance(meta_size, (int, float))
            else n_classes
        )
        raise ValueError(
            f"meta_size={meta_size!r} must be a positive multiple of the {n_classes} classes the meta set is balanced "
            f"over (equal images per class); use e.g. meta_size={lo} or {lo + n_classes}."
        )
    per_class = meta_size // n_classes
    rng = np.random.default_rng([seed, 0])
    picked = []
    for c in classes:
        rows = np.flatnonzero(labels == c)
        if per_class >= len(rows):
            fix = (
                f"use meta_size <= {(len(rows) - 1) * n_classes}"
                if len(rows) > 1
                else "the class has too few training images for a balanced meta set: subsample the train split "
                "class-balanced (stratified), not uniformly"
            )
            raise ValueError(
                f"meta_size={meta_size} needs {per_class} images of class {fine.names[c]!r} but train has only "
                f"{len(rows)} (at least one must stay in train); {fix}."
            )
        picked.append(rng.choice(rows, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def _standardize(ds: datasets.Dataset) -> tuple[datasets.Dataset, dict[str, np.ndarray], datasets.ClassLabel]:
    """Return the label arrays of a split in either the input schema (``fine_label``) or the output schema."""
    if "label" in ds.column_names and "clean_label" in ds.column_names:
        fine = _class_label(ds, "label", "the dataset")
        arrays = {
            "label": np.asarray(ds["label"], dtype=np.int64),
            "clean_label": np.asarray(ds["clean_label"], dtype=np.int64),
            "source_index": np.asarray(ds["source_index"], dtype=np.int64)
            if "source_index" in ds.column_names
            else np.arange(len(ds), dtype=np.int64),
        }
    else:
        fine = _class_label(ds, "fine_label", "the dataset")
        labels = np.asarray(ds["fine_label"], dtype=np.int64)
        arrays = {"label": labels, "clean_label": labels, "source_index": np.arange(len(ds), dtype=np.int64)}
    return ds, arrays, fine


def _fold_plan(data, k, seed: int, stratify: bool):
    """Shared by kfold_splits / make_kfold: validate, standardize, assign each row to a fold."""
    test = None
    if isinstance(data, (datasets.DatasetDict, dict)):
        if "train" not in data:
            raise ValueError(
                f"k-fold splitting needs a Dataset or a DatasetDict with a 'train' split, got {list(data)}."
            )
        test = data.get("test")
        data = data["train"]
    if not isinstance(data, datasets.Dataset):
        raise ValueError(
            f"k-fold splitting needs a datasets.Dataset or DatasetDict, got {type(data).__name__}."
        )
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 2 <= k <= len(data):
        raise ValueError(f"k must be an integer in [2, {len(data)}] (the number of rows), got {k!r}.")
    ds, arr, fine = _standardize(_flat(data))
    rng = np.random.default_rng([seed, 2])
    if stratify:
        order = np.concatenate(
            [rng.permutation(np.flatnonzero(arr["clean_label"] == c)) for c in range(fine.num_classes)]
        )
    else:
        order = rng.permutation(len(ds))
    fold_of = np.empty(len(ds), dtype=np.int64)
    fold_of[order] = np.arange(len(ds)) % k
    test_split = None
    if test is not None:
        t, tarr, _ = _standardize(_flat(test))
        test_split = _build_split(
            t, np.arange(len(t)), tarr["label"], tarr["clean_label"], tarr["source_index"], fine
        )
    return ds, arr, fine, fold_of, test_split


def _fold(ds, arr, fine, fold_of, test_split, i: int) -> datasets.DatasetDict:
    parts = {}
    for name, rows in (("train", np.flatnonzero(fold_of != i)), ("meta", np.flatnonzero(fold_of == i))):
        parts[name] = _build_split(
            ds, rows, arr["label"][rows], arr["clean_label"][rows], arr["source_index"][rows], fine
        )
    if test_split is not None:
        parts["test"] = test_split
    return datasets.DatasetDict(parts)


def kfold_splits(
    data: datasets.Dataset | datasets.DatasetDict, k: int, *, seed: int = 0, stratify: bool = True
) -> list[datasets.DatasetDict]:
    """Split a train set into ``k`` folds; fold ``i`` is ``DatasetDict(train=<other folds>, meta=<fold i>)``.

    This is the trajectory protocol: a model is trained on ``train`` of each fold with its held-out
    part as the meta set, so every training example is held out exactly once (the ``meta`` splits
    partition the input). ``data`` is a ``Dataset`` or a ``DatasetDict`` (its ``train`` split is
    used; a ``test`` split is passed through), in either the raw CIFAR schema (``fine_label``) or a
    :func:`make_variant` output (whose possibly noisy ``label`` is kept). With ``stratify`` each
    class is spread evenly over the folds. ``sample_index`` is renumbered per split;
    ``source_index`` keeps pointing at the row of the input.
    """
    plan = _fold_plan(data, k, seed, stratify)
    return [_fold(*plan, i) for i in range(k)]


def make_kfold(
    data: datasets.Dataset | datasets.DatasetDict, k: int, fold: int, *, seed: int = 0, stratify: bool = True
) -> datasets.DatasetDict:
    """Return fold ``fold`` of :func:`kfold_splits` with the same arguments, building only that fold."""
    plan = _fold_plan(data, k, seed, stratify)
    if not isinstance(fold, (int, np.integer)) or isinstance(fold, bool) or not 0 <= fold < k:
        raise ValueError(f"fold must be an integer in [0, k={k}), got {fold!r}.")
    return _fold(*plan, fold)


__all__ = [
    "VARIANTS",
    "NOISE_MODES",
    "OUTPUT_COLUMNS",
    "apply_label_noise",
    "kfold_splits",
    "make_kfold",
    "make_variant",
    "resolve_superclass",
]
