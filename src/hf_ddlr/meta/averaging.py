"""A running average of the meta-loss gradient, the direction every example's gradient is compared with.

One meta step sees one meta batch at one lookahead point θ'. Its gradient ``g_meta(θ')`` carries two kinds
of step-to-step noise that have nothing to do with any training example: the sampling noise of the meta
batch, and — with a real learning rate — the overshoot of the lookahead along the sharpest directions of
the meta loss, whose sign alternates from step to step (training runs near the edge of stability). An
exponential average over recent meta steps keeps the persistent part, which is what tells clean from
harmful examples, at the cost of one parameter-sized buffer. ``beta = 0`` is the paper's per-step value.

:class:`GradientSecondMoment` is the other running statistic of the meta step: Adam's second moment of the
training gradient, the diagonal metric in which ``rate_metric="adam"`` compares the example gradients with the
meta gradient when the optimizer itself does not precondition its step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

__all__ = ["GradientSecondMoment", "MetaGradientAverage"]


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host synchronisation: from each tensor's
    minimum and maximum (NaN propagates into both, ±inf is one of them), one pass over it and no tensor of
    flags of its size (what ``isfinite(g).all()`` would write)."""
    flags = [torch.isfinite(torch.stack(torch.aminmax(g.detach()))).all() for g in tensors if g.numel()]
    return not flags or bool(torch.stack(flags).all())


def _running_state(prefix: str, tensors: Mapping[str, torch.Tensor], num_updates: int) -> dict[str, torch.Tensor]:
    """A running statistic's tensors (names prefixed ``prefix``, on the CPU) and its step count, for a checkpoint."""
    sd = {f"{prefix}{n}": t.detach().cpu().contiguous() for n, t in tensors.items()}
    sd["num_updates"] = torch.tensor(num_updates, dtype=torch.int64)
    return sd


