"""instance_signal='other_classes': the instance rates' products without the own label's share over the head,
against brute force (a real optimizer step for θ', one backward per meta class and per training example)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_ddlr.meta import MetaBatch, MicroBatch, meta_gradients, param_specs
from hf_ddlr.meta.averaging import GradientSecondMoment, MetaGradientAverage

LR, N = 0.1, 16


class BNCNN(nn.Module):
    """Conv-BN body (batch statistics couple a batch's examples) and a linear head."""

    def __init__(self, nc=4):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, nc)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.b1(self.c1(x))), 2).flatten(1))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = BNCNN().train()
    x, y = torch.randn(72, 1, 8, 8), torch.randint(0, 4, (72,))
    w = torch.rand(N) + 0.5
    window = MicroBatch({"x": x[:N]}, y[:N], w, seed=1)
    probe = MicroBatch({"x": x[N:2 * N]}, y[N:2 * N], torch.zeros(N), seed=2)
    metas = [MetaBatch({"x": x[32:52]}, y[32:52], seed=3), MetaBatch({"x": x[52:]}, y[52:], seed=4)]
    return model, window, probe, metas


def _specs(model):
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return params, param_specs(opt, params, [], mode="optimizer")


def _example_grads(model, inputs, y):
    """∇ℓ_i of every example of a train-mode batch (BatchNorm couples them), one backward each, flattened."""
    out = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(**inputs), y, reduction="none")[i].backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(out)


def _lookahead_model(model, window):
    """θ': a real SGD step on a copy, with the window's weighted mean loss."""
    moved = copy.deepcopy(model)
    opt = torch.optim.SGD(moved.parameters(), lr=LR)
    (window.weights * F.cross_entropy(moved(**window.inputs), window.labels, reduction="none")).sum().div(N) \
        .backward()
    opt.step()
    return moved


def _meta_grads(moved, meta, num_classes=4):
    """The meta loss's gradient at θ' (all parameters) and each class's share of it (flattened)."""
    per_class = []
    for c in range(num_classes):
        moved.zero_grad()
        L = F.cross_entropy(moved(**meta.inputs), meta.labels, reduction="none")
        (L * (meta.labels == c)).sum().div(len(meta.labels)).backward()
        per_class.append(torch.cat([p.grad.flatten() for p in moved.parameters()]))
    return torch.stack(per_class)


def _head_mask(model):
    return torch.cat([torch.full((p.numel(),), n.startswith("fc.")) for n, p in model.named_parameters()])


def _expected(model, mb, G, metric_scale=None):
    """−(T·∇ℓ_i − T^{(y_i)}_head·∇_head ℓ_i)/N, with T = λ G summed over classes (times the metric's 1/scale)."""
    g = _example_grads(model, mb.inputs, mb.labels).double()
    T = LR * G.double()
    if metric_scale is not None:
        T = T * metric_scale.double()
    dots = g @ T.sum(0)
    own = ((g * _head_mask(model)) * T[mb.labels]).sum(1)
    return (-(dots - own) / N).float(), (-dots / N).float()


def test_other_classes_leaves_out_the_own_labels_head_share():
    model, window, probe, metas = _setup()
    params, specs = _specs(model)
    G = _meta_grads(_lookahead_model(model, window), metas[0])
    split, mean = _expected(model, window, G)
    probe_split, _ = _expected(model, probe, G)
    got = meta_gradients(model, params, [copy.deepcopy(window)], metas[0], specs, weight_decay=0.0, normalizer=N,
                         probes=[copy.deepcopy(probe)], instance_signal="other_classes")
    ref = meta_gradients(model, params, [copy.deepcopy(window)], metas[0], specs, weight_decay=0.0, normalizer=N)
    torch.testing.assert_close(ref.example_grad, mean, rtol=1e-4, atol=1e-7)
    assert (split - mean).abs().max() > 0.1 * mean.abs().max()  # the share left out is not negligible
    torch.testing.assert_close(got.example_grad, split, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.probe_grad, probe_split, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.dots, ref.dots)  # the products themselves stay the whole meta gradient's


def test_other_classes_with_finite_differences_and_features_of_the_real_forward():
    """The head's input and logits recorded by the real forward (``MicroBatch.features``) give the same split as the
    engine's own forward, and finite differences the same as forward mode (up to their rounding)."""
    model, window, _, metas = _setup(1)
    params, specs = _specs(model)
    G = _meta_grads(_lookahead_model(model, window), metas[0])
    split, _ = _expected(model, window, G)
    box = {}
    hook = model.fc.register_forward_hook(lambda m, i, o: box.update(h=i[0].detach(), logits=o.detach()))
    model(**window.inputs)
    hook.remove()
    recorded = copy.deepcopy(window)
    recorded.features = (box["h"], box["logits"])
    for mb, strategy, tol in [(recorded, "jvp", 1e-4), (copy.deepcopy(window), "finite_difference", 2e-2)]:
        got = meta_gradients(model, params, [mb], metas[0], specs, weight_decay=0.0, normalizer=N,
                             strategy=strategy, instance_signal="other_classes")
        torch.testing.assert_close(got.example_grad, split, rtol=tol, atol=tol * float(split.abs().max()))


