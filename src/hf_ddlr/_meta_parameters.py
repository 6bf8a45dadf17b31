"""The run's ``meta_parameters`` (which trainable parameters the meta step looks ahead on), its ``meta_objective``
(what the lookahead is scored by), its ``instance_rate_at_cap``, and what its instance rates step on and are centred
by (``instance_signal``, ``center_instance_rates``, ``instance_rate_center``), as their ``"auto"`` defaults resolve
for the model, its task and its optimizer."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .meta.engine import find_output_layer
from .meta.losses import SINGLE_LABEL
from .meta.parameters import head_parameter_names, select_meta_parameters
from .meta.rates import INSTANCE_LEVELS

__all__ = [
    "instance_centering_choice", "instance_rate_at_cap_choice", "instance_signal_choice", "meta_objective_choice",
    "meta_parameters_choice", "meta_parameter_names", "plain_sgd",
]

logger = logging.getLogger(__name__)


def _pretrained(model: nn.Module) -> bool:
    """Whether ``model`` was loaded with ``from_pretrained`` (its config names where from) and is not a PEFT
    model (whose adapters are what trains: they stay in the meta step)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "_name_or_path", "")) and not hasattr(model, "peft_config")


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def meta_parameters_choice(trainer: Any, trainable: list[str] | None = None) -> str:
    """``meta_parameters`` as the run uses it: ``"auto"`` resolved to ``"head"`` for a fine-tune of a pretrained
    model (not PEFT) on a task with one loss and one output per example whose model has a head after a stack of
    blocks, and to ``"all"`` otherwise; any other value as given. ``trainable``: the model's trainable parameter
    names, when the caller has them."""
    choice = trainer.meta_args.meta_parameters
    if choice != "auto":
        return choice
    model, task = trainer.model, getattr(trainer, "_task", None)
    if task is None or task.token_outputs or not _pretrained(model):
        return "all"
    return "head" if head_parameter_names(model, trainable or _trainable(model)) else "all"


def meta_parameter_names(trainer: Any, choice: str | None = None) -> list[str] | None:
    """The names of the trainable parameters the meta step takes (None: all of them), logged once. ``choice``:
    :func:`meta_parameters_choice` of the run, when the caller has it."""
    model = trainer.model
    trainable = _trainable(model)
    choice = choice or meta_parameters_choice(trainer, trainable)
    names = select_meta_parameters(model, trainable, choice)
    if names is not None:
        size = {n: p.numel() for n, p in model.named_parameters()}
        logger.info("The meta step looks ahead on %d of %d trainable tensors (%s; %.3g of %.3g M parameters): %s",
                    len(names), len(trainable), f"meta_parameters={trainer.meta_args.meta_parameters!r} -> {choice!r}",
                    sum(size[n] for n in names) / 1e6, sum(size[n] for n in trainable) / 1e6,
                    ", ".join(names[:6]) + (", ..." if len(names) > 6 else ""))
    return names


def meta_objective_choice(trainer: Any, parameters: str | None = None) -> str:
    """``meta_objective`` as the run uses it: ``"auto"`` resolved to ``"bounded"`` where the meta step looks
    ahead on the head of a pretrained model (``parameters``: the run's resolved ``meta_parameters``, when the
    caller has it) and to ``"loss"`` otherwise (and always under ``meta_strategy="last_layer"``); any other
    value as given."""
    choice = trainer.meta_args.meta_objective
    if choice != "auto":
        return choice
    if trainer.meta_args.meta_strategy == "last_layer" or not _pretrained(trainer.model):
        return "loss"
    return "bounded" if (parameters or meta_parameters_choice(trainer)) == "head" else "loss"


