"""Every class's pull on the meta gradient made equal: does a class the model already fits leave its examples'
rates without a signal?

Under the cross-entropy the meta gradient is set by the meta examples the model gets most wrong at the time, so
the training examples of a class the model fits well might get little signal while it does — one reading of why
an epoch's visits rank at about 0.85 where their sum reaches 0.97. This variant changes the meta
objective of a single-label classifier (a temporary patch of ``TaskLoss.meta_objective``'s ``"loss"``, the
default for models trained from scratch):

- ``class_log``: the mean over the meta batch's classes of ``log`` (the class's mean loss): every class pulls by
  the *relative* change of its loss, however well the model fits it (what ``meta_objective="log"`` does per
  example, here per class);
- ``class_mean``: the mean over the classes of the class's mean loss: the meta batch weighed as if it were
  class-balanced — the control, as a meta batch drawn from the balanced meta set is nearly so.

MetaLR's runs otherwise at the defaults, the matrix's plain and default MetaLR runs beside them.

    python benchmarks/results/variants/meta_objective_per_class/meta_objective_per_class.py --cells \\
        mnist-cnn-sgd-flip35 mnist-cnn-adamw-flip35 mnist-cnn-sgdm-uniform20 mnist-cnn-sgd-classdep \\
        digits-cnn-sgd-flip35 digits-cnn-sgdm-flip35 --seeds 0 1 2
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import robustness as R  # noqa: E402

from hf_ddlr.meta.losses import TaskLoss  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("class_log", "class_mean")
METHODS = tuple(f"metalr_{v}" for v in VARIANTS)
LOG_FLOOR = 1e-6


def per_class_objective(losses: torch.Tensor, labels: torch.Tensor, variant: str) -> torch.Tensor:
    """The meta objective of ``variant`` over a meta batch's per-example losses: the mean over the classes present
    of ``log(class mean loss)`` (``"class_log"``) or of the class mean loss (``"class_mean"``)."""
    per_class = torch.stack([losses[labels == c].mean() for c in torch.unique(labels)])
    if variant == "class_log":
        return torch.log(per_class + LOG_FLOOR).mean()
    if variant == "class_mean":
        return per_class.mean()
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


@contextlib.contextmanager
def per_class_meta_objective(variant: str) -> Iterator[dict]:
    """Within the block a single-label classifier's ``"loss"`` meta objective is :func:`per_class_objective`'s
    ``variant``; the dict yielded counts the meta objectives taken that way (``"patched"``)."""
    original, count = TaskLoss.meta_objective, {"patched": 0}

    def meta_objective(self, losses, labels, objective="loss"):
        if objective != "loss" or not self.class_labels:
            return original(self, losses, labels, objective)
        count["patched"] += 1
        return per_class_objective(losses, labels, variant)

    TaskLoss.meta_objective = meta_objective
    try:
        yield count
    finally:
        TaskLoss.meta_objective = original


def run_seed(cell: R.Cell, seed: int, methods: list[str], bar) -> list[dict]:
    out = []
    for method in methods:
        with per_class_meta_objective(method.removeprefix("metalr_")) as count:
            run = R.run_cell(cell, seed, "metalr")
        if not count["patched"]:
            raise RuntimeError(f"{cell.name}: no meta objective was taken per class (not a single-label classifier?)")
        out.append({**run, "method": method})
        bar.update()
    return out


def render(runs: list[dict], matrix: dict, command: str) -> str:
    lines = R.table_head(command, "MetaLR with every class's pull on the meta gradient made equal, beside the "
                         "matrix's runs (test accuracy / rate AUROC, mean over the seeds; runs ≥ plain)",
                         ["cell", "seeds", "plain acc", "MetaLR (defaults)", *[f"MetaLR, {v}" for v in VARIANTS]])
    for cell, ref, plain, columns in R.variant_runs(runs, matrix, METHODS):
        cols = []
        for x in columns:
            ge = sum(q["test_accuracy"] >= p["test_accuracy"] for p, q in zip(plain, x))
            cols.append(f"{np.mean([r['test_accuracy'] for r in x]):.3f} / {np.mean([r['rate_auroc'] for r in x]):.3f}"
                        f" ({ge} of {len(x)})")
        lines.append(f"| {cell} | {', '.join(map(str, ref))} | {np.mean([p['test_accuracy'] for p in plain]):.3f} | "
                     + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = R.cell_seed_parser(__doc__, HERE).parse_args(argv)
    matrix = R.matrix_runs()
    R.run_diagnostic(args.output_dir, "meta_objective_per_class",
                     "results/variants/meta_objective_per_class/meta_objective_per_class.py", argv,
                     R.select_cells(args.cells), args.seeds, run_seed, "per-class meta objective",
                     lambda runs, command: render(runs, matrix, command), methods=METHODS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