def test_other_classes_averages_the_class_shares_with_the_meta_gradient_and_takes_the_metric():
    """With the meta-gradient average, the own label's share is that of the averaged per-class gradients (two meta
    batches, β = 0.5); with the rate metric, every share is in its units."""
    model, window, _, metas = _setup(2)
    params, specs = _specs(model)
    moved = _lookahead_model(model, window)
    G = 0.5 * _meta_grads(moved, metas[0]) + 0.5 * _meta_grads(moved, metas[1])
    average, metric = MetaGradientAverage(0.5), GradientSecondMoment()
    for meta in metas:
        got = meta_gradients(model, params, [copy.deepcopy(window)], meta, specs, weight_decay=0.0, normalizer=N,
                             average=average, metric=metric, instance_signal="other_classes")
    ones = {n: torch.ones_like(p) for n, p in params.items()}
    metric.precondition_(ones)  # the metric's 1/(sqrt(v̂) + eps), as its own tests check it
    split, mean = _expected(model, window, G, torch.cat([v.flatten() for v in ones.values()]))
    assert (split - mean).abs().max() > 0.1 * mean.abs().max()
    torch.testing.assert_close(got.example_grad, split, rtol=1e-4, atol=1e-7)
    assert any("<own class head>." in k for k in average.state_dict())  # saved with the average


class TokenHead(nn.Module):
    """A head that scores every token, the logits kept at each sequence's last real token afterwards (as a
    decoder-only *ForSequenceClassification does)."""

    def __init__(self, nc=4):
        super().__init__()
        self.l1, self.fc = nn.Linear(5, 6), nn.Linear(6, nc)

    def forward(self, x, last):
        out = self.fc(torch.tanh(self.l1(x)))  # [batch, tokens, classes]
        return out[torch.arange(x.shape[0]), last]


def test_other_classes_takes_the_pooled_tokens_input_of_a_head_that_scores_every_token():
    torch.manual_seed(3)
    model = TokenHead()
    x, y, last = torch.randn(52, 7, 5), torch.randint(0, 4, (52,)), torch.randint(2, 7, (52,))
    window = MicroBatch({"x": x[:N], "last": last[:N]}, y[:N], torch.rand(N) + 0.5, seed=1)
    meta = MetaBatch({"x": x[32:], "last": last[32:]}, y[32:], seed=3)
    params, specs = _specs(model)
    G = _meta_grads(_lookahead_model(model, window), meta)
    split, mean = _expected(model, window, G)
    assert (split - mean).abs().max() > 0.1 * mean.abs().max()
    got = meta_gradients(model, params, [copy.deepcopy(window)], meta, specs, weight_decay=0.0, normalizer=N,
                         instance_signal="other_classes")
    torch.testing.assert_close(got.example_grad, split, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("strategy", ["exact", "last_layer"])
def test_other_classes_names_the_strategies_it_takes(strategy):
    model, window, _, metas = _setup()
    params, specs = _specs(model)
    with pytest.raises(ValueError, match="instance_signal='other_classes' is taken with meta_strategy='jvp'"):
        meta_gradients(model, params, [window], metas[0], specs, weight_decay=0.0, normalizer=N, strategy=strategy,
                       instance_signal="other_classes")


def test_other_classes_needs_the_head_in_the_lookahead():
    model, window, _, metas = _setup()
    params, specs = _specs(model)
    with pytest.raises(ValueError, match="does not move 'fc.weight'"):
        meta_gradients(model, params, [window], metas[0], specs, weight_decay=0.0, normalizer=N,
                       meta_params=["c1.weight", "c1.bias"], instance_signal="other_classes")


# ---------------------------------------------------------------- the trainer's option
def _trainer(tmp_path, **kw):
    from tiny import TinyMLP, make_split

    from hf_ddlr import MetaLRConfig, MetaLRTrainer

    args = MetaLRConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                        seed=0, max_steps=4, per_device_train_batch_size=12, learning_rate=0.1, optim="sgd", **kw)
    torch.manual_seed(0)
    return MetaLRTrainer(model=TinyMLP(bn=True, dropout=0.2), args=args,
                         train_dataset=make_split(48, seed=1, noise=0.3), meta_dataset=make_split(12, seed=2))


