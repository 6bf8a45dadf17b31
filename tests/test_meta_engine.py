"""The meta-gradient engine against an exact double-backward reference (pure torch, no Trainer)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_ddlr.meta import MetaBatch, MicroBatch, meta_gradients, param_specs, per_example_loss, replay_rng


class BNDropCNN(nn.Module):
    def __init__(self, nc=5):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8 * 4 * 4, nc)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.fc(self.drop(x.flatten(1)))


def cos(a, b):
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def _setup(seed=0, opt="sgd", steps=3):
    torch.manual_seed(seed)
    model = BNDropCNN()
    x, y = torch.randn(48, 1, 16, 16), torch.randint(0, 5, (48,))
    if opt == "sgd":
        o = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        o = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):  # some optimizer state, so the optimizer-aware lookahead is non-trivial
        o.zero_grad()
        F.cross_entropy(model(x[:16]), y[:16]).backward()
        o.step()
    params = dict(model.named_parameters())
    decay = [n for n in params if n.endswith("weight") and ".b" not in n and not n.startswith("b")]
    specs = param_specs(o, params, decay, mode="optimizer")
    w = torch.rand(16) + 0.5
    window = [MicroBatch({"x": x[16:32]}, y[16:32], w, seed=123)]
    meta = MetaBatch({"x": x[32:]}, y[32:], seed=7)
    return model, params, specs, window, meta


def _fwd_kw(model):  # our test model takes a positional x; expose it as keyword
    orig = model.forward
    model.forward = lambda x: orig(x)
    return model


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("strategy", ["jvp", "finite_difference"])
def test_strategy_matches_exact_double_backward(opt, strategy):
    model, params, specs, window, meta = _setup(opt=opt)
    _fwd_kw(model)
    model.train()
    ref = meta_gradients(model, params, copy.deepcopy(window), meta, specs, weight_decay=5e-4, normalizer=16,
                         strategy="exact")
    got = meta_gradients(model, params, copy.deepcopy(window), meta, specs, weight_decay=5e-4, normalizer=16,
                         strategy=strategy)
    assert ref.example_grad.abs().max() > 0
    c = cos(got.example_grad, ref.example_grad)
    # a one-sided difference in fp32 is limited by rounding (cosine 0.99984 to 0.99996 here, depending on the
    # thread count's summation order); tests/test_lookahead_optimizers.py checks it tightly in float64
    assert c >= (0.999 if strategy == "finite_difference" else 0.9999), c
    assert got.weight_decay_grad == pytest.approx(ref.weight_decay_grad, rel=1e-3, abs=1e-12)
    assert got.meta_loss == pytest.approx(ref.meta_loss, rel=1e-5)


def test_dropout_replay_matters():
    """Without replaying the real forward's dropout masks the dots are wrong: the test would catch it."""
    model, params, specs, window, meta = _setup()
    _fwd_kw(model)
    model.train()
    ref = meta_gradients(model, params, copy.deepcopy(window), meta, specs, weight_decay=5e-4, normalizer=16,
                         strategy="exact")
    w2 = copy.deepcopy(window)
    got = meta_gradients(model, params, w2, meta, specs, weight_decay=5e-4, normalizer=16, strategy="jvp")
    # a different seed for the jvp pass only = masks not replayed
    from hf_ddlr.meta import engine
    from hf_ddlr.meta.lookahead import lookahead, tangent
    theta = lookahead({n: p.detach() for n, p in params.items()},
                                engine.lookahead_gradient(model, params, copy.deepcopy(window), 16), specs, 5e-4)
    _, gm = engine.meta_loss_gradient(model, theta, meta)
    T = tangent(gm, specs)
    bad_mb = copy.deepcopy(window[0])
    bad_mb.seed = 999
    bad = -engine.jvp_dots(model, params, bad_mb, T) / 16
    assert cos(got.example_grad, ref.example_grad) > 0.9999
    assert cos(bad, ref.example_grad) < 0.999


def test_batchnorm_running_stats_untouched_by_meta_step():
    model, params, specs, window, meta = _setup()
    plain = copy.deepcopy(model)
    _fwd_kw(model)
    model.train()
    for strategy in ["jvp", "finite_difference", "exact", "last_layer"]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        meta_gradients(model, params, copy.deepcopy(window), meta, specs, weight_decay=5e-4, normalizer=16,
                       strategy=strategy)
        after = model.state_dict()
        for k in before:
            assert torch.equal(before[k], after[k]), (strategy, k)
    # and the real step after a meta step updates the running stats exactly as a plain step does
    torch.manual_seed(1)
    model(window[0].inputs["x"])
    torch.manual_seed(1)
    plain(window[0].inputs["x"])
    for (k, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), k


