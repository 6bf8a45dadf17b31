"""The optimizer-aware lookahead against the real torch optimizers, and the rate table's chain rule.

Everything is checked against an independent computation rather than against another path through the
same :func:`~hf_ddlr.meta.lookahead.lookahead`:

- θ' must equal the iterate that a real ``torch.optim`` step on the weighted loss ``(1/N) Σ e_i L_i``
  produces (SGD with momentum / dampening / Nesterov, Adam with coupled L2, AdamW, AMSGrad, RMSprop, Adagrad,
  transformers' and torch's Adafactor; with and without weight decay; on the first step from empty state and
  after warm steps), in float64.
- ``∂L_meta(θ')/∂e_i`` and ``∂L_meta/∂wd`` from every engine strategy must equal central finite
  differences taken through the real optimizer step. For SGD this is the exact derivative. For Adam the
  library documents that the derivative holds the step's new second moment ``v'`` constant, so the brute
  force does the same to the real step: before each perturbed step the state's ``exp_avg_sq`` is set so
  that torch's own update lands on the unperturbed ``v'`` (everything else is torch's arithmetic); for
  Adafactor the clipping threshold is set too, so that its update clipping divides by the unperturbed factor.
- ``lr_level="both"`` with non-unit instance and class rates: the table step equals ``meta_lr`` times the
  autograd gradient of ``Σ_i e_i·g_i`` through ``e_i = w_inst[idx_i]·w_class[y_i]`` (duplicate rows too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.optimization import Adafactor

from hf_ddlr.meta import MetaBatch, MicroBatch, RateTable, lookahead, meta_gradients, param_specs, tangent

N, D, C = 8, 5, 3
# exactly representable in float32 too (the exact strategy holds e in float32): no rounding of e anywhere
E = torch.tensor([0.5, 1.25, 0.75, 2.0, 1.5, 0.375, 1.0, 0.625], dtype=torch.float64)


class MLP(nn.Module):
    """Two linear layers and a LayerNorm; the biases and the LayerNorm are in a no-decay group."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(D, 7), nn.LayerNorm(7), nn.Linear(7, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


DECAY = ("fc1.weight", "fc2.weight")

# name -> (factory(param groups) -> optimizer, learning rates of the (decay, no-decay) groups, weight decay)
OPTIMIZERS: dict[str, tuple[Callable[[list[dict]], torch.optim.Optimizer], tuple[float, float], float]] = {
    "sgd": (lambda g: torch.optim.SGD(g), (0.1, 0.05), 5e-3),
    "sgd_momentum": (lambda g: torch.optim.SGD(g, momentum=0.9), (0.1, 0.05), 5e-3),
    "sgd_dampening": (lambda g: torch.optim.SGD(g, momentum=0.9, dampening=0.3), (0.1, 0.05), 5e-3),
    "sgd_nesterov": (lambda g: torch.optim.SGD(g, momentum=0.9, nesterov=True), (0.1, 0.05), 5e-3),
    "adam": (lambda g: torch.optim.Adam(g, betas=(0.8, 0.95)), (1e-2, 3e-3), 1e-2),
    "adam_amsgrad": (lambda g: torch.optim.Adam(g, betas=(0.8, 0.95), amsgrad=True), (1e-2, 3e-3), 1e-2),
    "adamw": (lambda g: torch.optim.AdamW(g, betas=(0.8, 0.95)), (1e-2, 3e-3), 1e-1),
    "adamw_amsgrad": (lambda g: torch.optim.AdamW(g, betas=(0.8, 0.95), amsgrad=True), (1e-2, 3e-3), 1e-1),
    "rmsprop": (lambda g: torch.optim.RMSprop(g, alpha=0.9), (1e-2, 3e-3), 1e-2),
    "rmsprop_momentum_centered": (lambda g: torch.optim.RMSprop(g, alpha=0.9, momentum=0.8, centered=True),
                                  (1e-2, 3e-3), 1e-2),
    "adagrad": (lambda g: torch.optim.Adagrad(g, lr_decay=0.05, initial_accumulator_value=0.1), (1e-1, 3e-2), 1e-2),
    # the Trainer's optim="adafactor" (a rate given, no relative step, no parameter scale)
    "adafactor": (lambda g: Adafactor(g, scale_parameter=False, relative_step=False), (1e-2, 3e-3), 1e-1),
    "adafactor_relative_beta1": (lambda g: Adafactor(g, lr=None, beta1=0.8, clip_threshold=0.5), (0.0, 0.0), 1e-1),
    "torch_adafactor": (lambda g: torch.optim.Adafactor(g), (1e-2, 3e-3), 1e-1),
}
ADAFACTORS = tuple(n for n in OPTIMIZERS if "adafactor" in n)
# the state tensor each preconditioned optimizer's step divides by (the brute force freezes its new value)
SECOND_MOMENT = {torch.optim.Adam: "exp_avg_sq", torch.optim.AdamW: "exp_avg_sq", torch.optim.RMSprop: "square_avg",
                 torch.optim.Adagrad: "sum"}  # AdamW: a class of its own before torch subclassed it from Adam


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(N, D, generator=g, dtype=torch.float64),
        "y": torch.randint(0, C, (N,), generator=g),
        "xm": torch.randn(12, D, generator=g, dtype=torch.float64),
        "ym": torch.randint(0, C, (12,), generator=g),
    }