def test_the_trainer_takes_the_split_from_its_real_forward(tmp_path, monkeypatch):
    """The head's input and logits the real forward records (BatchNorm's batch, its dropout masks) give the split
    the engine's own replaying forward gives; the split moves the rates, is recorded with the run, and its class
    shares are saved with the meta-gradient average."""
    import hf_ddlr.schedules as schedules

    original, seen = schedules.meta_gradients, []

    def both(model, params, window, meta, specs, **kw):
        spare = {k: copy.deepcopy(kw[k]) for k in ("average", "metric")}
        bare = [copy.copy(mb) for mb in window]
        for mb in bare:
            mb.features = None
        res = original(model, params, window, meta, specs, **kw)
        alone = original(model, params, bare, meta, specs, **{**kw, **spare})
        seen.append((all(mb.features is not None for mb in window), res.example_grad, alone.example_grad))
        return res

    monkeypatch.setattr(schedules, "meta_gradients", both)
    t = _trainer(tmp_path / "split")  # the default resolves to the split for a single-label classifier
    t.train()
    assert len(seen) == 4 and all(recorded for recorded, _, _ in seen)
    for _, got, ref in seen:
        torch.testing.assert_close(got, ref)
    config = t.lr_trajectory.config
    assert (config["instance_signal"], config["center_instance_rates"], config["instance_rate_center"]) == \
        ("other_classes", True, "median")
    assert (t.rates.center_instance, t.rates.center) == (True, "median")
    assert any("<own class head>." in k for k in t._meta_grad_average.state_dict())
    monkeypatch.setattr(schedules, "meta_gradients", original)
    mean = _trainer(tmp_path / "mean", instance_signal="mean")
    mean.train()
    assert not {"instance_signal", "center_instance_rates", "instance_rate_center"} & set(mean.lr_trajectory.config)
    assert (mean.rates.center_instance, mean.rates.center) == (False, "mean")
    assert not torch.allclose(t.rates.instance, mean.rates.instance)


def test_the_option_names_what_it_needs(tmp_path):
    from hf_ddlr import MetaLRConfig

    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="instance_signal='other_classes' changes .* no instance rates"):
        MetaLRConfig(**common, lr_level="class", instance_signal="other_classes")
    with pytest.raises(ValueError, match="taken with meta_strategy='jvp' or 'finite_difference', not 'exact'"):
        MetaLRConfig(**common, meta_strategy="exact", instance_signal="other_classes")
    with pytest.raises(ValueError, match="instance_signal='worst' is not valid"):
        MetaLRConfig(**common, instance_signal="worst")


@pytest.mark.parametrize("bias", [True, False])
def test_own_class_products_gathered_or_per_label_are_each_rows_own_tangent(bias):
    from hf_ddlr.meta.class_split import own_class_products

    torch.manual_seed(0)
    TW, Tb = torch.randn(5, 3, 4), torch.randn(5, 3) if bias else None
    h, d, labels = torch.randn(9, 4), torch.randn(9, 3), torch.tensor([4, 0, 0, 2, 4, 4, 1, 0, 2])
    want = torch.stack([d[i] @ TW[labels[i]] @ h[i] + (d[i] @ Tb[labels[i]] if bias else 0) for i in range(9)])
    torch.testing.assert_close(own_class_products(TW, Tb, h, d, labels), want)
    torch.testing.assert_close(own_class_products(TW, Tb, h, d, labels, gather_limit=0), want)


def test_auto_takes_the_split_only_where_it_applies(tmp_path):
    """instance_signal='auto' (the default): the other classes' share for a single-label classifier whose trained
    head the lookahead moves, the mean product otherwise; an explicit 'other_classes' on a task without one class per
    example is refused at construction."""
    from tiny import TinyConfig, TinyPreTrained, make_split

    from hf_ddlr import MetaLRConfig, MetaLRTrainer
    from hf_ddlr._meta_parameters import instance_signal_choice

    assert instance_signal_choice(_trainer(tmp_path / "a")) == "other_classes"
    assert instance_signal_choice(_trainer(tmp_path / "b", meta_strategy="last_layer")) == "mean"
    frozen = _trainer(tmp_path / "c")
    frozen.model.l2.weight.requires_grad_(False)
    assert instance_signal_choice(frozen) == "mean"
    assert instance_signal_choice(_trainer(tmp_path / "d", meta_parameters="l1")) == "mean"  # the head not looked at

    def regression(**kw):
        ds = make_split(24, seed=1).map(lambda r: {"label": float(r["label"])})
        args = MetaLRConfig(output_dir=str(tmp_path / "r"), report_to=[], use_cpu=True, max_steps=1, **kw)
        return MetaLRTrainer(model=TinyPreTrained(TinyConfig(num_labels=1)), args=args, train_dataset=ds,
                             meta_dataset=ds.select(range(8)))

    t = regression()
    assert t._task.task == "regression" and instance_signal_choice(t) == "mean"
    assert (t.rates.center_instance, t.rates.center) == (False, "mean")
    with pytest.raises(ValueError, match="instance_signal='other_classes' splits the meta gradient by the meta "
                                         "examples' single class label; the model's task is regression"):
        regression(instance_signal="other_classes")
