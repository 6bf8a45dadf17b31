"""One-step lookahead θ' = next iterate of the optimizer, and the quantities derived from it.

With effective example weights ``e`` and per-example losses ``L_i`` the train gradient is
``g = (1/N) Σ e_i ∇L_i``. Every optimizer supported here moves each parameter tensor as

    θ'_p = θ_p − λ_p · ρ_p ⊙ (g_p + [coupled] wd·θ_p) − λ_p · [decoupled] wd·θ_p − (terms free of e, wd)

with an elementwise factor ρ_p that does not depend on ``e`` (1 for SGD, the bias-corrected Adam
preconditioner with the second moment held constant). Hence, for any meta loss with gradient
``g_meta`` at θ', ``∂L_meta/∂e_i = −(1/N) · T·∇L_i`` with the *tangent* ``T_p = λ_p ρ_p ⊙ g_meta_p``, and
``∂L_meta/∂wd = −Σ_decay λ_p (ρ_p if coupled else 1) g_meta_p·θ_p``. The strategies only differ in how they
evaluate the dots ``T·∇L_i``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["ParamSpec", "param_specs", "lookahead", "tangent", "weight_decay_grad"]

LookaheadMode = Literal["optimizer", "sgd"]


@dataclass
class ParamSpec:
    """How the optimizer will move one parameter tensor at the coming step."""

    lr: float
    decay: bool = False  # the learned / configured weight decay applies to this tensor
    kind: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    decoupled: bool = False  # AdamW-style decay (not passed through the preconditioner)
    state: dict = field(default_factory=dict)


def _adam_like(opt: torch.optim.Optimizer) -> tuple[bool, bool]:
    """(is Adam family, decoupled decay) for the torch optimizers we understand."""
    if isinstance(opt, torch.optim.AdamW):
        return True, True
    if isinstance(opt, torch.optim.Adam):
        return True, bool(getattr(opt, "defaults", {}).get("decoupled_weight_decay", False))
    return False, False


def param_specs(
    optimizer: torch.optim.Optimizer | None,
    named_params: Mapping[str, torch.Tensor],
    decay_names: Iterable[str],
    mode: LookaheadMode = "optimizer",
    default_lr: float | None = None,
) -> dict[str, ParamSpec]:
    """Describe the coming step of ``optimizer`` for each named parameter.

    ``mode="sgd"`` is the paper's lookahead (plain SGD at the current learning rate, whatever the real
    optimizer is); ``"optimizer"`` follows the real optimizer (momentum SGD, Adam, AdamW). An optimizer
    this module does not know falls back to the plain-SGD lookahead with a warning.
    """
    decay = set(decay_names)
    group_of: dict[int, dict] = {}
    if optimizer is not None:
        for g in optimizer.param_groups:
            for p in g["params"]:
                group_of[id(p)] = g
    is_adam, decoupled = _adam_like(optimizer) if optimizer is not None else (False, False)
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    if mode == "optimizer" and optimizer is not None and not (is_adam or is_sgd):
        warnings.warn(
            f"Optimizer-aware lookahead does not know {type(optimizer).__name__}; using the plain-SGD "
            "lookahead of the paper (set lookahead='sgd' to silence this).",
            stacklevel=2,
        )
        mode = "sgd"
    specs: dict[str, ParamSpec] = {}
    for name, p in named_params.items():
        g = group_of.get(id(p))
        if g is None and default_lr is None:
            raise ValueError(f"Parameter {name!r} is not in any optimizer param group; cannot build a lookahead.")
        lr = float(g["lr"]) if g is not None else float(default_lr)
        spec = ParamSpec(lr=lr, decay=name in decay)
        if mode == "optimizer" and g is not None:
            st = optimizer.state.get(p, {})
            if is_sgd:
                spec.momentum = float(g.get("momentum", 0.0))
                spec.dampening = float(g.get("dampening", 0.0))
                spec.nesterov = bool(g.get("nesterov", False))
                if st.get("momentum_buffer") is not None:
                    spec.state = {"momentum_buffer": st["momentum_buffer"]}
            elif is_adam and "exp_avg_sq" in st:  # before the first step Adam has no state: plain SGD form
                spec.kind = "adam"
                spec.beta1, spec.beta2 = (float(b) for b in g["betas"])
                spec.eps = float(g["eps"])
                spec.decoupled = decoupled
                spec.state = {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"], "step": float(st["step"])}
        specs[name] = spec
    return specs


def _adam_factors(spec: ParamSpec) -> tuple[float, torch.Tensor]:
    """(c_t, P): bias-corrected first-moment factor and the preconditioner with v held at its last value."""
    t_prev = spec.state["step"]
    t = t_prev + 1.0
    c_t = (1.0 - spec.beta1) / (1.0 - spec.beta1**t)
    v_hat = spec.state["exp_avg_sq"] / (1.0 - spec.beta2**t_prev)
    return c_t, 1.0 / (v_hat.sqrt() + spec.eps)


def precondition(spec: ParamSpec, x: torch.Tensor) -> torch.Tensor:
    """ρ ⊙ x: how a change of the gradient moves the next iterate (before the −λ factor)."""
    if spec.kind == "adam":
        c_t, P = _adam_factors(spec)
        return c_t * P.to(x.dtype) * x
    if spec.nesterov:
        return (1.0 + spec.momentum) * x
    if spec.momentum and "momentum_buffer" in spec.state:
        return (1.0 - spec.dampening) * x
    return x


def lookahead(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    specs: Mapping[str, ParamSpec],
    weight_decay: float | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """θ': the parameters after one step of the described optimizer on ``grads`` with ``weight_decay``.

    Differentiable in ``grads`` and ``weight_decay`` when they carry a graph (the exact strategy); the
    optimizer state is read, never written.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        s, g = specs[name], grads[name]
        wd = weight_decay if s.decay else 0.0
        if s.kind == "adam":
            coupled = 0.0 if s.decoupled else wd
            gt = g + coupled * p if s.decay and not s.decoupled else g
            m = s.beta1 * s.state["exp_avg"] + (1.0 - s.beta1) * gt
            t = s.state["step"] + 1.0
            _, P = _adam_factors(s)
            step = (m / (1.0 - s.beta1**t)) * P.to(p.dtype)
            base = p * (1.0 - s.lr * wd) if (s.decay and s.decoupled) else p
            out[name] = base - s.lr * step
            continue
        d = g + wd * p if s.decay else g
        buf = s.state.get("momentum_buffer")
        if s.momentum and buf is not None:
            d_new = s.momentum * buf + (1.0 - s.dampening) * d
        else:
            d_new = d
        if s.nesterov and s.momentum:
            d_new = d + s.momentum * d_new
        out[name] = p - s.lr * d_new
    return out


def tangent(g_meta: Mapping[str, torch.Tensor], specs: Mapping[str, ParamSpec]) -> dict[str, torch.Tensor]:
    """T = λ ρ ⊙ g_meta: the direction whose dot with ∇L_i gives −N ∂L_meta/∂e_i."""
    return {n: specs[n].lr * precondition(specs[n], g) for n, g in g_meta.items()}


def weight_decay_grad(
    g_meta: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], specs: Mapping[str, ParamSpec]
) -> float:
    """∂L_meta/∂wd = −Σ over decayed tensors of λ (ρ if the decay is coupled) g_meta·θ (paper §2.3)."""
    total = 0.0
    for n, g in g_meta.items():
        s = specs[n]
        if not s.decay:
            continue
        coupled = not (s.kind == "adam" and s.decoupled)
        v = precondition(s, g) if coupled else g
        total += -s.lr * float((v.double() * params[n].detach().double()).sum())
    if not math.isfinite(total):
        return float("nan")
    return total
