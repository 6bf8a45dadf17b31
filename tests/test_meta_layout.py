"""The meta batch's images channels-last on CPU: the conversion reaches the convolutions (one channel too), the
meta loss and its gradient are those of the given layout, models whose forward depends on the layout are found
by the first step's check and keep their layout, and the trainer wires it in."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.meta import MetaBatch, MicroBatch, frozen_batchnorm, replay_rng
from hf_ddlr.meta.engine import jvp_dots, meta_loss_gradient
from hf_ddlr.meta.layout import MetaLayout, channel_block, channels_last_inputs, unsafe_convolution
from hf_ddlr.meta.primal_reuse import Recorded, record_outputs

CL = torch.channels_last


class _Net(nn.Module):
    """conv-BN-ReLU-maxpool ×2 and a linear head; ``flatten``: how the head's input is made."""

    def __init__(self, channels: int = 3, flatten: str = "flatten"):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 2 * 2, 4)
        self.flatten = flatten
        self.seen: list[bool] = []  # whether the first convolution's output was channels-last, per forward

    def forward(self, pixel_values, labels=None):
        h = self.c1(pixel_values)
        self.seen.append(h.is_contiguous(memory_format=CL) and not h.is_contiguous())
        h = F.max_pool2d(F.relu(self.b1(h)), 2)
        h = F.max_pool2d(F.relu(self.b2(self.c2(h))), 2)
        if self.flatten == "view":  # a .view of an activation: fails on a channels-last one
            h = h.view(h.shape[0], -1)
        elif self.flatten == "strides":  # reads the memory order: other values on a channels-last activation
            h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1) if not h.is_contiguous() else h.flatten(1)
        else:
            h = h.flatten(1)
        return SequenceClassifierOutput(logits=self.fc(h))


def _batch(channels: int = 3, n: int = 16, seed: int = 0) -> MetaBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 8, 8, generator=g)
    return MetaBatch({"pixel_values": x}, torch.randint(0, 4, (n,), generator=g), seed=1)


def test_images_become_channels_last_and_reach_the_convolutions_with_one_channel_too():
    for channels in (3, 1):
        x = torch.randn(4, channels, 8, 8)
        got = channels_last_inputs({"pixel_values": x, "mask": torch.ones(4, 8), "ids": torch.zeros(4, 1, 2, 2).long()})
        assert torch.equal(got["pixel_values"], x)  # the same values
        assert got["mask"] is not None and got["mask"].is_contiguous() and got["ids"].is_contiguous()
        model = _Net(channels)
        model(got["pixel_values"])
        model(x)
        assert model.seen == [True, False], channels  # the convolution ran channels-last on the converted input
    assert channels_last_inputs({"input_ids": torch.zeros(2, 5).long(), "x": torch.randn(2, 6)}) is None


def test_the_meta_loss_and_its_gradient_are_those_of_the_given_layout():
    torch.manual_seed(0)
    model = _Net(3)
    model.train()
    meta = _batch(3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    ref_loss, ref = meta_loss_gradient(model, params, meta)
    layout = MetaLayout()
    converted = layout.prepare(model, meta)
    assert layout.state == "channels_last"
    assert converted.inputs["pixel_values"].is_contiguous(memory_format=CL)
    assert meta.inputs["pixel_values"].is_contiguous()  # the given batch is left as it was
    model.seen.clear()
    loss, got = meta_loss_gradient(model, params, converted)
    assert model.seen == [True]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    top = max(float(r.abs().max()) for r in ref.values())  # (c1.bias's gradient is 0 up to rounding: BatchNorm)
    for n in ref:
        assert got[n].is_contiguous(), n  # conv weight gradients come back in the parameters' layout
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5 * top, msg=n)
    # later batches are converted without another check
    model.seen.clear()
    layout.prepare(model, _batch(3, seed=1))
    assert model.seen == []


def test_the_dots_pass_runs_channels_last_on_the_real_forwards_recorded_outputs():
    for channels in (3, 1):
        torch.manual_seed(0)
        model = _Net(channels)
        model.train()
        x, y = torch.randn(16, channels, 8, 8), torch.randint(0, 4, (16,))
        with replay_rng(5), frozen_batchnorm(model), record_outputs(model) as rec:
            model(pixel_values=x)  # the real forward, NCHW
        params = dict(model.named_parameters())
        T = {n: torch.randn_like(p) for n, p in params.items()}
        mb = MicroBatch({"pixel_values": x}, y, torch.ones(16), seed=5, outputs=rec)
        ref = jvp_dots(model, params, copy.copy(mb), T)
        layout = MetaLayout()
        layout.prepare(model, _batch(channels))
        (converted,) = layout.window([mb])
        assert converted is not mb and mb.inputs["pixel_values"].is_contiguous()
        model.seen.clear()
        got = jvp_dots(model, params, converted, T)
        assert model.seen == [True]  # the first convolution's (recorded) output was given the channels-last layout
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        # negative control: the recorded outputs are what the pass used
        wrong = replace(converted, outputs={m: [Recorded(o * 1.5, o._version) if o is not None else r
                                                for r in outs for o in [r.output]] for m, outs in rec.items()})
        assert not torch.allclose(jvp_dots(model, params, wrong, T), ref, rtol=1e-2)
    layout.state = "off"
    assert layout.window([mb])[0] is mb


