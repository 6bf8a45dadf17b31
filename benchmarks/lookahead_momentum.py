"""Whether where the lookahead lands is why momentum's rates rank better: plain SGD, meta loss at a momentum step.

On the robustness matrix the rates of the recipes with SGD momentum rank each epoch's visits better (the
per-visit AUROC of ``-∂L_meta/∂e_i``) than those of the same data under plain SGD. The lookahead follows the
real optimizer, so under momentum the meta loss is evaluated at ``θ - lr·(μ·buf + g)``, far along the
trajectory's recent direction, and under plain SGD at ``θ - lr·g``, one batch's step. This tells the two
explanations apart (the point the meta gradient is taken at, or the trajectory the model trains along): for a
plain-SGD cell and seed it trains plain, MetaLR (defaults) and MetaLR whose lookahead is evaluated where a
momentum-``μ`` SGD step would land, ``θ - lr·(μ·m + g)``, with ``m`` a momentum buffer of the real gradients
(rate-weighted, clipped, weight decay added, as ``torch.optim.SGD`` would keep it) that the optimizer itself
does not keep. The tangent (``lr·∇L_i``) is the real step's: only where the meta gradient is taken moves, and
the trained model still follows plain SGD.

    python benchmarks/lookahead_momentum.py --cells mnist-cnn-sgd-flip35 --seeds 0 1 2

Writes lookahead_momentum.json (every run; a rerun skips the runs already there) and lookahead_momentum.md to
--output_dir (default benchmarks/results/lookahead_momentum).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness as R  # noqa: E402  (the matrix's cells, data, models and recipes)

from hf_ddlr import MetaLRTrainer  # noqa: E402

METHODS = ("plain", "metalr", "metalr_momentum_lookahead")


class MomentumBuffer:
    """The buffer ``torch.optim.SGD(momentum=μ, dampening=0)`` would keep for an optimizer that has none:
    ``m ← μ·m + (grad + weight_decay·θ)`` at each of its steps (the first sets ``m`` to that), read before the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, momentum: float) -> None:
        self.momentum, self.buffers = momentum, {}
        optimizer.register_step_pre_hook(self._record)  # for the optimizer's life: it ends with its trainer

    @torch.no_grad()
    def _record(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.detach() + group.get("weight_decay", 0.0) * p.detach()
                buf = self.buffers.get(id(p))
                self.buffers[id(p)] = d.clone() if buf is None else buf.mul_(self.momentum).add_(d)


@contextlib.contextmanager
def momentum_lookahead(momentum: float) -> Iterator[None]:
    """Within the block, every ``MetaLRTrainer`` under plain SGD evaluates its lookahead at ``θ - lr·(μ·m + g)``
    (its specs get the momentum and a :class:`MomentumBuffer`'s tensor)."""
    original = MetaLRTrainer._lookahead_specs

    def specs(self, params):
        out = original(self, params)
        if getattr(self, "_momentum_buffer", None) is None:
            if any(s.kind != "sgd" or s.momentum for s in out.values()):
                raise SystemExit("lookahead_momentum.py needs a plain-SGD cell (no momentum, not Adam): the real "
                                 "optimizer already has a momentum buffer there. Pick a cell of the 'sgd' recipe.")
            raw = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper around it
            self._momentum_buffer = MomentumBuffer(raw, momentum)
        for name, p in params.items():
            buf = self._momentum_buffer.buffers.get(id(p))
            if buf is not None:  # none before the first step: torch's first momentum step is the gradient
                out[name].momentum, out[name].state = momentum, {"momentum_buffer": buf}
        return out

    MetaLRTrainer._lookahead_specs = specs
    try:
        yield
    finally:
        MetaLRTrainer._lookahead_specs = original


def run_seed(cell: R.Cell, seed: int, methods: list[str], momentum: float, bar, quick: bool = False) -> list[dict]:
    """Every method of one cell and seed (the splits shared), with its accuracy and rate / loss rankings."""
    data = R.load_data(cell, seed, quick)
    out = []
    for method in methods:
        if method == "metalr_momentum_lookahead":
            with momentum_lookahead(momentum):
                run = R.run_cell(cell, seed, "metalr", quick=quick, data=data)
            run.update(method=method, lookahead_momentum=momentum)
        else:
            run = R.run_cell(cell, seed, method, quick=quick, data=data)
        out.append(run)
        bar.update(1)
    return out


def render(runs: list[dict], command: str) -> str:
    """Per cell: test accuracy, rate AUROC and each epoch's per-visit AUROC of the two MetaLR runs, the plain
    model's loss AUROC, and the runs at or above plain."""
    lines = R.table_head(command, "test accuracy and rankings (mean over the seeds, then each seed); per-visit "
                         "AUROC: each epoch's visits of −∂L_meta/∂e_i, mean over the seeds",
                         ["cell", "seeds", "plain acc", "MetaLR acc: lookahead at the real step / at a momentum "
                          "step", "rate AUROC, same order", "per-visit AUROC by epoch, same order",
                          "loss AUROC (plain)", "runs ≥ plain, same order"])
    for cell, rs, _ in R.runs_by_cell(runs):
        by = {m: [r for r in rs if r["method"] == m] for m in METHODS}
        if not all(len(v) == len(by["plain"]) and v for v in by.values()):
            continue  # a cell and seed not finished for every method
        a, b = by["metalr"], by["metalr_momentum_lookahead"]
        visits = [" ".join(f"{v:.2f}" for v in np.mean([r["per_visit_auroc"] for r in x], axis=0)) for x in (a, b)]
        ge = [sum(q["test_accuracy"] >= p["test_accuracy"] for p, q in zip(by["plain"], x)) for x in (a, b)]
        lines.append(f"| {cell} | {', '.join(str(r['seed']) for r in by['plain'])} | "
                     f"{R.mean_and_each(by['plain'], 'test_accuracy')} | {R.mean_and_each(a, 'test_accuracy')} / "
                     f"{R.mean_and_each(b, 'test_accuracy')} | {R.mean_and_each(a, 'rate_auroc')} / "
                     f"{R.mean_and_each(b, 'rate_auroc')} | {visits[0]} / {visits[1]} | "
                     f"{R.mean_and_each(by['plain'], 'loss_auroc')} | {ge[0]} / {ge[1]} of {len(a)} |")
    return "\n".join(lines) + "\n"


def train(cell: R.Cell, seed: int, methods: list[str], bar, *, momentum: float, quick: bool) -> list[dict]:
    """:func:`robustness.run_missing`'s unit of work (module-level, so that ``--jobs`` workers can run it)."""
    return run_seed(cell, seed, methods, momentum, bar, quick)


def main(argv: list[str] | None = None) -> int:
    p = R.cell_seed_parser(__doc__, os.path.join(R.HERE, "results", "lookahead_momentum"), jobs=True)
    p.add_argument("--momentum", type=float, default=0.9, help="μ of the momentum step the lookahead lands at")
    p.add_argument("--quick", action="store_true", help="tiny subsample, 1 epoch (smoke test; robustness.py's)")
    args = p.parse_args(argv)
    if not 0.0 < args.momentum < 1.0:
        raise SystemExit(f"--momentum must be in (0, 1), got {args.momentum}.")
    cells = R.select_cells(args.cells)
    if bad := [c.name for c in cells if R.RECIPES[c.recipe].optim != "sgd" or R.RECIPES[c.recipe].momentum]:
        raise SystemExit(f"{bad} train with momentum or Adam, whose lookahead already lands at a momentum step; "
                         "pick plain-SGD cells (the 'sgd' recipe, e.g. mnist-cnn-sgd-flip35).")
    R.run_diagnostic(
        args.output_dir, "lookahead_momentum", "lookahead_momentum.py", argv, cells, args.seeds,
        functools.partial(train, momentum=args.momentum, quick=args.quick),
        "momentum lookahead", render, methods=METHODS, keep=lambda r: r["quick"] == args.quick, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
