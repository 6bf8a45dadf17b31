"""After a run that learned rates: how the trained model sees the meta set, reported.

The meta set is what "clean" means to the method: the rates move toward the examples whose gradients agree with
the meta loss's. A meta set that holds examples the task's data disagrees with (ambiguous or mislabelled items, or
items unlike the rest) pulls the rates toward their look-alikes instead of toward correct labels, and a small meta
set does not average them out. On the robustness matrix's AFINN fine-tune (docs/robustness.md, "A second held-out
fine-tune") the one seed whose rates failed was the one whose plain fine-tune got a quarter of its 20 meta words
wrong (0 and 1 on the other seeds). So after training, the trainer reads the meta set once with the trained model
(eval mode) and names the examples it gets wrong: what to inspect first. With the fine-tunes' bounded meta objective
the MetaLR model got 6 of those 20 wrong (3 under the cross-entropy objective, which bends the model toward them),
and 0-3 on the seeds that went well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .meta.passes import extract_logits

__all__ = ["MetaSetCheck", "WRONG_SHARE_WARNING", "check_meta_set"]

logger = logging.getLogger(__name__)

# A share of the meta set the trained model gets wrong from which the report is a warning: above what the MetaLR
# models of the AFINN and VADER cells got wrong on the seeds that went well (0-0.15), so that it flags an odd meta set
# (AFINN's failed seed: 0.30), one labelled unlike the train set or a model that did not learn, not the usual few
# hard examples.
WRONG_SHARE_WARNING = 0.2
SHOWN = 10  # meta examples named in the message


def _shown(rows: list[int]) -> str:
    """The first :data:`SHOWN` rows, comma-separated ("..." when there are more)."""
    return ", ".join(str(r) for r in rows[:SHOWN]) + (", ..." if len(rows) > SHOWN else "")


@dataclass
class MetaSetCheck:
    """The trained model on the meta set: every example's loss and whether its prediction is wrong (single-label
    classification), in the meta set's row order."""

    losses: torch.Tensor
    wrong: torch.Tensor
    num_labels: int

    @property
    def at_chance(self) -> bool:
        """Whether the model does no better than guessing on the meta set (the share a uniform guess gets wrong)."""
        return self.wrong_share >= 1 - 1 / max(2, self.num_labels)

    @property
    def wrong_share(self) -> float:
        return float(self.wrong.float().mean()) if len(self.wrong) else 0.0

    def wrong_rows(self) -> list[int]:
        """The rows the model gets wrong, highest loss first."""
        rows = torch.nonzero(self.wrong).flatten()
        return rows[torch.argsort(self.losses[rows], descending=True)].tolist()

    def card_text(self) -> str:
        """One line for the model card: how many meta examples the model gets wrong, and which."""
        rows = self.wrong_rows()
        return (f"{len(rows)} of {len(self.wrong)} meta examples predicted wrong (meta loss "
                f"{float(self.losses.mean()):.4g})" + (f"; rows, highest loss first: {_shown(rows)}" if rows else ""))

    def message(self) -> str:
        rows, n = self.wrong_rows(), len(self.wrong)
        text = (f"After training, the model gets {len(rows)} of the {n} meta examples wrong ({self.wrong_share:.0%}; "
                f"meta loss {float(self.losses.mean()):.4g}).")
        if self.at_chance:
            return text + (" That is no better than guessing: the model has not learned the task the meta set "
                           "defines (too few steps, or a meta set labelled unlike the train set), and the rates "
                           "followed little but noise.")
        if rows:
            text += (f" Meta-set rows, highest loss first: {_shown(rows)}. The learned rates follow the meta set: check that "
                     "these labels are right and the examples typical of the task (trainer.meta_set_check has them "
                     "all).")
        return text


def check_meta_set(trainer: Any) -> MetaSetCheck | None:
    """Read the whole meta set with the trained model (eval mode, no gradients) and log what it gets wrong: a
    warning from :data:`WRONG_SHARE_WARNING` of the set on, info below. Single-label classification only (None
    otherwise: "wrong" is not defined for the other tasks)."""
    task = trainer._task
    if task is None or not task.class_labels or trainer.meta_dataset is None or not len(trainer.meta_dataset):
        return None
    model, sampler = trainer.model, trainer._meta_set
    n = len(trainer.meta_dataset)
    size = max(1, trainer.args.per_device_eval_batch_size)
    losses, wrong = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, size):
                inputs, labels = sampler.read(torch.arange(start, min(n, start + size)))
                logits = extract_logits(model(**inputs))
                losses.append(task(logits, labels).float().cpu())
                wrong.append((logits.argmax(-1) != labels).cpu())
    finally:
        model.train(was_training)
    check = MetaSetCheck(torch.cat(losses), torch.cat(wrong), trainer.num_labels)
    if trainer.is_world_process_zero():
        log = logger.warning if check.wrong_share >= WRONG_SHARE_WARNING else logger.info
        log(check.message())
    return check
