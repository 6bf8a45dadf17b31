"""One meta step: the gradient of the meta loss after a one-step lookahead w.r.t. every example weight.

Pure functions of (model, parameters, batches); no Trainer, no optimizer mutation. The result is
``∂L_meta/∂e_i`` for the examples of a window of micro-batches (one optimizer step) and ``∂L_meta/∂wd``;
:class:`~hf_ddlr.meta.rates.RateTable` turns them into rate updates.

Strategies for the dots ``T·∇L_i`` (see :mod:`hf_ddlr.meta.lookahead` for T):

- ``"jvp"``: forward-mode AD (``torch.autograd.forward_ad``) of the per-example losses along T. Exact.
  When the caller recorded the real forward's layers (:class:`~hf_ddlr.meta.layerwise.LayerTape`, models
  made of Linear / Embedding / LayerNorm), the same dots come from per-layer products instead (one matmul
  per linear layer where forward mode needs two, or three without :mod:`~hf_ddlr.meta.primal_reuse`).
- ``"finite_difference"``: ``(L_i(θ+εT) − L_i(θ))/ε``. Matches jvp to ~1e-5 in fp32; not for half precision.
- ``"exact"``: θ' built as a differentiable function of the weights and a double backward (the way
  Learning-to-Reweight / Meta-Weight-Net compute it); the reference the others are tested against.
- ``"last_layer"``: closed form restricted to the final linear layer (a cheap proxy).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from .averaging import GradientSecondMoment, MetaGradientAverage
from .batchnorm_tangent import batchnorm_tangents
from .class_split import OWN_CLASS_KEY, HeadSplit, class_head_gradients, logit_gradients, own_class_products
from .distributed import all_reduce_mean_, world_size
from .layerwise import LayerTape
from .lookahead import ParamSpec, clip_coefficient, lookahead, tangent, weight_decay_grad
from .losses import META_OBJECTIVES, SINGLE_LABEL, TaskLoss
from .passes import (
    RngChain,
    RngState,
    checkpointing_off,
    forward_ad_safe_attention,
    frozen_batchnorm,
    functional_logits,
    meta_loss_mode,
    per_example_loss,
    replay_rng,
)
from .primal_reuse import Recording, reuse_outputs
from .rows import EmbeddingRows

__all__ = ["MicroBatch", "MetaBatch", "MetaGradients", "meta_gradients", "STRATEGIES", "INSTANCE_SIGNALS",
           "find_output_layer"]

Strategy = Literal["jvp", "finite_difference", "exact", "last_layer"]
STRATEGIES = ("jvp", "finite_difference", "exact", "last_layer")
# what the instance rates step on: the product with the whole meta gradient, or without the own label's share
INSTANCE_SIGNALS = ("mean", "other_classes")


@dataclass
class MicroBatch:
    """One training micro-batch as the model sees it, plus what the meta step needs."""

    inputs: dict[str, Any]  # model keyword arguments (no labels, no index)
    labels: torch.Tensor
    weights: torch.Tensor  # current effective weights e_i
    seed: int  # RNG seed under which the real forward of this micro-batch runs (dropout replay) unless ``rng``
    losses: torch.Tensor | None = None  # L_i(θ) if already known (finite differences reuse them)
    indices: torch.Tensor | None = None  # dataset row of every example (for the rate table)
    groups: torch.Tensor | None = None  # group id of every example (group-level rates: keys of the group table)
    # (head input h, logits) of the real forward, when it already ran: the last-layer strategy reuses them
    features: tuple[torch.Tensor, torch.Tensor] | None = None
    # conv / linear outputs of the real forward, when it already ran: the jvp pass reuses them as its primal
    outputs: Recording | None = None
    # the run's random state just before the real forward, when that forward drew its dropout masks from the run's
    # own stream (as the Trainer's does) instead of from ``seed``: the passes replay it
    rng: RngState | None = None
    # where the meta step runs before the window's real forwards: the states they start from, learned in order
    # from the meta step's first passes (shared by the copies of the window's micro-batches), and this one's place
    chain: RngChain | None = None
    position: int = 0

    @property
    def replay(self) -> int | RngState:
        """What the passes over this micro-batch replay the real forward's dropout masks from."""
        if self.chain is not None:
            return self.chain.state(self.position)
        return self.rng if self.rng is not None else self.seed


@contextlib.contextmanager
def _first_pass(mb: MicroBatch) -> Iterator[None]:
    """``replay_rng(mb.replay)`` for a pass that draws as the real forward does (a forward in training mode, its
    backward): where the states of the window's real forwards are learned in order (:class:`RngChain`), the
    state it leaves is the next micro-batch's."""
    with replay_rng(mb.replay):
        yield
        if mb.chain is not None:
            mb.chain.passed(mb.position)


@dataclass
class MetaBatch:
    inputs: dict[str, Any]
    labels: torch.Tensor
    seed: int
    dropout: bool = False  # evaluate the meta loss with dropout on (train mode) instead of like a validation loss
    # the classification head's input at θ for every meta example (last_layer), when taken before the real
    # forward (:func:`meta_head_features`): that forward then runs while no training graph is held
    features: torch.Tensor | None = None


