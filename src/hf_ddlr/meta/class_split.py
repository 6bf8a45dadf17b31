"""The own label's share of a training example's meta-gradient product, over the classification head.

An instance rate steps on the product ``T·∇ℓ_i`` of its example's gradient with the meta gradient, a sum over the
meta examples of every class. The share of the meta examples of the example's own (possibly wrong) label ranks the
mislabelled examples *above* the clean ones: a wrong label's gradient raises that label's logit for every input,
which helps the meta examples of that label. Left out, the rest ranks close to the plain model's own loss
(docs/robustness.md, "The meta gradient split by class"). Over the classification head that share has a closed form
— an example's head gradient is the outer product ``d_i h_iᵀ`` of the loss's gradient w.r.t. the logits and the
head's input — so leaving it out costs no pass over the model: :func:`class_head_gradients` gives the meta set's
per-class head gradients, :func:`own_class_products` every training example's product with its own label's share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["HeadSplit", "OWN_CLASS_KEY", "class_head_gradients", "logit_gradients", "own_class_products"]

# the per-class head gradients ride in the meta-gradient average under these keys (a "<" is in no parameter name), so
# that they are averaged with the same factor and steps as the meta gradient they split, and saved with it
OWN_CLASS_KEY = "<own class head>."


@dataclass(frozen=True)
class HeadSplit:
    """The classification head whose per-class share is taken: its module and the names of its parameters."""

    module: nn.Linear
    weight: str
    bias: str | None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def features(self, h: torch.Tensor, logits: torch.Tensor, head_out: torch.Tensor | None = None) -> torch.Tensor:
        """The head's input as one fp32 feature vector per example ([examples, in]). A head that ran on every token
        (a decoder-only ``*ForSequenceClassification`` scores each token and keeps one per sequence afterwards) gives
        each example the input of the token whose output is the example's logits (``logits``: the model's, one row
        per example; ``head_out``: the head's output in the same forward, else the head applied to ``h`` again, which
        holds where the head's weights are the module's own)."""
        batch, width = logits.shape[0], self.module.in_features
        h = h.detach()
        if h.numel() == batch * width:
            return h.float().reshape(batch, width)
        if h.shape[0] != batch or h.shape[-1] != width:
            raise ValueError(
                f"instance_signal='other_classes' needs the classification head's input per example, but the head "
                f"ran on an input of shape {tuple(h.shape)} for {batch} examples. Use instance_signal='mean'."
            )
        tokens = h.reshape(batch, -1, width)
        if head_out is None:
            with torch.no_grad():
                head_out = self.module(tokens)
        out = head_out.detach().reshape(batch, tokens.shape[1], -1).float()
        kept = (out - logits.detach().float().reshape(batch, 1, -1)).abs().sum(-1).argmin(1)  # the pooled token
        return tokens[torch.arange(batch, device=h.device), kept].float()


def logit_gradients(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """``∂ℓ_i/∂logits_i`` of the (label-smoothed) cross-entropy of every row, fp32: ``softmax − target``."""
    logits = logits.detach().float()
    C = logits.shape[-1]
    target = torch.nn.functional.one_hot(labels, C).float()
    if smoothing:
        target = target * (1 - smoothing) + smoothing / C
    return torch.softmax(logits, -1) - target


def class_head_gradients(
    h: torch.Tensor, d: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's share of the head's gradient of ``Σ_j w_j ℓ_j``: ``Σ_{j: y_j = c} w_j d_j h_jᵀ`` and ``Σ w_j d_j``,
    stacked over the classes ([classes, out, in], [classes, out]). ``w_j = ∂objective/∂ℓ_j`` (``1/M`` for the mean
    loss), so the shares add up to the head's part of the meta objective's gradient."""
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(d.dtype) * weights.to(d.dtype)[:, None]
    wd = onehot.T[:, :, None] * d[None]  # [classes, M, out]
    return torch.einsum("cmo,mi->coi", wd, h), wd.sum(1)


def own_class_products(
    TW: torch.Tensor, Tb: torch.Tensor | None, h: torch.Tensor, d: torch.Tensor, labels: torch.Tensor,
    gather_limit: int = 1 << 24,
) -> torch.Tensor:
    """``T^{(y_i)}·∇_head ℓ_i = d_iᵀ T_W^{(y_i)} h_i + d_iᵀ T_b^{(y_i)}`` for every row: each example's product with
    the head tangent of its own label's meta examples (``TW``: [classes, out, in], ``Tb``: [classes, out] or None).
    Each row's tangent gathered at once while that holds at most ``gather_limit`` numbers (no host synchronisation),
    else one matmul per label present."""
    d, h = d.float(), h.float()
    if labels.shape[0] * TW[0].numel() <= gather_limit:
        out = torch.einsum("no,noi,ni->n", d, TW.float().index_select(0, labels), h)
        return out if Tb is None else out + (d * Tb.float().index_select(0, labels)).sum(1)
    order = labels.argsort()
    present, counts = labels.index_select(0, order).unique_consecutive(return_counts=True)
    out = torch.empty(labels.shape[0], dtype=torch.float32, device=d.device)
    for c, rows in zip(present.tolist(), order.split(counts.tolist())):
        dc = d.index_select(0, rows)
        p = ((dc @ TW[c].float()) * h.index_select(0, rows)).sum(1)
        if Tb is not None:
            p = p + dc @ Tb[c].float()
        out.index_copy_(0, rows, p)
    return out