def _build(name: str, with_wd: bool, warm_steps: int, seed: int = 0):
    """A float64 MLP and its optimizer after ``warm_steps`` real steps on other weighted batches."""
    factory, (lr_d, lr_n), wd = OPTIMIZERS[name]
    wd = wd if with_wd else 0.0
    torch.manual_seed(seed)
    model = MLP().double()
    named = dict(model.named_parameters())
    groups = [
        {"params": [named[n] for n in DECAY], "lr": lr_d, "weight_decay": wd},
        {"params": [p for n, p in named.items() if n not in DECAY], "lr": lr_n, "weight_decay": 0.0},
    ]
    groups[0]["test_decay"], groups[1]["test_decay"] = True, False  # (the group _real_step's ``wd`` overrides)
    if name in ADAFACTORS:  # one group per tensor: the brute force sets each tensor's clipping threshold
        groups = [{**grp, "params": [p]} for grp in groups for p in grp["params"]]
    opt = factory(groups)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(warm_steps):
        x, y = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)
        w = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
        opt.zero_grad()
        ((w * F.cross_entropy(model(x), y, reduction="none")).sum() / N).backward()
        opt.step()
    return model, opt, wd


def _weighted_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return (e * F.cross_entropy(model(x), y, reduction="none")).sum() / N


def _real_step(model: nn.Module, opt: torch.optim.Optimizer, data, e: torch.Tensor, wd: float | None = None,
               freeze_v: dict[str, torch.Tensor] | None = None, grad_scale: float = 1.0,
               only: Collection[str] | None = None) -> nn.Module:
    """A copy of the model after one real ``opt.step()`` on the weighted loss (the originals are untouched).

    ``wd`` overrides the decay group's weight decay. ``freeze_v`` (Adam): the second moment the step must
    end with, by parameter name; the copy's ``exp_avg_sq`` is set beforehand so that torch's own
    ``v ← β2·v + (1−β2)·g²`` (g with coupled decay) lands on it. ``grad_scale`` multiplies the gradients before
    the step (a clipping factor held constant); ``only``: the parameters the step moves (the others get no
    gradient, which torch's optimizers skip: no decay, no state change).
    """
    m, o = copy.deepcopy((model, opt))
    if wd is not None:
        for group in o.param_groups:
            if group["test_decay"]:
                group["weight_decay"] = wd
    o.zero_grad()
    _weighted_loss(m, data["x"], data["y"], e).backward()
    _adjust_grads(m, grad_scale, only)
    if freeze_v is not None and _is_adafactor(o):
        _freeze_adafactor(m, o, freeze_v)
    elif freeze_v is not None and not isinstance(o, (torch.optim.Adam, torch.optim.AdamW)):
        _freeze_rmsprop_or_adagrad(m, o, freeze_v)
    elif freeze_v is not None:
        for group in o.param_groups:
            b2, coupled = group["betas"][1], not group.get("decoupled_weight_decay", isinstance(o, torch.optim.AdamW))
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = next(n for n, q in m.named_parameters() if q is p)
                gt = p.grad + group["weight_decay"] * p.detach() if coupled else p.grad
                st = o.state[p]
                if not st:  # the first step: the state torch would create, with our second moment
                    st["step"] = torch.tensor(0.0, dtype=torch.float64)
                    st["exp_avg"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        st["max_exp_avg_sq"] = torch.zeros_like(p)
                st["exp_avg_sq"] = (freeze_v[name] - (1 - b2) * gt * gt) / b2
                if group["amsgrad"]:
                    st["max_exp_avg_sq"] = freeze_v[name].clone()
    o.step()
    return m


def _freeze_rmsprop_or_adagrad(m: nn.Module, o: torch.optim.Optimizer, freeze_v: dict[str, torch.Tensor]) -> None:
    """Set the copy's state so that torch's own RMSprop (``v ← α·v + (1−α)·g²``; centered also
    ``ḡ ← ḡ + (1−α)(g − ḡ)``) or Adagrad (``s ← s + g²``) update lands on the frozen values (g with the coupled
    decay); the momentum buffer is left as it is."""
    for group in o.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            name = next(n for n, q in m.named_parameters() if q is p)
            gt = p.grad + group["weight_decay"] * p.detach()
            st = o.state[p]
            if isinstance(o, torch.optim.Adagrad):
                st["sum"] = freeze_v[name] - gt * gt
                continue
            if not st:  # the first step: the state torch would create, with our moments
                st["step"] = torch.tensor(0.0, dtype=torch.float64)
                if group["momentum"] > 0:
                    st["momentum_buffer"] = torch.zeros_like(p)
            a = group["alpha"]
            st["square_avg"] = (freeze_v[name] - (1 - a) * gt * gt) / a
            if group["centered"]:
                st["grad_avg"] = (freeze_v[name + "/grad_avg"] - (1 - a) * gt) / a


def _is_adafactor(o: torch.optim.Optimizer) -> bool:
    return isinstance(o, (Adafactor, torch.optim.Adafactor))


def _adafactor_moments(o: torch.optim.Optimizer, p: torch.Tensor) -> tuple[str, ...]:
    """The names of the second-moment state of ``p`` in ``o`` (row and column means, or the whole moment)."""
    if isinstance(o, Adafactor):
        return ("exp_avg_sq_row", "exp_avg_sq_col") if p.dim() >= 2 else ("exp_avg_sq",)
    return ("row_var", "col_var") if p.dim() >= 2 else ("variance",)


def _adafactor_update(o: torch.optim.Optimizer, group: dict, moments: list[torch.Tensor], g: torch.Tensor):
    """The unclipped Adafactor direction ``g/sqrt(v̂)`` of the given (new) second moment, as each library
    writes it (transformers: ``optimization.Adafactor._approx_sq_grad``; torch: ``_single_tensor_adafactor``)."""
    if isinstance(o, Adafactor):
        if len(moments) == 2:
            return Adafactor._approx_sq_grad(*moments) * g
        return moments[0].rsqrt() * g
    eps1 = group["eps"][0] if group["eps"][0] is not None else torch.finfo(g.dtype).eps
    v = moments[0] @ moments[1] / moments[0].mean(-2, keepdim=True).clamp(min=eps1) if len(moments) == 2 else moments[0]
    return v.clamp(min=eps1 * eps1).rsqrt() * g


def _threshold_key(o: torch.optim.Optimizer) -> str:
    return "clip_threshold" if isinstance(o, Adafactor) else "d"


def _freeze_adafactor(m: nn.Module, o: torch.optim.Optimizer, freeze: dict[str, torch.Tensor]) -> None:
    """Set the copy's state and clipping threshold so that the library's own Adafactor step lands on the
    frozen second moment (``v ← (1 − w)·v + w·(g² [+ eps1])``, w = t**decay_rate, inverted; t ≥ 2) and divides
    its update by the frozen clipping factor (one tensor per group)."""
    for group in o.param_groups:
        (p,) = group["params"]
        if p.grad is None:
            continue
        name = next(n for n, q in m.named_parameters() if q is p)
        st = o.state[p]
        t = float(st["step"]) + 1
        w = t ** group["decay_rate" if isinstance(o, Adafactor) else "beta2_decay"]
        sq = p.grad * p.grad + (group["eps"][0] if isinstance(o, Adafactor) else 0.0)
        keys = _adafactor_moments(o, p)
        news = (sq.mean(-1), sq.mean(-2)) if isinstance(o, Adafactor) and len(keys) == 2 else (
            (sq.mean(-1, keepdim=True), sq.mean(-2, keepdim=True)) if len(keys) == 2 else (sq,))
        for k, new in zip(keys, news):
            st[k] = (freeze[f"{name}/{k}"] - w * new) / (1 - w)
        rms = float(_adafactor_update(o, group, [freeze[f"{name}/{k}"] for k in keys], p.grad).pow(2).mean().sqrt())
        clip = float(freeze[f"{name}/clip"])
        group[_threshold_key(o)] = rms / clip if clip > 1 else float("inf")


def _adjust_grads(m: nn.Module, grad_scale: float = 1.0, only: Collection[str] | None = None) -> None:
    for n, p in m.named_parameters():
        p.grad = None if only is not None and n not in only else p.grad * grad_scale


def _meta_loss(model: nn.Module, data) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(data["xm"]), data["ym"]))