@dataclass
class MetaGradients:
    example_grad: torch.Tensor  # ∂L_meta/∂e_i for the local examples, micro-batches concatenated
    weight_decay_grad: float
    meta_loss: float
    dots: torch.Tensor = field(repr=False, default=None)  # T·∇L_i (diagnostics, tests)
    # set when a layer tape was checked against forward mode and disagreed (the forward-mode dots were used)
    layerwise_mismatch: str | None = None
    # ∂L_meta/∂e_i along this step's own meta gradient (not the running average), when asked for
    # (``per_step_too``) and an average is on: what the class / group rates step on with class_rate_direction="per_step"
    per_step_grad: torch.Tensor | None = field(repr=False, default=None)
    # ∂L_meta/∂e_j of the probe examples (``probes``): each as if it were in this step at weight 0
    probe_grad: torch.Tensor | None = field(repr=False, default=None)

    @property
    def finite(self) -> bool:
        return (
            math.isfinite(self.meta_loss)
            and math.isfinite(self.weight_decay_grad)
            and bool(torch.isfinite(self.example_grad).all())
            and all(g is None or bool(torch.isfinite(g).all()) for g in (self.per_step_grad, self.probe_grad))
        )


def _subset(tensors: dict[str, torch.Tensor], names: Collection[str] | None) -> dict[str, torch.Tensor]:
    """The entries the lookahead moves (``meta_params``; None: all of them)."""
    return tensors if names is None else {n: tensors[n] for n in names}


def _grads(out: torch.Tensor, params: Mapping[str, torch.Tensor], **kw) -> dict[str, torch.Tensor]:
    names = list(params)
    gs = list(torch.autograd.grad(out, [params[n] for n in names], allow_unused=True, **kw))
    # contiguous: a convolution on channels-last activations returns its weight's gradient in that layout; each
    # copied gradient is let go as soon as its copy exists (not all of them held twice at once)
    grads = {}
    for i, n in enumerate(names):
        g, gs[i] = gs[i], None
        grads[n] = g.contiguous() if g is not None else torch.zeros_like(params[n])
    return grads


def _losses(
    model: nn.Module, params: Mapping[str, torch.Tensor], mb, smoothing: float, task: TaskLoss = SINGLE_LABEL,
) -> torch.Tensor:
    """The per-example losses ``ℓ_i`` of ``mb`` (or a meta batch) at ``params``, by the task's loss."""
    return task(functional_logits(model, params, mb.inputs), mb.labels, smoothing)


def lookahead_gradient(
    model: nn.Module, params: Mapping[str, torch.Tensor], window: Sequence[MicroBatch], normalizer: float,
    smoothing: float = 0.0, loss_scale: float = 1.0, task: TaskLoss = SINGLE_LABEL,
) -> dict[str, torch.Tensor]:
    """(1/normalizer) Σ e_i ∇L_i over the window, averaged over ranks: the gradient the real step will use.

    ``loss_scale`` (the fp16 GradScaler's current scale) multiplies the loss before the backward so that
    half-precision intermediate gradients do not underflow; the result is divided by it again (unscaled).
    """
    total: dict[str, torch.Tensor] | None = None
    for mb in window:
        with _first_pass(mb), frozen_batchnorm(model):
            L = _losses(model, params, mb, smoothing, task)
            g = _grads((mb.weights.to(L.dtype) * L).sum() * (loss_scale / normalizer), params)
            if loss_scale != 1.0:
                g = {n: v / loss_scale for n, v in g.items()}
        mb.losses = L.detach()
        total = g if total is None else {n: total[n] + g[n] for n in total}
    all_reduce_mean_(list(total.values()))
    return total


