"""Per-example losses of every supported task, each equal to the loss the model's own head computes.

A task's loss is given per example as a *sum* ``ℓ_i`` and a *count* ``n_i`` (the targets it covers), so that
the batch loss a Hugging Face model computes is ``Σ_i ℓ_i / Σ_i n_i``:

- example-level tasks (single-label classification, multi-label classification, regression): ``ℓ_i`` is the
  example's loss (cross-entropy; binary cross-entropy with logits averaged over the labels; squared error
  averaged over the outputs) and ``n_i = 1``: the batch loss is the mean over examples;
- token-level tasks (token classification, causal LM, sequence-to-sequence LM): ``ℓ_i`` is the sum of the
  example's token cross-entropies over its target tokens (labels other than -100; for a causal LM the
  labels shifted by one, as the model's loss does) and ``n_i`` the number of those tokens: the batch loss is
  the mean over all target tokens of the batch, the one the model (and the Trainer, with its
  ``num_items_in_batch``) optimises.

The weighted loss of a training window is then ``Σ_i e_i ℓ_i / Σ_window n_i``: at ``e = 1`` it is exactly the
loss (and the gradient) the Trainer would use, and ``∂L_meta/∂e_i`` is the meta-gradient of that loss. An
example's mean token loss is ``ℓ_i / n_i`` (:meth:`TaskLoss.per_example_mean`).

Pure torch: the choice of the task from a model's class and config is made on the trainer side.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .passes import per_example_loss

__all__ = [
    "IGNORE_INDEX",
    "META_OBJECTIVES",
    "TASKS",
    "TaskLoss",
    "causal_lm_loss",
    "dpo_loss",
    "dpo_task",
    "multi_label_loss",
    "pack_dpo_labels",
    "preference_loss",
    "preference_task",
    "regression_loss",
    "task_loss",
    "token_loss",
]

META_OBJECTIVES = ("loss", "bounded", "log")  # what the meta step lowers on the meta set (TaskLoss.meta_objective)
_LOG_FLOOR = 1e-6  # "log": keeps log(loss) finite for an example the model fits exactly
IGNORE_INDEX = -100  # the label of a token that is not a target (padding, a masked prompt), as in transformers


def _fp32(logits: torch.Tensor) -> torch.Tensor:
    """The logits in fp32 (or fp64) even when they are half precision, as the model heads' losses upcast."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _check_shape(task: str, ok: bool, logits: torch.Tensor, labels: torch.Tensor, expected: str) -> None:
    if not ok:
        raise ValueError(
            f"The {task} loss expects {expected}; got logits {tuple(logits.shape)} and labels "
            f"{tuple(labels.shape)}. {_SUPPORTED_NOTE}"
        )


def multi_label_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy with logits of every example, averaged over its labels (multi-hot float targets):
    their mean over the batch is ``BCEWithLogitsLoss()(logits, labels)``."""
    _check_shape("multi_label_classification", logits.shape == labels.shape and logits.dim() == 2, logits, labels,
                 "logits and multi-hot labels of shape (batch, num_labels)")
    z = _fp32(logits)
    return F.binary_cross_entropy_with_logits(z, labels.to(z.dtype), reduction="none").mean(1)


def regression_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Squared error of every example, averaged over its outputs: their mean over the batch is the models'
    ``MSELoss()`` (on ``logits.squeeze()`` and ``labels.squeeze()`` when there is one output)."""
    B = logits.shape[0]
    _check_shape("regression", logits.numel() == labels.numel() and labels.shape[:1] == (B,), logits, labels,
                 "one float target per output: logits (batch, num_labels) and labels (batch[, num_labels])")
    z = _fp32(logits).reshape(B, -1)
    return F.mse_loss(z, labels.reshape(B, -1).to(z.dtype), reduction="none").mean(1)


def token_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """The sum of every example's token cross-entropies over its target tokens (labels ≠ -100): logits
    (batch, tokens, classes), labels (batch, tokens). Label smoothing as the Trainer's ``LabelSmoother``."""
    _check_shape("token-level", logits.dim() == 3 and logits.shape[:2] == labels.shape, logits, labels,
                 "logits (batch, tokens, classes) and labels (batch, tokens)")
    z = _fp32(logits)
    B, T, V = z.shape
    # one row per token (not the (batch, classes, tokens) view, whose strided softmax costs twice as much)
    per_token = F.cross_entropy(z.reshape(B * T, V), labels.reshape(B * T), ignore_index=IGNORE_INDEX,
                                reduction="none", label_smoothing=smoothing)
    return per_token.view(B, T).sum(1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """:func:`token_loss` of next-token prediction: the logits at position t score the label at t + 1, as
    a ``*ForCausalLM`` model's loss shifts them (the last position predicts nothing). The labels are shifted
    rather than the logits (padded with an ignored label), so the logits are not copied."""
    return token_loss(logits, F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX), smoothing)