def test_models_whose_forward_depends_on_the_layout_keep_it():
    for flatten, why in (("view", "failed"), ("strides", "differ")):
        torch.manual_seed(0)
        model = _Net(3, flatten=flatten)
        layout = MetaLayout()
        meta = _batch(3)
        assert layout.prepare(model, meta) is meta
        assert layout.state == "off" and why in layout.reason, (flatten, layout.reason)
        assert layout.prepare(model, _batch(3, seed=1)).inputs["pixel_values"].is_contiguous()


class _Dropped(_Net):
    """_Net with dropout on its first feature maps: elementwise (``nn.Dropout``) or per channel (``nn.Dropout2d``)."""

    def __init__(self, drop: nn.Module):
        super().__init__(3)
        self.drop = drop

    def forward(self, pixel_values, labels=None):
        h = self.drop(F.relu(self.b1(self.c1(pixel_values))))
        h = F.max_pool2d(F.relu(self.b2(self.c2(F.max_pool2d(h, 2)))), 2)
        return SequenceClassifierOutput(logits=self.fc(h.flatten(1)))


def _elementwise_mask_follows_memory_order() -> bool:
    """Whether this torch draws ``nn.Dropout``'s mask in memory order (torch 2.13 does; 2.6 does not), measured on a
    feature map alone: the same seed in both layouts, compared in logical order."""
    h = torch.rand(4, 8, 6, 6) + 1.0
    masks = []
    for x in (h, h.contiguous(memory_format=torch.channels_last)):
        torch.manual_seed(3)
        masks.append(F.dropout(x, 0.3, training=True) == 0)
    return not torch.equal(*masks)


def test_an_elementwise_dropout_on_feature_maps_keeps_the_layout_of_the_training_passes():
    """The passes over training micro-batches run with dropout on: where an elementwise mask is drawn in memory
    order, channels-last it would fall on other activations than the real forward's (per-channel masks do not
    move), so the layout is kept; where it is not (older torch), channels-last is safe."""
    x = _batch(3, seed=2)
    train = MicroBatch(x.inputs, x.labels, torch.ones(16), seed=7)
    moves = _elementwise_mask_follows_memory_order()
    for drop, kept in ((nn.Dropout(0.3), moves), (nn.Dropout2d(0.3), False), (nn.Identity(), False)):
        torch.manual_seed(0)
        model = _Dropped(drop)
        model.train()
        layout = MetaLayout()
        meta = _batch(3)
        out = layout.prepare(model, meta, train=train)
        assert (out is meta) == kept and (layout.state == "off") == kept, drop
        assert not kept or ("training mode" in layout.reason and "dropout" in layout.reason), layout.reason
        assert model.training  # the check leaves the model in its mode
        model.eval()
        layout = MetaLayout()
        layout.prepare(model, meta, train=train)
        assert layout.state == ("off" if kept else "channels_last") and not model.training
        assert MetaLayout().prepare(model, meta) is not meta  # without a training micro-batch: the meta batch's alone


