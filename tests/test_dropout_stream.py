"""Dropout under MetaLRTrainer: the real forward draws its masks from the run's own random stream, as the Trainer's
does, and the meta step's passes replay exactly those masks."""

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F
from tiny import TinyMLP, make_split
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_ddlr import MetaLRConfig, MetaLRTrainer

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
WAYS = {
    "same_step, forward mode": dict(layerwise_dots=False),
    "same_step, per-layer products": dict(layerwise_dots=True),
    "same_step, finite differences": dict(meta_strategy="finite_difference"),
    "delayed, forward mode": dict(meta_update="delayed", layerwise_dots=False),
    "delayed, accumulation of 2": dict(meta_update="delayed", gradient_accumulation_steps=2),
    "same_step, last layer": dict(meta_strategy="last_layer"),
    # the meta step before the window's real forwards: the states they start from, learned from its passes
    "same_step, accumulation of 2": dict(gradient_accumulation_steps=2),
    "same_step, accumulation of 2, finite differences": dict(gradient_accumulation_steps=2,
                                                             meta_strategy="finite_difference"),
    "same_step, accumulation of 3, last layer": dict(gradient_accumulation_steps=3, meta_strategy="last_layer"),
    "exact": dict(meta_strategy="exact", rate_metric="optimizer"),
    "exact, accumulation of 2": dict(meta_strategy="exact", rate_metric="optimizer", gradient_accumulation_steps=2),
}


def _paper_rule(logits, theta: dict, window: tuple, meta: tuple, lam: float, meta_lr: float) -> torch.Tensor:
    """The rates after one step of the paper's rule from 1, by hand: each example's gradient taken alone with its
    recorded dropout mask (``logits(params, x, mask)``), the lookahead of the plain SGD step at rate ``lam`` over
    the window, the meta loss's gradient there (no dropout), and ``1 + meta_lr · (lam / N) · ∇L_i · ∇L_meta``."""
    x, y, mask = window
    xm, ym = meta
    grads = []
    for i in range(x.shape[0]):
        leaf = {n: v.clone().requires_grad_() for n, v in theta.items()}
        loss = F.cross_entropy(logits(leaf, x[i : i + 1], mask[i : i + 1]), y[i : i + 1])
        grads.append(dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values())))))
    N = x.shape[0]
    look = {n: (theta[n] - lam * sum(g[n] for g in grads) / N).requires_grad_() for n in theta}
    g_meta = dict(zip(look, torch.autograd.grad(F.cross_entropy(logits(look, xm), ym), list(look.values()))))
    dots = torch.stack([sum((g[n] * g_meta[n]).sum() for n in theta) for g in grads])
    return (1 + meta_lr * (lam / N) * dots).clamp(min=0)