def preference_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0,
                    center: float = 0.0) -> torch.Tensor:
    """Every preference pair's Bradley-Terry loss ``−log σ(r_chosen − r_rejected − margin)`` (plus
    ``center·(r_chosen + r_rejected)²``): a reward model scores the batch's chosen answers in its first half of
    rows and the rejected ones in the second (as TRL's ``DataCollatorForPreference`` stacks them), one reward
    each; ``labels`` holds one margin per pair (0 without). Their mean over the pairs is TRL's
    ``RewardTrainer`` loss, ``center_rewards_coefficient`` included."""
    B = labels.shape[0]
    _check_shape("preference", logits.shape[0] == 2 * B and logits[0].numel() == 1, logits, labels,
                 "one reward per row, chosen rows then rejected rows: logits (2 * pairs, 1) and labels (pairs,)")
    r = _fp32(logits).reshape(2 * B)
    chosen, rejected = r[:B], r[B:]
    loss = -F.logsigmoid(chosen - rejected - labels.to(r.dtype))
    return loss + center * (chosen + rejected) ** 2 if center else loss


def preference_task(center: float = 0.0) -> TaskLoss:
    """The :class:`TaskLoss` of a reward model on preference pairs (:func:`preference_loss`; ``center``: TRL's
    ``center_rewards_coefficient``). Not chosen from a model (a reward model is a one-output sequence
    classifier, which reads as regression): the preference trainer sets it."""
    return TaskLoss("preference", functools.partial(preference_loss, center=float(center)), rows_per_example=2)


