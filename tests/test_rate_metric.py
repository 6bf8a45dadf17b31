"""``rate_metric="adam"``: the products in Adam's metric, against an independent computation.

The expected per-example meta-gradient is built without the library: a real ``torch.optim`` step (on a copy,
after clipping its gradient by hand) gives θ', autograd gives the meta gradient there and every example's own
gradient one by one, and Adam's second moment of the clipped training gradients is the recurrence written out.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from test_lookahead_optimizers import MLP
from test_meta_average_and_clipping import _avg_run
from test_meta_average_and_clipping import _state as _avg_state
from test_trainer_features import _assert_states, _only_checkpoint_without

from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr._checkpoint import RATE_METRIC_NAME
from hf_ddlr.config import rate_metric_choice
from hf_ddlr.meta import MetaBatch, MicroBatch, meta_gradients, param_specs
from hf_ddlr.meta.averaging import GradientSecondMoment

N, D, C = 8, 5, 3
DECAY = ("fc1.weight", "fc2.weight")
MAX_NORM = 0.3  # below the gradients' norm: the clipping coefficient is < 1 and must enter θ', v and T


def _build(kind: str):
    torch.manual_seed(0)
    model = MLP().double()
    named = dict(model.named_parameters())
    groups = [{"params": [named[n] for n in DECAY], "lr": 0.1, "weight_decay": 5e-3},
              {"params": [p for n, p in named.items() if n not in DECAY], "lr": 0.05, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, momentum=0.9, dampening=0.25) if kind == "sgd" else torch.optim.AdamW(groups)
    g = torch.Generator().manual_seed(7)
    for _ in range(2):  # a momentum buffer / Adam state exists: ρ = 1 − dampening
        x, y = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)
    e = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return x, y, e


def _weighted(model, x, y, e):
    return (e * F.cross_entropy(model(x), y, reduction="none")).sum() / N


def _expected(model, opt, batches, meta, beta=0.999, eps=1e-8):
    """−(1/N) Σ_p λ_p ρ_p c · g_meta,p(θ') / (sqrt(v̂_p) + eps) · ∇_p L_i for the last of ``batches``."""
    params = dict(model.named_parameters())
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y, e in batches:
        grads = torch.autograd.grad(_weighted(model, x, y, e), list(params.values()))
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        c = min(1.0, MAX_NORM / (float(norm) + 1e-6))
        for n, g in zip(params, grads):
            v[n] = beta * v[n] + (1 - beta) * (c * g) ** 2
    m, o = copy.deepcopy((model, opt))  # the real step on the last batch, clipped as the Trainer clips
    o.zero_grad()
    _weighted(m, x, y, e).backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM)
    o.step()
    g_meta = torch.autograd.grad(F.cross_entropy(m(meta[0]), meta[1]), list(m.parameters()))
    lr = {n: grp["lr"] for grp in opt.param_groups for n, p in params.items() if any(p is q for q in grp["params"])}
    rho = 1 - opt.param_groups[0]["dampening"]
    t = len(batches)
    metric = {n: 1 / ((v[n] / (1 - beta**t)).sqrt() + eps) for n in params}
    out = torch.empty(N, dtype=torch.float64)
    for i in range(N):
        gi = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(params.values()))
        out[i] = -sum(lr[n] * rho * c * (metric[n] * gm * g).sum() for n, gm, g in zip(params, g_meta, gi)) / N
    return out


def _run(model, opt, batches, meta, strategy, metric):
    params = dict(model.named_parameters())
    res = None
    for k, (x, y, e) in enumerate(batches):
        specs = param_specs(opt, params, DECAY)
        res = meta_gradients(model, params, [MicroBatch({"x": x}, y, e.clone(), seed=k)],
                             MetaBatch({"x": meta[0]}, meta[1], seed=1), specs, weight_decay=5e-3, normalizer=N,
                             strategy=strategy, max_grad_norm=MAX_NORM, metric=metric)
    return res


