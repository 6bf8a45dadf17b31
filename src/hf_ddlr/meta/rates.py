"""The learned values: per-instance and per-class learning-rate multipliers and the weight decay.

A small table with its own sparse SGD (only rows seen in the batch move) and one place that clamps,
in the spirit of Data Parameters. An example's *effective* multiplier is
``e_i = w_inst[idx_i] · w_class[y_i]`` (a level that is off counts as 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["RateTable", "RateUpdate"]

Level = Literal["instance", "class", "both"]
Scaling = Literal["normalized", "raw"]


@dataclass
class RateUpdate:
    """What one meta update did (for logging and tests)."""

    instance_grad: torch.Tensor | None  # per example of the (global) batch, aligned with ``indices``
    class_grad: torch.Tensor | None  # per class
    weight_decay_grad: float | None
    applied: bool


class RateTable:
    """Per-instance / per-class rate multipliers and the (optionally learned) weight decay.

    ``meta_lr_scaling="raw"`` is the paper's update ``w ← max(0, w − meta_lr · ∂L_meta/∂w)``.
    ``"normalized"`` (the default) makes the step scale-free, whatever the learning rate, batch size or
    gradient scale: an instance rate's gradient is divided by the batch's mean absolute value, so
    ``meta_lr`` is the typical change of a rate per visit; a class rate moves by ``meta_lr`` times its
    share of the batch's total absolute meta-gradient (a class is visited every step, so the class table
    as a whole moves by at most ``meta_lr`` per step); the weight decay moves multiplicatively,
    ``wd ← wd · exp(−meta_wd_lr · g / rms(g))`` with a running RMS of its meta-gradient.
    """

    def __init__(
        self,
        num_examples: int,
        num_classes: int,
        level: Level = "instance",
        *,
        weight_decay: float = 0.0,
        learn_weight_decay: bool = False,
        meta_lr: float = 0.1,
        meta_wd_lr: float = 0.01,
        scaling: Scaling = "normalized",
        max_rate: float | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if level not in ("instance", "class", "both"):
            raise ValueError(f"lr_level must be 'instance', 'class' or 'both', got {level!r}.")
        self.level = level
        self.meta_lr, self.meta_wd_lr = float(meta_lr), float(meta_wd_lr)
        self.scaling = scaling
        self.max_rate = max_rate
        self.learn_weight_decay = learn_weight_decay
        self.initial_weight_decay = float(weight_decay)
        self.instance = torch.ones(num_examples, device=device) if level in ("instance", "both") else None
        self.per_class = torch.ones(num_classes, device=device) if level in ("class", "both") else None
        self.weight_decay = float(weight_decay)
        self.wd_sq_avg = 0.0  # running mean of the squared weight-decay meta-gradient ("normalized")
        self.num_updates = 0

    # ------------------------------------------------------------------ reading
    def effective(self, indices: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """e_i for a batch (on the labels' device)."""
        e = torch.ones(labels.shape[0], device=labels.device)
        if self.instance is not None:
            if indices is None:
                raise ValueError("Per-instance rates need the dataset index of every training example.")
            e = e * self.instance[indices.to(self.instance.device)].to(labels.device)
        if self.per_class is not None:
            e = e * self.per_class[labels.to(self.per_class.device)].to(labels.device)
        return e

    def reset(self) -> None:
        """Back to 1 (the no-history ablation calls this before every meta step)."""
        if self.instance is not None:
            self.instance.fill_(1.0)
        if self.per_class is not None:
            self.per_class.fill_(1.0)

    # ------------------------------------------------------------------ updating
    def _scaled(self, grad: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.scaling == "raw":
            return self.meta_lr * grad
        scale = grad.abs().mean() if scale is None else scale
        if not torch.isfinite(scale) or scale <= 0:
            return None
        return self.meta_lr * grad / scale

    def _clamp(self, t: torch.Tensor) -> torch.Tensor:
        return t.clamp_(min=0.0, max=self.max_rate) if self.max_rate is not None else t.clamp_(min=0.0)

    def update(
        self,
        indices: torch.Tensor | None,
        labels: torch.Tensor,
        example_grad: torch.Tensor,
        weight_decay_grad: float | None = None,
    ) -> RateUpdate:
        """Apply ``∂L_meta/∂e_i`` of a (global) batch to the table by the chain rule through e_i.

        Returns without touching anything if any gradient is not finite.
        """
        example_grad = example_grad.detach().float()
        finite = bool(torch.isfinite(example_grad).all()) and (
            weight_decay_grad is None or math.isfinite(weight_decay_grad)
        )
        if not finite:
            return RateUpdate(None, None, None, applied=False)
        inst_grad = class_grad = None
        if self.instance is not None:
            idx = indices.to(self.instance.device)
            factor = self.per_class[labels.to(self.per_class.device)] if self.per_class is not None else 1.0
            g_rows = example_grad.to(self.instance.device) * factor
            # duplicates in a batch (rare) accumulate, as the gradient of a table lookup does
            grad_table = torch.zeros_like(self.instance).index_add_(0, idx, g_rows)
            rows = torch.unique(idx)
            inst_grad = g_rows
        if self.per_class is not None:
            lab = labels.to(self.per_class.device)
            factor = self.instance[indices.to(self.instance.device)] if self.instance is not None else 1.0
            contrib = example_grad.to(self.per_class.device) * factor
            class_grad = torch.zeros_like(self.per_class).index_add_(0, lab, contrib)
            present = torch.unique(lab)
            # normalized: a class moves by meta_lr times its share of the batch's total |meta-gradient|, so
            # the class table as a whole moves at most meta_lr per step (not meta_lr per class and step)
            class_scale = contrib.abs().sum()
        # apply both levels from the same (pre-update) values
        if self.instance is not None:
            step = self._scaled(grad_table[rows])
            if step is not None:
                self.instance[rows] = self._clamp(self.instance[rows] - step)
        if self.per_class is not None:
            step = self._scaled(class_grad[present], class_scale)
            if step is not None:
                self.per_class[present] = self._clamp(self.per_class[present] - step)
        if self.learn_weight_decay and weight_decay_grad is not None:
            self._update_weight_decay(weight_decay_grad)
        self.num_updates += 1
        return RateUpdate(inst_grad, class_grad, weight_decay_grad, applied=True)

    def _update_weight_decay(self, g: float) -> None:
        if self.scaling == "raw":
            self.weight_decay = max(0.0, self.weight_decay - self.meta_wd_lr * g)
            return
        beta = 0.99
        self.wd_sq_avg = beta * self.wd_sq_avg + (1 - beta) * g * g
        rms = math.sqrt(self.wd_sq_avg / (1 - beta ** (self.num_updates + 1)))
        if rms > 0:
            self.weight_decay = self.weight_decay * math.exp(-self.meta_wd_lr * max(-3.0, min(3.0, g / rms)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that make a resumed run continue exactly."""
        sd = {
            "weight_decay": torch.tensor(self.weight_decay, dtype=torch.float64),
            "wd_sq_avg": torch.tensor(self.wd_sq_avg, dtype=torch.float64),
            "num_updates": torch.tensor(self.num_updates, dtype=torch.int64),
        }
        if self.instance is not None:
            sd["instance"] = self.instance.detach().cpu().clone()
        if self.per_class is not None:
            sd["per_class"] = self.per_class.detach().cpu().clone()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor], *, allow_resize: bool = False) -> None:
        """Restore :meth:`state_dict`. A table of another size is an error unless ``allow_resize``, which
        keeps the overlapping rows (the first ``min(old, new)`` indices) and leaves the rest at 1."""
        for name in ("instance", "per_class"):
            mine = getattr(self, name)
            if (mine is None) != (name not in sd):
                raise ValueError(
                    f"Checkpoint rate table {name!r} is {'missing' if mine is not None else 'present'} but "
                    f"lr_level={self.level!r} {'needs' if mine is not None else 'does not use'} it. Resume "
                    "with the lr_level the checkpoint was trained with."
                )
            if mine is None:
                continue
            src = sd[name].to(mine.device, mine.dtype)
            if src.shape != mine.shape:
                if not allow_resize:
                    what = "train set" if name == "instance" else "label set"
                    raise ValueError(
                        f"The checkpoint's {name} rate table has {src.numel()} entries but this {what} has "
                        f"{mine.numel()}. Resume on the same data, or set resize_rates_on_resume=True to keep "
                        "the overlapping rows."
                    )
                n = min(src.numel(), mine.numel())
                mine.fill_(1.0)
                mine[:n] = src[:n]
            else:
                mine.copy_(src)
        self.weight_decay = float(sd["weight_decay"])
        self.wd_sq_avg = float(sd["wd_sq_avg"])
        self.num_updates = int(sd["num_updates"])