def test_last_layer_equals_exact_restricted_to_head():
    """The closed form equals the double backward when only the head moves in the lookahead."""
    model, params, specs, window, meta = _setup()
    _fwd_kw(model)
    model.eval()  # no dropout, running-stat BN: the body is a fixed feature map
    head = {n: p for n, p in params.items() if n.startswith("fc.")}
    ref = meta_gradients(model, head, copy.deepcopy(window), meta, specs, weight_decay=5e-4, normalizer=16,
                         strategy="exact")
    got = meta_gradients(model, params, copy.deepcopy(window), meta, specs, weight_decay=5e-4, normalizer=16,
                         strategy="last_layer")
    assert cos(got.example_grad, ref.example_grad) > 0.99999
    assert got.weight_decay_grad == pytest.approx(ref.weight_decay_grad, rel=1e-4)


def test_the_weight_decay_meta_gradient_is_skipped_when_not_learned(monkeypatch):
    """Not learned: no weight-decay meta-gradient (a float64 pass and a host synchronisation) for any strategy that
    computes it apart, and the same example gradients as when it is."""
    import hf_ddlr.meta.engine as engine

    model, params, specs, window, meta = _setup()
    _fwd_kw(model)
    model.train()
    for strategy in ("last_layer", "jvp", "finite_difference"):
        kw = dict(weight_decay=5e-4, normalizer=16, strategy=strategy)
        ref = meta_gradients(model, params, copy.deepcopy(window), meta, specs, **kw)
        assert ref.weight_decay_grad != 0.0, strategy
        calls: list = []
        monkeypatch.setattr(engine, "weight_decay_grad", lambda *a, calls=calls, **k: calls.append(a) or 1.0)
        got = meta_gradients(model, params, copy.deepcopy(window), meta, specs, weight_decay_grad_needed=False, **kw)
        monkeypatch.undo()
        assert calls == [] and got.weight_decay_grad == 0.0, strategy
        torch.testing.assert_close(got.example_grad, ref.example_grad, msg=strategy)


def test_last_layer_refuses_a_head_that_runs_per_token():
    class PerToken(nn.Module):  # like a decoder-only *ForSequenceClassification: score every token, then pool
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))[:, -1]

    torch.manual_seed(0)
    model = PerToken()
    params = dict(model.named_parameters())
    specs = param_specs(torch.optim.SGD(model.parameters(), lr=0.1), params, [], mode="sgd")
    window = [MicroBatch({"x": torch.randn(6, 5, 4)}, torch.randint(0, 3, (6,)), torch.ones(6), seed=1)]
    meta = MetaBatch({"x": torch.randn(6, 5, 4)}, torch.randint(0, 3, (6,)), seed=2)
    with pytest.raises(ValueError, match="one feature vector per example.*meta_strategy='jvp'"):
        meta_gradients(model, params, window, meta, specs, weight_decay=0.0, normalizer=6, strategy="last_layer")
    jvp = meta_gradients(model, params, window, meta, specs, weight_decay=0.0, normalizer=6, strategy="jvp")
    assert jvp.finite


def test_per_example_loss_rejects_non_classification_logits():
    with pytest.raises(ValueError, match="single-label classification"):
        per_example_loss(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))