CASES = [(name, wd, k) for name in OPTIMIZERS for wd in (False, True) for k in (0, 3)]


@pytest.mark.parametrize("name,with_wd,warm_steps", CASES)
def test_lookahead_is_the_real_optimizers_next_iterate(name, with_wd, warm_steps):
    """θ' from param_specs(mode='optimizer') + lookahead() == a real opt.step() on the weighted loss."""
    model, opt, wd = _build(name, with_wd, warm_steps)
    data = _data()
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(_weighted_loss(model, data["x"], data["y"], E), list(params.values()))))
    specs = param_specs(opt, params, DECAY, mode="optimizer")
    theta = lookahead({n: p.detach() for n, p in params.items()}, grads, specs, wd)
    real = dict(_real_step(model, opt, data, E).named_parameters())
    for n in params:
        assert not torch.equal(theta[n], params[n])  # it moved
        torch.testing.assert_close(theta[n], real[n].detach(), rtol=1e-12, atol=1e-14, msg=lambda m, n=n: f"{n}: {m}")
    # and nothing was written: the optimizer state and the parameters are as before
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())


def _frozen_second_moment(model, opt, data, **step) -> dict[str, torch.Tensor] | None:
    """Adam, RMSprop, Adagrad: the new second moment of the real unperturbed step (Adam's v', AMSGrad's
    max(v_max, v'); RMSprop's v' and, centered, its mean gradient ḡ' as ``name + "/grad_avg"``; Adagrad's sum),
    by parameter name (``step``: :func:`_real_step`'s ``grad_scale`` / ``only``). Adafactor: its new row and column
    means (or moment) as ``name + "/" + state key``, and the factor its update clipping divides by (``"/clip"``)."""
    if _is_adafactor(opt):
        m, o = copy.deepcopy((model, opt))
        o.zero_grad()
        _weighted_loss(m, data["x"], data["y"], E).backward()
        _adjust_grads(m, **step)
        grads = {p: p.grad.clone() for p in m.parameters() if p.grad is not None}
        o.step()
        out = {}
        for group in o.param_groups:
            (p,) = group["params"]
            if p not in grads:
                continue
            name = next(n for n, q in m.named_parameters() if q is p)
            keys = _adafactor_moments(o, p)
            out.update({f"{name}/{k}": o.state[p][k].clone() for k in keys})
            rms = _adafactor_update(o, group, [o.state[p][k] for k in keys], grads[p]).pow(2).mean().sqrt()
            out[f"{name}/clip"] = (rms / group[_threshold_key(o)]).clamp(min=1.0)
        return out
    kind = next((k for k in SECOND_MOMENT if isinstance(opt, k)), None)
    if kind is None:
        return None
    m, o = copy.deepcopy((model, opt))
    o.zero_grad()
    _weighted_loss(m, data["x"], data["y"], E).backward()
    _adjust_grads(m, **step)
    o.step()
    key = "max_exp_avg_sq" if o.param_groups[0].get("amsgrad") else SECOND_MOMENT[kind]
    out = {n: o.state[p][key].clone() for n, p in m.named_parameters() if p.grad is not None}
    if o.param_groups[0].get("centered"):
        out.update({n + "/grad_avg": o.state[p]["grad_avg"].clone() for n, p in m.named_parameters()
                    if p.grad is not None})
    return out