class _Shortcut(nn.Module):
    """A 3×3 stem to ``width`` channels and a ResNet's downsampling shortcut from it (1×1, ``stride``)."""

    def __init__(self, width: int, stride: int = 2, kernel: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.short = nn.Conv2d(width, 16, kernel, stride=stride, padding=kernel // 2)
        self.fc = nn.Linear(16, 4)

    def forward(self, pixel_values, labels=None):
        return SequenceClassifierOutput(logits=self.fc(self.short(F.relu(self.stem(pixel_values))).mean((2, 3))))


def test_a_strided_1x1_convolution_with_few_input_channels_keeps_the_layout():
    """oneDNN's channels-last weight gradient of such a convolution is wrong or crashes (uxlfoundation/oneDNN#6035):
    the model keeps its layout, decided before any pass runs. Wider inputs, a 3×3 or an unstrided 1×1 do not."""
    meta = _batch(3)
    narrow = MetaLayout()
    assert narrow.prepare(_Shortcut(4), meta) is meta
    assert narrow.state == "off" and "'short'" in narrow.reason and "4 input channels" in narrow.reason
    assert unsafe_convolution(_Shortcut(channel_block() - 1)) is not None
    for model in (_Shortcut(channel_block()), _Shortcut(4, kernel=3), _Shortcut(4, stride=1)):
        assert unsafe_convolution(model) is None
        layout = MetaLayout()
        assert layout.prepare(model, meta).inputs["pixel_values"].is_contiguous(memory_format=CL)
        assert layout.state == "channels_last"


def test_the_meta_gradient_of_a_narrow_resnet_is_right_on_one_thread():
    """A ResNet-18 at base width 4 (shortcuts of 4 input channels): its meta-loss gradient through the layout the
    check chooses equals a float64 one. In a subprocess on one thread, where the channels-last kernel crashes on
    AVX2 CPUs (on two it returns a wrong gradient): without the check this fails there."""
    script = textwrap.dedent("""
        import torch
        from hf_ddlr.meta import MetaBatch
        from hf_ddlr.meta.engine import meta_loss_gradient
        from hf_ddlr.meta.layout import MetaLayout
        from hf_ddlr.models import CifarResNetConfig, CifarResNetForImageClassification
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = CifarResNetForImageClassification(CifarResNetConfig(base_width=4, num_labels=10)).train()
        meta = MetaBatch({"pixel_values": torch.randn(32, 3, 32, 32)}, torch.randint(0, 10, (32,)), seed=1)
        params = {n: p.detach() for n, p in model.named_parameters()}
        _, got = meta_loss_gradient(model, params, MetaLayout().prepare(model, meta))
        _, ref = meta_loss_gradient(model.double(), {n: p.double() for n, p in params.items()},
                                    MetaBatch({"pixel_values": meta.inputs["pixel_values"].double()}, meta.labels, seed=1))
        worst = max(float((got[n].double() - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)) for n in ref)
        print("worst", worst)
        assert worst < 1e-2, worst
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-4000:])


def test_the_kernel_sweep_measures_right_cases_as_right_and_reports_a_crash_as_a_row():
    """``scripts/onednn_1x1_check.py`` (the sweep behind docs/speed.md's table): a case the kernel gets right reads
    as float32 rounding in both layouts, and a process that dies becomes a row of the table, not the sweep's end."""
    root = os.path.join(os.path.dirname(__file__), "..")
    sys.path.insert(0, os.path.join(root, "scripts"))
    try:
        import onednn_1x1_check as sweep
    finally:
        sys.path.pop(0)
    right = sweep._run_case(16, threads=1, repeats=1)
    assert set(right) == {"nchw", "channels_last"}
    assert 0 < right["nchw"] < 1e-5 and 0 < right["channels_last"] < 1e-5
    assert sweep._cell(right, "channels_last") == f"{right['channels_last']:.1g}"
    died = {"died": "SIGSEGV", "nchw": 2e-7}
    assert sweep._cell(died, "channels_last") == "**crash** (SIGSEGV)"
    assert sweep._cell(died, "nchw") == "2e-07" and sweep._cell({"died": "SIGSEGV"}, "nchw") == "–"
    assert sweep._cell({"channels_last": 0.4}, "channels_last") == "**0.4** (wrong)"


def test_batches_without_images_are_left_alone_and_not_checked():
    layout = MetaLayout()
    meta = MetaBatch({"input_ids": torch.zeros(4, 6).long()}, torch.zeros(4).long(), seed=0)
    assert layout.prepare(nn.Identity(), meta) is meta and layout.state == "off"  # decided once, without a forward


def _images(n: int, seed: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + y[:, None, None, None].float()
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()})


def test_the_trainer_runs_its_meta_passes_channels_last_when_the_model_allows_it(tmp_path):
    def run(flatten: str, **kw) -> MetaLRTrainer:
        torch.manual_seed(0)
        model = _Net(3, flatten=flatten)
        args = MetaLRConfig(output_dir=str(tmp_path / f"{flatten}{len(kw)}"), report_to=[], use_cpu=True,
                            save_strategy="no", disable_tqdm=True, seed=0, optim="sgd", learning_rate=0.1,
                            max_steps=3, per_device_train_batch_size=16, **kw)
        t = MetaLRTrainer(model=model, args=args, train_dataset=_images(48, 0), meta_dataset=_images(16, 1))
        t.train()
        return t

    a = run("flatten")
    assert a._schedule.meta_layout.state == "channels_last"
    # per step: the real forward (the user's layout), the meta loss's forward and the forward-mode passes of the
    # dots, the step's and the probes' (channels-last); before them, on the first step, the layout check's two
    # forwards of the meta batch and two of the step's micro-batch in training mode, and the forward-mode check's
    # one pass; after training, the meta-set check reads the 16 meta images in the user's layout (eval batches of 8).
    # The default split of the products (instance_signal) reads the probes' head input from one more forward of them
    # (the step's own micro-batch gives it from its real forward)
    real, check, forward_mode, meta, dots = [False], [False, True] * 2, [True], [True], [True, True, True]
    assert a.model.seen == real + check + forward_mode + meta + dots + (real + meta + dots) * 2 + [False] * 2
    b = run("view")  # would raise in the meta loss if the check let the layout through
    assert b._schedule.meta_layout.state == "off"
    assert not torch.equal(b.rates.instance, torch.ones_like(b.rates.instance))
    c = run("flatten", meta_update="delayed")  # the memory-lean mode keeps the layout (no check either)
    assert c._schedule.meta_layout.state == "off" and not any(c.model.seen)

