"""Per-example gradient algebra from one forward's layer inputs and output gradients ("ghost" products).

For a model built only from ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm`` and RMSNorm parameters (torch's
``nn.RMSNorm`` and the Llama-family ``*RMSNorm`` modules of transformers) and GPT-2's ``Conv1D`` (a linear
layer with a transposed weight), with no
coupling between the examples of a batch (no BatchNorm in train mode), the gradient of example i's loss
w.r.t. a layer's weight is ``Σ_t g_{i,t} ⊗ a_{i,t}`` (a: the layer's input, g: the gradient of the loss at
its output, t: the positions of the example). So, from the tensors a and g of *one* real forward and *one*
backward to the layer outputs:

- ``T·∇L_i`` for every example costs one matmul per linear layer (``Σ_t g·(T a)``) — what forward-mode AD
  costs three matmuls for (it recomputes the primal and pushes the tangent through every op);
- ``Σ_i c_i ∇L_i`` for any weights c (the lookahead gradient, then the real step's gradient with the
  updated rates) costs the weight-gradient matmul of a backward, without a second backward pass.

This is the same mathematics as the jvp strategy (the same numbers up to rounding); :class:`LayerTape`
only applies where every trainable parameter sits in one of those layers, and the trainer checks it
against forward mode on its first step (:func:`unsupported_reason` lists what is checked statically).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_ranks_true, all_reduce_mean_
from .passes import checkpointed_modules

__all__ = ["LayerTape", "LayerwiseCheck", "LayerwiseUnsupported", "compare_grads", "record_layers",
           "unsupported_reason"]

logger = logging.getLogger(__name__)

_LAYERS = (nn.Linear, nn.Embedding, nn.LayerNorm)


def _rms_eps(m: nn.Module) -> float | None:
    """The epsilon of an RMSNorm layer — ``w · x/√(mean(x²)+eps)`` over the last dimension, with one
    trainable 1-D ``weight`` and no bias — or None when ``m`` is not one. Recognised: ``nn.RMSNorm`` and the
    transformers ``*RMSNorm`` modules (Llama, Mistral, Qwen, ...: ``variance_epsilon``; Gemma's ``1 + w`` has
    the same weight gradient). A look-alike with other math fails the first step's check against autograd
    and the run falls back to forward mode."""
    if isinstance(m, nn.RMSNorm):
        if m.weight is None or len(m.normalized_shape) != 1:
            return None
        return float(m.eps) if m.eps is not None else torch.finfo(m.weight.dtype).eps  # torch's default
    if not type(m).__name__.endswith("RMSNorm"):
        return None
    own = dict(_trainable(m))
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    w = own.get("weight")
    if set(own) != {"weight"} or w is None or w.dim() != 1 or not isinstance(eps, float | int):
        return None
    return float(eps)


def _is_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: ``x @ W + b`` with ``W`` of shape [in, out]."""
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2 and getattr(m, "nf", None) == w.shape[1]


def _supported(m: nn.Module) -> bool:
    return type(m) in _LAYERS or _is_conv1d(m) or _rms_eps(m) is not None


class LayerwiseUnsupported(RuntimeError):
    """The recorded forward cannot be decomposed per example (raised at run time; callers fall back)."""


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(k, p) for k, p in module.named_parameters(recurse=False) if p.requires_grad]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the per-layer products cannot serve ``model``, or None when they can (checked statically)."""
    covered: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return f"'{name}' is a BatchNorm layer in train mode (its batch statistics couple the examples)"
        own = _trainable(m)
        if not own:
            continue
        if not _supported(m):
            return (f"'{name}' ({type(m).__name__}) holds trainable parameters and is not "
                    "Linear/Embedding/LayerNorm/RMSNorm/Conv1D")
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
            return f"'{name}' is an Embedding with max_norm / scale_grad_by_freq / sparse"
        covered.update(id(p) for _, p in own)
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            return f"parameter '{n}' does not belong to a supported layer"
    return None


@dataclass
class _Call:
    module: nn.Module
    inp: torch.Tensor
    out: torch.Tensor
    versions: tuple[int, int]
    grad: torch.Tensor | None = None


def _normalized(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂ of a LayerNorm / RMSNorm layer: its output before the elementwise weight (and bias)."""
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _rms_eps(m))


