"""The lookahead of a large embedding table on the rows that matter.

A word-embedding table is often half of a fine-tuned transformer's parameters (MiniLM: 11.7 M of 22.7 M), yet a
meta step reads few of its rows: the meta forward looks up the meta batch's tokens, and the dots ``T·∇L_i``
read the tangent on the training batch's tokens only. Computing θ' and the optimizer's preconditioner on those
rows alone (:func:`~hf_ddlr.meta.lookahead.lookahead` with ``rows``) gives the same meta loss, the same meta
gradient and the same dots, without a dozen passes over the whole table per step.

That holds only if nothing else reads the table (a table tied to an output layer reads every row; so could a
model that uses the weight outside the embedding call). :class:`EmbeddingRows` restricts only tables the layer
tape saw looked up once, on a model input, and checks the first restricted step against the full lookahead
bit for bit: on any difference the run keeps the full lookahead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .distributed import all_ranks_true
from .layerwise import LayerTape

__all__ = ["EmbeddingRows"]

logger = logging.getLogger(__name__)

# Tables with fewer rows are computed whole (position / token-type tables: nothing to save).
MIN_TABLE_ROWS = 1024
# Restrict only when the rows a step needs are at most this fraction of the table.
MAX_ROW_FRACTION = 0.25


class EmbeddingRows:
    """Which embedding tables a run's meta steps compute on the needed rows only: one per run, the same on
    every process. ``state``: ``"unchecked"`` until a restricted step has been compared with the full
    lookahead, then ``"verified"``, or ``"off"`` (the comparison differed: full lookahead from then on)."""

    def __init__(self) -> None:
        self.state = "unchecked"

    def plan(self, tape: LayerTape | None, meta_inputs: Mapping[str, Any], shapes: Mapping[str, torch.Size],
             other_inputs: Sequence[Mapping[str, Any]] = ()) -> dict[str, torch.Tensor]:
        """``{weight name: rows}``: the training batch's and the meta batch's ids of every table that qualifies
        (empty when none does, or after a failed check), and those of ``other_inputs`` (more batches whose dots
        read the tangent: the probes; the running average's direction is not zero outside this meta batch's rows)."""
        if self.state == "off" or tape is None:
            return {}
        rows: dict[str, torch.Tensor] = {}
        for name, (key, ids) in tape.embedding_lookups().items():
            if name not in shapes:  # a table the lookahead does not move
                continue
            meta_ids = meta_inputs.get(key)
            n = shapes[name][0]
            others = [inputs.get(key) for inputs in other_inputs]
            if not all(isinstance(x, torch.Tensor) for x in [meta_ids, *others]) or n < MIN_TABLE_ROWS:
                continue
            r = torch.unique(torch.cat([ids.reshape(-1), *(x.reshape(-1).to(ids.device) for x in [meta_ids, *others])]))
            if r.numel() <= MAX_ROW_FRACTION * n:
                rows[name] = r
        return rows

    def settle(self, same: bool, device: Any) -> None:
        """Record the first check's outcome (every process takes the same one)."""
        if all_ranks_true(same, device):
            self.state = "verified"
            logger.info("Lookahead of the embedding tables on the looked-up rows: matches the full lookahead.")
        else:
            self.state = "off"
            logger.warning("The row-restricted lookahead of an embedding table differed from the full one (the "
                           "table is read outside its lookup); using the full lookahead for this run.")