def central_differences(step, data, wd: float, h: float = 1e-5) -> tuple[torch.Tensor, float]:
    """Central differences of L_meta(step(e, wd)) in every e_i (at E) and in wd, where ``step(e, wd)`` returns
    the model after a real optimizer step (``wd=None``: the optimizer's own weight decay)."""
    de = torch.empty(N, dtype=torch.float64)
    for i in range(N):
        up, down = E.clone(), E.clone()
        up[i] += h
        down[i] -= h
        de[i] = (_meta_loss(step(up, None), data) - _meta_loss(step(down, None), data)) / (2 * h)
    dwd = (_meta_loss(step(E, wd + h), data) - _meta_loss(step(E, wd - h), data)) / (2 * h)
    return de, dwd


def _brute_force(model, opt, data, wd: float, h: float = 1e-5) -> tuple[torch.Tensor, float]:
    """Central differences of L_meta(θ'(e, wd)) in every e_i and in wd, through the real optimizer step."""
    frozen = _frozen_second_moment(model, opt, data)
    return central_differences(lambda e, w: _real_step(model, opt, data, e, wd=w, freeze_v=frozen), data, wd, h)


# Adafactor's first step takes its second moment from that step's gradient alone (no state to freeze it by):
# its brute force starts from warm steps, with and without decay
FD_CASES = [c for c in CASES if (c[2] > 0 if c[0] in ADAFACTORS else c[1] or c[2] == 0)]


@pytest.mark.parametrize("strategy", ["jvp", "exact", "finite_difference"])
@pytest.mark.parametrize("name,with_wd,warm_steps", FD_CASES)
def test_meta_gradient_matches_finite_differences_through_the_real_step(strategy, name, with_wd, warm_steps):
    """∂L_meta/∂e_i and ∂L_meta/∂wd from the engine == brute force through torch's optimizer (float64).

    Exact for SGD; for Adam the brute force freezes the new second moment as the library documents.
    """
    model, opt, wd = _build(name, with_wd, warm_steps)
    data = _data()
    params = dict(model.named_parameters())
    specs = param_specs(opt, params, DECAY, mode="optimizer")
    window = [MicroBatch({"x": data["x"]}, data["y"], E.clone(), seed=0)]
    res = meta_gradients(model, params, window, MetaBatch({"x": data["xm"]}, data["ym"], seed=1), specs,
                         weight_decay=wd, normalizer=N, strategy=strategy)
    de, dwd = _brute_force(model, opt, data, wd)
    assert de.abs().max() > 0 and dwd != 0
    # the engine hands back float32; finite_difference is itself a one-sided difference
    tol = 5e-5 if strategy == "finite_difference" else 1e-5  # seen: 8e-6 and 1.5e-6
    scale = float(de.abs().max())
    torch.testing.assert_close(res.example_grad.double(), de, rtol=tol, atol=tol * scale)
    assert res.weight_decay_grad == pytest.approx(dwd, rel=tol, abs=1e-9 * scale)
    assert res.meta_loss == pytest.approx(_meta_loss(_real_step(model, opt, data, E), data), rel=1e-6)


def test_adam_derivative_is_the_frozen_second_moment_one():
    """The frozen-v' brute force is not vacuous: letting v' follow e gives a different derivative, and the
    engine matches the frozen one (the documented approximation), not the full one."""
    model, opt, wd = _build("adamw", True, 3)
    data = _data()
    params = dict(model.named_parameters())
    specs = param_specs(opt, params, DECAY, mode="optimizer")
    window = [MicroBatch({"x": data["x"]}, data["y"], E.clone(), seed=0)]
    res = meta_gradients(model, params, window, MetaBatch({"x": data["xm"]}, data["ym"], seed=1), specs,
                         weight_decay=wd, normalizer=N, strategy="exact")
    h = 1e-5
    full = torch.empty(N, dtype=torch.float64)
    for i in range(N):
        up, down = E.clone(), E.clone()
        up[i] += h
        down[i] -= h
        full[i] = (_meta_loss(_real_step(model, opt, data, up), data)
                   - _meta_loss(_real_step(model, opt, data, down), data)) / (2 * h)
    frozen, _ = _brute_force(model, opt, data, wd)
    assert float((full - frozen).abs().max()) > 0.05 * float(frozen.abs().max())  # seen: 0.46, cosine 0.88
    torch.testing.assert_close(res.example_grad.double(), frozen, rtol=1e-5, atol=1e-5 * float(frozen.abs().max()))