@pytest.mark.parametrize("way", list(WAYS))
def test_at_rates_one_a_dropout_model_trains_as_the_trainer_does_masks_included(tmp_path, way):
    """meta_lr=0: every weight bit-equal to a plain Trainer's run of the same seed — which holds only if each real
    forward drew the Trainer's dropout masks and the meta step's passes drew nothing from the run's stream."""
    train, meta = make_split(64, seed=3), make_split(16, seed=5)
    accumulation = WAYS[way].get("gradient_accumulation_steps", 1)
    common = dict(per_device_train_batch_size=8, num_train_epochs=2, learning_rate=0.05, optim="adamw_torch",
                  gradient_accumulation_steps=accumulation, **COMMON)
    meta_options = {k: v for k, v in WAYS[way].items() if k != "gradient_accumulation_steps"}
    torch.manual_seed(0)
    plain = TinyMLP(bn=True, dropout=0.3)
    ours = copy.deepcopy(plain)
    Trainer(model=plain, args=TrainingArguments(output_dir=str(tmp_path / "p"), **common), train_dataset=train).train()
    t = MetaLRTrainer(model=ours, args=MetaLRConfig(output_dir=str(tmp_path / "m"), meta_lr=0.0, **meta_options,
                                                    **common), train_dataset=train, meta_dataset=meta)
    t.train()
    assert t.state.global_step == 2 * -(-8 // accumulation)  # (3: the last window of an epoch is shorter)
    assert (t.rates.instance == 1).all()
    for (n, a), (_, b) in zip(plain.state_dict().items(), ours.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("way", [w for w in WAYS if "per-layer" not in w and "last layer" not in w])
def test_the_meta_gradient_replays_the_masks_the_real_forward_drew(tmp_path, way, monkeypatch):
    """One step with dropout at 0.5: each example's rate moved by the paper's rule on ``−∂L_meta/∂e_i`` computed by
    hand from per-example gradients taken with the masks the real forwards drew (recorded from the model's dropout
    layer inside the Trainer's training_step), at the lookahead of the plain SGD step over the window (the meta loss
    without dropout, as by default)."""
    lam, meta_lr, p = 0.5, 20.0, 0.5
    accumulation = WAYS[way].get("gradient_accumulation_steps", 1)
    train, meta = make_split(24, seed=1), make_split(10, seed=2)
    torch.manual_seed(0)
    model = TinyMLP(dropout=p)
    start = copy.deepcopy(model)
    masks, real = [], [False]
    training_step = Trainer.training_step

    def real_step(self, *a, **kw):  # the Trainer's own step: its forward is the real one
        real[0] = True
        try:
            return training_step(self, *a, **kw)
        finally:
            real[0] = False

    monkeypatch.setattr(Trainer, "training_step", real_step)

    def record(module, inputs, output):
        if module.training and torch.is_grad_enabled() and real[0]:
            x = inputs[0].detach()
            masks.append(torch.where(x != 0, output.detach() / torch.where(x != 0, x, 1), 0.0))
            real[0] = False  # (a fused meta step's passes run later inside this step)

    model.drop.register_forward_hook(record)
    args = MetaLRConfig(output_dir=str(tmp_path), per_device_train_batch_size=24 // accumulation, max_steps=1,
                        learning_rate=lam, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                        meta_lr=meta_lr, meta_lr_scaling="raw", max_instance_rate=None, probe_batches=0,
                        meta_batch_size=10, lookahead="sgd", max_grad_norm=0.0, instance_signal="mean",
                        **{"rate_metric": "optimizer", **WAYS[way]}, **COMMON)
    trainer = MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta)
    trainer.train()
    assert len(masks) == accumulation
    mask = torch.cat(masks)
    assert set(torch.unique(mask).tolist()) <= {0.0, 1 / (1 - p)} and (mask == 0).float().mean() > 0.2

    rows = torch.cat([mb.indices for mb in trainer._window])  # the window's dataset rows, in the masks' order
    x, y = torch.tensor(train["x"])[rows], torch.tensor(train["label"])[rows]
    xm, ym = torch.tensor(meta["x"]), torch.tensor(meta["label"])
    theta = {n: q.detach() for n, q in start.named_parameters()}

    def logits(params, inputs, m=None):
        h = F.relu(inputs @ params["l1.weight"].T + params["l1.bias"])
        return (h if m is None else h * m) @ params["l2.weight"].T + params["l2.bias"]

    expect = _paper_rule(logits, theta, (x, y, mask), (xm, ym), lam, meta_lr)
    assert (expect - 1).abs().max() > 0.05  # the rates really moved
    tol = 1e-2 if "finite" in way else 1e-4  # (a finite difference in float32)
    torch.testing.assert_close(trainer.rates.instance[rows], expect, rtol=tol, atol=tol)


def test_a_dropout_run_resumed_mid_epoch_ends_bit_for_bit_where_it_would_have(tmp_path):
    """The masks come from the run's stream, which the Trainer checkpoints and restores: a run stopped after 3 of 8
    steps (mid-epoch) and resumed ends with the straight run's weights and rates."""
    from transformers import TrainerCallback

    train, meta = make_split(32, seed=3), make_split(16, seed=5)

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    def run(out, stop=False, resume=False):
        torch.manual_seed(0)
        args = MetaLRConfig(output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=0.05,
                            optim="adamw_torch", save_steps=3, **{**COMMON, "save_strategy": "steps"})
        t = MetaLRTrainer(model=TinyMLP(bn=True, dropout=0.3), args=args, train_dataset=train, meta_dataset=meta)
        if stop:
            t.add_callback(StopAt())
        t.train(resume_from_checkpoint=resume or None)
        return t

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop=True)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.state.global_step == straight.state.global_step == 8
    assert not torch.equal(straight.rates.instance, torch.ones_like(straight.rates.instance))
    assert torch.equal(resumed.rates.instance, straight.rates.instance)
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