def pack_dpo_labels(tokens: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The targets of a batch of DPO pairs as one row per pair, which is how the meta step keys its examples:
    the chosen sequence's token labels, the rejected one's (-100 outside the completion; the rows of ``tokens``
    stack the chosen sequences, then the rejected ones, as TRL's ``DataCollatorForPreference`` does) and the
    reference model's log-probabilities of the two answers (``ref_logps``: (pairs, 2), chosen then rejected).
    Float64, in which the token ids and the log-probabilities are exact."""
    B = ref_logps.shape[0]
    if tokens.dim() != 2 or tokens.shape[0] != 2 * B or ref_logps.shape != (B, 2):
        raise ValueError(f"DPO pairs need token labels (2 * pairs, tokens), chosen rows then rejected rows, and the "
                         f"reference log-probabilities (pairs, 2); got {tuple(tokens.shape)} and "
                         f"{tuple(ref_logps.shape)}.")
    t = tokens.to(torch.float64)
    return torch.cat([t[:B], t[B:], ref_logps.to(torch.float64)], dim=1)


def dpo_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0, beta: float = 0.1) -> torch.Tensor:
    """Every pair's DPO loss ``−log σ(β [(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))])``
    (Rafailov et al.; TRL's ``loss_type="sigmoid"``): a sequence's log-probability is the sum over its completion
    tokens of the causal LM's next-token log-probabilities. ``logits``: the model's (2 * pairs, tokens, vocab),
    chosen rows then rejected rows; ``labels``: :func:`pack_dpo_labels`. Their mean over the pairs is TRL's
    ``DPOTrainer`` loss. Logits longer than the labels (a prompt-tuned model's virtual tokens come first) are read
    at their last positions, as TRL does."""
    B = labels.shape[0]
    T = (labels.shape[1] - 2) // 2
    _check_shape("DPO", logits.dim() == 3 and logits.shape[0] == 2 * B and logits.shape[1] >= T
                 and labels.shape[1] == 2 * T + 2, logits, labels,
                 "logits (2 * pairs, tokens, vocab), chosen rows then rejected rows, and packed labels "
                 "(pairs, 2 * tokens + 2)")
    tokens = torch.cat([labels[:, :T], labels[:, T:2 * T]]).round().long()
    logps = -causal_lm_loss(logits[:, logits.shape[1] - T:], tokens)
    ref = labels[:, -2:].to(logps.dtype)
    return -F.logsigmoid(beta * ((logps[:B] - ref[:, 0]) - (logps[B:] - ref[:, 1])))


def dpo_task(beta: float = 0.1) -> TaskLoss:
    """The :class:`TaskLoss` of DPO on preference pairs (:func:`dpo_loss`; ``beta``: TRL's). Not chosen from a
    model (a policy is a causal LM): the DPO trainer sets it."""
    return TaskLoss("dpo", functools.partial(dpo_loss, beta=float(beta)), rows_per_example=2, token_outputs=True)


def _token_counts(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum(1)


def _shifted_token_counts(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


@dataclass(frozen=True)
class TaskLoss:
    """A task's per-example loss: ``loss(logits, labels, smoothing)`` gives every example's ``ℓ_i`` and
    ``counts(labels)`` its number of targets ``n_i`` (None: one per example, the batch loss is the mean of the
    ``ℓ_i``). ``class_labels``: the labels are one class id per example (class-level rates apply).
    ``rows_per_example``: how many rows of the model's batch one example spans. ``token_outputs``: the logits are
    per token over a vocabulary."""

    task: str
    loss: Callable[..., torch.Tensor]
    counts: Callable[[torch.Tensor], torch.Tensor] | None = None
    class_labels: bool = False
    # rows of the model's batch per example: 2 for preference pairs (the chosen rows, then the rejected ones); an
    # example's per-layer products are the sums over its rows
    rows_per_example: int = 1
    # the model's outputs are logits per token over a vocabulary, so a pass through its output layer costs about a
    # training step: no probes by default, the lookahead on every parameter (the token-level tasks and DPO)
    token_outputs: bool = False

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        return self.loss(logits, labels, smoothing)

    @property
    def token_level(self) -> bool:
        """Whether the loss is averaged over target tokens rather than over examples."""
        return self.counts is not None

    def num_targets(self, labels: Sequence[torch.Tensor]) -> float:
        """``Σ n_i`` over the label tensors of several batches (the examples, for an example-level task)."""
        if self.counts is None:
            return float(sum(y.shape[0] for y in labels))
        return float(sum(int(self.counts(y).sum()) for y in labels))

    def mean(self, losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch loss ``Σ ℓ_i / Σ n_i`` (what the model's own loss is on this batch). A batch without
        any target token has loss 0."""
        if self.counts is None:
            return losses.mean()
        return losses.sum() / self.counts(labels).sum().clamp(min=1)

    def per_example_mean(self, losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Every example's mean loss over its targets, ``ℓ_i / n_i`` (0 for an example without targets)."""
        if self.counts is None:
            return losses
        return losses / self.counts(labels).clamp(min=1).to(losses.dtype)

    def meta_objective(self, losses: torch.Tensor, labels: torch.Tensor, objective: str = "loss") -> torch.Tensor:
        """The meta set's objective, whose gradient at the lookahead the rates follow (:data:`META_OBJECTIVES`).

        ``"loss"``: the batch loss (:meth:`mean`; the paper's validation loss). ``"bounded"``: the mean over
        meta examples of ``1 - exp(-ℓ_i / n_i)`` — for cross-entropy ``1 - p(label)``, the meta set's expected
        error. Each meta example's pull on the direction is then at most that of one example the model is
        unsure of, so a few meta examples the model cannot fit do not set it alone, and the examples it already
        fits keep a share; under ``"loss"`` an example's pull grows with its loss. ``"log"``: the mean over meta
        examples of ``log(ℓ_i / n_i)``, whose gradient is each example's loss gradient divided by its loss — every
        meta example pulls by the *relative* change of its loss, so those the model already fits pull as much as
        those it still gets wrong (for a model that fits its meta set the cross-entropy's direction is set by its
        few remaining errors).
        """
        if objective == "loss":
            return self.mean(losses, labels)
        if objective == "bounded":
            return (1 - torch.exp(-self.per_example_mean(losses, labels))).mean()
        if objective == "log":
            return torch.log(self.per_example_mean(losses, labels) + _LOG_FLOOR).mean()
        raise ValueError(f"Unknown meta objective {objective!r}; choose one of {META_OBJECTIVES}.")


SINGLE_LABEL = TaskLoss("single_label_classification", per_example_loss, class_labels=True)

_TASKS: dict[str, TaskLoss] = {
    t.task: t
    for t in (
        SINGLE_LABEL,
        TaskLoss("multi_label_classification", multi_label_loss),
        TaskLoss("regression", regression_loss),
        TaskLoss("token_classification", token_loss, _token_counts, token_outputs=True),
        TaskLoss("causal_lm", causal_lm_loss, _shifted_token_counts, token_outputs=True),
        TaskLoss("seq2seq_lm", token_loss, _token_counts, token_outputs=True),
    )
}
TASKS: tuple[str, ...] = tuple(_TASKS)

_SUPPORTED_NOTE = (
    "Supported tasks: " + ", ".join(TASKS) + " (chosen from the model's class, config.problem_type and "
    "num_labels, and the labels)."
)


def task_loss(task: str) -> TaskLoss:
    """The :class:`TaskLoss` of ``task`` (one of :data:`TASKS`)."""
    if task not in _TASKS:
        raise ValueError(f"Unknown task {task!r}. {_SUPPORTED_NOTE}")
    return _TASKS[task]
