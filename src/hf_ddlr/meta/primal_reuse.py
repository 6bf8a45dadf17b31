"""Forward mode without recomputing what the real forward already computed.

A forward-mode pass computes every primal value again beside its tangent: for a convolution or a linear
layer that is one of its three matmuls / convolutions (``W·x`` beside ``W·ẋ + Ẇ·x``). The jvp pass of a
meta step runs at the same parameters, on the same micro-batch, with the same dropout masks and
batch-statistics BatchNorm as the real forward that just ran — so its primal values are the real
forward's. :func:`record_outputs` keeps the outputs of the convolution / linear layers of the real
forward; :func:`reuse_outputs` makes those layers return them as the primal of the forward-mode pass and
compute only the tangent. The result is the same jvp (the tangent formulas are unchanged), with one
convolution in three saved.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from .batchnorm_tangent import BATCHNORM_LAYERS
from .passes import patched_forwards

__all__ = ["Recorded", "Recording", "record_outputs", "reuse_outputs"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_RECORDED = _LAYERS + BATCHNORM_LAYERS  # BatchNorm's recorded statistics serve batchnorm_tangents


class Recorded(NamedTuple):
    """One recorded call of a layer: its output and the output's version counter when recorded (an in-place
    change since shows); for BatchNorm only the batch mean and inverse standard deviation its forward saved
    (``output`` None: holding BatchNorm's outputs would keep one more activation per layer alive through the
    meta step, for one elementwise pass saved)."""

    output: torch.Tensor | None
    version: int
    stats: tuple[torch.Tensor, torch.Tensor] | None = None
    input_shape: tuple[int, ...] | None = None  # BatchNorm: the shape of the input the statistics are of


# per layer, in call order
Recording = dict[nn.Module, list[Recorded]]


def _batchnorm_stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (mean, 1/std) a training-mode BatchNorm forward saved for its backward, when it ran on PyTorch's
    native kernel (other backends: None, and the tangent pass computes them again)."""
    fn = out.grad_fn
    if type(fn).__name__ != "NativeBatchNormBackward0" or not getattr(fn, "_saved_training", False):
        return None
    mean, invstd = getattr(fn, "_saved_result1", None), getattr(fn, "_saved_result2", None)
    if not (isinstance(mean, torch.Tensor) and isinstance(invstd, torch.Tensor)):
        return None
    return mean.detach(), invstd.detach()


@contextlib.contextmanager
def record_outputs(model: nn.Module) -> Iterator[Recording]:
    """Keep the output of every call of a Conv1d/2d/3d or Linear layer of ``model``, and the batch statistics
    (with the input's shape) of every call of a BatchNorm1d/2d/3d layer, in call order."""
    rec: Recording = {}

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(out, torch.Tensor):
            if type(m) in BATCHNORM_LAYERS:
                rec.setdefault(m, []).append(Recorded(None, 0, _batchnorm_stats(out), tuple(args[0].shape)))
            else:
                rec.setdefault(m, []).append(Recorded(out.detach(), out._version))

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) in _RECORDED]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def _tangent_only(m: nn.Module, queue: list[Recorded], orig_forward):
    """A forward for layer ``m`` that takes its primal output from ``queue`` and computes the tangent only."""
    linear = isinstance(m, nn.Linear)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x_p, x_t = fwAD.unpack_dual(x)
        if not queue:
            return orig_forward(x)  # more calls than recorded: compute them
        out, version = queue.pop(0)[:2]
        batch_dims = (lambda t: t.shape[:-1]) if linear else (lambda t: t.shape[:1])
        if out._version != version or out.device != x_p.device or batch_dims(out) != batch_dims(x_p):
            # modified in place after it was recorded (e.g. an in-place ReLU right after the layer), or not the
            # recorded call: compute it
            return orig_forward(x)
        if not linear and _is_channels_last(x_p) and not _is_channels_last(out):
            # a pass in channels-last layout (hf_ddlr.meta.layout) over a forward recorded in NCHW: the primal
            # takes the layout a convolution of this input would have given it, which later layers follow
            out = out.contiguous(memory_format=torch.channels_last)
        w_p, w_t = fwAD.unpack_dual(m.weight)
        apply = (lambda a, b: F.linear(a, b)) if linear else (lambda a, b: m._conv_forward(a, b, None))
        tangent = None
        for a, b in ((x_t, w_p), (x_p, w_t)):
            if a is not None and b is not None:
                t = apply(a, b)
                tangent = t if tangent is None else tangent.add_(t)
        b_t = fwAD.unpack_dual(m.bias).tangent if m.bias is not None else None
        if b_t is not None:
            shape = [1] * out.dim()
            shape[-1 if linear else 1] = -1
            tangent = b_t.reshape(shape).expand_as(out) if tangent is None else tangent + b_t.reshape(shape)
        if tangent is None:
            return out
        if tangent.shape != out.shape:
            raise RuntimeError(
                f"the recorded {type(m).__name__} output has shape {tuple(out.shape)}, its tangent "
                f"{tuple(tangent.shape)}: the forward-mode pass is not the recorded forward"
            )
        return fwAD.make_dual(out, tangent.to(out.dtype))

    return forward


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (a channel stride of 1; one-channel images too)."""
    return x.dim() == 4 and x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1


@contextlib.contextmanager
def reuse_outputs(rec: Recording) -> Iterator[None]:
    """During a forward-mode pass, the recorded layers return their recorded outputs as primal values.

    Each layer consumes its recorded outputs in call order; a call whose recorded output was modified in place
    since (an in-place activation right after the layer), or whose batch dimensions differ from it (not the
    recorded forward), computes normally.
    """
    patches = [  # BatchNorm's records serve batchnorm_tangents
        (m, functools.partial(_tangent_only, m, list(outs))) for m, outs in rec.items() if type(m) in _LAYERS
    ]
    with patched_forwards(patches):
        yield