def test_meta_package_imports_only_torch_and_itself():
    """`meta/` stays reusable without transformers: its modules import nothing but stdlib, torch and meta."""
    import ast
    import pathlib
    import sys

    import hf_ddlr.meta as meta_pkg

    allowed_roots = {"torch", "__future__"} | set(sys.stdlib_module_names)
    for path in pathlib.Path(meta_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 1:
                    raise AssertionError(f"{path.name} imports outside meta/ ({'.' * node.level}{node.module})")
                roots = [] if node.level == 1 else [node.module.split(".")[0]]
            else:
                continue
            for r in roots:
                assert r in allowed_roots, f"{path.name} imports {r}"


def test_meta_loss_is_a_validation_loss_unless_meta_dropout():
    """By default the meta loss has dropout off but BatchNorm on batch statistics; meta_dropout keeps dropout."""
    from hf_ddlr.meta.engine import meta_loss_gradient

    model, params, specs, window, meta = _setup()
    _fwd_kw(model)
    model.train()
    theta = {n: p.detach() for n, p in params.items()}

    def loss(m):
        return meta_loss_gradient(model, theta, m)[0]

    no_drop = [loss(MetaBatch(meta.inputs, meta.labels, seed=s)) for s in (1, 2)]
    assert no_drop[0] == no_drop[1]  # no randomness left
    with torch.no_grad():  # the same as dropout off by hand, BN still in batch mode (running stats not used)
        model.drop.eval()
        ref = float(per_example_loss(model(**meta.inputs), meta.labels).mean())
        model.drop.train()
    assert no_drop[0] == pytest.approx(ref, rel=1e-6)
    with torch.no_grad():
        model.eval()
        full_eval = float(per_example_loss(model(**meta.inputs), meta.labels).mean())
        model.train()
    assert abs(full_eval - no_drop[0]) > 1e-4  # BatchNorm was not switched to running statistics
    with_drop = [loss(MetaBatch(meta.inputs, meta.labels, seed=s, dropout=True)) for s in (1, 2)]
    assert with_drop[0] != with_drop[1] and with_drop[0] != no_drop[0]
    assert all(m.training for m in model.modules())  # every flag restored


def test_replay_rng_draws_what_torch_manual_seed_draws_and_restores_the_outer_stream():
    """Dropout masks replayed across the passes of a micro-batch are those of ``torch.manual_seed(seed)`` (the
    real forward's), and the run's own random stream continues as if the block had not run."""
    torch.manual_seed(123)
    expected_outer = torch.rand(4)
    torch.manual_seed(7)
    expected_inner = torch.rand(6)
    torch.manual_seed(123)
    with replay_rng(7):
        inner = torch.rand(6)
        with replay_rng(7):
            again = torch.rand(6)
    outer = torch.rand(4)
    assert torch.equal(inner, expected_inner) and torch.equal(again, expected_inner)
    assert torch.equal(outer, expected_outer)
    with replay_rng(8):
        assert not torch.equal(torch.rand(6), expected_inner)


class CheckpointedMLP(nn.Module):
    """A block checkpointed whenever the model trains with the flag on, with or without gradients recorded: the
    pattern of transformers before 5.24 and of many remote-code models. Dropout inside the checkpoint; a layer before
    it, so that the checkpoint's input carries a tangent."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.embed = nn.Linear(6, 6)
        self.block = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 3)
        self.gradient_checkpointing = True

    def forward(self, x):
        x = self.embed(x)
        if self.gradient_checkpointing and self.training:
            h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)
        else:
            h = self.block(x)
        return self.head(h)


def test_forward_mode_runs_checkpointed_layers_as_they_are():
    """torch's checkpoint has no forward-mode rule, and a pass without a backward has nothing to checkpoint for: the
    dots of a checkpointing model are those of the same model without checkpointing (double backward, same masks),
    and its flag is on again afterwards. (Without a recorded graph torch 2.13's non-reentrant checkpoint runs the
    layer as is by itself, torch 2.7's does not: the reentrant test below fails on both without the fix.)"""
    torch.manual_seed(0)
    model = CheckpointedMLP(reentrant=False).train()
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    params = dict(model.named_parameters())
    specs = param_specs(torch.optim.SGD(model.parameters(), lr=0.1), params, ["block.0.weight", "head.weight"],
                        mode="optimizer")
    window = [MicroBatch({"x": x[:12]}, y[:12], torch.rand(12) + 0.5, seed=5)]
    meta = MetaBatch({"x": x[12:]}, y[12:], seed=9)

    def run(strategy, checkpointing):
        model.gradient_checkpointing = checkpointing
        return meta_gradients(model, params, copy.deepcopy(window), meta, specs, weight_decay=0.0, normalizer=12,
                              strategy=strategy)

    ref = run("exact", False)
    got = run("jvp", True)
    assert model.gradient_checkpointing is True
    assert ref.example_grad.abs().max() > 0
    assert cos(got.example_grad, ref.example_grad) > 0.9999
    torch.testing.assert_close(got.example_grad, ref.example_grad, rtol=1e-4, atol=1e-7)


def test_forward_mode_dots_of_a_reentrant_checkpoint():
    """The reentrant checkpoint (``use_reentrant=True``, which a model may still pass) has no forward-mode rule on any
    torch: the per-example dots are computed with the layer run as is, equal to those with checkpointing off."""
    from hf_ddlr.meta import engine

    torch.manual_seed(1)
    model = CheckpointedMLP(reentrant=True).train()
    params = dict(model.named_parameters())
    T = {n: torch.randn_like(p) for n, p in params.items()}
    mb = MicroBatch({"x": torch.randn(10, 6)}, torch.randint(0, 3, (10,)), torch.ones(10), seed=3)
    model.gradient_checkpointing = False
    ref = engine.jvp_dots(model, params, copy.deepcopy(mb), T)
    model.gradient_checkpointing = True
    got = engine.jvp_dots(model, params, copy.deepcopy(mb), T)
    assert model.gradient_checkpointing is True and ref.abs().max() > 0
    torch.testing.assert_close(got, ref)
