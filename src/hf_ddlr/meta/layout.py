"""The memory layout of the meta batch's images: channels-last on CPU, where the meta passes run faster in it.

On CPU, PyTorch's kernels for convolutions, max-pooling and BatchNorm are much faster on channels-last (NHWC)
tensors than on the default NCHW ones: measured on this project's 4-conv BatchNorm CNN (batch 64, 32×32, 2
threads) a forward took 19 ms in NCHW and 9 ms channels-last, a forward and backward 39 ms and 28 ms
(docs/speed.md). The meta loss's forward and backward, the meta forward of ``meta_strategy="last_layer"`` and
the forward-mode pass of the dots are passes of the meta step's own, so they can run channels-last whatever the
user's layout: a convolution given a channels-last input returns a channels-last output, and every later layer
follows (the dots pass gives the real forward's recorded outputs that layout as it reuses them,
:mod:`~hf_ddlr.meta.primal_reuse`). The values are the same up to floating-point rounding — a little more of it
in BatchNorm, whose channels-last CPU kernel accumulates its statistics less precisely (docs/speed.md). The real
step is the user's and keeps its layout.

Strides are not values for every model: a forward that ``.view``\\ s an activation fails on a channels-last one,
and a forward that reads the strides may compute something else. So the first meta step checks the model: its
meta-batch logits in both layouts must agree (every process must agree, so that all take the same path), or
the meta batch keeps its layout for the rest of the run. On other devices the layout is left as it is.

One kernel is wrong in that layout: oneDNN's weight gradient of a 1×1 convolution with a stride, on
channels-last inputs with fewer input channels than the kernel's channel block (8 on AVX2 CPUs), writes past its
workspace (uxlfoundation/oneDNN#6035). Measured on an AVX2 AMD EPYC with PyTorch 2.13: 2 to 7 input channels
crash the process or return a weight gradient 13-140 % off, silently; 1, 8 and more are right
(``scripts/onednn_1x1_check.py`` measures a CPU). A model with such a convolution keeps its layout (checked
before any pass runs, since a crash cannot be caught).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .distributed import all_ranks_true
from .engine import MetaBatch, MicroBatch
from .passes import frozen_batchnorm, functional_logits, meta_loss_mode, replay_rng

__all__ = ["MetaLayout", "channel_block", "channels_last_inputs", "unsafe_convolution"]

logger = logging.getLogger(__name__)


def channels_last_inputs(inputs: Mapping[str, Any]) -> dict[str, Any] | None:
    """``inputs`` with every contiguous 4-D floating-point CPU tensor (a batch of images) in channels-last
    layout (the same values), or None when there is no such tensor."""
    out, changed = dict(inputs), False
    for k, v in inputs.items():
        if (isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_floating_point() and v.device.type == "cpu"
                and v.is_contiguous() and v.shape[2] * v.shape[3] > 1):
            out[k] = _channels_last(v)
            changed = True
    return out if changed else None


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (NCHW-contiguous) channels-last. With one channel the memory is already in that order, but
    ``contiguous(memory_format=...)`` keeps the NCHW strides, which convolutions read as NCHW; the view with a
    channel stride of 1 is what they read as channels-last."""
    if x.shape[1] == 1:
        _, _, h, w = x.shape
        return x.as_strided(x.shape, (h * w, 1, w, 1))
    return x.contiguous(memory_format=torch.channels_last)


class MetaLayout:
    """Whether the meta batches of a run go to the meta passes channels-last: a state machine, one per run,
    the same on every process.

    - ``"unchecked"``: until the first meta batch; when it holds images on CPU, that step compares the model's
      logits in both layouts (two forwards without gradients, once per run).
    - ``"channels_last"``: the check passed; every later meta batch's images are channels-last.
    - ``"off"``: no images on CPU, or the check failed on some process (the model's forward depends on the
      layout, or it has a convolution whose channels-last weight gradient is wrong); the meta batches keep
      their layout.
    """

    def __init__(self, off: str | None = None) -> None:
        """``off``: why this run keeps the layout from the start (no check then)."""
        self.state = "unchecked" if off is None else "off"
        self.reason: str | None = off  # why the layout is kept

    def prepare(self, model: nn.Module, meta: MetaBatch, device: Any = "cpu", train: MicroBatch | None = None) -> MetaBatch:
        """``meta`` with its images channels-last when this run uses that layout (checked on first use, on ``meta``
        and on the training micro-batch ``train`` when given: the passes over training micro-batches run with
        dropout on, and an elementwise dropout mask is drawn in memory order, so in the other layout it lands on
        other activations than the real forward's)."""
        if self.state == "off":
            return meta
        converted = channels_last_inputs(meta.inputs)
        if self.state == "unchecked":
            if not all_ranks_true(converted is not None, device):  # (one collective: the first meta step)
                self.state, self.reason = "off", "no images on CPU in the meta batch"
                return meta
            problem = _layout_problem(model, meta, converted, train)
            if all_ranks_true(problem is None, device):
                self.state = "channels_last"
            else:
                self.state, self.reason = "off", problem or "the check failed on another process"
                logger.info("The meta batches keep their memory layout: %s.", self.reason)
                return meta
        return meta if converted is None else replace(meta, inputs=converted)

    def window(self, window: Sequence[MicroBatch]) -> list[MicroBatch]:
        """The training micro-batches for the meta step's forward-mode pass: copies with their images
        channels-last when the meta batches are (the check of the model's forward covers them too; a pass that
        reuses the real forward's outputs gives them that layout as it goes). Not for finite differences,
        which subtract losses of the real forward's layout."""
        if self.state != "channels_last":
            return list(window)
        out = []
        for mb in window:
            converted = channels_last_inputs(mb.inputs)
            out.append(mb if converted is None else replace(mb, inputs=converted))
        return out


