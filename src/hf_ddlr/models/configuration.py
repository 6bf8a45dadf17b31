"""Configurations of the CIFAR-style image classifiers (``PreTrainedConfig`` dataclasses, transformers v5 style).

Each config carries the architecture hyper-parameters plus the usual ``num_labels`` /
``id2label`` / ``label2id`` of :class:`transformers.PreTrainedConfig`; invalid values raise at
construction time with a message naming the field.
"""

from __future__ import annotations

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


def _positive_ints(name: str, values: list[int], min_len: int = 1) -> None:
    ok = isinstance(values, (list, tuple)) and len(values) >= min_len and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:  # (a string such as "2222" has a length and int-able characters: refused here, not at build)
        raise ValueError(f"{name} must be a list of at least {min_len} positive integers, got {values!r}.")


def _check_common(num_channels: int, dropout_rate: float) -> None:
    if num_channels <= 0:
        raise ValueError(f"num_channels must be positive (3 for RGB, 1 for grayscale), got {num_channels}.")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")


class _ListFields:
    """Stores the list-valued fields named in ``_list_fields`` (tuples by default) as lists, the type a config
    has after a JSON round trip, so that saved and reloaded configs compare equal."""

    _list_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self, **kwargs):
        for name in self._list_fields:
            setattr(self, name, list(getattr(self, name)))
        super().__post_init__(**kwargs)


@strict
class CifarResNetConfig(_ListFields, PreTrainedConfig):
    """CIFAR ResNet (He et al. 2016, the variant with a 3x3 stem and no max-pool, as in the paper, section 3.2).

    Defaults give ResNet-18: ``depths=[2, 2, 2, 2]`` basic blocks at widths ``base_width * (1, 2, 4, 8)``
    with strides 1, 2, 2, 2, global average pooling, one linear classifier.
    """

    model_type = "hf_ddlr_resnet"

    num_channels: int = 3
    base_width: int = 64
    depths: list[int] | tuple[int, ...] = (2, 2, 2, 2)
    dropout_rate: float = 0.0

    _list_fields = ("depths",)

    def validate_architecture(self):
        """Reject non-positive widths/depths and dropout outside [0, 1)."""
        _check_common(self.num_channels, self.dropout_rate)
        _positive_ints("depths", self.depths)
        if self.base_width <= 0:
            raise ValueError(
                f"base_width must be positive (64 for the standard ResNet-18), got {self.base_width}."
            )


@strict
class CifarVGGConfig(_ListFields, PreTrainedConfig):
    """CIFAR VGG (Simonyan & Zisserman 2015) with batch norm; defaults give VGG-16-BN.

    ``stage_channels[i]`` is the width of the ``stage_depths[i]`` 3x3 convs of stage ``i``; every
    stage ends with a 2x2 max-pool. The classifier is the single ``Linear(512, num_labels)`` of the
    common CIFAR VGG (e.g. kuangliu/pytorch-cifar), not ImageNet VGG's three 4096-wide layers:
    14,774,436 parameters for 100 classes (14,728,266 for 10; convs keep their bias, as there).
    """

    model_type = "hf_ddlr_vgg"

    num_channels: int = 3
    stage_channels: list[int] | tuple[int, ...] = (64, 128, 256, 512, 512)
    stage_depths: list[int] | tuple[int, ...] = (2, 2, 3, 3, 3)
    batch_norm: bool = True
    dropout_rate: float = 0.0

    _list_fields = ("stage_channels", "stage_depths")

    def validate_architecture(self):
        """Stages need matching channel/depth lists of positive integers."""
        _check_common(self.num_channels, self.dropout_rate)
        _positive_ints("stage_channels", self.stage_channels)
        _positive_ints("stage_depths", self.stage_depths)
        if len(self.stage_channels) != len(self.stage_depths):
            raise ValueError(
                f"stage_channels ({len(self.stage_channels)} entries) and stage_depths ({len(self.stage_depths)}) "
                "must have one entry per stage."
            )


@strict
class WideResNetConfig(PreTrainedConfig):
    """Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016); defaults give WRN-28-10.

    Pre-activation basic blocks, ``(depth - 4) / 6`` per group, widths ``16 * widen_factor * (1, 2, 4)``,
    optional dropout between the two convs of each block (``dropout_rate``, 0.3 in the paper's
    robust settings). 36.5 M parameters for 100 classes.
    """

    model_type = "hf_ddlr_wrn"

    num_channels: int = 3
    depth: int = 28
    widen_factor: int = 10
    dropout_rate: float = 0.0

    def validate_architecture(self):
        """``depth`` must be 6n + 4."""
        _check_common(self.num_channels, self.dropout_rate)
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (e.g. 16, 28, 40), got {self.depth}.")
        if self.widen_factor <= 0:
            raise ValueError(f"widen_factor must be positive, got {self.widen_factor}.")


@strict
class SmallCNNConfig(_ListFields, PreTrainedConfig):
    """A small CNN for the offline demo (28x28 MNIST, 8x8 digits): [conv3x3-BN-ReLU-maxpool2] x len(channels) + linear.

    ``image_size`` is the (square) input size the flattening classifier is sized for; each stage
    halves it (floor), so it must be at least ``2 ** len(channels)``.
    """

    model_type = "hf_ddlr_cnn"

    num_channels: int = 1
    image_size: int = 28
    channels: list[int] | tuple[int, ...] = (32, 64)
    dropout_rate: float = 0.0

    _list_fields = ("channels",)

    def validate_architecture(self):
        """The input must survive ``len(channels)`` halvings."""
        _check_common(self.num_channels, self.dropout_rate)
        _positive_ints("channels", self.channels)
        if self.image_size < 2 ** len(self.channels):
            raise ValueError(
                f"image_size={self.image_size} is too small for {len(self.channels)} pooling stages; "
                f"use image_size >= {2 ** len(self.channels)} or fewer channels entries."
            )

    @property
    def feature_size(self) -> int:
        """Length of the flattened feature vector the classifier sees."""
        side = self.image_size // 2 ** len(self.channels)
        return self.channels[-1] * side * side