class _ConvDropout(nn.Module):
    """conv 3×3 → ReLU → elementwise dropout on the feature maps → linear: a mask drawn over a 4-D activation,
    whose order in memory is the layout's (a channels-last pass draws the same numbers into other places)."""

    def __init__(self, p: float):
        super().__init__()
        self.conv, self.drop, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(p), nn.Linear(4 * 5 * 5, 3)

    def forward(self, pixel_values, labels=None):
        return SequenceClassifierOutput(logits=self.fc(self.drop(F.relu(self.conv(pixel_values))).flatten(1)))


def _images(n: int, seed: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 5, 5, generator=g) + y[:, None, None, None].float()
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()})


@pytest.mark.parametrize("layerwise", [False, True])
def test_a_convolutional_dropout_model_gets_the_meta_gradient_of_its_real_masks(tmp_path, layerwise):
    """Dropout over convolutional feature maps, on CPU, where the meta passes may run channels-last: each rate moves
    by the paper's rule on ``−∂L_meta/∂e_i`` computed by hand with the masks the real forward drew. A pass that ran
    channels-last would draw its mask into the other memory order (other masks for the same numbers)."""
    lam, meta_lr, p = 0.5, 20.0, 0.5
    train, meta = _images(16, 1), _images(8, 2)
    torch.manual_seed(0)
    model = _ConvDropout(p)
    start = copy.deepcopy(model)
    masks = []

    def record(module, inputs, output):
        if module.training and torch.is_grad_enabled() and not masks:  # the step's first forward: the real one
            x = inputs[0].detach()
            masks.append(torch.where(x != 0, output.detach() / torch.where(x != 0, x, 1), 0.0))

    model.drop.register_forward_hook(record)
    args = MetaLRConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=1, learning_rate=lam,
                        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, meta_lr=meta_lr,
                        meta_lr_scaling="raw", max_instance_rate=None, probe_batches=0, rate_metric="optimizer",
                        meta_batch_size=8, lookahead="sgd", max_grad_norm=0.0, layerwise_dots=layerwise,
                        instance_signal="mean", **COMMON)
    trainer = MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta)
    trainer.train()
    (mask,) = masks
    assert (mask == 0).float().mean() > 0.3

    rows = trainer._window[0].indices
    x, y = torch.tensor(train["pixel_values"])[rows], torch.tensor(train["labels"])[rows]
    xm, ym = torch.tensor(meta["pixel_values"]), torch.tensor(meta["labels"])
    theta = {n: q.detach() for n, q in start.named_parameters()}

    def logits(params, inputs, m=None):
        h = F.relu(F.conv2d(inputs, params["conv.weight"], params["conv.bias"], padding=1))
        return ((h if m is None else h * m).flatten(1)) @ params["fc.weight"].T + params["fc.bias"]

    expect = _paper_rule(logits, theta, (x, y, mask), (xm, ym), lam, meta_lr)
    assert (expect - 1).abs().max() > 0.05  # the rates really moved
    torch.testing.assert_close(trainer.rates.instance[rows], expect, rtol=1e-4, atol=1e-4)
