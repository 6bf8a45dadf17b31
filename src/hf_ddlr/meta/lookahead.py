"""One-step lookahead θ' = next iterate of the optimizer, and the quantities derived from it.

With effective example weights ``e`` and per-example losses ``L_i`` the train gradient is
``g = (1/N) Σ e_i ∇L_i``. Every optimizer supported here moves each parameter tensor as

    θ'_p = θ_p − λ_p · ρ_p ⊙ (g_p + [coupled] wd·θ_p) − λ_p · [decoupled] wd·θ_p − (terms free of e, wd)

with an elementwise factor ρ_p that is held independent of ``e``:

- plain SGD: ``ρ = 1``;
- momentum μ with dampening τ (PyTorch's SGD; its first step sets the buffer to the gradient, undamped):
  ``ρ = 1 − τ`` once a buffer exists, 1 on the first step; Nesterov: ``ρ = 1 + μ(1 − τ)`` (``1 + μ`` on
  the first step);
- Adam / AdamW at step ``t`` (1 on the first step, from empty state):
  ``ρ = (1 − β1)/(1 − β1^t) · P`` with ``P = 1/(sqrt(v'/(1 − β2^t)) + eps)`` and the *updated* second
  moment ``v' = β2·v + (1 − β2)·(g + [coupled] wd·θ)²`` (AMSGrad: ``max(v_max, v')``);
- RMSprop: ``ρ = P = 1/(sqrt(v') + eps)`` with ``v' = α·v + (1 − α)·(g + wd·θ)²`` (centered: ``v' − ḡ'²``, the
  updated mean gradient ``ḡ' = α·ḡ + (1 − α)·(g + wd·θ)``); its momentum buffer adds ``P·(g + wd·θ)``, so ρ is
  the same with momentum;
- Adagrad: ``ρ = P = 1/(sqrt(s') + eps)`` with the updated sum ``s' = s + (g + wd·θ)²``, at the step's decayed
  rate ``λ/(1 + (t − 1)·lr_decay)``;
- Adafactor (transformers' ``Adafactor``, the Trainer's ``optim="adafactor"``, and ``torch.optim.Adafactor``):
  ``ρ = c·(1 − β1)·P`` with ``P = 1/sqrt(v̂')`` of the updated second moment ``v̂'`` (factored into row and column
  means for tensors of two or more dimensions), ``c = 1/max(1, RMS(P ⊙ g)/d)`` the update clipping and ``1 − β1``
  only when transformers' first moment (``beta1``) is on; ``λ`` is the step's rate (relative to the step number
  and scaled by the parameter's RMS where the optimizer says so) and the decay is decoupled,
  ``θ·(1 − wd·λ_wd)`` with the same rate (transformers) or the group's ``lr`` (torch).

θ' itself is the real optimizer's next iterate, its new moments included. For Adam, RMSprop and Adagrad those
moments (and Adafactor's clipping factor ``c``) depend on ``e`` too; the derivatives hold them constant (``P``
is a constant of this step, as in the real update's preconditioning), so for them they are those of a step with a frozen second moment, for SGD they
are exact. Hence, for any meta loss with gradient ``g_meta`` at θ', ``∂L_meta/∂e_i = −(1/N) · T·∇L_i`` with the
*tangent* ``T_p = λ_p ρ_p ⊙ g_meta_p``, and ``∂L_meta/∂wd = −Σ_decay λ_p (ρ_p if coupled else 1) g_meta_p·θ_p``
(decoupled: with the rate the decay is applied at).
The strategies only differ in how they evaluate the dots ``T·∇L_i``. Because ``P`` needs ``g``,
:func:`lookahead` records it on the specs and :func:`tangent` / :func:`weight_decay_grad` read it there.

Gradient clipping by global norm (the Trainer's ``max_grad_norm``) happens before the optimizer: the real
step takes ``c·g`` with ``c = min(1, max_norm/(‖g‖ + 1e-6))``. The optimizer-aware lookahead does the same
(:func:`clip_coefficient`), with ``c`` held constant in the derivatives (so ``T`` gains the factor ``c``);
weight decay added inside the optimizer is not clipped, as in the real step.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["ParamSpec", "clip_coefficient", "param_specs", "lookahead", "tangent", "weight_decay_grad"]

LookaheadMode = Literal["optimizer", "sgd"]


@dataclass
class ParamSpec:
    """How the optimizer will move one parameter tensor at the coming step."""

    lr: float
    decay: bool = False  # the learned / configured weight decay applies to this tensor
    kind: Literal["sgd", "adam", "rmsprop", "adagrad", "adafactor"] = "sgd"
    momentum: float = 0.0  # SGD's and RMSprop's
    dampening: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    alpha: float = 0.99  # RMSprop's smoothing constant
    centered: bool = False  # RMSprop's
    decoupled: bool = False  # AdamW-style decay (not passed through the preconditioner)
    amsgrad: bool = False
    # Adafactor: which implementation ("transformers" or "torch"), its clipping threshold d, the weight of the
    # new squared gradient in the second moment (t**decay_rate) and, where it is not the step's own rate, the
    # rate of its decoupled decay (torch's: the group's lr; see decoupled_lr); beta1 = 0: no first moment
    variant: str = ""
    clip_threshold: float = 1.0
    new_moment_weight: float = 1.0
    decay_lr: float | None = None
    # the share of the optimizer's step the lookahead takes: θ' = θ + f·(next iterate − θ); the derivatives
    # (the tangent, the weight decay's meta-gradient) stay those of the whole step (see lookahead())
    step_fraction: float = 1.0
    # the optimizer's tensors for this parameter (read, never written); Adam: exp_avg / exp_avg_sq /
    # max_exp_avg_sq are None and step is 0 before the first step
    state: dict = field(default_factory=dict)
    # Adam / RMSprop / Adagrad: P = 1/(sqrt(v̂')+eps) of the last lookahead() (v' held constant in the derivatives)
    preconditioner: torch.Tensor | None = field(default=None, repr=False)
    # the rows (of dim 0) the last lookahead() computed, when it was restricted to rows: the preconditioner
    # then holds those rows only, and precondition() is zero elsewhere
    rows: torch.Tensor | None = field(default=None, repr=False)

    @property
    def decoupled_lr(self) -> float:
        """The rate a decoupled decay is applied at, ``θ·(1 − wd·rate)``: the step's own (AdamW, transformers'
        Adafactor) unless the optimizer takes another (torch's Adafactor: the group's ``lr``, in ``decay_lr``)."""
        return self.lr if self.decay_lr is None else self.decay_lr

    @property
    def preconditioned(self) -> bool:
        """Whether the optimizer divides this tensor's step by a second moment of its gradients (ρ holds P)."""
        return self.kind != "sgd"


