"""Gradient clipping in the optimizer-aware lookahead and the running average of the meta gradient.

Checked against independent computations, not against another path through the same code:

- ``clip_coefficient`` is the factor a real ``torch.nn.utils.clip_grad_norm_`` call scales the gradients by.
- With ``max_grad_norm`` the engine's θ' is the parameters after a real clipped ``torch.optim`` step (weight
  decay added inside the optimizer stays unclipped), and ``∂L_meta/∂e_i``, ``∂L_meta/∂wd`` are central
  differences through that real step with the clip factor held at its unperturbed value (float64).
- In ``MetaLRTrainer`` (``lookahead="optimizer"``, ``meta_lr=0`` so that the real step uses the lookahead's
  weights) the θ' of every step is the model after that step; the paper's ``lookahead="sgd"`` is not.
- ``MetaGradientAverage`` is the stated EMA; every strategy uses it the same way (the exact one through its
  linear surrogate); a checkpointed run resumes bit-exactly only with ``meta_grad_average.safetensors``.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from ddp_worker import _StopAt, state_of
from test_lookahead_optimizers import (
    DECAY,
    E,
    N,
    _build,
    _data,
    _meta_loss,
    _weighted_loss,
    central_differences,
)
from test_meta_engine import _fwd_kw, _setup, cos
from test_trainer_features import _assert_states, _only_checkpoint_without
from tiny import TinyMLP, make_split
from transformers import TrainerCallback

import hf_ddlr.meta.engine as engine
from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.meta import MetaBatch, MicroBatch, meta_gradients, param_specs
from hf_ddlr.meta.averaging import MetaGradientAverage
from hf_ddlr.meta.lookahead import clip_coefficient
from hf_ddlr.trainer import META_STATE_NAME

META_GRAD_AVERAGE_NAME = "meta_grad_average.safetensors"


# ---------------------------------------------------------------------------------------------- clip factor
def _torch_clip_factor(grads: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """The gradients after a real ``clip_grad_norm_`` on clones of them."""
    leaves = {n: torch.zeros_like(g, requires_grad=True) for n, g in grads.items()}
    for n, p in leaves.items():
        p.grad = grads[n].clone()
    torch.nn.utils.clip_grad_norm_(list(leaves.values()), max_norm)
    return {n: p.grad for n, p in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.05, 0.7, 3.0, 1e3])
def test_clip_coefficient_is_the_factor_clip_grad_norm_applies(dtype, max_norm):
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(7, 5, generator=g, dtype=dtype), "b": torch.randn(3, generator=g, dtype=dtype) * 0.1,
             "c": torch.randn(2, 2, 2, generator=g, dtype=dtype)}
    c = clip_coefficient(grads, max_norm)
    clipped = _torch_clip_factor(grads, max_norm)
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in grads.values()))  # ~ 6.6
    assert c == pytest.approx(min(1.0, max_norm / (norm + 1e-6)), rel=1e-6)
    if max_norm > norm:
        assert c == 1.0  # not clipped: exactly the gradient
    else:
        assert c < 1.0
    for n, v in grads.items():
        torch.testing.assert_close(v * c, clipped[n], rtol=2e-6, atol=0)


def test_clip_coefficient_reads_the_norm_clip_grad_norm_returns():
    """The factor is computed from exactly the total norm the real clipping computes (same kernels), so the
    lookahead's clipping and the real step's agree to the last bit of the norm."""
    g = torch.Generator().manual_seed(1)
    grads = {f"p{i}": torch.randn(int(s), generator=g) * 10 ** (i % 3) for i, s in enumerate([7, 300, 5, 4096, 1])}
    leaves = [v.clone().requires_grad_() for v in grads.values()]
    for leaf, v in zip(leaves, grads.values()):
        leaf.grad = v.clone()
    total = float(torch.nn.utils.clip_grad_norm_(leaves, 1.0))
    assert clip_coefficient(grads, 1.0) == min(1.0, 1.0 / (total + 1e-6))


def test_clip_coefficient_off_and_non_finite():
    grads = {"a": torch.full((3,), 100.0)}
    assert clip_coefficient(grads, None) == 1.0
    assert clip_coefficient(grads, 0.0) == 1.0
    assert clip_coefficient(grads, 0) == 1.0
    assert clip_coefficient(grads, 1.0) < 0.01  # the same gradient is clipped once max_norm is set
    for bad in (float("inf"), float("nan")):
        assert math.isnan(clip_coefficient({"a": torch.tensor([1.0, bad]), "b": torch.ones(2)}, 1.0))


# ---------------------------------------------------------------------------------------------- engine
def _real_clipped_step(model, opt, data, e: torch.Tensor, max_norm: float | None = None, c: float | None = None,
                       wd: float | None = None):
    """A copy of the model after one real ``opt.step()`` on the weighted loss, its gradient clipped first:
    by ``clip_grad_norm_(max_norm)``, or scaled by the given constant ``c`` (the frozen clip factor)."""
    m, o = copy.deepcopy((model, opt))
    if wd is not None:
        o.param_groups[0]["weight_decay"] = wd
    o.zero_grad()
    _weighted_loss(m, data["x"], data["y"], e).backward()
    if c is None:
        torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
    else:
        for p in m.parameters():
            p.grad.mul_(c)
    o.step()
    return m


def _clip_setup(name: str, warm_steps: int):
    """A float64 MLP + optimizer and a max_norm that clips its weighted-loss gradient to 40 %."""
    model, opt, wd = _build(name, True, warm_steps)
    data = _data()
    params = dict(model.named_parameters())
    g = torch.autograd.grad(_weighted_loss(model, data["x"], data["y"], E), list(params.values()))
    norm = float(torch.sqrt(sum((v**2).sum() for v in g)))
    return model, opt, wd, data, params, 0.4 * norm, 0.4 * norm / (norm + 1e-6)


def _engine(model, opt, wd, data, params, strategy, max_norm, average=None):
    specs = param_specs(opt, params, DECAY, mode="optimizer")
    window = [MicroBatch({"x": data["x"]}, data["y"], E.clone(), seed=0)]
    return meta_gradients(model, params, window, MetaBatch({"x": data["xm"]}, data["ym"], seed=1), specs,
                          weight_decay=wd, normalizer=N, strategy=strategy, max_grad_norm=max_norm, average=average)


@pytest.fixture
def theta_spy(monkeypatch):
    """Every θ' the engine evaluates the meta loss at (detached clones), in call order."""
    seen: list[dict[str, torch.Tensor]] = []
    original = engine.meta_loss_gradient

    def spy(model, theta, *a, **k):
        seen.append({n: v.detach().clone() for n, v in theta.items()})
        return original(model, theta, *a, **k)

    monkeypatch.setattr(engine, "meta_loss_gradient", spy)
    return seen


