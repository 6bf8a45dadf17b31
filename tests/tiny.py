"""Tiny models and datasets shared by the trainer tests (built locally, nothing downloaded)."""

from __future__ import annotations

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class TinyMLP(nn.Module):
    """x -> linear -> [BN] -> relu -> [dropout] -> linear; returns an object with `logits` (and `loss`)."""

    def __init__(self, d_in: int = 6, hidden: int = 16, num_labels: int = 3, bn: bool = False, dropout: float = 0.0):
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.l2 = nn.Linear(hidden, num_labels)

    def forward(self, x, labels=None):
        logits = self.l2(self.drop(F.relu(self.bn(self.l1(x)))))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def make_split(n: int, seed: int, d_in: int = 6, num_labels: int = 3, noise: float = 0.0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = (x[:, :num_labels] + 0.3 * torch.randn(n, num_labels, generator=g)).argmax(1)
    if noise:
        flip = torch.rand(n, generator=g) < noise
        y = torch.where(flip, torch.randint(0, num_labels, (n,), generator=g), y)
    return datasets.Dataset.from_dict({"x": x.tolist(), "label": y.tolist()})


class TinyConfig(PretrainedConfig):
    model_type = "hf_ddlr_tiny_test"

    def __init__(self, d_in: int = 6, hidden: int = 16, **kw):
        self.d_in, self.hidden = d_in, hidden
        kw.setdefault("num_labels", 3)
        super().__init__(**kw)


class TinyPreTrained(PreTrainedModel):
    """TinyMLP as a PreTrainedModel (save_pretrained / push_to_hub work)."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.net = TinyMLP(config.d_in, config.hidden, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, x, labels=None):
        return self.net(x, labels)
