"""The forward-mode pass that takes its conv / linear primal values from the real forward: the same dots as a
full forward-mode pass (BatchNorm, dropout, bias, the first layer without input tangent), the reused values
are really used, a pass that is not the recorded forward computes normally, and the trainer wires it in."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from test_meta_engine import _fwd_kw, _setup, cos
from tiny import make_split
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import hf_ddlr.meta.engine as engine
import hf_ddlr.schedules as schedules
from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.meta import frozen_batchnorm, meta_gradients, replay_rng
from hf_ddlr.meta.primal_reuse import Recorded, record_outputs


def _prepared():
    """The engine tests' BN + dropout CNN set-up, in train mode, taking its input as a keyword."""
    model, params, specs, window, meta = _setup()
    _fwd_kw(model)
    model.train()
    return model, params, specs, window, meta


def _recorded(model, mb):
    """The 'real forward' of ``mb`` (same seed, batch-statistics BN) with its layer outputs recorded."""
    with replay_rng(mb.seed), frozen_batchnorm(model), record_outputs(model) as rec:
        model(**mb.inputs)
    return rec


def test_reused_primals_give_the_same_dots_and_are_really_used():
    model, params, specs, window, meta = _prepared()
    T = {n: torch.randn_like(p) for n, p in params.items()}
    mb = window[0]
    ref = engine.jvp_dots(model, params, copy.deepcopy(mb), T)
    rec = _recorded(model, mb)
    assert {type(m).__name__ for m in rec} == {"BatchNorm2d", "Conv2d", "Linear"}
    reused = copy.copy(mb)
    reused.outputs = rec
    got = engine.jvp_dots(model, params, reused, T)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # negative control: wrong recorded primals change the dots, so they are what the pass used
    wrong = copy.copy(mb)
    wrong.outputs = {m: [Recorded(o * 1.5, 0) for o, *_ in outs if o is not None] for m, outs in rec.items()}
    assert cos(engine.jvp_dots(model, params, wrong, T), ref) < 0.999
    for m in rec:  # the layers are back to their own forward
        assert "forward" not in m.__dict__


def test_a_pass_that_is_not_the_recorded_forward_computes_normally():
    model, params, specs, window, meta = _prepared()
    T = {n: torch.randn_like(p) for n, p in params.items()}
    other = copy.copy(window[0])
    other.inputs = {"x": other.inputs["x"][:8]}
    other.labels = other.labels[:8]
    rec = _recorded(model, window[0])  # recorded on 16 examples, used on 8: batch dims differ
    ref = engine.jvp_dots(model, params, copy.copy(other), T)
    other.outputs = rec
    torch.testing.assert_close(engine.jvp_dots(model, params, other, T), ref)


def test_meta_gradients_with_reused_primals_match_exact():
    model, params, specs, window, meta = _prepared()
    ref = meta_gradients(model, params, copy.deepcopy(window), meta, specs, weight_decay=5e-4, normalizer=16,
                         strategy="exact")
    w = copy.deepcopy(window)
    w[0].outputs = _recorded(model, w[0])
    got = meta_gradients(model, params, w, meta, specs, weight_decay=5e-4, normalizer=16, strategy="jvp")
    assert cos(got.example_grad, ref.example_grad) >= 0.9999


class _ConvNet(nn.Module):
    """Conv + BatchNorm + dropout + linear head (BatchNorm: the per-layer products do not apply)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(96, 3)

    def forward(self, x, labels=None):
        h = self.drop(F.relu(self.bn(self.c(x.unsqueeze(1)))))
        return SequenceClassifierOutput(logits=self.fc(h.flatten(1)))


def test_trainer_reuses_the_real_forward_and_trains_as_without(tmp_path, monkeypatch):
    seen = []
    orig = engine.jvp_dots

    def spy(model, params, mb, *a, **k):
        seen.append(None if mb.outputs is None else sorted(type(m).__name__ for m in mb.outputs))
        return orig(model, params, mb, *a, **k)

    monkeypatch.setattr(engine, "jvp_dots", spy)
    common = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, optim="sgd",
                  learning_rate=0.3, lr_scheduler_type="constant", max_steps=4, per_device_train_batch_size=8,
                  lr_level="both", learn_weight_decay=True, weight_decay=0.01)

    def run(out):
        torch.manual_seed(0)
        t = MetaLRTrainer(model=_ConvNet(), args=MetaLRConfig(output_dir=str(out), **common),
                          train_dataset=make_split(32, seed=3, d_in=24), meta_dataset=make_split(16, seed=4, d_in=24))
        t.train()
        return t

    a = run(tmp_path / "a")
    # two sets of products per meta step (the average's for the instance rates, the step's own for the class
    # rates: class_rate_direction="per_step"), both from the real forward's outputs, then the probes' (no real
    # forward of theirs to reuse)
    rec = ["BatchNorm1d", "Conv1d", "Linear"]
    assert seen == [rec, rec, None] * 4 and a._layerwise == "off"
    assert all(mb.outputs is None for mb in a._window)  # released after the meta step
    seen.clear()
    monkeypatch.setattr(schedules, "record_outputs", lambda model: _NoRecording())
    b = run(tmp_path / "b")
    assert seen == [None] * 12
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(a.rates.instance, b.rates.instance)
    assert not torch.equal(a.rates.instance, torch.ones_like(a.rates.instance))


class _NoRecording:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = self.c(x)
        h.mul_(2.0)  # overwrites the conv's output in place
        return self.fc(torch.relu(h).flatten(1))


def test_outputs_overwritten_in_place_are_not_reused():
    torch.manual_seed(0)
    model = _InPlace()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    params = dict(model.named_parameters())
    T = {n: torch.randn_like(p) for n, p in params.items()}
    mb = engine.MicroBatch({"x": x}, y, torch.ones(6), seed=1)
    _fwd_kw(model)
    ref = engine.jvp_dots(model, params, copy.copy(mb), T)
    with record_outputs(model) as rec:
        model(x=x)
    conv_out, version = rec[model.c][0][:2]
    assert conv_out._version != version  # the recorded tensor now holds 2 × the conv's output
    mb.outputs = rec
    torch.testing.assert_close(engine.jvp_dots(model, params, mb, T), ref)


def test_reused_primals_under_bf16_autocast():
    model, params, specs, window, meta = _prepared()
    T = {n: torch.randn_like(p) * 1e-2 for n, p in params.items()}
    mb = window[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = engine.jvp_dots(model, params, copy.deepcopy(mb), T)
        reused = copy.copy(mb)
        reused.outputs = _recorded(model, mb)
        got = engine.jvp_dots(model, params, reused, T)
    assert cos(got, ref) > 0.999


def test_reuse_skips_layers_without_tangent_work():
    """A frozen layer (no weight tangent) and the first layer (no input tangent) still get the right tangent."""
    model, params, specs, window, meta = _prepared()
    model.c1.weight.requires_grad_(False)
    model.c1.bias.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    T = {n: torch.randn_like(p) for n, p in params.items()}
    mb = window[0]
    ref = engine.jvp_dots(model, params, copy.deepcopy(mb), T)
    reused = copy.copy(mb)
    reused.outputs = _recorded(model, mb)
    torch.testing.assert_close(engine.jvp_dots(model, params, reused, T), ref, rtol=1e-5,
                               atol=1e-6 * float(ref.abs().max()))