@pytest.mark.parametrize("opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, maximize=True),
    lambda p: torch.optim.Adam(p, maximize=True),
    lambda p: torch.optim.RAdam(p),
    lambda p: torch.optim.RMSprop(p, maximize=True),
])
def test_unmodelled_optimizer_falls_back_to_sgd_with_a_warning(opt):
    model = MLP()
    params = dict(model.named_parameters())
    with pytest.warns(UserWarning, match="plain-SGD lookahead"):
        specs = param_specs(opt(model.parameters()), params, DECAY, mode="optimizer")
    assert all(s.kind == "sgd" and s.momentum == 0.0 for s in specs.values())


def test_adam_tangent_needs_the_lookahead_first():
    from hf_ddlr.meta import tangent

    model = MLP()
    params = dict(model.named_parameters())
    specs = param_specs(torch.optim.Adam(model.parameters()), params, DECAY, mode="optimizer")
    with pytest.raises(RuntimeError, match="call lookahead"):
        tangent({n: torch.ones_like(p) for n, p in params.items()}, specs)


# ---------------------------------------------------------------------------------------------- rate table
@pytest.mark.parametrize("level", ["instance", "class", "both"])
def test_rate_update_is_the_chain_rule_through_e_with_non_unit_rates(level):
    """Raw scaling: every rate moves by −meta_lr · ∂(Σ_i e_i g_i)/∂w with e_i = w_inst[idx_i]·w_class[y_i],
    computed by autograd on leaf tables (duplicate rows in the batch accumulate, as a table lookup does)."""
    num_ex, num_cls, meta_lr = 7, 4, 0.05
    t = RateTable(num_ex, num_cls, level, meta_lr=meta_lr, scaling="raw", instance_gradient="chain_rule")
    inst0 = torch.tensor([1.5, 0.5, 2.0, 0.75, 1.25, 3.0, 0.25])
    cls0 = torch.tensor([0.5, 2.5, 1.5, 0.8])
    if t.instance is not None:
        t.instance.copy_(inst0)
    if t.per_class is not None:
        t.per_class.copy_(cls0)
    idx = torch.tensor([0, 2, 5, 2, 3, 6])  # row 2 twice; rows 1 and 4 absent
    y = torch.tensor([1, 0, 2, 3, 1, 2])
    g = torch.tensor([0.3, -0.7, 1.1, 0.4, -0.2, 0.9])
    w_inst = inst0.clone().requires_grad_(level != "class")
    w_cls = cls0.clone().requires_grad_(level != "instance")
    e = (w_inst[idx] if level != "class" else 1.0) * (w_cls[y] if level != "instance" else 1.0)
    torch.testing.assert_close(t.effective(idx, y), e.detach())
    leaves = [w for w in (w_inst, w_cls) if w.requires_grad]
    grads = dict(zip([id(w) for w in leaves], torch.autograd.grad((e * g).sum(), leaves)))
    assert t.update(idx if level != "class" else None, y, g)
    if level != "class":
        torch.testing.assert_close(t.instance.grad.to_dense(), grads[id(w_inst)])  # the gradient it stepped on
        torch.testing.assert_close(t.instance, inst0 - meta_lr * grads[id(w_inst)])
        assert t.instance[1] == inst0[1] and t.instance[4] == inst0[4]
    if level != "instance":
        torch.testing.assert_close(t.per_class.grad.to_dense(), grads[id(w_cls)])  # the gradient it stepped on
        torch.testing.assert_close(t.per_class, cls0 - meta_lr * grads[id(w_cls)])


