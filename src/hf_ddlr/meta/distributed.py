"""Collective helpers so that every rank holds identical rate tables (pure torch.distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world_size", "all_reduce_mean_", "all_gather_varlen", "all_ranks_true"]


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average tensors over ranks in place (one flattened collective); no-op on a single process."""
    if world_size() == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off : off + n].view_as(t).to(t.dtype))
        off += n
    return tensors


def all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor from every rank in rank order; ranks may hold different lengths."""
    if world_size() == 1:
        return t
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = t.new_zeros(max(sizes))
    pad[: t.numel()] = t
    out = [torch.zeros_like(pad) for _ in sizes]
    dist.all_gather(out, pad)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def all_ranks_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` is true on every rank (a MIN all-reduce), so that all ranks take the same branch."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