def meta_loss_gradient(
    model: nn.Module, theta: Mapping[str, torch.Tensor], meta: MetaBatch, smoothing: float = 0.0,
    loss_scale: float = 1.0, task: TaskLoss = SINGLE_LABEL, wrt: Collection[str] | None = None,
    objective: str = "loss", record: tuple[nn.Module, dict[str, torch.Tensor]] | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean meta loss (the task's batch loss: over examples, or over target tokens) and the gradient of the
    meta ``objective`` (:meth:`TaskLoss.meta_objective`; ``"loss"``: that loss) at θ (batch-statistics BN,
    nothing written), averaged over ranks. The backward runs on ``loss_scale ×`` the objective and the
    gradient is unscaled (fp16 underflow). ``wrt``: the gradient of these parameters only (the others enter
    the forward as constants: no graph is kept for them). ``record`` (a module, a dict): that module's input
    (``"h"``) and output (``"logits"``) in this forward, and every meta example's ``∂objective/∂ℓ_j``
    (``"w"``), detached, into the dict (this rank's examples: what :mod:`~hf_ddlr.meta.class_split` needs)."""
    leaf = {n: v.detach().requires_grad_(wrt is None or n in wrt) for n, v in theta.items()}
    hook = None
    if record is not None:
        box = record[1]
        hook = record[0].register_forward_hook(
            lambda mod, inp, out: box.update(h=inp[0].detach(), head_out=out.detach()))
    with replay_rng(meta.seed), frozen_batchnorm(model), meta_loss_mode(model, meta.dropout):
        try:
            logits = functional_logits(model, leaf, meta.inputs)  # (what _losses computes, the logits kept)
            L = task(logits, meta.labels, smoothing)
        finally:
            if hook is not None:
                hook.remove()
        if record is not None:
            box["logits"] = logits.detach()
        Lm = task.mean(L, meta.labels)
        obj = task.meta_objective(L, meta.labels, objective)
        if record is not None:
            record[1]["w"] = torch.autograd.grad(obj, L, retain_graph=True)[0].detach().float()
        g = _grads(obj * loss_scale, _subset(leaf, wrt))
        if loss_scale != 1.0:
            g = {n: v / loss_scale for n, v in g.items()}
    lm = Lm.detach().reshape(1)
    all_reduce_mean_([lm, *g.values()])
    return float(lm), g


def jvp_dots(
    model: nn.Module, params: Mapping[str, torch.Tensor], mb: MicroBatch, T: Mapping[str, torch.Tensor],
    smoothing: float = 0.0, loss_scale: float = 1.0, task: TaskLoss = SINGLE_LABEL,
) -> torch.Tensor:
    """T·∇L_i for every example of ``mb`` in one forward-mode pass, replaying the real forward's dropout
    (T may name a subset of ``params``: the dots over that subset).
    The tangent is pushed forward as ``loss_scale × T`` (fp16 underflow) and the dots are unscaled. With
    ``mb.outputs`` (the real forward's layer outputs) the convolution / linear layers take their primal
    values from there instead of computing them again."""
    reuse = reuse_outputs(mb.outputs) if mb.outputs else contextlib.nullcontext()
    bn = batchnorm_tangents(model, mb.outputs)
    with replay_rng(mb.replay), frozen_batchnorm(model), forward_ad_safe_attention(), checkpointing_off(model), \
            torch.no_grad(), reuse, bn:
        with fwAD.dual_level():
            # (parameters outside T enter as constants: no tangent is carried through them)
            dual = {n: fwAD.make_dual(p.detach(), (T[n] * loss_scale).to(p.dtype)) if n in T else p.detach()
                    for n, p in params.items()}
            L = _losses(model, dual, mb, smoothing, task)
            primal, tang = fwAD.unpack_dual(L)
    if mb.losses is None:
        mb.losses = primal.detach()
    return tang.detach().float() / loss_scale


def fd_dots(
    model: nn.Module, params: Mapping[str, torch.Tensor], mb: MicroBatch, T: Mapping[str, torch.Tensor],
    eps_rel: float = 3e-6, smoothing: float = 0.0, task: TaskLoss = SINGLE_LABEL,
) -> torch.Tensor:
    """One-sided finite difference ``(L_i(θ+εT) − L_i(θ))/ε`` with ε relative to ‖θ‖/‖T‖."""
    with torch.no_grad():
        tn = math.sqrt(sum(float((t.float() ** 2).sum()) for t in T.values()))
        pn = math.sqrt(sum(float((params[n].float() ** 2).sum()) for n in T))
        if tn == 0.0:
            return torch.zeros(mb.labels.shape[0], device=mb.labels.device)
        eps = eps_rel * max(pn, 1e-12) / tn
        with replay_rng(mb.replay), frozen_batchnorm(model):
            if mb.losses is None:
                mb.losses = _losses(model, params, mb, smoothing, task).detach()
        with replay_rng(mb.replay), frozen_batchnorm(model):
            Lp = _losses(model, {n: p + eps * T[n].to(p.dtype) if n in T else p for n, p in params.items()}, mb,
                         smoothing, task)
        return ((Lp.double() - mb.losses.double()) / eps).float()


def find_output_layer(model: nn.Module, num_labels: int | None = None) -> tuple[str, nn.Linear]:
    """The classification head: the last ``nn.Linear`` (with ``num_labels`` outputs when given)."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (num_labels is None or m.out_features == num_labels):
            found = (name, m)
    if found is None:
        raise ValueError(
            "meta_strategy='last_layer' needs a final nn.Linear producing the logits "
            f"({num_labels} outputs); none was found. Use meta_strategy='jvp'."
        )
    return found


def _head_features(h: torch.Tensor, batch: int, head: nn.Linear) -> torch.Tensor:
    """The head's input as one feature vector per example, or a clear error when the head ran per token."""
    if h.numel() != batch * head.in_features:
        raise ValueError(
            f"meta_strategy='last_layer' needs one feature vector per example at the classification head, but "
            f"the head ran on an input of shape {tuple(h.shape)} for {batch} examples (e.g. a decoder-only "
            f"*ForSequenceClassification scores every token and pools afterwards). Use meta_strategy='jvp'."
        )
    return h.reshape(batch, head.in_features)


def meta_head_features(model: nn.Module, meta: MetaBatch, num_labels: int | None = None) -> torch.Tensor:
    """The classification head's input for every example of ``meta`` at the model's current parameters (what
    ``meta_strategy="last_layer"`` needs of the meta batch: one forward without gradients, batch-statistics BN,
    nothing written), fp32, [examples, head input]."""
    _, head = find_output_layer(model, num_labels)
    box: dict[str, torch.Tensor] = {}
    hook = head.register_forward_hook(lambda mod, inp, out: box.__setitem__("h", inp[0]))
    try:
        with torch.no_grad(), replay_rng(meta.seed), frozen_batchnorm(model), meta_loss_mode(model, meta.dropout):
            functional_logits(model, {}, meta.inputs)
    finally:
        hook.remove()
    return _head_features(box["h"].detach().float(), meta.labels.shape[0], head)


def _last_layer(
    model: nn.Module, params: Mapping[str, torch.Tensor], window: Sequence[MicroBatch], meta: MetaBatch,
    specs: Mapping[str, ParamSpec], weight_decay: float, normalizer: float, smoothing: float,
    grads: Mapping[str, torch.Tensor] | None, num_labels: int | None = None,
    average: MetaGradientAverage | None = None, per_step_too: bool = False, weight_decay_grad_needed: bool = True,
    probes: Sequence[MicroBatch] = (), metric: GradientSecondMoment | None = None,
) -> MetaGradients:
    head_name, head = find_output_layer(model, num_labels)
    hp = {n: p for n, p in params.items() if n in (f"{head_name}.weight", f"{head_name}.bias")}
    wn = f"{head_name}.weight"
    bn = f"{head_name}.bias" if f"{head_name}.bias" in hp else None
    box: dict[str, torch.Tensor] = {}
    hook = head.register_forward_hook(lambda mod, inp, out: box.__setitem__("h", inp[0]))
    def features(mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(head input h, dL_i/dlogits) of every example of ``mb``."""
        if mb.features is not None:
            h, logits = (f.detach().float() for f in mb.features)
        else:
            with _first_pass(mb), frozen_batchnorm(model):
                logits = functional_logits(model, {}, mb.inputs).float()
            h = box["h"].detach().float()
        h = _head_features(h, logits.shape[0], head)
        C = logits.shape[1]
        target = torch.nn.functional.one_hot(mb.labels, C).float()
        if smoothing:
            target = target * (1 - smoothing) + smoothing / C
        mb.losses = per_example_loss(logits, mb.labels, smoothing)
        return h, torch.softmax(logits, 1) - target

    try:
        with torch.no_grad():
            feats = [features(mb) for mb in window]
            probe_feats = [features(mb) for mb in probes]
            if grads is None:
                gW = sum((mb.weights[:, None] * d).T @ h for mb, (h, d) in zip(window, feats)) / normalizer
                gb = sum((mb.weights[:, None] * d).sum(0) for mb, (h, d) in zip(window, feats)) / normalizer
                grads = {wn: gW.to(hp[wn].dtype)}
                if bn:
                    grads[bn] = gb.to(hp[bn].dtype)
                all_reduce_mean_(list(grads.values()))
            theta = lookahead({n: p.detach() for n, p in hp.items()}, {n: grads[n] for n in hp}, specs, weight_decay)
            _update_metric(metric, grads, hp, specs, 1.0)
        hm = meta.features if meta.features is not None else meta_head_features(model, meta, num_labels)
        W2 = theta[wn].detach().float().requires_grad_(True)
        b2 = theta[bn].detach().float().requires_grad_(True) if bn else None
        lm_logits = hm @ W2.T + (b2 if b2 is not None else 0.0)
        Lm = per_example_loss(lm_logits, meta.labels, smoothing).mean()
        gm = dict(zip([wn] + ([bn] if bn else []), torch.autograd.grad(Lm, [W2] + ([b2] if bn else []))))
        lm = Lm.detach().reshape(1)
        all_reduce_mean_([lm, *gm.values()])
        def head_dots(T: Mapping[str, torch.Tensor], of: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
            return torch.cat([((d @ T[wn].float()) * h).sum(1) + (d @ T[bn].float() if bn else 0.0) for h, d in of])

        T_step = None
        if average is not None:
            if per_step_too:
                T_step = tangent(gm, specs)
            gm = average.update(gm)
        T = tangent(gm, specs)
        _in_metric(metric, T, T_step)
        per_step = -head_dots(T_step, feats) / (normalizer * world_size()) if T_step is not None else None
        dots = head_dots(T, feats)
        probe_grad = -head_dots(T, probe_feats) / (normalizer * world_size()) if probes else None
    finally:
        hook.remove()
    wd_g = weight_decay_grad(gm, {n: hp[n] for n in gm}, specs) if weight_decay_grad_needed else 0.0
    return MetaGradients(-dots / (normalizer * world_size()), wd_g, float(lm), dots, per_step_grad=per_step,
                         probe_grad=probe_grad)


def _exact(
    model: nn.Module, params: Mapping[str, torch.Tensor], window: Sequence[MicroBatch], meta: MetaBatch,
    specs: Mapping[str, ParamSpec], weight_decay: float, normalizer: float, smoothing: float,
    max_grad_norm: float | None = None, average: MetaGradientAverage | None = None, task: TaskLoss = SINGLE_LABEL,
    per_step_too: bool = False, probes: Sequence[MicroBatch] = (), meta_params: Collection[str] | None = None,
    objective: str = "loss",
) -> MetaGradients:
    if world_size() > 1:
        raise NotImplementedError(
            "meta_strategy='exact' (double backward) is a single-process reference; under DDP use 'jvp'."
        )
    # the probes are in the lookahead at weight 0: their weights' gradients are theirs, the step is unchanged
    e_leaves = [mb.weights.detach().float().clone().requires_grad_(True) for mb in window]
    e_leaves += [torch.zeros(mb.labels.shape[0], device=mb.labels.device, requires_grad=True) for mb in probes]
    wd = torch.tensor(float(weight_decay), requires_grad=True)
    g: dict[str, torch.Tensor] | None = None
    with forward_ad_safe_attention():
        for mb, e in zip([*window, *probes], e_leaves):
            with _first_pass(mb), frozen_batchnorm(model):
                L = _losses(model, params, mb, smoothing, task)
                gi = _grads((e.to(L.dtype) * L).sum() / normalizer, params, create_graph=True)
            mb.losses = L.detach()
            g = gi if g is None else {n: g[n] + gi[n] for n in g}
        c = clip_coefficient(g, max_grad_norm)  # a constant of the step, as in the other strategies
        moved = _subset(params, meta_params)
        theta = {**{n: p.detach() for n, p in params.items()}, **lookahead(moved, g, specs, wd, grad_scale=c)}
        with replay_rng(meta.seed), frozen_batchnorm(model), meta_loss_mode(model, meta.dropout):
            L_meta = _losses(model, theta, meta, smoothing, task)
            Lm = task.mean(L_meta, meta.labels)
            obj = task.meta_objective(L_meta, meta.labels, objective)
        per_step = None
        if average is None:
            out = torch.autograd.grad(obj, [*e_leaves, wd], allow_unused=True)
        else:  # the chain rule through θ' with the averaged meta gradient in place of this step's
            names = list(moved)
            gm = dict(zip(names, torch.autograd.grad(obj, [theta[n] for n in names], retain_graph=True)))
            if per_step_too:
                raw = torch.autograd.grad(obj, e_leaves[:len(window)], retain_graph=True, allow_unused=True)
                per_step = torch.cat([o if o is not None else torch.zeros_like(e) for o, e in zip(raw, e_leaves)])
            direction = average.update(gm)
            surrogate = sum((direction[n].detach() * theta[n]).sum() for n in names)
            out = torch.autograd.grad(surrogate, [*e_leaves, wd], allow_unused=True)
    grads_e = [(o if o is not None else torch.zeros_like(e)).detach() for o, e in zip(out[:-1], e_leaves)]
    eg = torch.cat(grads_e[:len(window)])
    wd_g = float(out[-1]) if out[-1] is not None else 0.0
    return MetaGradients(eg, wd_g, float(Lm.detach()), -eg * normalizer,
                         per_step_grad=None if per_step is None else per_step.detach(),
                         probe_grad=torch.cat(grads_e[len(window):]) if probes else None)


def meta_gradients(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    window: Sequence[MicroBatch],
    meta: MetaBatch,
    specs: Mapping[str, ParamSpec],
    *,
    weight_decay: float,
    normalizer: float,
    strategy: Strategy = "jvp",
    grads: Mapping[str, torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
    fd_eps: float = 3e-6,
    loss_scale: float = 1.0,
    num_labels: int | None = None,
    layer_tape: LayerTape | None = None,
    check_layer_tape: float | None = None,
    max_grad_norm: float | None = None,
    average: MetaGradientAverage | None = None,
    weight_decay_grad_needed: bool = True,
    task: TaskLoss = SINGLE_LABEL,
    embedding_rows: EmbeddingRows | None = None,
    per_step_too: bool = False,
    average_products: bool = True,
    probes: Sequence[MicroBatch] = (),
    meta_params: Collection[str] | None = None,
    objective: str = "loss",
    metric: GradientSecondMoment | None = None,
    instance_signal: str = "mean",
) -> MetaGradients:
    """∂L_meta/∂e_i for every example of ``window`` and ∂L_meta/∂wd after the lookahead of ``specs``.

    ``params`` are the model's trainable parameters at θ (the point of the real step); ``normalizer`` is
    the number of examples the real loss is averaged over on this rank (the real gradient is
    ``Σ e_i ∇L_i / normalizer`` averaged over ranks); for a token-level ``task``
    (:class:`~hf_ddlr.meta.losses.TaskLoss`: ``L_i`` is then the sum of example i's token losses) the number
    of target tokens instead. ``grads`` may carry that real gradient when it is
    already known (the delayed update reuses the real step's ``.grad``); otherwise it is computed.
    ``loss_scale`` is the fp16 GradScaler's current scale (1 otherwise): the reverse passes run on scaled
    losses and the forward-mode pass on a scaled tangent, and every result is unscaled, so the returned
    gradients do not depend on it (up to rounding) but do not underflow in half precision. Overflow shows
    up as a non-finite result (:attr:`MetaGradients.finite`), which the caller skips. ``num_labels`` picks
    the classification head of ``"last_layer"`` (the last ``nn.Linear`` with that many outputs).

    ``layer_tape`` (``"jvp"`` on a one-micro-batch window): the recorded real forward of that micro-batch,
    after its backward; the dots are taken from it instead of a forward-mode pass. ``check_layer_tape``
    (a cosine, e.g. 0.9999) also runs the forward-mode pass and, when the two disagree, uses the forward-mode
    dots and says why in :attr:`MetaGradients.layerwise_mismatch`. ``embedding_rows`` (with a layer tape, and
    when the weight decay's meta-gradient is not needed): compute the lookahead of large embedding tables on
    the looked-up rows only (:mod:`~hf_ddlr.meta.rows`).

    ``per_step_too`` (with an ``average``): also the example gradients along this step's own meta gradient
    (:attr:`MetaGradients.per_step_grad`), one more set of products: the class / group rates, which move at
    every step, step on it so that they do not chase the average's lagging direction (docs/robustness.md).
    ``average_products=False`` (with ``per_step_too``; no instance rates to step on the average's products): the
    jvp and finite-difference strategies take only the per-step products, which are then
    :attr:`MetaGradients.example_grad` too (the average is still updated: the weight decay's meta-gradient uses it).

    ``probes``: more training micro-batches that are not part of the step. Each probe example j gets
    ``∂L_meta/∂e_j`` as if it were in the step at weight ``e_j = 0`` (the derivative Learning to Reweight takes):
    the same products ``T·∇L_j`` as the window's, with the instance rates' direction (the average's), divided by
    the same ``normalizer`` (:attr:`MetaGradients.probe_grad`). The step, θ' and the meta loss do not change.

    ``meta_params`` (names of ``params``; None: all): the lookahead moves these only, so the products — and every
    gradient returned — are sums over them (:mod:`~hf_ddlr.meta.parameters`); the real step's gradient, and so
    its clipping coefficient, stays the whole model's. ``"last_layer"`` is its own restriction and ignores it.

    ``objective``: what the lookahead's meta batch is scored by (:data:`~hf_ddlr.meta.losses.META_OBJECTIVES`,
    :meth:`~hf_ddlr.meta.losses.TaskLoss.meta_objective`); every meta-gradient returned is that objective's,
    :attr:`MetaGradients.meta_loss` stays the task's loss. ``"last_layer"`` takes ``"loss"`` only.

    ``metric`` (not with ``"exact"``): Adam's second moment of the training gradient, folded in with this step's
    (clipped) gradient of the tensors the optimizer does not precondition (SGD specs); their share of every product
    is then taken in its metric, ``T_p / (sqrt(v̂_p) + eps)`` (:class:`~hf_ddlr.meta.averaging.GradientSecondMoment`).
    Adam / AdamW, RMSprop and Adagrad specs keep their own preconditioner. The weight decay's meta-gradient stays
    the real step's.

    ``instance_signal="other_classes"`` (``"jvp"`` and ``"finite_difference"``, single-label classification): the
    window's and the probes' example gradients (:attr:`MetaGradients.example_grad`, ``probe_grad``: what the instance
    rates step on) leave out each example's product with the share of the meta examples of its own label, taken over
    the classification head in closed form (:mod:`~hf_ddlr.meta.class_split`); :attr:`MetaGradients.dots` and the
    per-step products (class and group rates) stay the whole meta gradient's. ``"mean"``: the whole product.
    """
    _check_arguments(strategy, layer_tape, grads, task, objective, instance_signal)
    if strategy == "exact" and metric is not None:
        raise ValueError("meta_strategy='exact' differentiates the real lookahead, whose products are the optimizer's; "
                         "it cannot take them in Adam's metric. Use meta_strategy='jvp' or rate_metric='optimizer'.")
    if strategy == "exact":
        return _exact(model, params, window, meta, specs, weight_decay, normalizer, label_smoothing,
                      max_grad_norm, average, task, per_step_too, probes, meta_params, objective)
    if strategy == "last_layer":
        return _last_layer(model, params, window, meta, specs, weight_decay, normalizer, label_smoothing, grads,
                           num_labels, average, per_step_too, weight_decay_grad_needed, probes, metric)
    if grads is None:
        grads = lookahead_gradient(model, params, window, normalizer, label_smoothing, loss_scale, task)
    rows = None if weight_decay_grad_needed or layer_tape is None else embedding_rows
    split = _head_split(model, params, num_labels, meta_params) if instance_signal == "other_classes" else None
    meta_loss, g_meta, T, T_step, T_own = _meta_tangent(
        model, params, grads, meta, specs, weight_decay, label_smoothing, loss_scale, max_grad_norm, average, task,
        rows, layer_tape, per_step_too, [mb.inputs for mb in probes], meta_params, objective, metric, split)
    only_step = T_step is not None and not average_products  # the per-step set is the only one
    dots, mismatch = _dots(model, params, window, T_step if only_step else T, strategy, label_smoothing, loss_scale,
                           fd_eps, layer_tape, check_layer_tape, task)
    example_grad = -dots / (normalizer * world_size())
    per_step = example_grad if only_step else None
    if T_step is not None and not only_step:
        # (forward mode too when the tape disagreed with it: the tape is not trusted for either set)
        step_dots, _ = _dots(model, params, window, T_step, strategy, label_smoothing, loss_scale, fd_eps,
                             None if mismatch else layer_tape, None, task)
        per_step = -step_dots / (normalizer * world_size())
    probe_grad = None
    if probes:
        probe_dots, _ = _dots(model, params, probes, T, strategy, label_smoothing, loss_scale, fd_eps, None, None,
                              task)
        probe_grad = -probe_dots / (normalizer * world_size())
    if split is not None:  # the own label's share of the instance rates' products, left out
        def own(of: Sequence[MicroBatch]) -> torch.Tensor:
            return torch.cat([own_class_products(*T_own, *_train_head_features(model, params, mb, split,
                                                                                label_smoothing), mb.labels)
                              for mb in of])

        example_grad = example_grad + own(window).to(example_grad.dtype) / (normalizer * world_size())
        if probes:
            probe_grad = probe_grad + own(probes).to(probe_grad.dtype) / (normalizer * world_size())
    wd_g = weight_decay_grad(g_meta, params, specs) if weight_decay_grad_needed else 0.0
    return MetaGradients(example_grad, wd_g, meta_loss, dots, mismatch, per_step, probe_grad)


def _head_split(
    model: nn.Module, params: Mapping[str, torch.Tensor], num_labels: int | None, meta_params: Collection[str] | None,
) -> HeadSplit:
    """The classification head of ``instance_signal="other_classes"``, or a clear error when the lookahead does not
    move it (its per-class share is then 0)."""
    name, head = find_output_layer(model, num_labels)
    weight, bias = f"{name}.weight", f"{name}.bias"
    moved = set(params) if meta_params is None else set(meta_params) & set(params)
    if weight not in moved:
        raise ValueError(
            f"instance_signal='other_classes' splits the meta gradient over the classification head {name!r}, but "
            f"the lookahead does not move {weight!r} (frozen, or outside meta_parameters). Train the head and keep it "
            "in meta_parameters, or use instance_signal='mean'."
        )
    return HeadSplit(head, weight, bias if bias in moved and head.bias is not None else None)


def _train_head_features(
    model: nn.Module, params: Mapping[str, torch.Tensor], mb: MicroBatch, split: HeadSplit, smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(head input h_i, ∂ℓ_i/∂logits_i) of every example of ``mb`` at θ: from its real forward when that recorded
    them (``mb.features``), else from one forward without gradients that replays it."""
    if mb.features is not None:
        h, logits = mb.features
    else:
        box: dict[str, torch.Tensor] = {}
        hook = split.module.register_forward_hook(lambda mod, inp, out: box.update(h=inp[0].detach()))
        try:
            with torch.no_grad(), replay_rng(mb.replay), frozen_batchnorm(model):
                logits = functional_logits(model, {n: p.detach() for n, p in params.items()}, mb.inputs)
        finally:
            hook.remove()
        h = box["h"]
    logits = logits.reshape(mb.labels.shape[0], -1)
    return split.features(h, logits), logit_gradients(logits, mb.labels, smoothing)


def _check_arguments(
    strategy: str, layer_tape: LayerTape | None, grads: Mapping | None, task: TaskLoss, objective: str = "loss",
    instance_signal: str = "mean",
) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown meta_strategy {strategy!r}; choose one of {STRATEGIES}.")
    if instance_signal not in INSTANCE_SIGNALS:
        raise ValueError(f"Unknown instance_signal {instance_signal!r}; choose one of {INSTANCE_SIGNALS}.")
    if instance_signal == "other_classes" and strategy not in ("jvp", "finite_difference"):
        raise ValueError(f"instance_signal='other_classes' is taken with meta_strategy='jvp' or 'finite_difference', "
                         f"not {strategy!r}. Use one of those, or instance_signal='mean'.")
    if instance_signal == "other_classes" and task is not SINGLE_LABEL:
        raise ValueError(f"instance_signal='other_classes' splits the meta gradient by the meta examples' single "
                         f"label; the task is {task.task}. Use instance_signal='mean'.")
    if objective not in META_OBJECTIVES:
        raise ValueError(f"Unknown meta objective {objective!r}; choose one of {META_OBJECTIVES}.")
    if strategy == "last_layer" and objective != "loss":
        raise ValueError(f"meta_strategy='last_layer' is the closed form of the cross-entropy meta loss; the meta "
                         f"objective {objective!r} needs meta_strategy='jvp' (or meta_objective='loss').")
    if strategy == "last_layer" and task is not SINGLE_LABEL:
        raise ValueError(
            f"meta_strategy='last_layer' is the closed form of single-label cross-entropy; the task is "
            f"{task.task}. Use meta_strategy='jvp'."
        )
    if layer_tape is not None and strategy != "jvp":
        raise ValueError(f"A layer tape gives the dots of meta_strategy='jvp', not {strategy!r}.")
    if strategy == "exact" and grads is not None:
        raise ValueError("meta_strategy='exact' recomputes the lookahead graph; it cannot take precomputed grads.")


def _meta_tangent(
    model: nn.Module, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], meta: MetaBatch,
    specs: Mapping[str, ParamSpec], weight_decay: float, smoothing: float, loss_scale: float,
    max_grad_norm: float | None, average: MetaGradientAverage | None, task: TaskLoss = SINGLE_LABEL,
    embedding_rows: EmbeddingRows | None = None, tape: LayerTape | None = None, per_step_too: bool = False,
    probe_inputs: Sequence[Mapping[str, Any]] = (), meta_params: Collection[str] | None = None,
    objective: str = "loss", metric: GradientSecondMoment | None = None, split: HeadSplit | None = None,
) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor] | None,
           tuple[torch.Tensor, torch.Tensor | None] | None]:
    """The meta loss at the lookahead point θ' of the real gradient ``grads``, its gradient (the running
    average's direction when there is one), and the tangent T of the dots. The step's clipping coefficient
    is a constant of the step: θ' uses the clipped gradient and T carries the coefficient. With
    ``embedding_rows`` the tables it plans are computed on their looked-up rows (checked once against the
    full lookahead). With ``per_step_too`` and an average, also the tangent of this step's own meta gradient
    (else None). ``meta_params``: the lookahead moves these only (the clipping coefficient is still the whole
    step's) and the gradient and tangent are theirs. ``metric``: both tangents in its metric (:func:`meta_gradients`).
    ``split`` (the classification head): also the head tangents of each class's meta examples alone, stacked over
    the classes (averaged as the meta gradient is; :mod:`~hf_ddlr.meta.class_split`), else None."""
    c = clip_coefficient(grads, max_grad_norm)
    detached = {n: p.detach() for n, p in params.items()}
    moved = _subset(detached, meta_params)
    shapes = {n: p.shape for n, p in moved.items()}
    rows = embedding_rows.plan(tape, meta.inputs, shapes, probe_inputs) if embedding_rows else {}

    seen: dict[str, torch.Tensor] = {}

    def at_lookahead(**kw) -> tuple[float, dict[str, torch.Tensor]]:
        theta = {**detached, **lookahead(moved, grads, specs, weight_decay, grad_scale=c, **kw)}
        return meta_loss_gradient(model, theta, meta, smoothing, loss_scale, task, wrt=meta_params,
                                  objective=objective, record=(split.module, seen) if split else None)

    meta_loss, g_meta = at_lookahead(rows=rows)
    if rows and embedding_rows.state == "unchecked":
        ref_loss, ref_g = at_lookahead()  # the full lookahead, for comparison
        if math.isfinite(ref_loss):  # (an overflowing fp16 step is no check: the next one is)
            same = ref_loss == meta_loss and all(torch.equal(ref_g[n], g_meta[n]) for n in ref_g)
            embedding_rows.settle(same, next(iter(ref_g.values())).device)
        meta_loss, g_meta = ref_loss, ref_g
    # (a finite clipping coefficient is a finite norm of the whole gradient: the metric need not scan it again)
    _update_metric(metric, grads, moved, specs, c, known_finite=bool(max_grad_norm) and max_grad_norm > 0)
    own = _class_head_gradients(split, seen, meta, smoothing) if split else {}
    T_step = None
    if average is not None:
        if per_step_too:
            T_step = _scaled(tangent(g_meta, specs), c)
        both = average.update({**g_meta, **own})  # (one average: the same factor and steps, saved together)
        g_meta = {n: v for n, v in both.items() if not n.startswith(OWN_CLASS_KEY)}
        own = {n: v for n, v in both.items() if n.startswith(OWN_CLASS_KEY)}
    T = _scaled(tangent(g_meta, specs), c)
    _in_metric(metric, T, T_step)
    T_own = None
    if split:  # (the tangent is elementwise-linear in the gradient: each class's is its gradient times T of ones)
        unit = _scaled(tangent({n: torch.ones_like(detached[n], dtype=torch.float32) for n in split.names}, specs), c)
        _in_metric(metric, unit)
        T_own = (unit[split.weight] * own[OWN_CLASS_KEY + "weight"],
                 unit[split.bias] * own[OWN_CLASS_KEY + "bias"] if split.bias else None)
    return meta_loss, g_meta, T, T_step, T_own


def _class_head_gradients(
    split: HeadSplit, seen: Mapping[str, torch.Tensor], meta: MetaBatch, smoothing: float,
) -> dict[str, torch.Tensor]:
    """The meta objective's head gradient split by the meta examples' class, averaged over ranks, under the keys the
    meta-gradient average holds it by (:data:`~hf_ddlr.meta.class_split.OWN_CLASS_KEY`)."""
    logits = seen["logits"].float().reshape(meta.labels.shape[0], -1)
    h = split.features(seen["h"], logits, seen["head_out"])
    GW, Gb = class_head_gradients(h, logit_gradients(logits, meta.labels, smoothing), seen["w"], meta.labels,
                                  logits.shape[1])
    all_reduce_mean_([GW, Gb])
    out = {OWN_CLASS_KEY + "weight": GW}
    if split.bias is not None:
        out[OWN_CLASS_KEY + "bias"] = Gb
    return out


def _update_metric(
    metric: GradientSecondMoment | None, grads: Mapping[str, torch.Tensor], moved: Collection[str],
    specs: Mapping[str, ParamSpec], scale: float, known_finite: bool = False,
) -> None:
    """Fold this step's gradient (times the clipping coefficient ``scale``) of the moved tensors the optimizer does
    not precondition into ``metric`` (``known_finite``: :meth:`GradientSecondMoment.update`)."""
    if metric is not None:
        metric.update({n: grads[n] for n in moved if not specs[n].preconditioned}, scale, known_finite=known_finite)


def _in_metric(metric: GradientSecondMoment | None, *tangents: dict[str, torch.Tensor] | None) -> None:
    """The tangents (new tensors; None: absent) in ``metric``'s units, in place, on the tensors it holds: those the
    optimizer does not precondition (:func:`_update_metric`)."""
    if metric is not None:
        metric.precondition_(*(T for T in tangents if T is not None))


def _scaled(T: dict[str, torch.Tensor], c: float) -> dict[str, torch.Tensor]:
    """The tangent ``T`` (new tensors, from :func:`tangent`) times the step's clipping coefficient, in place."""
    return T if c == 1.0 else {n: t.mul_(c) for n, t in T.items()}


def _dots(
    model: nn.Module, params: Mapping[str, torch.Tensor], window: Sequence[MicroBatch],
    T: Mapping[str, torch.Tensor], strategy: Strategy, smoothing: float, loss_scale: float, fd_eps: float,
    layer_tape: LayerTape | None, check_layer_tape: float | None, task: TaskLoss = SINGLE_LABEL,
) -> tuple[torch.Tensor, str | None]:
    """T·∇L_i of every example of the window (micro-batches concatenated) by ``"jvp"`` (from the layer tape
    when there is one) or ``"finite_difference"``, and why a checked layer tape disagreed with forward mode
    (None when it did not; the forward-mode dots are returned then)."""
    if strategy == "finite_difference":
        return torch.cat([fd_dots(model, params, mb, T, fd_eps, smoothing, task) for mb in window]), None
    if layer_tape is None:
        return torch.cat([jvp_dots(model, params, mb, T, smoothing, loss_scale, task) for mb in window]), None
    if len(window) != 1:
        raise ValueError("A layer tape records one micro-batch; the window has several.")
    dots = layer_tape.dots(T)
    if check_layer_tape is None:
        return dots, None
    ref = jvp_dots(model, params, window[0], T, smoothing, loss_scale, task)
    mismatch = _compare_dots(dots, ref, check_layer_tape)
    return (dots if mismatch is None else ref), mismatch


def _compare_dots(dots: torch.Tensor, ref: torch.Tensor, min_cos: float) -> str | None:
    """Why ``dots`` do not match the forward-mode ``ref`` (cosine below ``min_cos``, or norms that differ by
    more than ``100·(1 − min_cos)`` relative), or None."""
    d, r = dots.double().flatten(), ref.double().flatten()
    if not (torch.isfinite(d).all() and torch.isfinite(r).all()):
        return None  # a non-finite step is skipped by the caller either way
    nr, nd = float(r.norm()), float(d.norm())
    if nr == 0.0 and nd == 0.0:
        return None
    cos = float(d @ r) / max(nr * nd, 1e-300)
    if cos >= min_cos and abs(nd - nr) <= (1 - min_cos) * 100 * nr:
        return None
    return f"per-layer dots vs forward mode: cosine {cos:.6f}, norms {nd:.4g} vs {nr:.4g}"
