"""CIFAR-100 from the Hugging Face Hub (``uoft-cs/cifar100``) and its label metadata.

The label names and the fine -> coarse grouping are the ones published with CIFAR-100
(Krizhevsky, 2009) and used by the ``uoft-cs/cifar100`` dataset card, so that synthetic
test datasets and the real one share one schema (``img``, ``fine_label``, ``coarse_label``).
"""

from __future__ import annotations

import os

import datasets

# Coarse class -> its five fine classes, in the order of the dataset's ``coarse_label`` ClassLabel.
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_COARSE_NAMES: list[str] = list(CIFAR100_SUPERCLASSES)
# fine label names are sorted alphabetically in the dataset's ``fine_label`` ClassLabel
CIFAR100_FINE_NAMES: list[str] = sorted(n for fines in CIFAR100_SUPERCLASSES.values() for n in fines)
# fine label id -> coarse label id
CIFAR100_FINE_TO_COARSE: list[int] = [
    next(c for c, fines in enumerate(CIFAR100_SUPERCLASSES.values()) if name in fines)
    for name in CIFAR100_FINE_NAMES
]
# per-channel statistics of the CIFAR-100 training images (pixel values scaled to [0, 1])
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

CIFAR100_REPO_ID = "uoft-cs/cifar100"


def cifar100_features() -> datasets.Features:
    """The exact features of ``uoft-cs/cifar100`` (``img`` Image, ``fine_label``/``coarse_label`` ClassLabels)."""
    return datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=CIFAR100_FINE_NAMES),
            "coarse_label": datasets.ClassLabel(names=CIFAR100_COARSE_NAMES),
        }
    )


def load_cifar100(
    variant: str = "clean",
    *,
    noise_rate: float = 0.0,
    noise_mode: str = "uniform",
    superclass: str | int | None = None,
    meta_size: int = 1000,
    seed: int = 0,
    repo_id: str = CIFAR100_REPO_ID,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """Download CIFAR-100 with ``datasets.load_dataset`` and build a train / meta / test variant.

    This is :func:`hf_ddlr.data.make_variant` applied to ``load_dataset(repo_id)``; see there for
    the variants and the columns of the returned splits. ``repo_id`` / ``revision`` exist so a mirror
    or a pinned revision can be used; the Hub endpoint follows ``HF_ENDPOINT`` as usual.
    """
    from hf_ddlr.data.variants import make_variant

    try:
        raw = datasets.load_dataset(
            repo_id, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except ConnectionError as err:  # offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) or the Hub unreachable
        raise ConnectionError(
            f"Could not load {repo_id} from the Hub or the local cache ({err}). Without network, download it once "
            f"where the Hub is reachable (the cache is then reused offline), or pass a mirror as repo_id; for an "
            f"offline run on real images use hf_ddlr.data.load_embedded('mnist') with make_variant(...) (the "
            f"examples' --dataset embedded)."
        ) from err
    if not isinstance(raw, datasets.DatasetDict) or not {"train", "test"} <= set(raw):
        raise ValueError(
            f"{repo_id} did not load as a DatasetDict with 'train' and 'test' splits (got {type(raw).__name__} "
            f"{list(raw) if isinstance(raw, dict) else ''}); point repo_id at a CIFAR-100 copy with both splits."
        )
    return make_variant(
        raw,
        variant,
        noise_rate=noise_rate,
        noise_mode=noise_mode,
        superclass=superclass,
        meta_size=meta_size,
        seed=seed,
    )
