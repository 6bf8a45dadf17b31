"""Helpers that make the extra forward passes of a meta step faithful to the real one.

The lookahead, meta and directional-derivative passes must see the same function as the real training
forward (batch-statistics BatchNorm, the same dropout masks) without leaving any trace on the model
(BatchNorm running statistics must be bit-identical to a plain step's).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = [
    "checkpointed_modules",
    "checkpointing_off",
    "compiled_like_eager",
    "is_compiled",
    "frozen_batchnorm",
    "meta_loss_mode",
    "replay_rng",
    "RngChain",
    "RngState",
    "forward_ad_safe_attention",
    "extract_logits",
    "per_example_loss",
    "functional_logits",
]


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module) -> Iterator[None]:
    """Use batch statistics in every BatchNorm layer without reading or writing running statistics.

    Setting ``track_running_stats=False`` makes ``F.batch_norm`` receive ``running_mean=None`` in train
    mode, so the pass computes exactly what a training forward computes and updates nothing.
    """
    mods = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    old = [m.track_running_stats for m in mods]
    for m in mods:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, o in zip(mods, old):
            m.track_running_stats = o


def checkpointed_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` with gradient checkpointing on (the ``gradient_checkpointing`` flag transformers'
    layers and many remote-code models carry)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextlib.contextmanager
def checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Run every gradient-checkpointed layer as is for a pass that records no backward (the forward-mode dots).

    Checkpointing only saves memory for a backward; a layer that checkpoints without one (transformers before
    5.24, and remote-code models that test ``self.gradient_checkpointing and self.training`` alone) runs through
    ``torch.utils.checkpoint``, which has no forward-mode rule, and the pass fails. Dropout draws the same masks
    either way. Clears the ``gradient_checkpointing`` flag of the modules that have it on, then restores it.
    """
    mods = []
    try:
        for m in checkpointed_modules(model):
            try:
                m.gradient_checkpointing = False
            except AttributeError:  # a read-only property: the module decides itself
                continue
            mods.append(m)
        yield
    finally:
        for m in mods:
            m.gradient_checkpointing = True


@contextlib.contextmanager
def meta_loss_mode(model: nn.Module, dropout: bool) -> Iterator[None]:
    """Evaluate the held-out (meta) loss like a validation loss unless ``dropout`` is True.

    Every module except BatchNorm is switched to eval mode (dropout and other train-only randomness
    off); BatchNorm keeps using batch statistics, as the real step and the lookahead do, so the meta
    loss is the one of the model the real step trains. Restores every flag afterwards.
    """
    if dropout:
        yield
        return
    bn = nn.modules.batchnorm._BatchNorm
    mods = [m for m in model.modules() if m.training and not isinstance(m, bn)]
    for m in mods:
        m.training = False
    try:
        yield
    finally:
        for m in mods:
            m.training = True


def is_compiled(model: nn.Module) -> bool:
    """Whether any part of ``model``'s forward runs compiled: the model or one of its modules compiled by
    ``torch.compile`` / ``Module.compile()`` (the Trainer's ``torch_compile=True``, accelerate's dynamo backend,
    its regional compilation of repeated blocks), wrappers such as DDP included."""
    return any(isinstance(getattr(m, "_orig_mod", None), nn.Module)  # torch.compile's OptimizedModule
               or getattr(m, "_compiled_call_impl", None) is not None  # nn.Module.compile()
               for m in model.modules())


@contextlib.contextmanager
def compiled_like_eager(enabled: bool) -> Iterator[None]:
    """While a run with a compiled forward trains (``enabled``), make its compiled graphs serve the meta step.

    - The meta step takes the lookahead gradient from the real forward's graph (``retain_graph=True``) before the
      real backward uses it again; a compiled backward that donates its saved buffers (PyTorch's default since
      2.6) refuses that. Donation off is PyTorch's own remedy and changes no value.
    - The meta step's own passes run eager and replay the real forward's dropout masks from its seed; a compiled
      graph draws its masks with its own generator, so the passes would see other masks than the real step
      trained with (measured: rates 0.12 apart after one step of a BERT with dropout 0.1). Inductor's
      ``fallback_random`` makes the compiled graph draw them as eager code does.

    Disabled (an eager run), nothing is imported or changed.
    """
    if not enabled:
        yield
        return
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    donation = (functorch_config.patch(donated_buffer=False) if hasattr(functorch_config, "donated_buffer")
                else contextlib.nullcontext())  # older PyTorch donates nothing
    with inductor_config.patch(fallback_random=True), donation:
        yield


def _rng_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.cuda.current_device()]
    return []