@pytest.mark.parametrize("name,warm_steps", [("sgd_momentum", 3), ("sgd", 0), ("adamw", 3), ("adam", 3)])
def test_clipped_lookahead_is_the_real_clipped_step(name, warm_steps, theta_spy):
    """θ' (what the meta loss is evaluated at) == a real clip_grad_norm_ + opt.step() on the weighted loss."""
    model, opt, wd, data, params, max_norm, c = _clip_setup(name, warm_steps)
    res = _engine(model, opt, wd, data, params, "jvp", max_norm)
    (theta,) = theta_spy
    real = dict(_real_clipped_step(model, opt, data, E, max_norm=max_norm).named_parameters())
    unclipped = dict(_real_clipped_step(model, opt, data, E, c=1.0).named_parameters())
    for n, p in params.items():
        step = float((real[n].detach() - p.detach()).abs().max())
        # clip_coefficient takes the norm in float32 (torch here in float64): a relative 1e-7 of the step
        torch.testing.assert_close(theta[n], real[n].detach(), rtol=0, atol=1e-6 * step, msg=lambda m, n=n: f"{n}: {m}")
        # the clipping is not vacuous for this tensor
        assert float((unclipped[n] - real[n]).detach().abs().max()) > 1e-3 * step, n
    assert res.meta_loss == pytest.approx(_meta_loss(_real_clipped_step(model, opt, data, E, max_norm=max_norm),
                                                     data), rel=1e-6)
    assert c < 0.5
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())  # nothing written