def channel_block() -> int:
    """The input-channel block of oneDNN's 1×1 convolution kernels on this CPU: 16 with AVX-512, else 8."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def unsafe_convolution(model: nn.Module) -> str | None:
    """Why the model's meta passes must not run channels-last on this CPU (None: no reason found): a 1×1
    convolution with a stride and fewer input channels per group than :func:`channel_block`, whose channels-last
    weight gradient is wrong or crashes (module docstring). The AVX-512 bound is the oneDNN issue's "fewer than
    the channel block", not measured here."""
    block = channel_block()
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and max(m.stride) > 1
                and m.in_channels // m.groups < block):
            return (f"its 1x1 convolution {name!r} with stride {tuple(m.stride)} has {m.in_channels // m.groups} "
                    f"input channels per group, fewer than {block}: oneDNN's channels-last weight gradient is wrong "
                    "there (uxlfoundation/oneDNN#6035)")
    return None


def _layout_problem(
    model: nn.Module, meta: MetaBatch, converted: Mapping[str, Any], train: MicroBatch | None = None,
) -> str | None:
    """Why the model's meta passes keep the given layout: a convolution the channels-last kernels get wrong, or
    meta-batch logits that differ between the given layout and ``converted``, or (``train``) a training
    micro-batch's logits in training mode, dropout masks from one random state, that differ between the layouts
    (None: they agree to rounding)."""
    unsafe = unsafe_convolution(model)
    if unsafe is not None:
        return unsafe
    with torch.no_grad(), frozen_batchnorm(model), meta_loss_mode(model, meta.dropout):  # as the meta loss runs
        problem = _logits_differ(model, meta.inputs, converted, meta.seed)
    if problem is not None or train is None:
        return problem
    train_converted = channels_last_inputs(train.inputs)
    if train_converted is None:
        return None
    was_training = model.training
    model.train()  # as the passes over training micro-batches run: dropout on, masks replayed from one state
    try:
        with torch.no_grad(), frozen_batchnorm(model):
            problem = _logits_differ(model, train.inputs, train_converted, train.seed)
    finally:
        model.train(was_training)
    if problem is not None:
        return (f"in training mode {problem} (an elementwise dropout on feature maps draws its mask in memory order: "
                "other masks than the real forward's)")
    return None


def _logits_differ(model: nn.Module, inputs: Mapping[str, Any], converted: Mapping[str, Any], seed: int) -> str | None:
    """How the model's logits on ``inputs`` and on ``converted`` (the same images channels-last), each computed
    from the random state ``seed``, differ beyond rounding (None: they do not)."""
    with replay_rng(seed):
        ref = functional_logits(model, {}, inputs).float()
    try:
        with replay_rng(seed):
            got = functional_logits(model, {}, converted).float()
    except Exception as err:  # e.g. a .view of a channels-last activation
        return f"the model's forward failed on channels-last images ({type(err).__name__}: {err})"
    if got.shape != ref.shape:
        return f"the model's logits have shape {tuple(got.shape)} on channels-last images, {tuple(ref.shape)} otherwise"
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((got - ref).abs().max()) if ref.numel() else 0.0
    # (a forward that depends on the layout is off by the size of the logits; rounding, by ~1e-4 of it on a
    # BatchNorm ResNet, whose channels-last kernel accumulates its statistics less precisely)
    if not err <= 1e-3 * max(scale, 1.0):
        return f"the model's logits differ by {err:.3g} on channels-last images (largest logit {scale:.3g})"
    return None