class LayerTape:
    """The layer calls of one forward; after :meth:`backward`, per-example dots and weighted gradients.

    ``names`` maps the model's trainable parameters (by identity) to the names used in the tangent / gradient
    dictionaries (the model's ``named_parameters`` names). ``batch``: the rows of the forward; ``rows_per_example``
    k: each example spans k rows, example i the rows i, i + n, ..., i + (k − 1)·n of the n·k (preference pairs:
    the chosen rows, then the rejected ones); its products are the sums over its rows.
    """

    def __init__(self, names: Mapping[int, str], batch: int, rows_per_example: int = 1) -> None:
        if batch % rows_per_example:
            raise ValueError(f"a batch of {batch} rows does not split into examples of {rows_per_example} rows.")
        self.names = dict(names)
        self.calls: list[_Call] = []
        self.batch = batch
        self.rows_per_example = rows_per_example
        self.problem: str | None = None  # why the forward cannot be decomposed (found while recording)
        self._done = False  # backward has run
        self.scale = 1.0  # the loss scale the recorded output gradients carry
        self.inputs: Mapping[str, Any] | None = None  # the model inputs of the recorded forward (set by its caller)
        self.expanded = 0  # batch-1 embedding outputs handed on expanded to the batch (see _hook)

    # ------------------------------------------------------------------ recording
    def _hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            self.problem = f"a {type(module).__name__} was called without a tensor input/output"
            return None
        if not out.requires_grad:
            return None
        x = args[0]
        B = self.batch
        broadcast = isinstance(module, nn.Embedding) and B > 1 and x.dim() >= 1 and x.shape[0] == 1
        if broadcast:
            # Position embeddings are looked up once ([1, S]) and broadcast over the batch; an explicit
            # expand (a view, the same values downstream) gives every example its own output gradient.
            # A forward that does not broadcast that output (PEFT's prompt tuning repeats it per example) can
            # fail on the expanded one: :func:`record_layers` then raises LayerwiseUnsupported.
            x, out = x.expand(B, *x.shape[1:]), out.expand(B, *out.shape[1:])
            self.expanded += 1
        self.calls.append(_Call(module, x, out, (x._version, out._version)))
        return out if broadcast else None

    def backward(self, losses: torch.Tensor, scale: float = 1.0, retain_graph: bool = False) -> None:
        """Gradients of ``Σ_i L_i`` at every recorded layer output (one reverse pass that skips weight
        gradients). ``scale`` multiplies the loss (fp16 underflow) and is divided out of every product."""
        if self.problem is not None:
            raise LayerwiseUnsupported(self.problem)
        if not self.calls:
            raise LayerwiseUnsupported("no supported layer ran in the forward")
        B = self.batch
        if losses.shape[0] * self.rows_per_example != B:
            raise LayerwiseUnsupported(f"{losses.shape[0]} losses for a batch of {B} rows")
        for c in self.calls:
            if (c.inp._version, c.out._version) != c.versions:
                raise LayerwiseUnsupported(f"the input or output of a {type(c.module).__name__} was modified in place")
            if c.inp.dim() == 0 or c.inp.shape[0] != B or c.out.shape[0] != B:
                raise LayerwiseUnsupported(
                    f"a {type(c.module).__name__} ran on a tensor whose first dimension is not the batch"
                )
        self._done = True
        gs = torch.autograd.grad(
            losses.sum() * scale, [c.out for c in self.calls], retain_graph=retain_graph, allow_unused=True
        )
        self.scale = float(scale)
        for c, g in zip(self.calls, gs):
            c.grad = None if g is None else g.detach()  # kept scaled (half precision); unscaled in fp32 below
            c.out = None  # the graph is no longer needed

    # ------------------------------------------------------------------ products
    def _pieces(
        self, wanted: Callable[[nn.Module], bool] | None = None,
    ) -> Iterator[tuple[_Call, torch.Tensor, torch.Tensor]]:
        """(call, a, g) with a, g as [B, positions, features] in fp32 (ids for embeddings), for the calls of the
        modules ``wanted`` accepts (all by default: the others are not converted or normalised)."""
        if not self._done:
            raise RuntimeError("LayerTape.backward must run before products are taken")
        B = self.batch
        for c in self.calls:
            if c.grad is None or (wanted is not None and not wanted(c.module)):
                continue
            m = c.module
            g = c.grad.float()
            if self.scale != 1.0:
                g = g / self.scale
            if isinstance(m, nn.Linear):
                yield c, c.inp.detach().reshape(B, -1, m.in_features).float(), g.reshape(B, -1, m.out_features)
            elif _is_conv1d(m):
                n_in, n_out = m.weight.shape
                yield c, c.inp.detach().reshape(B, -1, n_in).float(), g.reshape(B, -1, n_out)
            elif isinstance(m, nn.Embedding):
                ids = c.inp.reshape(B, -1)
                g = g.reshape(B, -1, m.embedding_dim)
                if m.padding_idx is not None:
                    g = g * (ids != m.padding_idx).unsqueeze(-1)
                yield c, ids, g
            else:  # LayerNorm / RMSNorm: a is the normalized input x̂, recomputed at each use (an elementwise
                # pass: cheaper than holding an activation-sized copy per norm layer through the meta pass)
                n = m.weight.numel()
                yield c, _normalized(m, c.inp.detach().float()).reshape(B, -1, n), g.reshape(B, -1, n)

    def _param(self, m: nn.Module, attr: str) -> str | None:
        p = getattr(m, attr, None)
        return None if p is None or not p.requires_grad else self.names.get(id(p))

    def dots(self, T: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``T·∇L_i`` for every example (fp32), T given for the named parameters (a subset: the dots over it)."""
        out = torch.zeros(self.batch, dtype=torch.float32, device=self._device())

        def in_T(m: nn.Module) -> tuple[str | None, str | None]:
            return tuple(n if n in T else None for n in (self._param(m, "weight"), self._param(m, "bias")))

        for c, a, g in self._pieces(lambda m: in_T(m) != (None, None)):
            m = c.module
            w, b = in_T(m)
            if isinstance(m, nn.Linear) or _is_conv1d(m):
                if w is not None:  # the elementwise product on the input side when the output is much wider
                    Tw = T[w].float()
                    Tw = Tw if _is_conv1d(m) else Tw.T  # as (in, out)
                    out += ((g @ Tw.T) * a).sum((1, 2)) if _wide_output(a, g) else ((a @ Tw) * g).sum((1, 2))
                if b is not None:
                    out += g.sum(1) @ T[b].float()
            elif isinstance(m, nn.Embedding):
                if w is not None:
                    out += (T[w].float()[a] * g).sum((1, 2))
            else:
                if w is not None:
                    out += (a * g).sum(1) @ T[w].float().reshape(-1)
                if b is not None:
                    out += g.sum(1) @ T[b].float().reshape(-1)
        return out.view(self.rows_per_example, -1).sum(0) if self.rows_per_example > 1 else out

    def weighted_grads(self, coef: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Σ_i coef_i ∇L_i`` for every named parameter a recorded layer used (fp32, parameter shapes)."""
        grads: dict[str, torch.Tensor] = {}

        def add(name: str | None, value: torch.Tensor) -> None:
            if name is not None:
                grads[name] = grads[name] + value if name in grads else value

        coef = coef.float().to(self._device()).repeat(self.rows_per_example)  # (every row: its example's)
        per_example = coef[:, None, None]
        for c, a, g in self._pieces():
            m = c.module
            w, b = self._param(m, "weight"), self._param(m, "bias")
            if (isinstance(m, nn.Linear) or _is_conv1d(m)) and _wide_output(a, g):
                if w is not None:  # the coefficients scale the (narrow) input, not the wide output gradient
                    a2, g2 = (a * per_example).reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
                    add(w, a2.T @ g2 if _is_conv1d(m) else g2.T @ a2)
                if b is not None:
                    add(b, coef @ g.sum(1))
                continue
            cg = g * per_example
            if isinstance(m, nn.Linear) or _is_conv1d(m):
                if w is not None:
                    a2, cg2 = a.reshape(-1, a.shape[-1]), cg.reshape(-1, cg.shape[-1])
                    add(w, a2.T @ cg2 if _is_conv1d(m) else cg2.T @ a2)
                add(b, cg.sum((0, 1)))
            elif isinstance(m, nn.Embedding):
                if w is not None:
                    gw = torch.zeros(m.num_embeddings, m.embedding_dim, dtype=torch.float32, device=g.device)
                    add(w, gw.index_add_(0, a.reshape(-1), cg.reshape(-1, m.embedding_dim)))
            else:
                add(w, (a * cg).sum((0, 1)).reshape(m.weight.shape))
                add(b, cg.sum((0, 1)).reshape(m.weight.shape))
        return grads

    def embedding_lookups(self) -> dict[str, tuple[str, torch.Tensor]]:
        """``{weight name: (input key, ids)}`` for every trainable embedding table that the recorded forward
        read in exactly one place, an ``nn.Embedding`` call on one of its model inputs :attr:`inputs` (the word
        embeddings; not a table tied to an output layer, nor positions built inside the model). Empty when the
        inputs were not recorded."""
        if self.inputs is None:
            return {}
        uses: dict[str, int] = {}
        for c in self.calls:
            for attr in ("weight", "bias"):
                if (n := self._param(c.module, attr)) is not None:
                    uses[n] = uses.get(n, 0) + 1
        found: dict[str, tuple[str, torch.Tensor]] = {}
        for c in self.calls:
            w = self._param(c.module, "weight")
            if not isinstance(c.module, nn.Embedding) or w is None or uses[w] != 1:
                continue
            key = next((k for k, v in self.inputs.items() if v is c.inp), None)
            if key is not None:
                found[w] = (key, c.inp)
        return found

    def _device(self) -> torch.device:
        return self.calls[0].inp.device if self.calls else torch.device("cpu")


WIDE_OUTPUT = 4  # output / input width from which the per-layer products work on the input side


def _wide_output(a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether a linear layer's output gradient ``g`` is much wider than its input ``a`` (an lm head: the
    vocabulary against the hidden size), so per-example scaling and elementwise products are cheaper on the
    input side. Other layers keep the output side (the arithmetic of earlier releases, bit for bit)."""
    return g.shape[-1] >= WIDE_OUTPUT * a.shape[-1]


@contextlib.contextmanager
def record_layers(model: nn.Module, names: Mapping[int, str], batch: int,
                  rows_per_example: int = 1) -> Iterator[LayerTape]:
    """Record every call of a Linear / Embedding / LayerNorm / RMSNorm / Conv1D layer with trainable parameters in ``model``
    during a forward over ``batch`` rows (``rows_per_example``: see :class:`LayerTape`). A forward that fails once
    the recording has expanded a batch-1 embedding output (which it hands on in place of the original) raises
    :class:`LayerwiseUnsupported`."""
    tape = LayerTape(names, batch, rows_per_example)
    handles = [
        m.register_forward_hook(tape._hook)
        for m in model.modules()
        if _trainable(m) and _supported(m)
    ]
    try:
        yield tape
    except Exception as e:
        if not tape.expanded:
            raise
        # the forward failed after the recording changed an output's shape: not the model's error
        raise LayerwiseUnsupported(
            f"the forward failed on a batch-1 embedding output expanded to the batch ({type(e).__name__}: {e})"
        ) from e
    finally:
        for h in handles:
            h.remove()


def compare_grads(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], tol: float) -> str | None:
    """Why ``got`` differs from ``ref`` beyond ``tol`` (relative, per tensor, with a floor for ~zero tensors)."""
    floor = 1e-3 * max(float(r.float().norm()) for r in ref.values())
    for n, r in ref.items():
        err = float((got[n].float() - r.float()).norm())
        if not err <= tol * (float(r.float().norm()) + floor):
            return f"the per-layer gradient of '{n}' differs from autograd's by {err:.3g} (norm {float(r.norm()):.3g})"
    return None


class LayerwiseCheck:
    """Whether a training run's meta steps take their dots and weighted gradients from a :class:`LayerTape`:
    a state machine, one per run, the same on every process.

    - ``"unchecked"``: until a step has been checked. The first step a tape can serve (one micro-batch,
      forward-mode strategy) runs both the tape and the references (autograd's lookahead gradient, forward
      mode's dots) and compares them; a step whose values overflow (as early fp16 steps do) does not count.
    - ``"verified"``: the check passed on every process; later steps use the tape alone.
    - ``"off"``: the model is not supported (seen statically, a forward that cannot be decomposed, or a failed
      check on any process): forward mode for the rest of the run.
    """

    def __init__(self) -> None:
        self.state = "unchecked"

    def applies(self, model: nn.Module, gradient_checkpointing: bool, compiled: bool = False) -> bool:
        """Whether this step's meta step should record a tape (the static check runs until a step is checked).
        ``compiled``: the real forward runs compiled, where the layers' values live inside the compiled graph."""
        if self.state == "off":
            return False
        if self.state == "unchecked":
            reason = "the model's forward is compiled (torch_compile / torch.compile)" if compiled else None
            reason = reason or unsupported_reason(model)
            checkpointing = gradient_checkpointing or bool(checkpointed_modules(model))
            if reason is None and checkpointing:
                reason = "gradient checkpointing recomputes the layers during the backward"
            if reason is not None:
                self._turn_off(reason, warn=False)
                return False
        return True

    def turn_off(self, reason: str) -> None:
        """Forward mode for the rest of the run, with a warning saying why (a forward the recording broke)."""
        self._turn_off(reason, warn=True)

    def _turn_off(self, reason: str, warn: bool) -> None:
        self.state = "off"
        msg = f"meta_strategy='jvp' uses forward mode for this model: {reason}."
        if warn:
            warnings.warn(msg + " (layerwise_dots=False skips this check.)", stacklevel=4)
        else:
            logger.info(msg)

    def meta_step(
        self, tape: LayerTape, losses: torch.Tensor, coef: torch.Tensor, params: Mapping[str, nn.Parameter], *,
        loss_scale: float, half: bool, device: Any, reference: Callable[[], Mapping[str, torch.Tensor]],
        run: Callable[[dict[str, torch.Tensor], float | None], Any],
    ) -> bool:
        """The meta step from the recorded layers; False when they cannot serve (nothing was done then, and the
        real forward's graph is intact). ``coef``: the weights of the lookahead gradient ``Σ coef_i ∇L_i``;
        ``reference()``: that gradient by autograd (for the check); ``run(grads, check)``: the meta step with
        the tape's lookahead gradient, checking its dots against forward mode at cosine ``check`` (None: no
        check); it returns the :class:`~hf_ddlr.meta.MetaGradients`."""
        check = self.state == "unchecked"
        problem = None
        try:
            tape.backward(losses, loss_scale, retain_graph=check)
        except LayerwiseUnsupported as e:
            problem = str(e)
        if check and not all_ranks_true(problem is None, device):  # every rank takes the same path
            self._turn_off(problem or "the recorded forward could not be decomposed on another process", warn=True)
            return False
        grads = None
        if problem is None:
            got = tape.weighted_grads(coef)
            grads = {n: got[n] if n in got else torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            all_reduce_mean_(list(grads.values()))
            if check:
                ref = reference()
                if not all(bool(torch.isfinite(r).all()) for r in ref.values()):
                    return False  # an fp16 overflow (the same on every rank): this step has no check; next one
                problem = compare_grads(grads, ref, 2e-2 if half else 1e-3)
        if check and not all_ranks_true(problem is None, device):
            self._turn_off(problem or "the check failed on another process", warn=True)
            return False
        if problem is not None:  # a later step that cannot be decomposed (e.g. an unusual batch)
            self._turn_off(problem, warn=True)
            return False
        res = run(grads, (0.999 if half else 0.9999) if check else None)
        if check and all_ranks_true(res.finite, device):  # (non-finite: skipped; checked next step)
            if all_ranks_true(res.layerwise_mismatch is None, device):
                self.state = "verified"
                logger.info("meta_strategy='jvp': per-layer products match forward mode; using them.")
            else:
                self._turn_off(res.layerwise_mismatch or "the check failed on another process", warn=True)
        return True