@dataclass(frozen=True)
class RngState:
    """The random state a forward draws its dropout masks from: the CPU generator's and, once CUDA is initialised,
    the current CUDA device's. Captured just before a real forward that draws from the run's own stream, so that
    the meta step's passes over the same micro-batch replay its masks (:func:`replay_rng`)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None

    @classmethod
    def capture(cls) -> RngState | None:
        """The current state, or None on an accelerator other than CUDA (MPS, XPU), whose generator is not
        captured here: the caller then seeds the forward instead."""
        if not _cpu_only() and not torch.cuda.is_available():
            return None
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        """Set the generators to this state (the run's stream goes on from here)."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


class RngChain:
    """The random states a window's real forwards start from, in order, where the meta step runs before them
    (several micro-batches per optimizer step): the first is captured as the window begins, and each next one is
    where the meta step's first pass over the micro-batch before it left the generators — a pass draws its dropout
    masks as the real forward does, so that is where the Trainer's stream stands when that micro-batch's real
    forward begins. The passes replay these states, and each real forward starts from its own."""

    def __init__(self, first: RngState, length: int) -> None:
        self.states: list[RngState | None] = [first] + [None] * (length - 1)

    def state(self, position: int) -> RngState:
        """The state the forward of the window's micro-batch ``position`` starts from."""
        state = self.states[position]
        if state is None:
            raise RuntimeError(f"micro-batch {position} of the window was replayed before the pass over micro-batch "
                               f"{position - 1}, which gives its random state; the window's passes run in order.")
        return state

    def passed(self, position: int) -> None:
        """A pass over micro-batch ``position`` ends here: the next micro-batch starts from the current state,
        unless an earlier pass gave it already."""
        if position + 1 < len(self.states) and self.states[position + 1] is None:
            self.states[position + 1] = RngState.capture()


@contextlib.contextmanager
def replay_rng(seed: int | RngState) -> Iterator[None]:
    """Run a block with the global RNG seeded by ``seed`` (or set to a captured :class:`RngState`) and restore the
    outer RNG stream afterwards.

    Every pass over the same micro-batch (lookahead, directional derivative, real forward) is run from the same
    seed or state so that dropout draws identical masks; the outer stream is left untouched.
    """
    with torch.random.fork_rng(devices=_rng_devices()):
        rewind_rng(seed)
        yield


def rewind_rng(seed: int | RngState) -> None:
    """Set the generators to where a forward replaying ``seed`` starts (:func:`replay_rng`), in place: for a forward
    that must draw the same masks again in the stream it runs in."""
    if isinstance(seed, RngState):
        seed.restore()
    elif _cpu_only():
        torch.default_generator.manual_seed(seed)  # what torch.manual_seed seeds on such a machine
    else:
        torch.manual_seed(seed)


@functools.cache
def _cpu_only() -> bool:
    """No CUDA / MPS / XPU device: seeding the CPU generator is all ``torch.manual_seed`` does that matters,
    without its lazily queued CUDA seeding (which formats a stack trace, ~1 ms, at every call)."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return not (
        torch.cuda.is_available()
        or (mps is not None and mps.is_available())
        or (xpu is not None and xpu.is_available())
    )


@contextlib.contextmanager
def patched_forwards(patches: Iterable[tuple[nn.Module, Callable[[Any], Any]]]) -> Iterator[None]:
    """Make each ``(module, make)`` pair's module run ``make(its current forward)`` as its forward for the block,
    then give every module its own forward back (an instance attribute it had, or the class's)."""
    saved: list[tuple[nn.Module, object]] = []
    try:
        for m, make in patches:
            saved.append((m, m.__dict__.get("forward")))
            m.forward = make(m.forward)
        yield
    finally:
        for m, old in saved:
            if old is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = old


@contextlib.contextmanager
def forward_ad_safe_attention() -> Iterator[None]:
    """Route scaled-dot-product attention to the math kernel, the only one with forward-mode AD rules
    and double-backward support on CPU (the fused flash kernel has neither)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - very old torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def extract_logits(outputs: Any) -> torch.Tensor:
    """Return the logits of a model output: a ``ModelOutput``, a mapping with ``logits``, a tensor, or a
    tuple (``return_dict=False``), whose first element is the logits because labels are never passed in."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, tuple) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None:
        raise TypeError(
            f"The model returned {type(outputs).__name__} without `logits`. MetaLRTrainer needs per-example "
            "losses computed from classification logits: use a *ForSequenceClassification / "
            "*ForImageClassification model or make forward() return an object or dict with `logits`."
        )
    return logits


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of every example, computed in fp32 (or fp64) even when the logits are half precision."""
    if logits.dim() != 2:
        raise ValueError(
            f"Expected logits of shape (batch, num_labels), got {tuple(logits.shape)}: the task was taken to be "
            "single-label classification (from the model's class and config). Supported tasks: single-label, "
            "multi-label (config.problem_type='multi_label_classification'), regression (num_labels=1), token "
            "classification, causal LM and sequence-to-sequence LM (from the model's *For... class)."
        )
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)


def functional_logits(
    model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Mapping[str, Any]
) -> torch.Tensor:
    """Logits of ``model`` evaluated at ``params`` (a subset of its parameters) on keyword ``inputs``."""
    return extract_logits(functional_call(model, dict(params), args=(), kwargs=dict(inputs), strict=False))