@pytest.mark.parametrize("strategy", ["jvp", "finite_difference"])
def test_products_in_adams_metric_match_a_real_step_and_the_written_out_second_moment(strategy):
    model, opt = _build("sgd")
    batches = [_batch(s) for s in (1, 2, 3)]
    g = torch.Generator().manual_seed(9)
    meta = (torch.randn(12, D, generator=g, dtype=torch.float64), torch.randint(0, C, (12,), generator=g))
    metric = GradientSecondMoment()
    res = _run(model, opt, batches, meta, strategy, metric)
    expected = _expected(model, opt, batches, meta)
    tol = 1e-6 if strategy == "jvp" else 1e-4  # (the second moment is held in float32)
    torch.testing.assert_close(res.example_grad.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    assert metric.num_updates == 3
    # the metric moves the products, not the weight decay's meta-gradient (the real step's)
    plain = _run(model, opt, batches, meta, strategy, None)
    assert res.weight_decay_grad == pytest.approx(plain.weight_decay_grad, rel=1e-9)
    assert not torch.allclose(plain.example_grad.double(), expected, rtol=1e-2)  # the metric is not a no-op here


def test_adam_keeps_its_own_preconditioner():
    """Under AdamW the products already carry Adam's metric: the option changes nothing and holds no state."""
    model, opt = _build("adamw")
    batches = [_batch(s) for s in (1, 2)]
    meta = (torch.randn(12, D, dtype=torch.float64), torch.randint(0, C, (12,)))
    metric = GradientSecondMoment()
    with_metric = _run(model, opt, batches, meta, "jvp", metric)
    without = _run(model, opt, batches, meta, "jvp", None)
    assert torch.equal(with_metric.example_grad, without.example_grad)
    assert metric.second_moment == {}


def test_second_moment_skips_a_non_finite_gradient_and_round_trips():
    m = GradientSecondMoment(beta=0.9)
    assert m.update({"w": torch.tensor([1.0, -2.0])}, scale=0.5)
    assert not m.update({"w": torch.tensor([float("nan"), 1.0])})
    assert m.update({"w": torch.tensor([3.0, 0.0])})
    v = 0.9 * (0.1 * torch.tensor([0.25, 1.0])) + 0.1 * torch.tensor([9.0, 0.0])
    torch.testing.assert_close(m.second_moment["w"], v)
    t = {"w": torch.ones(2)}
    m.precondition_(t)
    torch.testing.assert_close(t["w"], 1 / ((v / (1 - 0.9**2)).sqrt() + 1e-8))
    again = GradientSecondMoment(beta=0.9)
    again.load_state_dict(m.state_dict())
    assert again.num_updates == 2 and torch.equal(again.second_moment["w"], m.second_moment["w"])


def test_exact_strategy_refuses_the_metric():
    model, opt = _build("sgd")
    with pytest.raises(ValueError, match="rate_metric='optimizer'"):
        _run(model, opt, [_batch(1)], (torch.randn(4, D, dtype=torch.float64), torch.randint(0, C, (4,))), "exact",
             GradientSecondMoment())
    with pytest.raises(ValueError, match="meta_strategy='exact'"):
        MetaLRConfig(output_dir="unused", rate_metric="adam", meta_strategy="exact")
    with pytest.raises(ValueError, match="rate_metric"):
        MetaLRConfig(output_dir="unused", rate_metric="rms")


# ---------------------------------------------------------------------------------------------- in the Trainer
def _metric_run(out_dir: str, stop_at: int | None = None, resume: bool = False, **kw) -> MetaLRTrainer:
    """A momentum-SGD run with clipping, class and instance rates, probes, the average and the learned weight decay
    on, its products in Adam's metric (unless ``kw`` says otherwise)."""
    return _avg_run(out_dir, stop_at, resume, **{"rate_metric": "adam", **kw})


def _state(t: MetaLRTrainer) -> dict[str, torch.Tensor]:
    out = _avg_state(t)  # parameters, rates, weight decay, trajectory, the meta-gradient average
    out.update({f"v.{n}": v.clone() for n, v in t._rate_metric.second_moment.items()})
    return out


def test_trainer_takes_the_metric_and_resumes_it_exactly(tmp_path):
    straight = _metric_run(str(tmp_path / "straight"))
    assert straight._rate_metric.num_updates == 6
    assert set(straight._rate_metric.second_moment) == {n for n, p in straight.model.named_parameters()}
    assert straight.lr_trajectory.config["rate_metric"] == "adam"
    out = str(tmp_path / "resume")
    _metric_run(out, stop_at=3)
    assert RATE_METRIC_NAME in os.listdir(os.path.join(out, "checkpoint-3"))
    resumed = _metric_run(out, resume=True)
    _assert_states(_state(resumed), _state(straight), exact=True)

    # negative control: without its file the second moment starts again and the run is not the same
    _only_checkpoint_without(out, "checkpoint-3", RATE_METRIC_NAME)
    with pytest.warns(UserWarning, match="rate_metric.safetensors is missing"):
        broken = _metric_run(out, resume=True)
    assert broken._rate_metric.num_updates == 3
    assert not torch.equal(broken.rates.instance, straight.rates.instance)


def test_the_default_is_adams_metric_except_under_exact(tmp_path):
    """rate_metric='auto' (the default) takes the products in Adam's metric — the same run as an explicit 'adam' —
    and in the optimizer's under meta_strategy='exact', whose lookahead it differentiates."""
    assert MetaLRConfig(output_dir="unused").rate_metric == "auto"
    assert rate_metric_choice(MetaLRConfig(output_dir="unused")) == "adam"
    assert rate_metric_choice(MetaLRConfig(output_dir="unused", meta_strategy="exact")) == "optimizer"
    auto = _metric_run(str(tmp_path / "auto"), rate_metric="auto")
    adam = _metric_run(str(tmp_path / "adam"))
    optimizer = _metric_run(str(tmp_path / "optimizer"), rate_metric="optimizer")
    assert auto._rate_metric.num_updates == 6 and optimizer._rate_metric is None
    assert torch.equal(auto.rates.instance, adam.rates.instance)
    assert not torch.equal(auto.rates.instance, optimizer.rates.instance)
    assert auto.lr_trajectory.config["rate_metric"] == "adam" and "rate_metric" not in optimizer.lr_trajectory.config
    exact = _metric_run(str(tmp_path / "exact"), rate_metric="auto", meta_strategy="exact")
    assert exact._rate_metric is None


def test_a_coordinate_no_training_gradient_reached_is_left_out():
    """Where the second moment is exactly 0 (an embedding row never looked up by a training batch) the tangent is
    0, not the meta gradient times 1/eps; elsewhere it is divided by sqrt(v̂) + eps."""
    m = GradientSecondMoment()
    g = torch.tensor([[0.5, 0.0], [0.0, -2.0]])
    m.update({"emb": g})
    t = {"emb": torch.full((2, 2), 3.0)}
    m.precondition_(t)
    expected = torch.tensor([[3.0 / (0.5 + 1e-8), 0.0], [0.0, 3.0 / (2.0 + 1e-8)]])
    torch.testing.assert_close(t["emb"], expected)
    assert torch.isfinite(t["emb"]).all()