def plain_sgd(trainer: Any) -> bool:
    """Whether the run trains with torch's SGD without momentum: the optimizer passed to the Trainer when there is
    one, else the class and keyword arguments it will build one from (``optimizer_cls_and_kwargs``, or
    ``args.optim`` / ``args.optim_args``). An optimizer that cannot be told without building it counts as not."""
    opt = getattr(trainer, "optimizer", None)
    while opt is not None and not isinstance(opt, torch.optim.SGD) and hasattr(opt, "optimizer"):
        opt = opt.optimizer  # accelerate's wrapper of the optimizer the Trainer built
    if opt is not None:
        return isinstance(opt, torch.optim.SGD) and all(not g.get("momentum") for g in opt.param_groups)
    given = getattr(trainer, "optimizer_cls_and_kwargs", None)
    try:
        cls, kwargs = given if given is not None else Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    except Exception:  # an optimizer that needs more than the arguments (or a package) to be resolved
        return False
    return isinstance(cls, type) and issubclass(cls, torch.optim.SGD) and not kwargs.get("momentum")


def instance_rate_at_cap_choice(trainer: Any, parameters: str | None = None) -> str:
    """``instance_rate_at_cap`` as the run uses it: ``"auto"`` resolved to ``"relative"`` where the meta step looks
    ahead on the head of a pretrained model (a fine-tune: ``parameters``, the run's resolved ``meta_parameters``,
    when the caller has it) or the model trains with SGD without momentum: there a few epochs leave many
    mislabelled examples at the cap beside the clean ones. ``"clamp"`` otherwise (momentum SGD and Adam from
    scratch, whose mislabelled examples fall far below the cap, and without instance rates); any other value as
    given."""
    choice = trainer.meta_args.instance_rate_at_cap
    if choice != "auto":
        return choice
    if trainer.meta_args.lr_level not in INSTANCE_LEVELS:  # no instance rates: nothing to resolve
        return "clamp"
    if (parameters or meta_parameters_choice(trainer)) == "head":
        return "relative"
    return "relative" if plain_sgd(trainer) else "clamp"


def instance_signal_choice(trainer: Any) -> str:
    """``instance_signal`` as the run uses it: ``"auto"`` resolved to ``"other_classes"`` where that applies —
    instance rates, single-label classification, ``meta_strategy`` ``"jvp"`` or ``"finite_difference"``, and a
    classification head (the last ``nn.Linear`` with ``num_labels`` outputs) that trains and that the lookahead
    moves — and to ``"mean"`` otherwise; any other value as given."""
    meta = trainer.meta_args
    if meta.instance_signal != "auto":
        return meta.instance_signal
    if (meta.lr_level not in INSTANCE_LEVELS or meta.meta_strategy not in ("jvp", "finite_difference")
            or getattr(trainer, "_task", None) is not SINGLE_LABEL):
        return "mean"
    try:
        name, head = find_output_layer(trainer.model, getattr(trainer, "num_labels", None))
    except ValueError:  # no linear head with one output per class
        return "mean"
    if not head.weight.requires_grad:
        return "mean"
    trainable = _trainable(trainer.model)
    moved = select_meta_parameters(trainer.model, trainable, meta_parameters_choice(trainer, trainable))
    return "other_classes" if moved is None or f"{name}.weight" in moved else "mean"


def instance_centering_choice(trainer: Any, signal: str | None = None) -> tuple[bool, str]:
    """(``center_instance_rates``, ``instance_rate_center``) as the run uses them: ``center_instance_rates=None``
    resolved to on where the instance rates step on the other classes' share (``signal``: the run's resolved
    :func:`instance_signal_choice`, when the caller has it) or ``instance_rate_center`` asks for the median, off
    otherwise; ``instance_rate_center="auto"`` resolved to ``"median"`` for the other classes' share and to
    ``"mean"`` otherwise. The other classes' share leans negative for every example (each loses its own label's
    help), so uncentred every rate drifts down together (docs/robustness.md)."""
    meta = trainer.meta_args
    split = (signal or instance_signal_choice(trainer)) == "other_classes"
    center = meta.instance_rate_center if meta.instance_rate_center != "auto" else ("median" if split else "mean")
    on = meta.center_instance_rates
    if on is None:
        on = meta.lr_level in INSTANCE_LEVELS and (split or meta.instance_rate_center == "median")
    return bool(on), center