def _adam_like(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` is torch's Adam or AdamW (AdamW subclasses Adam in recent torch)."""
    return isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))


def _decoupled(opt: torch.optim.Optimizer, group: dict) -> bool:
    """AdamW-style decay for this group: AdamW, or Adam with ``decoupled_weight_decay=True``."""
    return isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


# the param-group options of transformers' Adafactor (read by duck typing: meta/ does not import transformers)
_HF_ADAFACTOR_OPTIONS = frozenset({"eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter",
                                   "relative_step", "warmup_init"})


def _adafactor_variant(opt: torch.optim.Optimizer) -> str | None:
    """``"torch"`` for ``torch.optim.Adafactor``, ``"transformers"`` for transformers' ``Adafactor`` (the
    Trainer's ``optim="adafactor"``), None for any other optimizer."""
    torch_adafactor = getattr(torch.optim, "Adafactor", None)  # torch >= 2.5
    if torch_adafactor is not None and isinstance(opt, torch_adafactor):
        return "torch"
    if type(opt).__name__ == "Adafactor" and all(_HF_ADAFACTOR_OPTIONS <= set(g) for g in opt.param_groups):
        return "transformers"
    return None


def _unmodelled(opt: torch.optim.Optimizer) -> str | None:
    """Why the optimizer-aware lookahead cannot follow ``opt`` (None when it can)."""
    known = (torch.optim.SGD, torch.optim.RMSprop, torch.optim.Adagrad)
    if not (_adam_like(opt) or isinstance(opt, known) or _adafactor_variant(opt)):
        return f"does not know {type(opt).__name__}"
    if any(g.get("maximize", False) for g in opt.param_groups):
        return f"does not model {type(opt).__name__}(maximize=True)"
    return None


def param_specs(
    optimizer: torch.optim.Optimizer,
    named_params: Mapping[str, torch.Tensor],
    decay_names: Iterable[str],
    mode: LookaheadMode = "optimizer",
    step_fraction: float = 1.0,
) -> dict[str, ParamSpec]:
    """Describe the coming step of ``optimizer`` for each named parameter.

    ``mode="sgd"`` is the paper's lookahead (plain SGD at the current learning rate, whatever the real
    optimizer is); ``"optimizer"`` follows the real optimizer (SGD with momentum / dampening / Nesterov,
    Adam, AdamW, AMSGrad, RMSprop with momentum / centered, Adagrad, transformers' and torch's Adafactor),
    from its first step on. An optimizer or
    option this module does not model (another class, ``maximize=True``) falls back to the plain-SGD lookahead
    with a warning.
    ``step_fraction`` (in [0, 1]): the share of that step the lookahead takes (:func:`lookahead`).
    """
    if not 0.0 <= step_fraction <= 1.0:
        raise ValueError(f"step_fraction must be in [0, 1], got {step_fraction}.")
    decay = set(decay_names)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if mode == "optimizer" and (why := _unmodelled(optimizer)) is not None:
        warnings.warn(
            f"Optimizer-aware lookahead {why}; using the plain-SGD lookahead of the paper (set "
            "lookahead='sgd' to silence this).",
            stacklevel=2,
        )
        mode = "sgd"
    is_adam, adafactor = _adam_like(optimizer), _adafactor_variant(optimizer)
    specs: dict[str, ParamSpec] = {}
    for name, p in named_params.items():
        g = group_of.get(id(p))
        if g is None:
            raise ValueError(f"Parameter {name!r} is not in any optimizer param group; cannot build a lookahead.")
        spec = ParamSpec(lr=float(g["lr"]), decay=name in decay, step_fraction=float(step_fraction))
        if mode == "optimizer":
            st = optimizer.state.get(p, {})
            if is_adam:
                spec.kind = "adam"
                spec.beta1, spec.beta2 = (float(b) for b in g["betas"])
                spec.eps = float(g["eps"])
                spec.decoupled = _decoupled(optimizer, g)
                spec.amsgrad = bool(g.get("amsgrad", False))
                spec.state = {
                    "exp_avg": st.get("exp_avg"),
                    "exp_avg_sq": st.get("exp_avg_sq"),
                    "max_exp_avg_sq": st.get("max_exp_avg_sq"),
                    "step": float(st["step"]) if "step" in st else 0.0,
                }
            elif isinstance(optimizer, torch.optim.RMSprop):
                spec.kind = "rmsprop"
                spec.alpha, spec.eps = float(g["alpha"]), float(g["eps"])
                spec.momentum, spec.centered = float(g.get("momentum", 0.0)), bool(g.get("centered", False))
                spec.state = {k: st.get(k) for k in ("square_avg", "grad_avg", "momentum_buffer")}
            elif adafactor is not None:
                _describe_adafactor(spec, adafactor, g, st, p)
            elif isinstance(optimizer, torch.optim.Adagrad):
                spec.kind = "adagrad"
                spec.eps = float(g["eps"])
                t = float(st["step"]) + 1.0 if "step" in st else 1.0  # the step this lookahead takes
                spec.lr /= 1.0 + (t - 1.0) * float(g.get("lr_decay", 0.0))
                spec.state = {"sum": st.get("sum"), "initial": float(g.get("initial_accumulator_value", 0.0))}
            else:
                spec.momentum = float(g.get("momentum", 0.0))
                spec.dampening = float(g.get("dampening", 0.0))
                spec.nesterov = bool(g.get("nesterov", False))
                if st.get("momentum_buffer") is not None:
                    spec.state = {"momentum_buffer": st["momentum_buffer"]}
        specs[name] = spec
    return specs


def _rms(x: torch.Tensor) -> float:
    """Root mean square of a tensor's entries (a host read: the optimizers themselves read it)."""
    x = x.detach()
    return float((x if x.dtype in (torch.float32, torch.float64) else x.float()).norm(2)) / math.sqrt(x.numel())


def _describe_adafactor(spec: ParamSpec, variant: str, group: dict, st: dict, p: torch.Tensor) -> None:
    """Fill ``spec`` with the coming Adafactor step of ``p``: its rate (relative step, parameter scale), the
    second-moment weight and options, and the state it reads."""
    t = float(st["step"]) + 1.0 if "step" in st else 1.0  # the step this lookahead takes
    spec.kind, spec.variant, spec.decoupled = "adafactor", variant, True
    spec.new_moment_weight = t ** float(group["decay_rate" if variant == "transformers" else "beta2_decay"])
    if variant == "transformers":
        eps1, eps2 = (float(e) for e in group["eps"])
        rate = float(group["lr"]) if group["lr"] is not None else 0.0
        if group["relative_step"]:
            rate = min(1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
        spec.lr = rate * (max(eps2, _rms(p)) if group["scale_parameter"] else 1.0)
        spec.eps, spec.clip_threshold = eps1, float(group["clip_threshold"])
        spec.beta1 = float(group["beta1"]) if group["beta1"] is not None else 0.0
        spec.state = {k: st.get(k) for k in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")}
    else:
        eps1, eps2 = group["eps"]
        spec.lr = max(float(eps2), _rms(p)) * min(float(group["lr"]), 1.0 / math.sqrt(t))
        spec.eps = float(eps1) if eps1 is not None else torch.finfo(p.dtype).eps
        spec.clip_threshold, spec.beta1 = float(group["d"]), 0.0
        spec.decay_lr = float(group["lr"])
        spec.state = {k: st.get(k) for k in ("row_var", "col_var", "variance")}


def _adafactor_preconditioner(s: ParamSpec, g: torch.Tensor) -> torch.Tensor:
    """ρ = c·(1 − β1)·P of the coming Adafactor step, from the gradient detached: P = 1/sqrt(v̂') of the
    updated (factored) second moment, c the update clipping (both held constant in derivatives)."""
    gd, w, st = g.detach(), s.new_moment_weight, s.state
    sq = gd * gd
    if s.variant == "transformers":
        sq.add_(s.eps)
        if gd.dim() >= 2:
            row, col = sq.mean(-1), sq.mean(-2)
            if st.get("exp_avg_sq_row") is not None:
                row = torch.lerp(st["exp_avg_sq_row"].to(gd.dtype), row, w)
                col = torch.lerp(st["exp_avg_sq_col"].to(gd.dtype), col, w)
            pre = (row / row.mean(-1, keepdim=True)).rsqrt_().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()
        else:
            v = sq if st.get("exp_avg_sq") is None else torch.lerp(st["exp_avg_sq"].to(gd.dtype), sq, w)
            pre = v.rsqrt()
    else:
        if gd.dim() >= 2:
            row, col = sq.mean(-1, keepdim=True), sq.mean(-2, keepdim=True)
            if st.get("row_var") is not None:
                row = torch.lerp(st["row_var"].to(gd.dtype), row, w)
                col = torch.lerp(st["col_var"].to(gd.dtype), col, w)
            v = (row @ col).div_(row.mean(-2, keepdim=True).clamp_(min=s.eps))
        else:
            v = sq if st.get("variance") is None else torch.lerp(st["variance"].to(gd.dtype), sq, w)
        pre = v.clamp(min=s.eps * s.eps).rsqrt_()
    clip = (torch.linalg.vector_norm(pre * gd) / (math.sqrt(gd.numel()) * s.clip_threshold)).clamp_(min=1.0)
    return pre.div_(clip).mul_(1.0 - s.beta1)  # (the factor stays on the device: no host read)


def _adam_preconditioner(spec: ParamSpec, gt: torch.Tensor) -> torch.Tensor:
    """P = 1/(sqrt(v̂')+eps) for the gradient ``gt`` the Adam step sees (coupled decay included).

    v' = β2·v + (1−β2)·gt² is the second moment the real step writes (AMSGrad: its running maximum),
    bias-corrected at the coming step t; computed from ``gt`` detached, i.e. held constant in derivatives.
    Every operation after the first writes into that first result (the same arithmetic as the expression
    written out, without a parameter-sized allocation per operation).
    """
    gd = gt.detach()
    v_old, st = spec.state.get("exp_avg_sq"), spec.state
    v = torch.mul(gd, 1.0 - spec.beta2).mul_(gd)
    if v_old is not None:
        v.add_(v_old.to(gd.dtype) * spec.beta2)
    if spec.amsgrad and st.get("max_exp_avg_sq") is not None:
        torch.maximum(st["max_exp_avg_sq"].to(gd.dtype), v, out=v)
    t = st["step"] + 1.0
    # 1/x is torch's reciprocal(x) * 1 (Tensor.__rtruediv__); the product with 1 changes no value
    return v.sqrt_().div_(math.sqrt(1.0 - spec.beta2**t)).add_(spec.eps).reciprocal_()


def precondition(spec: ParamSpec, x: torch.Tensor) -> torch.Tensor:
    """ρ ⊙ x: how a change of the gradient moves the next iterate (before the −λ factor). A new tensor, or
    ``x`` itself where ρ = 1."""
    if spec.preconditioned:
        if spec.preconditioner is None:
            raise RuntimeError(f"An {spec.kind} ParamSpec has no preconditioner yet: call lookahead() with it first.")
        c_t = 1.0
        if spec.kind == "adam":
            t = spec.state["step"] + 1.0
            c_t = (1.0 - spec.beta1) / (1.0 - spec.beta1**t)
        if spec.rows is not None:
            rows = _into(spec.preconditioner.to(x.dtype) * c_t, torch.mul, x.index_select(0, spec.rows))
            return torch.zeros_like(x).index_copy_(0, spec.rows, rows)
        return _into(spec.preconditioner.to(x.dtype) * c_t, torch.mul, x)
    has_buf = "momentum_buffer" in spec.state  # PyTorch's first momentum step: buffer = d, undamped
    if spec.momentum and spec.nesterov:
        return (1.0 + spec.momentum * ((1.0 - spec.dampening) if has_buf else 1.0)) * x
    if spec.momentum and has_buf:
        return (1.0 - spec.dampening) * x
    return x


def _needs_graph(*xs: object) -> bool:
    """Whether any of ``xs`` carries an autograd graph (the exact strategy differentiates through θ')."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def _into(a: torch.Tensor, op, b: torch.Tensor | float) -> torch.Tensor:
    """``op(a, b)``, written into ``a`` (a scratch tensor of the caller) unless autograd needs ``a`` unchanged or
    the result has another dtype than ``a`` (e.g. fp32 per-layer gradients of float64 parameters)."""
    if _needs_graph(a, b) or (torch.is_tensor(b) and b.dtype != a.dtype):
        return op(a, b)
    return op(a, b, out=a)


def _adam_next(s: ParamSpec, p: torch.Tensor, g: torch.Tensor, wd: float | torch.Tensor) -> torch.Tensor:
    """θ'_p of torch's Adam / AdamW step; records the step's preconditioner on ``s``."""
    gt = _into(wd * p, torch.add, g) if s.decay and not s.decoupled else g
    s.preconditioner = _adam_preconditioner(s, gt)
    m = (1.0 - s.beta1) * gt
    if s.state.get("exp_avg") is not None:
        m = _into(s.beta1 * s.state["exp_avg"].to(gt.dtype), torch.add, m)
    t = s.state["step"] + 1.0
    step = _into(_into(m, torch.div, 1.0 - s.beta1**t), torch.mul, s.preconditioner.to(p.dtype))
    base = p * (1.0 - s.decoupled_lr * wd) if (s.decay and s.decoupled) else p
    return _sub_from(base, _into(step, torch.mul, s.lr))


def _sub_from(base: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``base − step``, written into ``step`` (a scratch tensor) unless autograd needs it or the result has another
    dtype than ``step`` (θ' keeps the parameters' dtype: float64 parameters with fp32 per-layer gradients)."""
    if _needs_graph(base, step) or base.dtype != step.dtype:
        return base - step
    return torch.sub(base, step, out=step)


def _rmsprop_next(s: ParamSpec, p: torch.Tensor, g: torch.Tensor, wd: float | torch.Tensor) -> torch.Tensor:
    """θ'_p of torch's RMSprop step (coupled decay, momentum, centered); records P = 1/(sqrt(v')+eps) on ``s``,
    computed from the gradient detached (the new moments held constant in derivatives)."""
    gt = _into(wd * p, torch.add, g) if s.decay else g
    gd = gt.detach()
    v = torch.mul(gd, 1.0 - s.alpha).mul_(gd)
    if s.state.get("square_avg") is not None:
        v.add_(s.state["square_avg"].to(gd.dtype) * s.alpha)
    if s.centered:
        mean = gd * (1.0 - s.alpha)
        if s.state.get("grad_avg") is not None:
            mean.add_(s.state["grad_avg"].to(gd.dtype) * s.alpha)
        v.sub_(mean * mean)
    s.preconditioner = v.sqrt_().add_(s.eps).reciprocal_()
    step = gt * s.preconditioner.to(gt.dtype)
    if s.momentum and s.state.get("momentum_buffer") is not None:
        step = _into(step, torch.add, s.momentum * s.state["momentum_buffer"].to(step.dtype))
    return _sub_from(p, _into(step, torch.mul, s.lr))


def _adagrad_next(s: ParamSpec, p: torch.Tensor, g: torch.Tensor, wd: float | torch.Tensor) -> torch.Tensor:
    """θ'_p of torch's Adagrad step (coupled decay; ``s.lr`` is the step's decayed rate); records
    P = 1/(sqrt(s')+eps) on ``s``, from the gradient detached (the new sum held constant in derivatives)."""
    gt = _into(wd * p, torch.add, g) if s.decay else g
    gd = gt.detach()
    acc = s.state.get("sum")
    total = torch.mul(gd, gd).add_(acc.to(gd.dtype) if acc is not None else s.state.get("initial", 0.0))
    s.preconditioner = total.sqrt_().add_(s.eps).reciprocal_()
    step = gt * s.preconditioner.to(gt.dtype)
    return _sub_from(p, _into(step, torch.mul, s.lr))


def _adafactor_next(s: ParamSpec, p: torch.Tensor, g: torch.Tensor, wd: float | torch.Tensor) -> torch.Tensor:
    """θ'_p of an Adafactor step (transformers' or torch's; decoupled decay, transformers' first moment);
    records ρ = c·(1 − β1)·P on ``s``."""
    s.preconditioner = _adafactor_preconditioner(s, g)
    step = _into(g * s.preconditioner.to(g.dtype), torch.mul, s.lr)
    if s.beta1 and s.state.get("exp_avg") is not None:  # its average of the steps (already at their rates)
        step = _into(step, torch.add, s.beta1 * s.state["exp_avg"].to(step.dtype))
    base = p * (1.0 - s.decoupled_lr * wd) if s.decay else p
    return _sub_from(base, step)


def _sgd_next(s: ParamSpec, p: torch.Tensor, g: torch.Tensor, wd: float | torch.Tensor) -> torch.Tensor:
    """θ'_p of torch's SGD step (momentum, dampening, Nesterov)."""
    d = _into(wd * p, torch.add, g) if s.decay else g
    buf = s.state.get("momentum_buffer")
    if s.momentum and buf is not None:
        d_new = _into(s.momentum * buf, torch.add, (1.0 - s.dampening) * d)
    else:
        d_new = d
    if s.nesterov and s.momentum:
        d_new = d + s.momentum * d_new
    return _sub_from(p, s.lr * d_new)


def _rows_next(
    s: ParamSpec, p: torch.Tensor, g: torch.Tensor, wd: float | torch.Tensor, rows: torch.Tensor, grad_scale: float
) -> torch.Tensor:
    """θ'_p on ``rows`` only (the same operations on the gathered rows: the same values there); the other rows
    of the returned tensor are left uninitialised. Records the rows' preconditioner and the rows on ``s``."""
    state = {k: v.index_select(0, rows) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in s.state.items()}
    sub = dataclasses.replace(s, state=state, preconditioner=None, rows=None)
    g_rows = g.index_select(0, rows)
    if grad_scale != 1.0:
        g_rows = g_rows * grad_scale
    theta = _next(sub, p.index_select(0, rows), g_rows, wd)
    s.preconditioner, s.rows = sub.preconditioner, rows
    return torch.empty_like(p).index_copy_(0, rows, theta)


def _part_of_step(p: torch.Tensor, theta: torch.Tensor, f: float) -> torch.Tensor:
    """``p + f·(theta − p)``: the point a share ``f`` of the way along the step; with a graph (the exact
    strategy) its derivatives are those of ``theta`` (of the whole step), as the other strategies' tangent."""
    if f == 1.0:
        return theta
    if _needs_graph(p, theta):
        return (p + f * (theta - p)).detach() + (theta - theta.detach())
    return theta.sub_(p).mul_(f).add_(p)  # (theta is a scratch tensor of the lookahead)


def _next(s: ParamSpec, p: torch.Tensor, g: torch.Tensor, wd: float | torch.Tensor) -> torch.Tensor:
    """θ'_p: the spec's share of its optimizer's step."""
    return _part_of_step(p, _NEXT[s.kind](s, p, g, wd), s.step_fraction)


_NEXT = {"sgd": _sgd_next, "adam": _adam_next, "rmsprop": _rmsprop_next, "adagrad": _adagrad_next,
         "adafactor": _adafactor_next}


def lookahead(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    specs: Mapping[str, ParamSpec],
    weight_decay: float | torch.Tensor,
    grad_scale: float = 1.0,
    rows: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """θ': the parameters after one step of the described optimizer on ``grad_scale·grads`` with
    ``weight_decay`` (``grad_scale``: the clipping factor of :func:`clip_coefficient`, applied tensor by
    tensor so that no scaled copy of the whole gradient is held).

    This is the real optimizer's next iterate (PyTorch's SGD / Adam / AdamW update, Adam's new second
    moment included). Differentiable in ``grads`` and ``weight_decay`` when they carry a graph (the exact
    strategy), with Adam's second moment held constant. The optimizer state is read, never written; for
    Adam the preconditioner of this step is recorded on ``specs`` (see :func:`tangent`). Without a graph the
    intermediate results are written in place (the same operations in the same order: the same values).

    A spec's ``step_fraction`` f < 1 moves θ' to ``θ + f·(θ' − θ)``, a share of the step, while the
    derivatives stay those of the whole step (:func:`tangent` is unchanged; the exact strategy differentiates
    the whole step at the shortened point): f = 0 gives the first-order meta-gradient, the meta loss's
    gradient at θ itself, as in first-order DARTS.

    ``rows`` (without a graph): for the named tensors, compute θ' (and the preconditioner) on these rows only
    — a large embedding table of which the meta forward reads a few rows and the dots a few others. The
    other rows of those θ' tensors are unspecified: whoever passes ``rows`` guarantees that nothing reads them.
    Adafactor's step of a row depends on every row (the column means of its second moment, the clipping), so
    its tensors are computed whole.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        s, g = specs[name], grads[name]
        s.rows = None
        wd = weight_decay if s.decay else 0.0
        if rows and name in rows and s.kind != "adafactor" and not _needs_graph(p, g, wd):
            out[name] = _rows_next(s, p, g, wd, rows[name], grad_scale)
            continue
        if grad_scale != 1.0:
            g = g * grad_scale
        out[name] = _next(s, p, g, wd)
    return out


def tangent(g_meta: Mapping[str, torch.Tensor], specs: Mapping[str, ParamSpec]) -> dict[str, torch.Tensor]:
    """T = λ ρ ⊙ g_meta: the direction whose dot with ∇L_i gives −N ∂L_meta/∂e_i (new tensors).

    Adam specs must have been through :func:`lookahead` (ρ uses the preconditioner of that step).
    """
    out: dict[str, torch.Tensor] = {}
    for n, g in g_meta.items():
        v = precondition(specs[n], g)
        out[n] = specs[n].lr * v if v is g else _into(v, torch.mul, specs[n].lr)
    return out


def weight_decay_grad(
    g_meta: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], specs: Mapping[str, ParamSpec]
) -> float:
    """∂L_meta/∂wd = −Σ over decayed tensors of λ (ρ if the decay is coupled) g_meta·θ (paper §2.3).

    The sum runs on the tensors' device in float64 (each tensor's dot in float64, added in order: the values
    of adding Python floats) and is read once, at the end: one host synchronisation per meta step."""
    total: torch.Tensor | None = None
    for n, g in g_meta.items():
        s = specs[n]
        if not s.decay:
            continue
        v = g if s.decoupled else precondition(s, g)
        term = (v.double() * params[n].detach().double()).sum() * -(s.decoupled_lr if s.decoupled else s.lr)
        total = (torch.zeros((), dtype=torch.float64, device=term.device) if total is None else total) + term
    value = float(total) if total is not None else 0.0
    if not math.isfinite(value):
        return float("nan")
    return value


def clip_coefficient(grads: Mapping[str, torch.Tensor], max_norm: float | None) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` would scale ``grads`` by: ``min(1, max_norm/(‖g‖+1e-6))``
    (1 when ``max_norm`` is None or not positive; NaN when the norm is not finite)."""
    if not max_norm or max_norm <= 0:
        return 1.0
    tensors = [g.detach() for g in grads.values()]
    if hasattr(torch.nn.utils, "get_total_norm"):  # what clip_grad_norm_ computes (torch >= 2.6): the same
        norm = torch.nn.utils.get_total_norm(tensors, 2.0)  # kernels (foreach, per device and dtype), one launch each
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in tensors]))
    norm = float(norm)  # one host sync per meta step: the factor scales the lookahead
    if not math.isfinite(norm):
        return float("nan")
    return min(1.0, max_norm / (norm + 1e-6))
