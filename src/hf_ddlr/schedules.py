"""How one optimizer step of :class:`~hf_ddlr.MetaLRTrainer` runs: one class per schedule of the meta step.

The Trainer drives a step through three hooks; each hands it to the schedule resolved when ``train()``
starts (:func:`schedule_for`):

- ``get_batch_samples`` → :meth:`Schedule.begin_window`: the step's micro-batches are known; their example
  weights ``e_i`` are set (and the optimizer's weight decay);
- ``training_step`` → :meth:`Schedule.loss` (from ``compute_loss``): a micro-batch's forward and weighted loss
  ``Σ e_i L_i / N_window``, which the Trainer's backward differentiates;
- ``training_step``, after that backward → :meth:`Schedule.after_backward`.

The schedules differ in where the meta step (:meth:`MetaStepSchedule._meta_step`) runs:

- :class:`SameStepFused` (``meta_update="same_step"``, one micro-batch per step: the default): inside the
  micro-batch's loss, between its real forward and its backward, reusing that forward;
- :class:`SameStepWindow` (``"same_step"`` with several micro-batches per step, or ``meta_strategy="exact"``):
  when the window begins, on functional passes of its own;
- :class:`Delayed` (``meta_update="delayed"``): after the window's last backward, from the real gradient; the
  new rates apply from the next step;
- :class:`Replay` (``replay_trajectory``): none; the rates are the recorded ones.

The Trainer is reached as ``self.trainer`` so that tests/test_transformers_contract.py sees the uses of its
members.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._batches import ProbeSampler, probe_batches, to_microbatch
from ._meta_parameters import (
    instance_signal_choice,
    meta_objective_choice,
    meta_parameter_names,
    meta_parameters_choice,
)
from ._tasks import model_batch
from .meta import MetaBatch, MetaGradients, MicroBatch, find_output_layer, meta_gradients
from .meta.distributed import all_gather_varlen, all_ranks_true, all_reduce_mean_
from .meta.engine import jvp_dots, meta_head_features
from .meta.layerwise import LayerTape, LayerwiseUnsupported, record_layers
from .meta.layout import MetaLayout
from .meta.passes import RngChain, RngState, extract_logits, rewind_rng
from .meta.primal_reuse import record_outputs
from .meta.rows import EmbeddingRows

if TYPE_CHECKING:
    from .trainer import MetaLRTrainer

__all__ = ["Delayed", "MetaStepSchedule", "Replay", "SameStepFused", "SameStepWindow", "Schedule", "schedule_for"]

logger = logging.getLogger(__name__)


def schedule_for(trainer: MetaLRTrainer) -> Schedule:
    """The schedule of this run (resolved once, when ``train()`` starts)."""
    meta = trainer.meta_args
    if trainer.replay is not None:
        return Replay(trainer)
    if meta.meta_update == "delayed":
        return Delayed(trainer)
    if meta.meta_strategy == "exact":  # the exact strategy rebuilds the lookahead graph: it cannot reuse a forward
        return SameStepWindow(trainer)
    return SameStepFused(trainer)


def trainable_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Schedule:
    """What every schedule shares: the window of the current optimizer step, its weights and the micro-batches'
    forwards. Subclasses say where the meta step runs."""

    def __init__(self, trainer: MetaLRTrainer) -> None:
        self.trainer = trainer
        self.meta = trainer.meta_args
        self.window: list[MicroBatch] = []
        self.current: MicroBatch | None = None  # the micro-batch whose training_step is running
        self.normalizer = 1.0  # N_window: the examples of the window on this process
        self.due = False  # whether this step runs a meta step
        self._next = 0
        self._outputs_checked = False  # the first forward checks the head's width against the label space

    # ---------------------------------------------------------------- the hooks
    def begin_window(self, batches: list[Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, inputs: Mapping[str, Any], mb: MicroBatch) -> tuple[torch.Tensor, Any]:
        """The weighted loss of ``mb`` at the weights set for the window, and the model's outputs."""
        outputs, L, _ = self._forward(model, inputs, mb)
        return self._weighted(mb.weights.detach(), L), outputs

    def after_backward(self, mb: MicroBatch) -> None:
        """Called when the backward of ``mb``'s real step is done."""

    def next_micro_batch(self) -> MicroBatch:
        if self._next >= len(self.window):
            raise RuntimeError("training_step was called outside the Trainer's loop; use trainer.train().")
        self._next += 1
        return self.window[self._next - 1]

    @contextlib.contextmanager
    def running(self, mb: MicroBatch) -> Iterator[None]:
        """``mb``'s training_step (its ``compute_loss`` is then the weighted loss of :meth:`loss`)."""
        self.current = mb
        try:
            yield
        finally:
            self.current = None

    # ---------------------------------------------------------------- shared steps
    def _meta_step_due(self) -> bool:
        return self.trainer.state.global_step % self.meta.meta_interval == 0

    def _open(self, batches: list[Mapping[str, Any]]) -> None:
        """The window of this step: its micro-batches, with their weights at the current rates."""
        self.trainer._meta_log.begin_step(lr=float(self.trainer.optimizer.param_groups[0]["lr"]))
        self.window = [to_microbatch(self.trainer, b, k) for k, b in enumerate(batches)]
        self._next = 0
        self.normalizer = self._window_normalizer()
        self._refresh()

    def _window_normalizer(self) -> float:
        """What the window's weighted loss is divided by on this process: its number of examples, or, for a
        token-level task, of target tokens, averaged over processes (at least 1) so that the real gradient is
        ``Σ e_i ∇ℓ_i / (the target tokens of every process)`` as the Trainer's ``num_items_in_batch`` makes it;
        under ``average_tokens_across_devices=False`` this process's own tokens, as the Trainer then divides."""
        task = self.trainer._task
        if not task.token_level:
            return float(sum(mb.labels.shape[0] for mb in self.window))
        n = torch.tensor([task.num_targets([mb.labels for mb in self.window])], dtype=torch.float64,
                         device=self.window[0].labels.device)
        if getattr(self.trainer.args, "average_tokens_across_devices", True):
            all_reduce_mean_([n])
        return max(float(n), 1.0)

    def _refresh(self) -> None:
        """The current rates into the real step: the window's weights ``e_i`` and the optimizer's weight decay
        (the one place where either is set)."""
        rates, applied = self.trainer.rates, self.trainer._applied_instance
        # (a replay's table holds the rates as applied: never divided again)
        divisor = 1.0 if self.trainer.replay is not None else rates.instance_divisor()
        for mb in self.window:
            mb.weights = rates.effective(mb.indices, mb.labels if mb.groups is None else mb.groups, divisor)
            if applied is not None:  # (the last refresh before the real step is what it applies)
                applied.note(mb.indices, rates.instance[mb.indices.to(rates.instance.device)] / divisor)
        self.trainer._apply_weight_decay()

    def _forward(
        self, model: torch.nn.Module, inputs: Mapping[str, Any], mb: MicroBatch, *, head: bool = False,
        layers: bool = False, primals: bool = False,
    ) -> tuple[Any, torch.Tensor, LayerTape | None]:
        """The real forward of ``mb``: the outputs, the per-example losses ``L_i`` (kept in ``mb.losses``) and,
        for a meta step that reuses this forward, what it records: the classification head's input (``head``,
        into ``mb.features``), the layers (``layers``: a LayerTape), the conv / linear outputs (``primals``,
        into ``mb.outputs``)."""
        unwrapped = self.trainer.model  # ``model`` may be the DDP wrapper; hooks go on the model itself
        task = self.trainer._task
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        for col in self.trainer._rate_columns:
            inputs.pop(col, None)
        inputs, labels = model_batch(unwrapped, inputs, labels, task)
        box: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            if head:
                _, layer = find_output_layer(unwrapped, self.trainer.num_labels)
                hook = layer.register_forward_hook(lambda mod, inp, out: box.__setitem__("h", inp[0]))
                stack.callback(hook.remove)
            names = {id(p): n for n, p in trainable_params(unwrapped).items()} if layers else None
            k = task.rows_per_example
            tape = stack.enter_context(record_layers(unwrapped, names, labels.shape[0] * k, k)) if layers else None
            mb.outputs = stack.enter_context(record_outputs(unwrapped)) if primals else None
            outputs = model(**inputs)
        if tape is not None:
            tape.inputs = inputs
        logits = extract_logits(outputs)
        if not self._outputs_checked:
            _check_output_width(logits, task.class_labels, self.trainer.num_labels)
            self._outputs_checked = True
        L = task(logits, labels, self.trainer.args.label_smoothing_factor)
        mb.losses = L.detach()
        if "h" in box:
            mb.features = (box["h"].detach(), logits.detach())
        return outputs, L, tape

    def _weighted(self, w: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        """``Σ e_i L_i / N_window``: this micro-batch's share of the window's weighted mean loss."""
        return (w.to(L.dtype) * L).sum() / self.normalizer


class Replay(Schedule):
    """``replay_trajectory``: every step applies the rates (and weight decay) a learned run recorded for it."""

    def begin_window(self, batches: list[Mapping[str, Any]]) -> None:
        self.trainer._set_replayed_rates()
        self._open(batches)


def finite_difference_blocker(model: torch.nn.Module, half_precision: bool, on_cuda: bool) -> str | None:
    """Why a finite difference of the loss would drown in rounding here (None: it would not).

    Its relative step is ~1e-6, so the forward must be accurate to well below that: not so in bf16/fp16, nor on a
    GPU that runs the model's matmuls or convolutions in TF32 (10-bit mantissa). Measured on an H200, ResNet-18:
    cosine 0.42-0.67 against the double backward with cuDNN's default TF32 convolutions, 0.99996 with them off
    (docs/gpu.md)."""
    if half_precision:
        return "is unreliable in half precision (the perturbation drowns in rounding)"
    if not on_cuda:
        return None
    if _runs_tf32(torch.backends.cuda.matmul, "allow_tf32"):
        return ("is unreliable with TF32 matmuls (tf32=True or torch.set_float32_matmul_precision('high'): the "
                "perturbation drowns in rounding); set tf32=False to keep it")
    convolutions = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    if _runs_tf32(torch.backends.cudnn, "allow_tf32", "conv") and any(
        isinstance(m, convolutions) for m in model.modules()
    ):
        return ("is unreliable with cuDNN's TF32 convolutions (on by default on GPUs: the perturbation drowns "
                "in rounding); set tf32=False (or torch.backends.cudnn.conv.fp32_precision = 'ieee') to keep it")
    return None


def _runs_tf32(backend: Any, legacy_flag: str, op: str | None = None) -> bool:
    """Whether ``backend`` (torch.backends.cuda.matmul, torch.backends.cudnn) computes fp32 in TF32: through the
    fp32_precision API of torch >= 2.9 (reading the legacy flag there can raise when the two APIs were mixed),
    else the legacy allow_tf32 flag."""
    node = getattr(backend, op) if op is not None and hasattr(backend, op) else backend
    precision = getattr(node, "fp32_precision", None)
    if isinstance(precision, str):
        return precision == "tf32"
    return bool(getattr(backend, legacy_flag))


class MetaStepSchedule(Schedule):
    """A schedule that learns the rates: the meta step and what it needs."""

    def __init__(self, trainer: MetaLRTrainer) -> None:
        super().__init__(trainer)
        self.strategy = self.meta.meta_strategy
        self.embedding_rows = EmbeddingRows()  # large embedding tables' lookahead on the looked-up rows
        self.meta_layout = MetaLayout()  # the meta batch's images channels-last on CPU (checked on first use)
        self._early_meta: MetaBatch | None = None  # a meta batch taken before the real forward (last_layer)
        self._forward_mode_checked = False  # (jvp: whether the model's forward can carry a tangent, seen once)
        self._meta_step_ran = False  # an error in the first meta step says what it ran the model on
        self.signal = instance_signal_choice(trainer)  # what the instance rates step on ("auto" resolved once)
        # "other_classes": the real forward records the head's input for the split's closed form
        self._split = self.signal == "other_classes"
        self.probe_sampler = ProbeSampler(trainer)  # training rows scored outside the step (probe_batches)
        parameters = meta_parameters_choice(trainer)  # (resolved once: "auto" scans the model for its head)
        self.meta_params = meta_parameter_names(trainer, parameters)  # what the lookahead moves (None: all)
        self.objective = meta_objective_choice(trainer, parameters)  # what the lookahead is scored by
        if trainer.meta_args.meta_objective == "auto":
            logger.info("The meta step scores its lookahead by meta_objective=%r (meta_objective='auto').", self.objective)
        if self.strategy == "finite_difference":
            reason = self._finite_difference_blocker()
            if reason is not None:
                warnings.warn(f"meta_strategy='finite_difference' {reason}; using 'jvp' instead.", stacklevel=3)
                self.strategy = "jvp"

    def _forget_history(self) -> None:
        """``keep_history=False`` (the no-history ablation): the meta step starts from rates 1."""
        if not self.meta.keep_history:
            self.trainer.rates.reset()

    def _loss_scale(self) -> float:
        """The fp16 GradScaler's current scale (1 otherwise): the meta passes run on scaled losses too."""
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _meta_step(
        self, grads: dict[str, torch.Tensor] | None = None, tape: LayerTape | None = None, check: float | None = None,
    ) -> MetaGradients:
        """∂L_meta/∂e_i for the window (:func:`~hf_ddlr.meta.meta_gradients`; ``grads``: the lookahead gradient
        when already known, ``tape``/``check``: see there), then the rates' update, the same on every process.
        A non-finite result is skipped on every process."""
        trainer, args, meta = self.trainer, self.trainer.args, self.meta
        model = trainer.model
        model.train()
        params = trainable_params(model)
        specs = trainer._lookahead_specs(params)
        meta_batch, self._early_meta = self._early_meta or self._meta_batch(), None
        probes = self._probes()

        def run(tape: LayerTape | None, check: float | None) -> MetaGradients:
            jvp = self.strategy == "jvp"
            return meta_gradients(
                model, params, self.meta_layout.window(self.window) if jvp else self.window, meta_batch, specs,
                weight_decay=trainer.rates.weight_decay if meta.learn_weight_decay else args.weight_decay,
                normalizer=self.normalizer, strategy=self.strategy, grads=grads,
                label_smoothing=args.label_smoothing_factor, fd_eps=meta.fd_epsilon, loss_scale=self._loss_scale(),
                num_labels=trainer.num_labels, layer_tape=tape, check_layer_tape=check,
                # the optimizer-aware lookahead clips like the real step; the paper's plain-SGD one does not
                max_grad_norm=args.max_grad_norm if meta.lookahead == "optimizer" else None,
                average=trainer._meta_grad_average, weight_decay_grad_needed=meta.learn_weight_decay,
                task=trainer._task, embedding_rows=self.embedding_rows,
                per_step_too=meta.class_rate_direction == "per_step" and trainer.rates.keyed is not None,
                average_products=trainer.rates.instance is not None,  # class / group rates: the per-step set alone
                probes=probes, meta_params=self.meta_params, objective=self.objective, metric=trainer._rate_metric,
                instance_signal=self.signal,
            )

        if self.strategy == "jvp" and not self._forward_mode_checked:
            self._check_forward_mode(model, params)
            if self.strategy != "jvp":  # (a recorded tape's dots are forward mode's: not used from here on)
                tape, check = None, None
        try:
            res = run(tape, check)
        except RuntimeError as err:  # (a plain RuntimeError only: out-of-memory and the like keep their type)
            if self._meta_step_ran or type(err) is not RuntimeError:
                raise
            raise RuntimeError(_first_meta_step_failed(err, meta_batch, self.window)) from err
        self._meta_step_ran = True
        if not all_ranks_true(res.finite, args.device):  # every rank skips together (no hanging gather)
            trainer._meta_log.record_skipped(trainer.state.global_step, res.meta_loss)
            return res
        idx = all_gather_varlen(torch.cat([mb.indices for mb in self.window]))
        labels = all_gather_varlen(torch.cat([self._table_keys(mb) for mb in self.window]))
        grad = all_gather_varlen(res.example_grad.to(labels.device))
        keyed = None if res.per_step_grad is None else all_gather_varlen(res.per_step_grad.to(labels.device))
        probed = None
        if res.probe_grad is not None:
            probe_keys = all_gather_varlen(torch.cat([self._table_keys(mb) for mb in probes]))
            probed = (all_gather_varlen(torch.cat([mb.indices for mb in probes])), probe_keys,
                      all_gather_varlen(res.probe_grad.to(probe_keys.device)))
        trainer.rates.update(idx, labels, grad, res.weight_decay_grad, keyed_grad=keyed, probes=probed)
        trainer._meta_log.record(res.meta_loss)
        trainer.last_meta_gradients = res
        return res

    def _check_forward_mode(self, model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Once per run, before the first meta step changes anything: a forward-mode pass of the first micro-batch
        along a zero tangent. A model running an operation forward mode cannot differentiate (a custom
        ``autograd.Function`` without ``jvp``, as PEFT's LoHa / LoKr adapters) gets the finite difference of the
        losses for the rest of the run, which needs forward passes only, or, where that would drown in rounding,
        an error naming the fix."""
        self._forward_mode_checked = True
        names = params if self.meta_params is None else self.meta_params
        zero = {n: torch.zeros_like(params[n]) for n in names}
        try:
            jvp_dots(model, params, self.meta_layout.window(self.window[:1])[0], zero, task=self.trainer._task)
        except NotImplementedError as e:
            if "forward" not in str(e).lower():
                raise
            self._leave_forward_mode(e)

    def _finite_difference_blocker(self) -> str | None:
        """Why this run's finite difference of the losses would drown in rounding (:func:`finite_difference_blocker`)."""
        args = self.trainer.args
        return finite_difference_blocker(self.trainer.model, args.bf16 or args.fp16, args.device.type == "cuda")

    def _leave_forward_mode(self, error: Exception) -> None:
        reason = self._finite_difference_blocker()
        if reason is not None:
            raise ValueError(
                f"meta_strategy='jvp' needs forward-mode AD, which this model does not support ({error}); "
                f"meta_strategy='finite_difference' {reason}. Set meta_strategy='exact' (double backward, one "
                "process) or train in fp32."
            ) from error
        warnings.warn(
            f"meta_strategy='jvp' needs forward-mode AD, which this model does not support ({error}); using "
            "meta_strategy='finite_difference' (forward passes only) for the rest of the run.",
            stacklevel=4,
        )
        self.strategy = "finite_difference"  # (no per-layer products either: they are forward mode's)

    def _probes(self) -> list[MicroBatch]:
        """This meta step's probe micro-batches (``probe_batches``; none without instance rates), in the meta
        passes' layout."""
        if self.trainer.rates.instance is None or not probe_batches(self.trainer):
            return []
        probes = self.probe_sampler.take(first_k=len(self.window))
        return self.meta_layout.window(probes) if self.strategy == "jvp" else probes

    def _meta_batch(self) -> MetaBatch:
        """This meta step's meta batch (sampled in turn from the meta set, in the meta passes' layout; the
        forward-mode passes over the window take that layout too, so the first check covers a micro-batch of it)."""
        trainer = self.trainer
        train = self.window[0] if self.strategy == "jvp" and self.window else None
        return self.meta_layout.prepare(trainer.model, trainer._meta_set.sample(), trainer.args.device, train=train)

    def _table_keys(self, mb: MicroBatch) -> torch.Tensor:
        """The keys of ``mb``'s class or group rates: its group ids with group rates, else its labels for a task
        with class labels; a placeholder per example otherwise (token or multi-hot labels key no class rate;
        class-level rates are refused for them)."""
        if mb.groups is not None:
            return mb.groups
        if self.trainer._task.class_labels:
            return mb.labels
        return torch.zeros(mb.labels.shape[0], dtype=torch.long, device=mb.labels.device)


class SameStepWindow(MetaStepSchedule):
    """``meta_update="same_step"`` with several micro-batches per step (or ``meta_strategy="exact"``): the meta
    step runs when the window begins, on functional passes over all its micro-batches; every micro-batch's
    real step then uses the updated rates."""

    def begin_window(self, batches: list[Mapping[str, Any]]) -> None:
        self.due = self._meta_step_due()
        if self.due:
            self._forget_history()
        self._open(batches)  # the weights at the current rates: the lookahead step's
        if self.due and not self._fused():
            self._chain_random_states()
            self._meta_step()
            self._refresh()  # the real step uses the updated rates

    def _fused(self) -> bool:
        """Whether this step's meta step runs inside the loss of its micro-batch (see SameStepFused)."""
        return False

    def _chain_random_states(self) -> None:
        """The meta step runs before the window's real forwards, whose dropout masks its passes must replay: the
        states those forwards start from in the run's stream are learned in order from the passes
        (:class:`~hf_ddlr.meta.passes.RngChain`), and each real forward then starts from its own. Where the state is
        not captured (an accelerator other than CUDA) every pass and real forward runs from the step's seeds."""
        first = RngState.capture()
        if first is None:
            return
        chain = RngChain(first, len(self.window))
        for k, mb in enumerate(self.window):
            mb.chain, mb.position = chain, k


class SameStepFused(SameStepWindow):
    """``meta_update="same_step"`` with one micro-batch per step (the default; also the last, shorter window of
    an epoch under gradient accumulation): the meta step runs inside the micro-batch's loss, between its real
    forward and its backward. The lookahead gradient is ``autograd.grad`` on the real forward's retained
    graph, and the backward then uses the freshly updated weights: one forward fewer than a meta step on its
    own. The forward-mode pass takes its conv / linear primal values from this forward; on models the
    per-layer products serve (``layerwise_dots``, :class:`~hf_ddlr.meta.layerwise.LayerwiseCheck`), they
    replace the forward-mode pass and the second backward altogether. A window of several micro-batches
    runs as in :class:`SameStepWindow`."""

    def _fused(self) -> bool:
        return self.due and len(self.window) == 1

    def loss(self, model: torch.nn.Module, inputs: Mapping[str, Any], mb: MicroBatch) -> tuple[torch.Tensor, Any]:
        if not self._fused():
            return super().loss(model, inputs, mb)
        trainer, check = self.trainer, self.trainer._layerwise_check
        if self.strategy == "last_layer":
            self._take_meta_batch_early()
        w = mb.weights.detach()
        # a compiled forward runs the layers inside its graph: hooks there would be traced into it (and the
        # recorded outputs changed the real step's gradient in a measured run), so nothing is recorded
        compiled = trainer._compiled
        layers = (self.meta.layerwise_dots and self.strategy == "jvp"
                  and check.applies(trainer.model, trainer.args.gradient_checkpointing, compiled=compiled))
        if layers:
            try:
                outputs, L, tape = self._forward(model, inputs, mb, layers=True, head=self._split)
            except LayerwiseUnsupported as e:  # the recording changed what the forward computes: without it
                check.turn_off(str(e))
                rewind_rng(mb.replay)  # (the dropout masks of the forward that never recorded, drawn again)
                layers = False
        if not layers:
            outputs, L, tape = self._forward(model, inputs, mb, head=self.strategy == "last_layer" or self._split,
                                             primals=not compiled and self.strategy == "jvp")
        from_tape = tape is not None and check.meta_step(
            tape, L, w / self.normalizer, trainable_params(trainer.model), loss_scale=self._loss_scale(),
            half=bool(trainer.args.bf16 or trainer.args.fp16), device=trainer.args.device,
            reference=lambda: self._lookahead_grad(w, L),
            run=lambda grads, cos: self._meta_step(grads=grads, tape=tape, check=cos),
        )
        if not from_tape:
            self._meta_step(grads=self._lookahead_grad(w, L))
        mb.outputs = None  # the recorded primal values are released with the meta step
        self._refresh()
        w = mb.weights
        if from_tape and check.state == "verified":
            return self._loss_from_tape(tape, w, L), outputs
        return self._weighted(w, L), outputs

    def _take_meta_batch_early(self) -> None:
        """``last_layer``: the meta batch and its one forward (the head's input) before the real forward, while
        no training graph is held — a lower peak, and the same parameters as at the meta step."""
        trainer = self.trainer
        self._early_meta = self._meta_batch()
        trainer.model.train()
        self._early_meta.features = meta_head_features(trainer.model, self._early_meta, trainer.num_labels)

    def _lookahead_grad(self, w: torch.Tensor, L: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """(1/N) Σ e_i ∇L_i from the real forward's graph (kept for the real backward), averaged over ranks."""
        if self.strategy == "last_layer":
            return None  # the closed form needs only the head's input, captured during the forward
        params = trainable_params(self.trainer.model)
        scale = self._loss_scale()
        total = (w.to(L.dtype) * L).sum() * (scale / self.normalizer)
        gs = torch.autograd.grad(total, list(params.values()), retain_graph=True, allow_unused=True)
        grads = {n: (g / scale if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), gs)}
        all_reduce_mean_(list(grads.values()))
        return grads

    def _loss_from_tape(self, tape: LayerTape, w: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        """A loss whose gradient is the real step's ``Σ e_i ∇L_i / N``, assembled from the recorded layers (no
        second backward through the model), and whose value is the weighted loss (what the Trainer logs)."""
        G = tape.weighted_grads(w / self.normalizer)
        params = trainable_params(self.trainer.model)
        names = list(G)
        grads = [G[n].to(params[n].dtype) for n in names]
        inject = _GradientOf.apply(grads, *(params[n] for n in names))
        return inject + (w.to(L.dtype) * L.detach()).sum() / self.normalizer


class _GradientOf(torch.autograd.Function):
    """A zero whose gradient w.r.t. the given parameters is the given tensors (times the incoming gradient: the
    loss scale, the accumulation factor): the real step's gradient handed to the Trainer's backward as it is,
    without a surrogate ``Σ θ·G`` to compute and differentiate (two parameter-sized passes each way)."""

    @staticmethod
    def forward(ctx, grads: list[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return (None, *(g * grad_out.to(g.dtype) for g in ctx.grads))


class Delayed(MetaStepSchedule):
    """``meta_update="delayed"``: the real step uses the current rates; after the window's last backward the
    meta step reuses the real gradient (no lookahead backward of its own), and its rates apply from the next
    step (an example's next visit). The mode whose point is memory: its meta passes keep the images' layout
    (channels-last passes peak higher: +18 MB on the ResNet-18 at batch 64, docs/speed.md)."""

    def __init__(self, trainer: MetaLRTrainer) -> None:
        super().__init__(trainer)
        self.meta_layout = MetaLayout(off="meta_update='delayed' keeps the layout")

    def begin_window(self, batches: list[Mapping[str, Any]]) -> None:
        self.due = self._meta_step_due()
        self._open(batches)

    def loss(self, model: torch.nn.Module, inputs: Mapping[str, Any], mb: MicroBatch) -> tuple[torch.Tensor, Any]:
        outputs, L, _ = self._forward(model, inputs, mb, head=self.strategy == "last_layer" or self._split)
        return self._weighted(mb.weights.detach(), L), outputs

    def after_backward(self, mb: MicroBatch) -> None:
        if not (self.due and mb is self.window[-1]):
            return
        grads = self._real_gradient()
        self._forget_history()
        self._meta_step(grads=grads)

    def _real_gradient(self) -> dict[str, torch.Tensor]:
        """The window's accumulated ``.grad``, unscaled. The meta step only reads it, so fp32 gradients at scale 1
        are passed as they are: a copy would cost a full gradient's worth of memory at the step's peak."""
        scale = self._loss_scale()

        def real_grad(p: torch.Tensor) -> torch.Tensor:
            if p.grad is None:
                return torch.zeros_like(p)
            g = p.grad.detach()
            if scale == 1.0 and g.dtype == torch.float32:
                return g
            return g.float() / scale

        return {n: real_grad(p) for n, p in trainable_params(self.trainer.model).items()}


def _check_output_width(logits: torch.Tensor, class_labels: bool, num_labels: int) -> None:
    """Refuse, at the first forward, a classifier with fewer outputs than the label space the trainer took (from
    the train labels, for a model without a config): its loss would fail with an index error, or a device-side
    assert on a GPU, that names neither the labels nor the fix."""
    if class_labels and logits.dim() == 2 and logits.shape[-1] < num_labels:
        raise ValueError(
            f"The model outputs {logits.shape[-1]} logits per example, but the labels span {num_labels} classes "
            f"(0..{num_labels - 1}). Give the model's head num_labels={num_labels} outputs, or map the labels to "
            f"0..{logits.shape[-1] - 1} (and pass num_labels={logits.shape[-1]} to MetaLRTrainer)."
        )


def _shapes(inputs: Mapping[str, Any]) -> str:
    """``{name: shape}`` of a batch's tensors, for an error message."""
    return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in inputs.items() if torch.is_tensor(v)) + "}"


def _first_meta_step_failed(err: BaseException, meta_batch: Any, window: list[MicroBatch]) -> str:
    """The message of an error in a run's first meta step: most often a meta set the model cannot take as it
    takes the train set (other feature sizes, columns or preprocessing), so it shows both batches' shapes."""
    train = _shapes(window[0].inputs) if window else "{}"
    return (f"The first meta step failed: {type(err).__name__}: {err}\nIt runs the model on a meta batch "
            f"{_shapes(meta_batch.inputs)} beside the training micro-batch {train}. If their features differ, "
            "prepare the meta set as the train set (the same columns, feature sizes and preprocessing).")