@pytest.mark.parametrize("strategy", ["jvp", "exact", "finite_difference"])
@pytest.mark.parametrize("name,warm_steps", [("sgd_momentum", 3), ("sgd_nesterov", 0), ("sgd", 3)])
def test_clipped_meta_gradient_matches_finite_differences_through_the_real_clipped_step(strategy, name, warm_steps):
    """∂L_meta/∂e_i and ∂L_meta/∂wd == central differences through the real SGD step whose gradient is scaled
    by the unperturbed clip factor (held constant, as documented); the decay inside SGD is not clipped."""
    model, opt, wd, data, params, max_norm, c = _clip_setup(name, warm_steps)
    res = _engine(model, opt, wd, data, params, strategy, max_norm)
    de, dwd = central_differences(lambda e, w: _real_clipped_step(model, opt, data, e, c=c, wd=w), data, wd)
    assert de.abs().max() > 0 and dwd != 0
    tol = 5e-5 if strategy == "finite_difference" else 1e-5
    scale = float(de.abs().max())
    torch.testing.assert_close(res.example_grad.double(), de, rtol=tol, atol=tol * scale)
    assert res.weight_decay_grad == pytest.approx(dwd, rel=tol, abs=1e-9 * scale)
    assert res.meta_loss == pytest.approx(_meta_loss(_real_clipped_step(model, opt, data, E, c=c), data), rel=1e-6)


# ---------------------------------------------------------------------------------------------- trainer
COMMON = dict(report_to=[], use_cpu=True, disable_tqdm=True, seed=0)


class _Params(TrainerCallback):
    """The model's parameters at the end of every optimizer step."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append({n: p.detach().clone() for n, p in self.model.named_parameters()})


@pytest.mark.parametrize("optim,ga,extra", [
    ("sgd", 1, dict(optim_args="momentum=0.9", layerwise_dots=True)),  # fused step, per-layer dots
    ("sgd", 1, dict(optim_args="momentum=0.9,nesterov=True", meta_update="delayed")),  # the real step's .grad
    ("adamw_torch", 2, dict(adam_epsilon=1e-3)),  # a two-micro-batch window (meta step before the forward)
    ("adafactor", 1, dict()),  # transformers' Adafactor: factored second moment, update clipping, decoupled decay
], ids=["sgdm-fused", "nesterov-delayed", "adamw-ga2", "adafactor"])
def test_trainer_lookahead_is_the_real_clipped_step(tmp_path, theta_spy, optim, ga, extra):
    """meta_lr=0 keeps every rate at 1, so the real step uses the lookahead's weights: the θ' of step k is the
    model after step k, clipping (max_grad_norm) and weight decay included."""
    torch.manual_seed(0)
    model = TinyMLP(hidden=12)
    args = MetaLRConfig(
        output_dir=str(tmp_path), **COMMON, save_strategy="no", optim=optim,
        learning_rate=0.1 if optim == "sgd" else 0.02, lr_scheduler_type="linear", weight_decay=0.05,
        max_grad_norm=0.05, lookahead="optimizer", meta_lr=0.0, lr_level="both", meta_strategy="jvp",
        per_device_train_batch_size=8 // ga, gradient_accumulation_steps=ga, max_steps=4, meta_batch_size=8,
        **{"layerwise_dots": False, "meta_update": "same_step", **extra},
    )
    t = MetaLRTrainer(model=model, args=args, train_dataset=make_split(32, seed=11),
                      meta_dataset=make_split(8, seed=12))
    after = _Params(t.model)
    t.add_callback(after)
    start = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    assert len(theta_spy) == len(after.seen) == 4
    assert torch.equal(t.rates.instance, torch.ones(32)) and torch.equal(t.rates.per_class, torch.ones(3))
    before = start
    for k, (theta, real) in enumerate(zip(theta_spy, after.seen)):
        for n, p in real.items():
            step = float((p - before[n]).abs().max())
            assert step > 0
            torch.testing.assert_close(theta[n], p, rtol=0, atol=1e-4 * step, msg=lambda m, n=n, k=k: f"{k} {n}: {m}")
        before = real
    assert t.meta_args.meta_update == extra.get("meta_update", "same_step")  # the path this case is about


@pytest.mark.parametrize("optim_args", [None, "momentum=0.9"])
def test_trainer_sgd_lookahead_is_not_the_clipped_step(tmp_path, theta_spy, optim_args):
    """Negative control: the paper's plain-SGD lookahead does not clip (with plain SGD that is the only
    difference from the real step) nor follow momentum."""
    torch.manual_seed(0)
    model = TinyMLP(hidden=12)
    args = MetaLRConfig(
        output_dir=str(tmp_path), **COMMON, save_strategy="no", optim="sgd", optim_args=optim_args,
        learning_rate=0.1, lr_scheduler_type="constant", weight_decay=0.05, max_grad_norm=0.05, lookahead="sgd",
        meta_lr=0.0, meta_strategy="jvp", meta_update="same_step", layerwise_dots=False,
        per_device_train_batch_size=8, max_steps=3, meta_batch_size=8,
    )
    t = MetaLRTrainer(model=model, args=args, train_dataset=make_split(32, seed=11),
                      meta_dataset=make_split(8, seed=12))
    after = _Params(t.model)
    t.add_callback(after)
    t.train()
    assert len(theta_spy) == 3
    for theta, real in zip(theta_spy, after.seen):
        assert max(float((theta[n] - p).abs().max()) for n, p in real.items()) > 1e-3


# ---------------------------------------------------------------------------------------------- average
def _grads(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g, dtype=dtype), "b": torch.randn(3, generator=g, dtype=dtype)}


def test_average_starts_at_the_first_value_then_is_the_stated_ema():
    beta = 0.75  # exact in binary: every value below is computed in the same float32 arithmetic
    avg = MetaGradientAverage(beta)
    seq = [_grads(s) for s in range(4)]
    out = avg.update(seq[0])
    for n in seq[0]:
        assert torch.equal(out[n], seq[0][n])  # the first value itself, not (1 - β)·g
    m = {n: v.clone() for n, v in seq[0].items()}
    for g in seq[1:]:
        out = avg.update(g)
        m = {n: m[n] * beta + g[n] * (1 - beta) for n in m}
        for n in m:
            torch.testing.assert_close(out[n], m[n], rtol=1e-6, atol=1e-7)
            assert not torch.equal(out[n], g[n])
    assert avg.num_updates == 4


def test_average_skips_non_finite_gradients():
    avg = MetaGradientAverage(0.5)
    avg.update(_grads(0))
    avg.update(_grads(1))
    state = {n: v.clone() for n, v in avg.average.items()}
    bad = _grads(2)
    bad["b"][1] = float("inf")
    out = avg.update(bad)
    assert out["b"][1] == float("inf") and torch.equal(out["w"], bad["w"])  # this step's value, as it is
    assert avg.num_updates == 2
    assert all(torch.equal(avg.average[n], state[n]) for n in state)  # not folded in
    nan = _grads(3)
    nan["w"][0, 0] = float("nan")
    assert math.isnan(float(avg.update(nan)["w"][0, 0]))
    assert all(torch.equal(avg.average[n], state[n]) for n in state)
    g = _grads(4)
    out = avg.update(g)  # and the next finite step continues from the last finite average
    for n in g:
        torch.testing.assert_close(out[n], 0.5 * state[n] + 0.5 * g[n])


def test_average_with_beta_zero_is_the_per_step_value():
    """β = 0 hands back this step's gradient untouched (float64 stays float64: no float32 round trip)."""
    avg = MetaGradientAverage(0.0)
    for s in range(3):
        g = _grads(s, torch.float64)
        assert not torch.equal(g["w"], g["w"].float().double())  # not representable in float32
        out = avg.update(g)
        assert all(torch.equal(out[n], g[n]) and out[n].dtype == torch.float64 for n in g)


