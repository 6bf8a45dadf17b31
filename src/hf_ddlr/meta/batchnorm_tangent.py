"""BatchNorm's forward-mode tangent in three fused kernels instead of a dozen elementwise passes.

In training mode (batch statistics) a BatchNorm layer's output depends on the whole batch, so a per-example
dot ``T·∇L_i`` has to go through it in forward mode. PyTorch's generic jvp formula for ``batch_norm``
spends about a dozen full passes over the activation on centring and rescaling the tangent — on a CIFAR
ResNet-18 more time than the tangent convolutions themselves. The input part of BatchNorm's Jacobian is
symmetric per channel, ``γ·σ⁻¹·(I − 11ᵀ/n − x̂x̂ᵀ/n)``, so its product with the input tangent is exactly what
BatchNorm's *backward* kernel computes for an output gradient equal to that tangent; the parameter part adds
``γ̇·x̂ + β̇``. :func:`batchnorm_tangents` makes every eligible BatchNorm layer compute its tangent that way
during a forward-mode pass (the batch statistics taken from the real forward when it was recorded), and leaves
every other case — running statistics, ``SyncBatchNorm``, half precision, autocast — to PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from .passes import patched_forwards

__all__ = ["BATCHNORM_LAYERS", "batchnorm_tangents"]

# exact types only: SyncBatchNorm's statistics span processes, lazy modules have no shape yet
BATCHNORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FLOATS = (torch.float32, torch.float64)


def _plain(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A possibly dual tensor as (primal, tangent); ``(None, None)`` for None."""
    if t is None:
        return None, None
    p, d = fwAD.unpack_dual(t)
    return p, d


def _eligible(m: nn.Module, x_p: torch.Tensor, x_t: torch.Tensor | None, w_p: torch.Tensor | None) -> bool:
    """Batch statistics, an input tangent, full precision, no autocast: the case the fused formula covers."""
    # batch statistics and no running ones to update (inside frozen_batchnorm, or a BatchNorm built without)
    batch_stats = m.training and (not m.track_running_stats or m.running_mean is None)
    return (
        batch_stats and x_t is not None and x_p.dtype in _FLOATS and x_t.dtype == x_p.dtype
        and (w_p is None or w_p.dtype == x_p.dtype) and x_p.dim() >= 2
        and not torch.is_autocast_enabled(x_p.device.type)
    )


def _fast_forward(m: nn.Module, queue: list, orig_forward):
    """A forward for BatchNorm layer ``m`` whose tangent comes from the fused kernels; its batch statistics come
    from the next record of ``queue`` when that record is of this call (the same input shape and device)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        recorded = queue.pop(0) if queue else None  # consumed in call order, used or not
        x_p, x_t = fwAD.unpack_dual(x)
        w_p, w_t = _plain(m.weight)
        b_p, b_t = _plain(m.bias)
        if not _eligible(m, x_p, x_t, w_p):
            return orig_forward(x)
        shape = [1, -1] + [1] * (x_p.dim() - 2)
        stats = recorded.stats if recorded is not None else None
        if stats is not None and (recorded.input_shape != tuple(x_p.shape) or stats[0].device != x_p.device):
            stats = None  # not the recorded call
        if stats is not None:
            mean, invstd = stats  # the real forward's: x̂ in one pass
            xhat = torch.addcmul((-mean * invstd).view(shape), x_p, invstd.view(shape))
        else:
            xhat, mean, invstd = torch.ops.aten.native_batch_norm(x_p, None, None, None, None, True, 0.0, m.eps)
        if w_p is not None and b_p is not None:
            out = torch.addcmul(b_p.view(shape), xhat, w_p.view(shape))
        else:
            out = xhat if w_p is None else xhat * w_p.view(shape)
            out = out if b_p is None else out + b_p.view(shape)
        # the input part: BatchNorm's Jacobian is symmetric, so its backward kernel applies it to the tangent
        tangent = torch.ops.aten.native_batch_norm_backward(
            x_t, x_p, w_p, None, None, mean, invstd, True, m.eps, [True, False, False]
        )[0]
        if w_t is not None:
            tangent = tangent.addcmul_(xhat, w_t.view(shape))
        if b_t is not None:
            tangent = tangent.add_(b_t.view(shape))
        return fwAD.make_dual(out, tangent)

    return forward


@contextlib.contextmanager
def batchnorm_tangents(model: nn.Module, recorded: dict | None = None) -> Iterator[None]:
    """During a forward-mode pass over ``model``, its BatchNorm layers that use batch statistics without
    updating running ones (see :func:`~hf_ddlr.meta.passes.frozen_batchnorm`) compute their tangent with the
    fused kernels; ``recorded`` (the real forward's :class:`~hf_ddlr.meta.primal_reuse.Recorded` calls, in call
    order) spares them the batch statistics."""
    patches = [(m, functools.partial(_fast_forward, m, list((recorded or {}).get(m, []))))
               for m in model.modules() if type(m) in BATCHNORM_LAYERS]
    with patched_forwards(patches):
        yield