@pytest.mark.parametrize("name,with_wd,warm_steps", [c for c in CASES if c[2] == 3])
def test_row_restricted_lookahead_is_the_real_next_iterate_on_those_rows(name, with_wd, warm_steps):
    """lookahead(rows=...) on a weight matrix: on the given rows, the real opt.step()'s next iterate (and bit for
    bit the full lookahead's), with clipping; for Adam, RMSprop and Adagrad the tangent from the preconditioner is
    the full one on those rows and zero elsewhere."""
    model, opt, wd = _build(name, with_wd, warm_steps)
    data = _data()
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(_weighted_loss(model, data["x"], data["y"], E), list(params.values()))))
    rows = torch.tensor([0, 2, 5])
    detached = {n: p.detach() for n, p in params.items()}
    full_specs, specs = (param_specs(opt, params, DECAY, mode="optimizer") for _ in range(2))
    full = lookahead(detached, grads, full_specs, wd, grad_scale=0.7)
    got = lookahead(detached, grads, specs, wd, grad_scale=0.7, rows={"fc1.weight": rows})
    real = dict(_real_step(model, opt, data, E * 0.7).named_parameters())  # clipping by 0.7 = weights × 0.7
    assert torch.equal(got["fc1.weight"][rows], full["fc1.weight"][rows])
    torch.testing.assert_close(got["fc1.weight"][rows], real["fc1.weight"].detach()[rows], rtol=1e-12, atol=1e-14)
    assert all(torch.equal(got[n], full[n]) for n in params if n != "fc1.weight")
    g_meta = {n: torch.randn_like(p) for n, p in params.items()}
    T_full, T = tangent(g_meta, full_specs), tangent(g_meta, specs)
    assert torch.equal(T["fc1.weight"][rows], T_full["fc1.weight"][rows])
    others = torch.tensor([1, 3, 4, 6])
    if name in ADAFACTORS:  # every row's step depends on every row (column means, clipping): computed whole
        assert torch.equal(T["fc1.weight"], T_full["fc1.weight"]) and T["fc1.weight"][others].abs().min() > 0
    elif full_specs["fc1.weight"].preconditioned:  # Adam, RMSprop, Adagrad: the preconditioner is known on the rows only
        assert not T["fc1.weight"][others].any() and T_full["fc1.weight"][others].abs().min() > 0
    else:  # SGD: no preconditioner, the tangent is the full one
        assert torch.equal(T["fc1.weight"], T_full["fc1.weight"])
    assert torch.equal(T["fc2.weight"], T_full["fc2.weight"])


def test_both_instance_rates_step_on_the_effective_rate_gradient_by_default():
    """lr_level='both', raw scaling, the default instance_rate_gradient='effective': the instance rates move by
    −meta_lr · ∂(Σ_i e_i g_i)/∂e summed into their rows (autograd with the class factor held at 1); the class
    rates by the chain rule as above."""
    num_ex, num_cls, meta_lr = 7, 4, 0.05
    t = RateTable(num_ex, num_cls, "both", meta_lr=meta_lr, scaling="raw")
    inst0 = torch.tensor([1.5, 0.5, 2.0, 0.75, 1.25, 3.0, 0.25])
    cls0 = torch.tensor([0.5, 2.5, 1.5, 0.8])
    t.instance.copy_(inst0)
    t.per_class.copy_(cls0)
    idx, y = torch.tensor([0, 2, 5, 2, 3, 6]), torch.tensor([1, 0, 2, 3, 1, 2])
    g = torch.tensor([0.3, -0.7, 1.1, 0.4, -0.2, 0.9])
    w_inst, w_cls = inst0.clone().requires_grad_(True), cls0.clone().requires_grad_(True)
    (g_inst,) = torch.autograd.grad((w_inst[idx] * g).sum(), [w_inst])
    (g_cls,) = torch.autograd.grad((inst0[idx] * w_cls[y] * g).sum(), [w_cls])
    assert t.update(idx, y, g)
    torch.testing.assert_close(t.instance, inst0 - meta_lr * g_inst)
    torch.testing.assert_close(t.per_class, cls0 - meta_lr * g_cls)


# ------------------------------------------------------------------------------------- a share of the step
@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_lookahead_step_fraction_lies_on_the_real_step(name, fraction):
    """step_fraction f: θ' = θ + f·(the real optimizer's next iterate − θ); f = 0 is θ itself."""
    model, opt, wd = _build(name, True, 3)
    data = _data()
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(_weighted_loss(model, data["x"], data["y"], E), list(params.values()))))
    theta = lookahead({n: p.detach() for n, p in params.items()}, grads,
                      param_specs(opt, params, DECAY, step_fraction=fraction), wd)
    real = dict(_real_step(model, opt, data, E).named_parameters())
    for n, p in params.items():
        expected = p.detach() + fraction * (real[n].detach() - p.detach())
        torch.testing.assert_close(theta[n], expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"step_fraction must be in \[0, 1\]"):
        param_specs(opt, params, DECAY, step_fraction=-0.1)


@pytest.mark.parametrize("strategy", ["jvp", "exact", "finite_difference"])
@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
def test_partial_lookahead_meta_gradient_is_the_whole_steps_derivative_at_the_shortened_point(strategy, name):
    """With f = 0.5 the engine returns d/de L_meta(θ + f·(θ'(e) − θ)) / f: the meta loss is evaluated a share
    of the way along the real step, the derivative is that of the whole step (brute force: central
    differences through real optimizer steps, divided by f)."""
    f = 0.5
    model, opt, wd = _build(name, True, 3)
    data = _data()
    params = dict(model.named_parameters())
    specs = param_specs(opt, params, DECAY, step_fraction=f)
    window = [MicroBatch({"x": data["x"]}, data["y"], E.clone(), seed=0)]
    res = meta_gradients(model, params, window, MetaBatch({"x": data["xm"]}, data["ym"], seed=1), specs,
                         weight_decay=wd, normalizer=N, strategy=strategy)
    frozen = _frozen_second_moment(model, opt, data)

    def shortened(e, w):
        stepped = _real_step(model, opt, data, e, wd=w, freeze_v=frozen)
        with torch.no_grad():
            for q, p in zip(stepped.parameters(), model.parameters()):
                q.copy_(p + f * (q - p))
        return stepped

    de, dwd = central_differences(shortened, data, wd)
    de, dwd = de / f, dwd / f
    tol = 5e-5 if strategy == "finite_difference" else 1e-5
    scale = float(de.abs().max())
    torch.testing.assert_close(res.example_grad.double(), de, rtol=tol, atol=tol * scale)
    assert res.weight_decay_grad == pytest.approx(dwd, rel=tol, abs=1e-9 * scale)
    assert res.meta_loss == pytest.approx(_meta_loss(shortened(E, None), data), rel=1e-6)