def test_average_keeps_the_callers_dtype():
    avg = MetaGradientAverage(0.5)
    for s in range(2):
        out = avg.update(_grads(s, torch.bfloat16))
        assert all(v.dtype == torch.bfloat16 for v in out.values())
    assert all(v.dtype == torch.float32 for v in avg.average.values())


def test_average_state_dict_round_trip_continues_identically():
    a = MetaGradientAverage(0.9)
    for s in range(3):
        a.update(_grads(s))
    sd = a.state_dict()
    assert set(sd) == {"avg.w", "avg.b", "num_updates"}
    b = MetaGradientAverage(0.9)
    b.load_state_dict({k: v.clone() for k, v in sd.items()})
    assert b.num_updates == 3
    for s in range(3, 6):
        oa, ob = a.update(_grads(s)), b.update(_grads(s))
        assert all(torch.equal(oa[n], ob[n]) for n in oa)
    # negative control: a fresh average (what a resume without the state gets) continues differently
    c = MetaGradientAverage(0.9)
    oc = c.update(_grads(6))
    oa = a.update(_grads(6))
    assert not torch.allclose(oa["w"], oc["w"])


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan")])
def test_average_rejects_an_invalid_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        MetaGradientAverage(beta)


def test_config_rejects_an_invalid_meta_grad_average(tmp_path):
    with pytest.raises(ValueError, match="meta_grad_average"):
        MetaLRConfig(output_dir=str(tmp_path), **COMMON, meta_grad_average=1.0)