def _load_running_state(
    prefix: str, sd: Mapping[str, torch.Tensor], device: torch.device | str,
) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors (fp32, on ``device``) and step count written by :func:`_running_state`."""
    tensors = {k[len(prefix):]: v.to(device, torch.float32).clone() for k, v in sd.items() if k.startswith(prefix)}
    return tensors, int(sd["num_updates"]) if "num_updates" in sd else 0


class MetaGradientAverage:
    """Exponential moving average ``m ← β·m + (1 − β)·g_meta`` per parameter tensor, started at the first value.

    Every rank feeds it the same (all-reduced) meta gradient, so every rank holds the same average.
    """

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"The meta-gradient average needs 0 <= beta < 1, got {beta}.")
        self.beta = float(beta)
        self.average: dict[str, torch.Tensor] = {}
        self.num_updates = 0

    def update(self, g_meta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold in this step's meta gradient and return the average to use (detached, in ``g_meta``'s dtypes).

        The returned tensors may be the average's own buffers: read them, never modify them in place.

        A non-finite gradient (an fp16 overflow) is returned as it is and not folded in: its step is skipped.
        """
        if not _all_finite(g_meta.values()):
            return dict(g_meta)
        if self.beta == 0.0:
            return {n: g.detach() for n, g in g_meta.items()}
        if not self.average or not set(self.average) <= set(g_meta):
            self.average = {n: g.detach().float().clone() for n, g in g_meta.items()}
        else:  # (a tensor first seen now — e.g. one a resumed checkpoint did not hold — starts at its value)
            for n, g in g_meta.items():
                if n not in self.average:
                    self.average[n] = g.detach().float().clone()
                else:
                    self.average[n].mul_(self.beta).add_(g.detach().float(), alpha=1.0 - self.beta)
        self.num_updates += 1
        return {n: m.to(g_meta[n].dtype) for n, m in self.average.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average's tensors (prefixed ``avg.``) and its step count: a resumed run continues exactly."""
        return _running_state("avg.", self.average, self.num_updates)

    def load_state_dict(self, sd: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.average, self.num_updates = _load_running_state("avg.", sd, device)


class GradientSecondMoment:
    """Adam's second moment ``v ← β·v + (1 − β)·g²`` of the (clipped) training gradient, per parameter tensor,
    from ``v = 0`` with Adam's bias correction: the diagonal metric ``1/(sqrt(v̂) + eps)`` by which Adam divides
    each coordinate of its step.

    Under SGD the products ``g_meta·∇L_i`` sum over every parameter with the parameters' own scales, so the
    coordinates with the largest gradients — a deep network's lower layers and normalisation parameters — set
    them; taken in this metric each coordinate counts in units of its typical gradient, as in an Adam step
    (docs/robustness.md, "The products in Adam's metric"). Every rank feeds it the same (all-reduced) gradient.
    """

    def __init__(self, beta: float = 0.999, eps: float = 1e-8) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"The second moment needs 0 < beta < 1, got {beta}.")
        self.beta, self.eps = float(beta), float(eps)
        self.second_moment: dict[str, torch.Tensor] = {}
        self.num_updates = 0

    def update(self, grads: Mapping[str, torch.Tensor], scale: float = 1.0, known_finite: bool = False) -> bool:
        """Fold in ``(scale·g)²`` for every tensor of ``grads`` (``scale``: the step's clipping coefficient).
        A non-finite gradient (an fp16 overflow, a skipped step) is not folded in; returns whether it was.
        ``known_finite``: the caller has found ``grads`` finite already (a finite norm of them), so they are not
        scanned again."""
        if not math.isfinite(scale) or not (known_finite or _all_finite(grads.values())):
            return False
        if grads:  # (one multi-tensor op per stage: few kernel launches for a network of many small tensors)
            g2 = torch._foreach_mul([g.detach().float() for g in grads.values()], scale)
            torch._foreach_mul_(g2, g2)
            for n, g in zip(grads, g2):  # (a tensor first seen now starts from 0 like the others did)
                if n not in self.second_moment:
                    self.second_moment[n] = torch.zeros_like(g)
            v = [self.second_moment[n] for n in grads]
            torch._foreach_mul_(v, self.beta)
            torch._foreach_add_(v, g2, alpha=1.0 - self.beta)
        self.num_updates += 1
        return True

    def precondition_(self, *tangents: Mapping[str, torch.Tensor]) -> None:
        """Divide each tensor of each of ``tangents`` that has a second moment by ``sqrt(v̂) + eps``, in place (one
        denominator for all of them); its coordinates whose second moment is exactly 0 (an embedding row no training
        batch has looked up, a unit no training example has activated) become 0: there the meta gradient divided by
        ``eps`` would outweigh every other coordinate of the products."""
        if not self.num_updates:
            return
        names = [n for n in self.second_moment if any(n in t for t in tangents)]
        if not names:
            return
        v = [self.second_moment[n] for n in names]
        denom = torch._foreach_div(v, 1.0 - self.beta**self.num_updates)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.eps)
        for vi, d in zip(v, denom):  # a coordinate no training gradient has reached has no scale yet: left out (as
            d.masked_fill_(vi == 0, math.inf)  # Adam leaves it unmoved), not multiplied by 1/eps
        of = dict(zip(names, denom))
        for tangent in tangents:
            held = [n for n in names if n in tangent]
            ts, ds = [tangent[n] for n in held], [of[n] for n in held]
            if not held:
                continue
            if all(t.dtype == d.dtype for t, d in zip(ts, ds)):
                torch._foreach_div_(ts, ds)
            else:
                for t, d in zip(ts, ds):
                    t.div_(d.to(t.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The second moment's tensors (prefixed ``v.``) and its step count: a resumed run continues exactly."""
        return _running_state("v.", self.second_moment, self.num_updates)

    def load_state_dict(self, sd: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.second_moment, self.num_updates = _load_running_state("v.", sd, device)