def test_first_order_meta_gradient_is_the_dot_with_the_meta_gradient_at_theta():
    """f = 0 with plain SGD: ∂L_meta/∂e_i = −(1/N) Σ_p λ_p g_meta,p(θ)·∇_p L_i(θ), with g_meta and every
    example's gradient taken by autograd at the model as it is (no step anywhere)."""
    model, opt, wd = _build("sgd", True, 3)
    data = _data()
    params = dict(model.named_parameters())
    lr = {n: g["lr"] for g in opt.param_groups for n, p in params.items() if any(p is q for q in g["params"])}
    g_meta = torch.autograd.grad(F.cross_entropy(model(data["xm"]), data["ym"]), list(params.values()))
    expected = torch.empty(N, dtype=torch.float64)
    for i in range(N):
        gi = torch.autograd.grad(F.cross_entropy(model(data["x"][i:i + 1]), data["y"][i:i + 1]), list(params.values()))
        expected[i] = -sum(lr[n] * (gm * g).sum() for n, gm, g in zip(params, g_meta, gi)) / N
    specs = param_specs(opt, params, DECAY, step_fraction=0.0)
    window = [MicroBatch({"x": data["x"]}, data["y"], E.clone(), seed=0)]
    for strategy in ("jvp", "exact"):
        res = meta_gradients(model, params, window, MetaBatch({"x": data["xm"]}, data["ym"], seed=1), specs,
                             weight_decay=wd, normalizer=N, strategy=strategy)
        torch.testing.assert_close(res.example_grad.double(), expected, rtol=1e-5, atol=1e-7)
        assert res.meta_loss == pytest.approx(_meta_loss(model, data), rel=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_partial_lookahead_on_looked_up_rows_equals_the_full_one_there(kind):
    """The row-restricted lookahead of an embedding table (hf_ddlr.meta.rows) takes the same share of the step."""
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(20, 4, dtype=torch.float64))
    opt = torch.optim.SGD([table], lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.AdamW([table], lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        table[torch.tensor([1, 3, 5, 7])].pow(2).sum().backward()
        opt.step()
    grad = torch.zeros_like(table).index_add_(0, torch.tensor([3, 7, 11]), torch.randn(3, 4, dtype=torch.float64))
    rows = torch.tensor([3, 7, 11, 2])
    specs = param_specs(opt, {"emb": table}, ["emb"], step_fraction=0.3)
    full = lookahead({"emb": table.detach()}, {"emb": grad}, specs, 0.01)["emb"]
    part = lookahead({"emb": table.detach()}, {"emb": grad}, specs, 0.01, rows={"emb": rows})["emb"]
    torch.testing.assert_close(part[rows], full[rows], rtol=0, atol=0)
    whole = lookahead({"emb": table.detach()}, {"emb": grad}, param_specs(opt, {"emb": table}, ["emb"]), 0.01)["emb"]
    torch.testing.assert_close(full, table.detach() + 0.3 * (whole - table.detach()))


@pytest.mark.parametrize("strategy", ["jvp", "exact", "finite_difference"])
@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
def test_probe_gradient_is_the_derivative_of_a_weight_zero_example_in_the_real_step(strategy, name):
    """``probes``: ∂L_meta/∂e_j of examples outside the step == central differences through torch's optimizer
    step on the window plus example j at weight ±h (float64); the window's own gradients do not change."""
    model, opt, wd = _build(name, True, 3)
    data = _data()
    g = torch.Generator().manual_seed(7)
    xp, yp = torch.randn(5, D, generator=g, dtype=torch.float64), torch.randint(0, C, (5,), generator=g)
    params = dict(model.named_parameters())
    specs = param_specs(opt, params, DECAY, mode="optimizer")
    meta = MetaBatch({"x": data["xm"]}, data["ym"], seed=1)

    def run(probes):
        window = [MicroBatch({"x": data["x"]}, data["y"], E.clone(), seed=0)]
        return meta_gradients(model, params, window, meta, specs, weight_decay=wd, normalizer=N, strategy=strategy,
                              probes=probes)

    res = run([MicroBatch({"x": xp}, yp, None, seed=3)])
    alone = run(())
    torch.testing.assert_close(res.example_grad, alone.example_grad, rtol=1e-6, atol=0)
    assert alone.probe_grad is None and res.meta_loss == alone.meta_loss
    both = {"x": torch.cat([data["x"], xp]), "y": torch.cat([data["y"], yp]), "xm": data["xm"], "ym": data["ym"]}
    frozen = _frozen_second_moment(model, opt, data)  # (Adam: probes at weight 0 leave v' as it is)
    h, brute = 1e-5, torch.empty(5, dtype=torch.float64)
    for j in range(5):
        losses = []
        for sign in (1, -1):
            e = torch.cat([E, torch.zeros(5, dtype=torch.float64)])
            e[N + j] = sign * h
            losses.append(_meta_loss(_real_step(model, opt, both, e, freeze_v=frozen), data))
        brute[j] = (losses[0] - losses[1]) / (2 * h)
    assert brute.abs().max() > 0
    tol = 5e-5 if strategy == "finite_difference" else 1e-5
    torch.testing.assert_close(res.probe_grad.double(), brute, rtol=tol, atol=tol * float(brute.abs().max()))


@pytest.mark.parametrize("strategy", ["jvp", "exact", "finite_difference"])
@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("subset", [("fc2.weight", "fc2.bias"), ("ln.weight", "fc2.weight")])
def test_meta_gradient_over_a_subset_is_that_of_a_real_step_moving_only_it(strategy, name, subset):
    """``meta_params``: ∂L_meta/∂e_i, ∂L_meta/∂wd and the probes' gradients == central differences through
    torch's optimizer step that moves only the subset, with the whole model's gradient clipped (the clipping
    factor of the unperturbed step, held constant as the engine documents) — float64."""
    model, opt, wd = _build(name, True, 3)
    data = _data()
    params = dict(model.named_parameters())
    specs = param_specs(opt, params, DECAY, mode="optimizer")
    full = torch.autograd.grad(_weighted_loss(model, data["x"], data["y"], E), list(params.values()))
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in full])))
    max_norm = 0.5 * norm  # the step is clipped: its factor comes from every parameter, not the subset's
    g = torch.Generator().manual_seed(7)
    xp, yp = torch.randn(3, D, generator=g, dtype=torch.float64), torch.randint(0, C, (3,), generator=g)
    res = meta_gradients(model, params, [MicroBatch({"x": data["x"]}, data["y"], E.clone(), seed=0)],
                         MetaBatch({"x": data["xm"]}, data["ym"], seed=1), specs, weight_decay=wd, normalizer=N,
                         strategy=strategy, max_grad_norm=max_norm, meta_params=subset,
                         probes=[MicroBatch({"x": xp}, yp, None, seed=3)])
    step = {"grad_scale": max_norm / (norm + 1e-6), "only": subset}
    frozen = _frozen_second_moment(model, opt, data, **step)
    de, dwd = central_differences(lambda e, w: _real_step(model, opt, data, e, wd=w, freeze_v=frozen, **step),
                                  data, wd)
    whole = meta_gradients(model, params, [MicroBatch({"x": data["x"]}, data["y"], E.clone(), seed=0)],
                           MetaBatch({"x": data["xm"]}, data["ym"], seed=1), specs, weight_decay=wd, normalizer=N,
                           strategy=strategy, max_grad_norm=max_norm)
    assert not torch.allclose(whole.example_grad.double(), de, rtol=0.05)  # the restriction is not a no-op
    tol = 5e-5 if strategy == "finite_difference" else 1e-5
    scale = float(de.abs().max())
    torch.testing.assert_close(res.example_grad.double(), de, rtol=tol, atol=tol * scale)
    assert res.weight_decay_grad == pytest.approx(dwd, rel=tol, abs=1e-9 * scale)
    # the probes: the window plus probe j at weight ±h, the same restricted, clipped step
    both = {"x": torch.cat([data["x"], xp]), "y": torch.cat([data["y"], yp]), "xm": data["xm"], "ym": data["ym"]}
    brute = torch.empty(3, dtype=torch.float64)
    for j in range(3):
        losses = []
        for sign in (1, -1):
            e = torch.cat([E, torch.zeros(3, dtype=torch.float64)])
            e[N + j] = sign * 1e-5
            losses.append(_meta_loss(_real_step(model, opt, both, e, freeze_v=frozen, **step), data))
        brute[j] = (losses[0] - losses[1]) / 2e-5
    torch.testing.assert_close(res.probe_grad.double(), brute, rtol=tol, atol=tol * float(brute.abs().max()))


@pytest.mark.parametrize("strategy", ["last_layer", "jvp", "exact"])
def test_a_probe_of_the_steps_own_examples_gets_their_meta_gradient(strategy):
    """∂L_meta/∂e_i does not depend on e_i (the step is linear in the weights): the window's own examples, probed
    again at weight 0, get exactly the window's gradients — with every strategy, the head-only one included."""
    model, opt, wd = _build("sgd_momentum", True, 3)
    data = _data()
    params = dict(model.named_parameters())
    specs = param_specs(opt, params, DECAY, mode="optimizer")
    res = meta_gradients(model, params, [MicroBatch({"x": data["x"]}, data["y"], E.float(), seed=0)],
                         MetaBatch({"x": data["xm"]}, data["ym"], seed=1), specs, weight_decay=wd, normalizer=N,
                         strategy=strategy, num_labels=C, probes=[MicroBatch({"x": data["x"]}, data["y"], None, seed=0)])
    assert res.example_grad.abs().max() > 0
    torch.testing.assert_close(res.probe_grad, res.example_grad, rtol=1e-5, atol=1e-7)