# ---------------------------------------------------------------------------------------------- strategies
def _three_meta_steps(opt: str):
    """One model (BN + dropout) and three different (window, meta batch) pairs: the meta steps to feed."""
    model, params, specs, window, meta = _setup(opt=opt)
    _fwd_kw(model)
    model.train()
    g = torch.Generator().manual_seed(5)
    steps = [(window, meta)]
    for k in range(2):
        x, y = torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 5, (32,), generator=g)
        steps.append(([MicroBatch({"x": x[:16]}, y[:16], torch.rand(16, generator=g) + 0.5, seed=200 + k)],
                      MetaBatch({"x": x[16:]}, y[16:], seed=300 + k)))
    return model, params, specs, steps


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_strategies_agree_with_the_average(opt, clip):
    """Fed the same three meta steps (a fresh average each), jvp / finite_difference / exact (the linear
    surrogate Σ m·θ') give the same example and weight-decay gradients, with and without clipping; the
    average is the per-step value at the first step and changes the result after it."""
    model, params, specs, steps = _three_meta_steps(opt)
    if clip is not None:  # the clipping is active at every step
        assert all(clip_coefficient(engine.lookahead_gradient(model, params, copy.deepcopy(w), 16), clip) < 0.5
                   for w, _ in steps)
    out: dict[tuple[str, bool], list] = {}
    for strategy in ("exact", "jvp", "finite_difference"):
        for use_avg in (True, False):
            avg = MetaGradientAverage(0.8) if use_avg else None
            out[strategy, use_avg] = [
                meta_gradients(model, params, copy.deepcopy(w), m, specs, weight_decay=5e-4, normalizer=16,
                               strategy=strategy, max_grad_norm=clip, average=avg)
                for w, m in steps
            ]
    for k in range(3):
        ref = out["exact", True][k]
        assert ref.example_grad.abs().max() > 0
        # a one-sided difference in float32 on a ReLU net: sizes within ~1 % (seen 0.8 %)
        for strategy, min_cos, size_tol in (("jvp", 0.9999, 1e-3), ("finite_difference", 0.999, 3e-2)):
            got = out[strategy, True][k]
            c = cos(got.example_grad, ref.example_grad)
            assert c >= min_cos, (strategy, k, c)
            ratio = float(got.example_grad.norm() / ref.example_grad.norm())  # the size too (the clip factor)
            assert ratio == pytest.approx(1.0, abs=size_tol), (strategy, k, ratio)
            assert got.weight_decay_grad == pytest.approx(ref.weight_decay_grad, rel=1e-3, abs=1e-12)
            assert got.meta_loss == pytest.approx(ref.meta_loss, rel=1e-5)
        for strategy in ("exact", "jvp", "finite_difference"):
            a, b = out[strategy, True][k], out[strategy, False][k]
            assert a.meta_loss == pytest.approx(b.meta_loss, rel=1e-6)  # the same θ': the average is not in it
            c = cos(a.example_grad, b.example_grad)
            if k == 0:  # the average starts at the first value
                assert c > 0.99999, (strategy, c)
                torch.testing.assert_close(a.example_grad, b.example_grad, rtol=1e-4, atol=1e-4 * float(
                    b.example_grad.abs().max()))
                assert a.weight_decay_grad == pytest.approx(b.weight_decay_grad, rel=1e-4)
            else:  # and is used after it
                rel = float((a.example_grad - b.example_grad).norm() / b.example_grad.norm())
                assert rel > 0.05, (strategy, k, rel)  # seen: 0.12 to 0.73
                assert a.weight_decay_grad != pytest.approx(b.weight_decay_grad, rel=1e-2)


# ---------------------------------------------------------------------------------------------- checkpoint
def _avg_run(out_dir: str, stop_at: int | None = None, resume: bool = False, **kw) -> MetaLRTrainer:
    """tests/ddp_worker.py's run with the running average, the optimizer lookahead and clipping on (``kw``: other
    or more MetaLRConfig options)."""
    torch.manual_seed(0)
    options = dict(
        optim="sgd", optim_args="momentum=0.9", learning_rate=0.3,
        lr_scheduler_type="constant", weight_decay=0.01, learn_weight_decay=True, lr_level="both", meta_lr=0.2,
        meta_lr_scaling="normalized", meta_strategy="jvp", meta_update="same_step", lookahead="optimizer",
        max_grad_norm=1.0, meta_grad_average=0.9, per_device_train_batch_size=8, meta_batch_size=8, max_steps=6,
        logging_steps=1, save_strategy="steps", save_steps=3,
    )
    args = MetaLRConfig(output_dir=out_dir, **COMMON, **{**options, **kw})
    t = MetaLRTrainer(model=TinyMLP(hidden=12), args=args, train_dataset=make_split(32, seed=11),
                      meta_dataset=make_split(8, seed=12))
    if stop_at is not None:
        t.add_callback(_StopAt(stop_at))
    t.train(resume_from_checkpoint=True if resume else None)
    return t


