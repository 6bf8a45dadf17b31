"""Which dataset a trajectory was learned on: its signature, its class names, and the replay compatibility check.

Instance rates are indexed by row, so a trajectory can only be replayed on the train set it was learned on
(same size, same order). The signature records enough of that set (id, revision, split, fingerprint, size)
to refuse other data with a message that says what differs.
"""

from __future__ import annotations

from typing import Any


def dataset_signature(
    dataset: Any, split: str | None = None, *, revision: str | None = None, dataset_id: str | None = None
) -> dict[str, Any]:
    """Describe ``dataset`` well enough to refuse replaying a trajectory on different data.

    Works for a ``datasets.Dataset`` (id from ``info.dataset_name``/``builder_name``, revision from
    ``info.version``, split from ``dataset.split``, fingerprint from ``dataset._fingerprint``) and for
    any sized torch dataset (fingerprint ``None``: only the size can be checked then).
    """
    if dataset is None or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"dataset_signature needs a sized dataset (datasets.Dataset or a torch Dataset with __len__), "
            f"got {type(dataset).__name__}"
        )
    info = getattr(dataset, "info", None)
    fingerprint = getattr(dataset, "_fingerprint", None)
    if info is not None and fingerprint is not None:  # a datasets.Dataset
        version = getattr(info, "version", None)
        if split is None and getattr(dataset, "split", None) is not None:
            split = str(dataset.split)
        return {
            "id": dataset_id or getattr(info, "dataset_name", None) or getattr(info, "builder_name", None),
            "config": getattr(info, "config_name", None),
            "revision": revision if revision is not None else (str(version) if version is not None else None),
            "split": split,
            "fingerprint": str(fingerprint),
            "num_examples": len(dataset),
        }
    return {
        "id": dataset_id or type(dataset).__name__,
        "config": None,
        "revision": revision,
        "split": split,
        "fingerprint": None,
        "num_examples": len(dataset),
    }


def label_names_of(dataset: Any, label_column: str | None) -> list[str] | None:
    """Class names from a ``ClassLabel`` feature (``label_column`` or the usual label column names)."""
    features = getattr(dataset, "features", None)
    if not features:
        return None
    candidates = [label_column] if label_column else ["label", "labels", "fine_label"]
    for name in candidates:
        feature = features.get(name)
        if feature is not None and getattr(feature, "names", None):
            return list(feature.names)
    return None


def check_same_dataset(mine: dict[str, Any], signature: dict[str, Any], *, check_fingerprint: bool = True) -> None:
    """Raise ValueError when ``signature`` does not describe the dataset ``mine`` describes (rows indexed alike).

    The size must match. Fingerprints are compared when both are known (``datasets.Dataset``); a torch
    dataset has none, so only its size is checked.
    """
    n_mine, n_theirs = mine.get("num_examples"), signature.get("num_examples")
    if n_mine is not None and n_theirs is not None and int(n_mine) != int(n_theirs):
        raise ValueError(
            f"dataset size mismatch: the trajectory was learned on {n_mine} examples "
            f"({mine.get('id')!r}, split {mine.get('split')!r}) but the dataset to replay on has {n_theirs} "
            f"({signature.get('id')!r}, split {signature.get('split')!r}). Replay on the same train set, "
            f"in the same order."
        )
    f_mine, f_theirs = mine.get("fingerprint"), signature.get("fingerprint")
    if check_fingerprint and f_mine and f_theirs and f_mine != f_theirs:
        raise ValueError(
            f"dataset fingerprint mismatch: the trajectory was learned on fingerprint {f_mine!r} but the "
            f"dataset to replay on has fingerprint {f_theirs!r} (same size {n_theirs}: a different variant, "
            f"noise seed, order or preprocessing). Build the train set exactly as in the original run, or "
            f"set check_fingerprint=False if you know the rows are the same (MetaLRConfig(check_fingerprint=False), "
            f"--check_fingerprint false, or LRTrajectory.check_dataset(..., check_fingerprint=False))."
        )
