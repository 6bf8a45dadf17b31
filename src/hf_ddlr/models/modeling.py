"""CIFAR image classifiers as ``PreTrainedModel``\\ s: ResNet-18, VGG-16-BN, WRN-28-10 and a small CNN.

All four share one contract so the trainer and the meta-gradient engine can treat them alike:

* ``forward(pixel_values, labels=None, output_hidden_states=None, return_dict=None)`` returns an
  :class:`~transformers.modeling_outputs.ImageClassifierOutput` with ``logits`` (and the mean
  cross-entropy ``loss`` when ``labels`` are given). The signature is strict: extra batch columns
  (``sample_index`` ...) must be removed by the caller.
* No in-place operations on activations (``F.relu(x)``, never ``inplace=True``) and plain
  ``nn.BatchNorm2d``, so the models work under ``torch.func.functional_call`` and forward-mode AD
  (``torch.autograd.forward_ad`` / ``torch.func.jvp``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

from hf_ddlr.models.configuration import CifarResNetConfig, CifarVGGConfig, SmallCNNConfig, WideResNetConfig


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class _CifarClassifier(PreTrainedModel):
    """Shared plumbing: weight init, input checks, loss and output packing. Subclasses define ``features``."""

    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):  # torch's default Linear init, as in the reference CIFAR code
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if module.num_batches_tracked is not None:
                init.zeros_(module.num_batches_tracked)

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Return (pooled features (N, D), per-stage feature maps)."""
        raise NotImplementedError

    def _check_input(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"{type(self).__name__} expects pixel_values of shape (batch, {self.config.num_channels}, H, W), got "
                f"{tuple(pixel_values.shape)}; set num_channels in the config to match the images."
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        """Classify a batch of images (N, C, H, W); ``labels`` (N,) class ids add the mean cross-entropy loss."""
        self._check_input(pixel_values)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        pooled, hidden = self.features(pixel_values)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device).long().view(-1))
        hidden_states = hidden if output_hidden_states else None
        if not return_dict:
            out = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


# --------------------------------------------------------------------------------------------- ResNet
class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetForImageClassification(_CifarClassifier):
    """CIFAR ResNet (3x3 stem, no max-pool); ResNet-18 with the default config: 11.22 M parameters at 100 classes."""

    config_class = CifarResNetConfig
    _no_split_modules = ["_BasicBlock"]

    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        w = config.base_width
        self.conv1 = _conv3x3(config.num_channels, w)
        self.bn1 = nn.BatchNorm2d(w)
        stages, cin = [], w
        for i, n in enumerate(config.depths):
            cout = w * 2**i
            blocks = [
                _BasicBlock(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0 else 1)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.classifier = nn.Linear(cin, config.num_labels)
        self.post_init()

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x = F.relu(self.bn1(self.conv1(pixel_values)))
        hidden = [x]
        for stage in self.stages:
            x = stage(x)
            hidden.append(x)
        return x.mean(dim=(2, 3)), tuple(hidden)


# --------------------------------------------------------------------------------------------- VGG
class CifarVGGForImageClassification(_CifarClassifier):
    """CIFAR VGG-16 with batch norm (conv3x3-BN-ReLU stages + max-pool, global average pool, Linear(512, C))."""

    config_class = CifarVGGConfig

    def __init__(self, config: CifarVGGConfig):
        super().__init__(config)
        stages, cin = [], config.num_channels
        for width, depth in zip(config.stage_channels, config.stage_depths):
            layers: list[nn.Module] = []
            for _ in range(depth):
                # biased convs, as in the standard count
                layers.append(nn.Conv2d(cin, width, 3, padding=1, bias=True))
                layers.append(nn.BatchNorm2d(width) if config.batch_norm else nn.Identity())
                cin = width
            stages.append(nn.ModuleList(layers))
        self.stages = nn.ModuleList(stages)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.classifier = nn.Linear(cin, config.num_labels)
        self.post_init()

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x, hidden = pixel_values, []
        for stage in self.stages:
            for conv, norm in zip(stage[0::2], stage[1::2]):
                x = F.relu(norm(conv(x)))
            if min(x.shape[-2:]) >= 2:  # 32x32 inputs reach 1x1 after five pools; smaller inputs stop pooling
                x = F.max_pool2d(x, 2)
            hidden.append(x)
        return x.mean(dim=(2, 3)), tuple(hidden)


# --------------------------------------------------------------------------------------------- WRN
class _WideBlock(nn.Module):
    """Pre-activation basic block of Wide ResNet (BN-ReLU-conv-BN-ReLU-dropout-conv + shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.dropout = nn.Dropout(dropout_rate)
        self.equal_in_out = cin == cout and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = F.relu(self.bn2(self.conv1(o)))
        out = self.conv2(self.dropout(out))
        return out + shortcut


class WideResNetForImageClassification(_CifarClassifier):
    """Wide ResNet for CIFAR; WRN-28-10 with the default config: 36.5 M parameters at 100 classes."""

    config_class = WideResNetConfig
    _no_split_modules = ["_WideBlock"]

    def __init__(self, config: WideResNetConfig):
        super().__init__(config)
        n = (config.depth - 4) // 6
        widths = [16, 16 * config.widen_factor, 32 * config.widen_factor, 64 * config.widen_factor]
        self.conv1 = _conv3x3(config.num_channels, widths[0])
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    *[
                        _WideBlock(
                            cin if j == 0 else cout, cout, stride if j == 0 else 1, config.dropout_rate
                        )
                        for j in range(n)
                    ]
                )
            )
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.bn = nn.BatchNorm2d(cin)
        # dropout lives inside the blocks for WRN; the classifier input is not dropped
        self.dropout = nn.Identity()
        self.classifier = nn.Linear(cin, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and module.bias is not None:
            init.zeros_(module.bias)

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x = self.conv1(pixel_values)
        hidden = [x]
        for stage in self.stages:
            x = stage(x)
            hidden.append(x)
        x = F.relu(self.bn(x))
        return x.mean(dim=(2, 3)), tuple(hidden)


# --------------------------------------------------------------------------------------------- small CNN
class SmallCNNForImageClassification(_CifarClassifier):
    """[conv3x3-BN-ReLU-maxpool2] x len(channels), flatten, optional dropout, linear. 50 k parameters with the default (32, 64) channels on 28x28."""

    config_class = SmallCNNConfig

    def __init__(self, config: SmallCNNConfig):
        super().__init__(config)
        convs, norms, cin = [], [], config.num_channels
        for width in config.channels:
            convs.append(nn.Conv2d(cin, width, 3, padding=1, bias=False))
            norms.append(nn.BatchNorm2d(width))
            cin = width
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.classifier = nn.Linear(config.feature_size, config.num_labels)
        self.post_init()

    def _check_input(self, pixel_values: torch.Tensor) -> None:
        super()._check_input(pixel_values)
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"SmallCNN was configured for {size}x{size} images (its classifier is sized for that), got "
                f"{tuple(pixel_values.shape[-2:])}; set image_size in SmallCNNConfig to the image size."
            )

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x, hidden = pixel_values, []
        for conv, norm in zip(self.convs, self.norms):
            x = F.max_pool2d(F.relu(norm(conv(x))), 2)
            hidden.append(x)
        return x.flatten(1), tuple(hidden)