def _state(t: MetaLRTrainer) -> dict[str, torch.Tensor]:
    out = state_of(t)  # parameters, rates, weight decay, trajectory
    out.update({f"avg.{n}": v.clone() for n, v in t._meta_grad_average.average.items()})
    return out


def test_resume_with_the_average_is_bit_exact_and_needs_its_file(tmp_path):
    straight = _avg_run(str(tmp_path / "straight"))
    assert straight._meta_grad_average.num_updates == 6
    out = str(tmp_path / "resume")
    stopped = _avg_run(out, stop_at=3)  # mid-epoch (4 steps per epoch)
    assert stopped.state.global_step == 3
    ckpt = os.path.join(out, "checkpoint-3")
    assert {META_STATE_NAME, META_GRAD_AVERAGE_NAME} <= set(os.listdir(ckpt))
    resumed = _avg_run(out, resume=True)
    assert resumed.state.global_step == 6 and resumed._meta_grad_average.num_updates == 6
    _assert_states(_state(resumed), _state(straight), exact=True)
    logs = lambda t: [h for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert logs(resumed) == logs(straight)

    # negative control: without the average's file the resume warns and is not an exact continuation
    _only_checkpoint_without(out, "checkpoint-3", META_GRAD_AVERAGE_NAME)
    with pytest.warns(UserWarning, match="meta_grad_average.safetensors is missing"):
        broken = _avg_run(out, resume=True)
    assert broken._meta_grad_average.num_updates == 3
    assert not torch.allclose(broken.rates.instance, straight.rates.instance)

    # a second train() of the finished trainer, resumed from that checkpoint, also starts the average again
    # (rather than carrying on from the end of its first run) and so continues exactly like the fresh trainer
    with pytest.warns(UserWarning, match="meta_grad_average.safetensors is missing"):
        straight.train(resume_from_checkpoint=ckpt)
    assert straight._meta_grad_average.num_updates == 3
    a, b = _state(straight), _state(broken)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- span in epochs
def _span_run(tmp_path, name: str, **kw) -> MetaLRTrainer:
    torch.manual_seed(0)
    args = MetaLRConfig(output_dir=str(tmp_path / name), **COMMON, optim="sgd", learning_rate=0.3,
                        per_device_train_batch_size=8, num_train_epochs=2, save_strategy="no", lr_level="both", **kw)
    t = MetaLRTrainer(model=TinyMLP(hidden=12), args=args, train_dataset=make_split(64, seed=11),
                      meta_dataset=make_split(8, seed=12))
    t.train()
    return t


@pytest.mark.parametrize(
    ("extra", "beta"),
    [({}, 0.75),  # 64 examples / batch 8 = 8 meta steps per epoch; half an epoch = 4 steps
     ({"gradient_accumulation_steps": 2}, 0.5),  # 4 optimizer steps per epoch
     ({"meta_interval": 2}, 0.5)],  # 4 meta steps per epoch
)
def test_a_span_in_epochs_is_the_factor_that_averages_over_that_many_meta_steps(tmp_path, extra, beta):
    spanned = _span_run(tmp_path, "span", meta_grad_average_epochs=0.5, **extra)
    assert spanned._meta_grad_average.beta == pytest.approx(beta)
    # the same run with the factor given directly (independent of the span arithmetic) ends identically
    direct = _span_run(tmp_path, "direct", meta_grad_average=beta, **extra)
    a, b = state_of(spanned), state_of(direct)
    assert a.keys() == b.keys()
    for k in a:  # bit-equal (NaN marks the steps without a meta step under meta_interval)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert not torch.equal(spanned.rates.instance, _span_run(tmp_path, "default", **extra).rates.instance)


def test_config_rejects_a_non_positive_span(tmp_path):
    with pytest.raises(ValueError, match="meta_grad_average_epochs must be > 0"):
        MetaLRConfig(output_dir=str(tmp_path), **COMMON, meta_grad_average_epochs=0.0)


@pytest.mark.parametrize("strategy", ["exact", "jvp", "finite_difference", "last_layer"])
def test_per_step_grad_is_the_gradient_without_the_average(strategy):
    """per_step_too=True: besides the averaged example gradients (unchanged, the average folded in once per
    step), the example gradients along the step's own meta gradient — what the engine returns with no
    average at all. None when not asked for or when there is no average."""
    model, params, specs, steps = _three_meta_steps("adamw")
    tol = 3e-2 if strategy == "finite_difference" else 1e-4
    avg_plain, avg_both, avg_only = MetaGradientAverage(0.8), MetaGradientAverage(0.8), MetaGradientAverage(0.8)
    for k, (w, m) in enumerate(steps):
        kw = dict(weight_decay=5e-4, normalizer=16, strategy=strategy, max_grad_norm=0.05, num_labels=5)
        plain = meta_gradients(model, params, copy.deepcopy(w), m, specs, average=avg_plain, **kw)
        both = meta_gradients(model, params, copy.deepcopy(w), m, specs, average=avg_both, per_step_too=True, **kw)
        none = meta_gradients(model, params, copy.deepcopy(w), m, specs, per_step_too=True, **kw)
        assert plain.per_step_grad is None and none.per_step_grad is None
        torch.testing.assert_close(both.example_grad, plain.example_grad, rtol=0, atol=0)
        scale = float(none.example_grad.abs().max())
        torch.testing.assert_close(both.per_step_grad, none.example_grad, rtol=tol, atol=tol * scale)
        if k > 0:  # the average has history: the two directions differ
            rel = float((both.per_step_grad - both.example_grad).norm() / both.example_grad.norm())
            assert rel > 0.05, (strategy, k, rel)
        if strategy in ("jvp", "finite_difference"):  # no instance rates: the per-step products alone
            only = meta_gradients(model, params, copy.deepcopy(w), m, specs, average=avg_only, per_step_too=True,
                                  average_products=False, **kw)
            torch.testing.assert_close(only.example_grad, both.per_step_grad, rtol=0, atol=0)
            assert only.per_step_grad is only.example_grad
            assert only.weight_decay_grad == both.weight_decay_grad  # the average is still kept


def _class_rate_run(tmp_path, name: str, **extra) -> MetaLRTrainer:
    torch.manual_seed(0)
    args = MetaLRConfig(
        output_dir=str(tmp_path / name), **COMMON, save_strategy="no", optim="adamw_torch", learning_rate=0.05,
        lr_scheduler_type="constant", weight_decay=0.0, lr_level="class", meta_lr=0.3, lookahead="optimizer",
        max_grad_norm=1.0, per_device_train_batch_size=8, meta_batch_size=8, max_steps=6, **extra,
    )
    t = MetaLRTrainer(model=TinyMLP(hidden=12), args=args, train_dataset=make_split(32, seed=11),
                      meta_dataset=make_split(16, seed=12))
    t.train()
    return t


@pytest.mark.parametrize("layerwise", [True, False], ids=["per-layer", "forward-mode"])
def test_class_rates_per_step_follow_the_per_step_meta_gradient(tmp_path, monkeypatch, layerwise):
    """class_rate_direction='per_step' with the average on gives class rates (and a model) equal to a run with
    no average at all, taking one set of products per step (there are no instance rates for the average's);
    'average' does not."""
    kw = dict(layerwise_dots=layerwise)
    calls = []
    jvp = engine.jvp_dots
    monkeypatch.setattr(engine, "jvp_dots", lambda *a, **k: calls.append(1) or jvp(*a, **k))
    per_step = _class_rate_run(tmp_path, "ps", meta_grad_average=0.9, class_rate_direction="per_step", **kw)
    assert len(calls) == (1 if layerwise else 6)  # per-layer: the first step's check only
    no_avg = _class_rate_run(tmp_path, "none", meta_grad_average=0.0, **kw)
    averaged = _class_rate_run(tmp_path, "avg", meta_grad_average=0.9, class_rate_direction="average", **kw)
    assert float((no_avg.rates.per_class - 1).abs().max()) > 0.1  # the class rates moved
    torch.testing.assert_close(per_step.rates.per_class, no_avg.rates.per_class, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(per_step.model.named_parameters(), no_avg.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert float((averaged.rates.per_class - no_avg.rates.per_class).abs().max()) > 1e-3


def test_both_levels_class_rates_step_on_the_per_step_products(tmp_path, monkeypatch):
    """lr_level='both' with the average on: every rate update hands the class table the step's own products
    (``keyed_grad``, as the engine computed them), not the instance rates' averaged ones; with
    class_rate_direction='average' it hands none, and the class rates end elsewhere."""
    from hf_ddlr.meta.rates import RateTable

    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    update = RateTable.update

    def spy(self, indices, labels, example_grad, weight_decay_grad=None, keyed_grad=None, probes=None):
        seen.append((example_grad.clone(), None if keyed_grad is None else keyed_grad.clone()))
        return update(self, indices, labels, example_grad, weight_decay_grad, keyed_grad=keyed_grad, probes=probes)

    monkeypatch.setattr(RateTable, "update", spy)

    def run(name: str, direction: str) -> MetaLRTrainer:
        torch.manual_seed(0)
        args = MetaLRConfig(output_dir=str(tmp_path / name), **COMMON, save_strategy="no", optim="sgd",
                            learning_rate=0.3, lr_scheduler_type="constant", lr_level="both", meta_lr=0.3,
                            meta_grad_average=0.9, class_rate_direction=direction, per_device_train_batch_size=8,
                            meta_batch_size=8, max_steps=6, probe_batches=0)
        t = MetaLRTrainer(model=TinyMLP(hidden=12), args=args, train_dataset=make_split(32, seed=11),
                          meta_dataset=make_split(16, seed=12))
        t.train()
        return t

    per_step = run("ps", "per_step")
    assert len(seen) == 6 and all(k is not None for _, k in seen)
    last = per_step.last_meta_gradients
    torch.testing.assert_close(seen[-1][1], last.per_step_grad.cpu())
    torch.testing.assert_close(seen[-1][0], last.example_grad.cpu())
    assert max(float((k - g).norm() / g.norm()) for g, k in seen[1:]) > 0.05  # the two directions differ
    seen.clear()
    averaged = run("avg", "average")
    assert len(seen) == 6 and all(k is None for _, k in seen)
    assert float((averaged.rates.per_class - per_step.rates.per_class).abs().max()) > 1e-4


def test_class_products_take_the_same_metric_as_the_instance_products(tmp_path):
    """Under plain SGD the products are taken in Adam's metric (rate_metric='auto'): at the first step, where the
    running average is its first value, a class-level run's products (the per-step tangent) equal an
    instance-level run's (the averaged one) on the same batch and model. A per-step tangent outside the metric
    differs."""
    def first_products(name: str, level: str, metric: str = "auto") -> torch.Tensor:
        torch.manual_seed(0)
        args = MetaLRConfig(output_dir=str(tmp_path / name), **COMMON, save_strategy="no", optim="sgd",
                            learning_rate=0.3, lr_scheduler_type="constant", lr_level=level, meta_lr=0.3,
                            meta_grad_average=0.9, per_device_train_batch_size=8, meta_batch_size=8, max_steps=1,
                            probe_batches=0, rate_metric=metric, instance_signal="mean")  # (the whole products)
        t = MetaLRTrainer(model=TinyMLP(hidden=12), args=args, train_dataset=make_split(32, seed=11),
                          meta_dataset=make_split(16, seed=12))
        t.train()
        return t.last_meta_gradients.example_grad

    cls, inst = first_products("cls", "class"), first_products("inst", "instance")
    torch.testing.assert_close(cls, inst, rtol=1e-5, atol=1e-8)
    plain = first_products("plain", "instance", metric="optimizer")  # the check can fail: the metric matters here
    assert float((plain - inst).norm() / inst.norm()) > 0.05


def test_average_starts_a_new_tensor_at_its_value_and_goes_on_with_the_others():
    """A tensor the average did not hold (the class shares of instance_signal='other_classes' after a resume from a
    checkpoint written without them) starts at its first value; the tensors it held go on averaging. A tensor it
    held that is gone (another set of parameters) starts everything again."""
    a = MetaGradientAverage(0.5)
    a.update(_grads(0))
    g = _grads(1)
    out = a.update({**g, "new": torch.full((2,), 4.0)})
    torch.testing.assert_close(out["w"], 0.5 * _grads(0)["w"] + 0.5 * g["w"])
    torch.testing.assert_close(out["new"], torch.full((2,), 4.0))
    out = a.update({"w": g["w"]})  # "b" and "new" gone: started again
    assert set(out) == {"w"} and torch.equal(out["w"], g["w"])
