"""Which parameters the meta step looks ahead on: all of them, the head after the model's stack of blocks, or a
pattern.

The meta-gradient ``∂L_meta/∂e_i`` is a sum over parameters of the lookahead's products ``T·∇L_i``. Restricting
it to a subset is the meta-gradient of a lookahead that moves that subset only (the real step still moves
everything): on a fine-tuned pretrained encoder, the head's part ranks mislabelled examples better than the
whole, whose lower layers' part follows the input's resemblance to the few meta examples more than the label's
correctness (docs/robustness.md, "The head's meta-gradient").
"""

from __future__ import annotations

import re
from collections.abc import Collection

from torch import nn

__all__ = ["PARAMETER_CHOICES", "block_stack", "head_parameter_names", "meta_parameters_pattern",
           "select_meta_parameters"]

PARAMETER_CHOICES = ("all", "head")


def block_stack(model: nn.Module) -> str | None:
    """The qualified name of the model's stack of blocks — the ``nn.ModuleList`` of two or more modules holding
    the most parameters (a transformer's layers, a ResNet's stages) — or None when it has none."""
    best, size = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2:
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = name, n
    return best


def head_parameter_names(model: nn.Module, names: Collection[str]) -> list[str]:
    """Of ``names`` (trainable parameters), those registered after the model's stack of blocks: what turns the
    last block's output into the prediction (a pooler, a final norm, the classifier). Empty when the model has
    no stack or nothing follows it."""
    stack = block_stack(model)
    if stack is None:
        return []
    prefix, order = stack + ".", [n for n, _ in model.named_parameters()]
    inside = [i for i, n in enumerate(order) if n.startswith(prefix)]
    if not inside:
        return []
    wanted = set(names)
    return [n for n in order[inside[-1] + 1:] if n in wanted]


def meta_parameters_pattern(choice: str, named: Collection[str] = PARAMETER_CHOICES) -> re.Pattern | None:
    """The regular expression a ``meta_parameters`` value stands for (None for a named choice of ``named``); a
    value that is neither is an error naming the choices."""
    if choice in named:
        return None
    try:
        return re.compile(choice)
    except re.error as e:
        raise ValueError(f"meta_parameters={choice!r} is not one of {tuple(named)} nor a valid regular "
                         f"expression of parameter names ({e}).") from None


def select_meta_parameters(model: nn.Module, names: Collection[str], choice: str) -> list[str] | None:
    """The trainable parameters (of ``names``) the meta step takes: None for ``"all"``; the head for ``"head"``;
    the names a regular expression finds (``re.search``) otherwise. A choice that selects nothing is an error
    naming what to use instead."""
    if choice == "all":
        return None
    if choice == "head":
        head = head_parameter_names(model, names)
        if not head:
            raise ValueError(
                f"meta_parameters='head' takes the trainable parameters after the model's stack of blocks (an "
                f"nn.ModuleList of layers), but {type(model).__name__} has "
                + ("none" if block_stack(model) is None else "no trainable parameter after it")
                + ". Use meta_parameters='all' or a regular expression of parameter names."
            )
        return head
    pattern = meta_parameters_pattern(choice)
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        some = ", ".join(list(names)[:3])
        raise ValueError(f"meta_parameters={choice!r} matches no trainable parameter (they are named like "
                         f"{some}, ...). Use 'all', 'head' or a pattern that matches some of them.")
    return chosen
