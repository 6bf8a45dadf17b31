"""The rates learned without feeding them back: does the real step's use of the rates cost the ranking?

A rate that falls early takes its example out of training; an atypical clean example left untrained keeps the
high loss and the gradient that disagree with the meta set's, so its later visits may confirm the early mistake
where plain training would have fit it. ``benchmarks/rate_rules.py`` replays a run's recorded signals and so
cannot see this loop. This variant cuts it: a temporary patch of ``Schedule._refresh`` sets every window weight
to 1 after the rates are read, so the real step (and the lookahead, which takes the real step) is plain
training's, while the rates are stepped on the meta-gradients of that trajectory exactly as the defaults step
them (probes, caps, averaging):

- ``shadow``: the weights stay 1 for the whole run: the rates' ranking along plain training's own trajectory;
- ``shadow_epoch1``: the weights are 1 during the first epoch only, then the rates learned so far apply (a meta
  warm-up that keeps the updates and defers their use).

MetaLR's runs otherwise at the defaults, the matrix's plain and default MetaLR runs beside them.

    python benchmarks/results/variants/shadow_rates/shadow_rates.py --cells mnist-cnn-sgd-flip35 \\
        mnist-cnn-adamw-flip35 digits-cnn-sgd-flip35 mnist-resnet-sgd-flip35 vader-minilm-ft3-flip20 --seeds 0 1 2
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import robustness as R  # noqa: E402

from hf_ddlr.schedules import Schedule  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("shadow", "shadow_epoch1")
METHODS = tuple(f"metalr_{v}" for v in VARIANTS)


@contextlib.contextmanager
def unit_weights(variant: str) -> Iterator[dict]:
    """Within the block the window's weights are 1 (always for ``"shadow"``, during the first epoch for
    ``"shadow_epoch1"``); the dict yielded counts the windows set to 1 and those left at the rates."""
    original, count = Schedule._refresh, {"ones": 0, "rates": 0}

    def _refresh(self) -> None:
        original(self)
        if variant == "shadow" or (variant == "shadow_epoch1" and (self.trainer.state.epoch or 0.0) < 1.0):
            for mb in self.window:
                mb.weights = torch.ones_like(mb.weights)
            count["ones"] += 1
        else:
            count["rates"] += 1

    with mock.patch.object(Schedule, "_refresh", _refresh):
        yield count


def run_seed(cell: R.Cell, seed: int, methods: list[str], bar) -> list[dict]:
    out = []
    data = R.load_data(cell, seed, False)
    for method in methods:
        variant = method.removeprefix("metalr_")
        with unit_weights(variant) as count:
            run = R.run_cell(cell, seed, "metalr", data=data)
        if not count["ones"] or (variant == "shadow_epoch1") != bool(count["rates"]):
            raise RuntimeError(f"{cell.name}: the patch did not take as {variant!r} needs ({count})")
        out.append({**run, "method": method, "windows": count})
        bar.update()
    return out


def render(runs: list[dict], matrix: dict, command: str) -> str:
    lines = R.table_head(command, "MetaLR's rates learned without their use in the real step, beside the matrix's "
                         "runs (test accuracy / rate AUROC, mean over the seeds; runs ≥ plain; per-visit AUROC of "
                         "each epoch)",
                         ["cell", "seeds", "plain acc / loss AUROC", "MetaLR (defaults)",
                          *[f"MetaLR, {v}" for v in VARIANTS]])
    for cell, ref, plain, columns in R.variant_runs(runs, matrix, METHODS):
        cols = []
        for x in columns:
            ge = sum(q["test_accuracy"] >= p["test_accuracy"] for p, q in zip(plain, x))
            visits = np.mean([r["per_visit_auroc"] for r in x], axis=0)
            cols.append(f"{np.mean([r['test_accuracy'] for r in x]):.3f} / {np.mean([r['rate_auroc'] for r in x]):.3f}"
                        f" ({ge} of {len(x)}; visits {' '.join(f'{v:.2f}' for v in visits)})")
        lines.append(f"| {cell} | {', '.join(map(str, ref))} | {np.mean([p['test_accuracy'] for p in plain]):.3f} / "
                     f"{np.mean([p['loss_auroc'] for p in plain]):.3f} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = R.cell_seed_parser(__doc__, HERE).parse_args(argv)
    matrix = R.matrix_runs()
    R.run_diagnostic(args.output_dir, "shadow_rates", "results/variants/shadow_rates/shadow_rates.py", argv,
                     R.select_cells(args.cells), args.seeds, run_seed, "rates without feedback",
                     lambda runs, command: render(runs, matrix, command), methods=METHODS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
