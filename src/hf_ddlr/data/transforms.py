"""Image -> tensor transforms with the standard CIFAR augmentation, in plain torch (no torchvision).

:func:`with_transforms` attaches an on-the-fly transform (``Dataset.with_transform``, the
non-mutating form of ``set_transform``) to every split of a :func:`hf_ddlr.data.make_variant`
output. Each example becomes ``{"pixel_values": float tensor (C, H, W), "label": int,
"sample_index": int}`` — the keys the models and the trainer consume. Augmentation (random crop
after zero padding, random horizontal flip) is applied to the ``augment_splits`` only (``train`` by
default), never to ``meta`` / ``test``; normalisation is applied everywhere. Randomness comes from
torch's global generator, so ``transformers.set_seed`` / ``torch.manual_seed`` make it reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F


def image_to_tensor(image: Any) -> torch.Tensor:
    """Convert a PIL image or uint8 array (H, W) / (H, W, C) to a float tensor (C, H, W) in [0, 1]."""
    if hasattr(image, "mode"):  # PIL image
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        image = np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(
            f"expected an image of shape (H, W) or (H, W, C), got an array of shape {arr.shape}."
        )
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).to(torch.float32) / scale


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad a (C, H, W) tensor by ``padding`` pixels on each side and crop a random H x W window."""
    if padding <= 0:
        return x
    _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top, left = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,)))
    return padded[:, top : top + h, left : left + w]


def random_hflip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Flip a (C, H, W) tensor left-right with probability ``p``."""
    return x.flip(-1) if float(torch.rand(())) < p else x


def compute_mean_std(
    dataset: datasets.Dataset, image_column: str = "img", max_images: int | None = 10000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of pixel values in [0, 1] over (the first ``max_images``) images of a split."""
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    if n == 0:
        raise ValueError("cannot compute mean/std of an empty dataset; pass mean= and std= explicitly.")
    total = total_sq = None
    count = 0
    for img in dataset.select_columns([image_column]).select(range(n))[image_column]:
        x = image_to_tensor(img).double().flatten(1)
        total = x.sum(1) if total is None else total + x.sum(1)
        total_sq = (x * x).sum(1) if total_sq is None else total_sq + (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def make_transform(
    *,
    augment: bool,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int = 4,
    flip: bool = True,
    image_column: str = "img",
) -> Callable[[dict[str, list]], dict[str, list]]:
    """Return a batched ``datasets`` transform: images -> normalised ``pixel_values``; keeps ``label``/``sample_index``."""
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    if mean_t.numel() != std_t.numel() or bool((std_t <= 0).any()):
        raise ValueError(f"mean and std need one value per channel and std > 0; got mean={mean}, std={std}.")

    def transform(batch: dict[str, list]) -> dict[str, list]:
        pixels = []
        for img in batch[image_column]:
            x = image_to_tensor(img)
            if x.shape[0] != mean_t.shape[0]:
                raise ValueError(
                    f"image has {x.shape[0]} channel(s) but mean/std have {mean_t.shape[0]}; pass per-channel "
                    "statistics that match the images (hf_ddlr.data.compute_mean_std computes them)."
                )
            if augment:
                x = random_crop(x, crop_padding)
                if flip:
                    x = random_hflip(x)
            pixels.append((x - mean_t) / std_t)
        out: dict[str, list] = {"pixel_values": pixels}
        for key in ("label", "sample_index"):
            if key in batch:
                out[key] = list(batch[key])
        return out

    return transform


def with_transforms(
    dataset_dict: datasets.DatasetDict,
    *,
    augment: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_padding: int = 4,
    flip: bool | None = None,
    augment_splits: Sequence[str] = ("train",),
) -> datasets.DatasetDict:
    """Return a copy of ``dataset_dict`` whose splits yield ``pixel_values`` / ``label`` / ``sample_index``.

    ``mean`` / ``std`` default to the per-channel statistics of the ``train`` split (use
    ``hf_ddlr.data.CIFAR100_MEAN`` / ``CIFAR100_STD`` for CIFAR-100 to skip that pass).
    ``flip=None`` means: flip colour (3-channel) images, not grayscale ones (digits are not
    mirror-symmetric). ``crop_padding`` is the zero padding of the random crop (4 for 32x32 CIFAR;
    use 2 for 28x28 MNIST, 1 for 8x8 digits). The input must be in the :func:`make_variant` schema.
    """
    if not isinstance(dataset_dict, (datasets.DatasetDict, dict)) or not dataset_dict:
        raise ValueError(f"with_transforms needs a non-empty DatasetDict, got {type(dataset_dict).__name__}.")
    for name, split in dataset_dict.items():
        missing = {"img", "label", "sample_index"} - set(split.column_names)
        if missing:
            raise ValueError(
                f"split {name!r} lacks columns {sorted(missing)} (has {split.column_names}); build the splits with "
                "hf_ddlr.data.make_variant(...) or kfold_splits(...) first."
            )
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither (then both are computed from the train split).")
    if mean is None:
        ref = dataset_dict["train"] if "train" in dataset_dict else next(iter(dataset_dict.values()))
        mean, std = compute_mean_std(ref)
    if flip is None:
        flip = len(mean) == 3
    unknown = set(augment_splits) - set(dataset_dict)
    if augment and unknown:
        raise ValueError(
            f"augment_splits {sorted(unknown)} are not splits of the dataset ({list(dataset_dict)})."
        )
    out = {}
    for name, split in dataset_dict.items():
        fn = make_transform(
            augment=augment and name in augment_splits,
            mean=mean,
            std=std,
            crop_padding=crop_padding,
            flip=flip,
        )
        out[name] = split.with_transform(fn, columns=["img", "label", "sample_index"])
    return datasets.DatasetDict(out)
