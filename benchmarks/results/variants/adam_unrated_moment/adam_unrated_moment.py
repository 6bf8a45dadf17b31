"""Adam's second moment from the unweighted gradient: do the rates act as learning rates under Adam?

Under SGD an instance rate ``r_i`` is a learning-rate multiplier: the example's share of the step is ``r_i``
times what plain training gives it. Under Adam it is not quite: the loss's weights enter the gradient ``Σ r_i
∇L_i / N`` that *both* of Adam's moments see, and Adam divides each coordinate by the root of its second moment,
so in a coordinate the slowed examples dominate, the division gives back much of what the rates took. The
lookahead holds that second moment constant (``hf_ddlr.meta.lookahead``), i.e. it assumes the rates do not reach
it. This variant makes the real step match that assumption: the trainer's AdamW takes its first moment from the
rated gradient as always and its second moment from the *unweighted* gradient ``Σ ∇L_i / N`` of the same batch
(clipped by the same ``max_grad_norm`` as the rated one), so that a rate of 0.2 is a fifth of the example's
step in Adam's metric. A temporary patch of the schedule's real-step loss (one more backward per step for the
unweighted gradient, or the per-layer products' own contraction where those give the step) and of
``torch.optim.AdamW.step`` (torch's single-tensor AdamW, written out; with the unweighted gradient equal to the
rated one it matches torch's to the bit); MetaLR's runs otherwise at the defaults, the matrix's plain and default
MetaLR runs beside them.

    python benchmarks/results/variants/adam_unrated_moment/adam_unrated_moment.py --cells mnist-cnn-adamw-flip35 \\
        mnist-cnn-adamw-pair30 vader-minilm-ft3-flip20 vader-minilm-ft-flip30 afinn-minilm-ft-flip30 \\
        textblob-minilm-ft6-flip30 --seeds 0 1 2
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import robustness as R  # noqa: E402

from hf_ddlr import schedules  # noqa: E402
from hf_ddlr.schedules import trainable_params  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def adamw_step(self: torch.optim.AdamW, closure=None, max_norm: float = 1.0):
    """torch's AdamW (no AMSGrad), except that a parameter's second moment takes ``p._unrated_grad`` when the
    real step left one (clipped like the real gradient), and its first moment the real (rated) ``p.grad``."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    stash = [p for g in self.param_groups for p in g["params"] if p.grad is not None and hasattr(p, "_unrated_grad")]
    clip = 1.0
    if stash and max_norm:
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p._unrated_grad) for p in stash])))
        clip = min(1.0, max_norm / (norm + 1e-6))
    for group in self.param_groups:
        (b1, b2), lr, wd, eps = group["betas"], float(group["lr"]), group["weight_decay"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            second = p._unrated_grad * clip if hasattr(p, "_unrated_grad") else p.grad
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            t = float(st["step"])
            p.mul_(1 - lr * wd)
            st["exp_avg"].lerp_(p.grad, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(second, second, value=1 - b2)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1**t))
            if hasattr(p, "_unrated_grad"):
                del p._unrated_grad
    return loss


@contextlib.contextmanager
def unrated_second_moment(max_norm: float = 1.0) -> Iterator[dict]:
    """Within the block, every MetaLR trainer's AdamW takes its second moment from the unweighted gradient (see
    the module docstring). Yields counters: the optimizer's parameter steps and those that had an unweighted
    gradient."""
    weighted, from_tape, step = schedules.Schedule._weighted, schedules.SameStepFused._loss_from_tape, torch.optim.AdamW.step
    count = {"param_steps": 0, "unrated": 0}

    def stash(params: dict, grads: dict) -> None:
        for n, p in params.items():
            g = grads.get(n)
            p._unrated_grad = g.detach().to(p.dtype) if g is not None else torch.zeros_like(p)

    def patched_weighted(self, w, L):
        if L.requires_grad and torch.is_grad_enabled():
            params = trainable_params(self.trainer.model)
            gs = torch.autograd.grad(L.sum() / self.normalizer, list(params.values()), retain_graph=True,
                                     allow_unused=True)
            stash(params, dict(zip(params, gs)))
        return weighted(self, w, L)

    def patched_from_tape(self, tape, w, L):
        stash(trainable_params(self.trainer.model), tape.weighted_grads(torch.ones_like(w) / self.normalizer))
        return from_tape(self, tape, w, L)

    def patched_step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        count["param_steps"] += len(params)
        count["unrated"] += sum(hasattr(p, "_unrated_grad") for p in params)
        return adamw_step(self, closure, max_norm)

    schedules.Schedule._weighted, schedules.SameStepFused._loss_from_tape = patched_weighted, patched_from_tape
    torch.optim.AdamW.step = patched_step
    try:
        yield count
    finally:
        schedules.Schedule._weighted, schedules.SameStepFused._loss_from_tape = weighted, from_tape
        torch.optim.AdamW.step = step


def run_seed(cell: R.Cell, seed: int, missing: list, bar) -> list[dict]:
    if R.RECIPES[cell.recipe].optim != "adamw_torch":
        raise SystemExit(f"{cell.name} does not train with AdamW: pick an AdamW cell.")
    with unrated_second_moment() as count:
        run = R.run_cell(cell, seed, "metalr")
    if count["unrated"] != count["param_steps"] or not count["param_steps"]:
        raise RuntimeError(f"{count['unrated']} of {count['param_steps']} parameter steps had an unweighted gradient")
    bar.update()
    return [{**run, "method": "metalr_unrated_moment"}]


def render(runs: list[dict], matrix: dict, command: str) -> str:
    lines = R.table_head(command, "MetaLR's AdamW with its second moment from the unweighted gradient, beside the "
                         "matrix's runs (test accuracy / rate AUROC per seed)",
                         ["cell", "seed", "plain acc", "MetaLR acc / AUROC (defaults)",
                          "MetaLR acc / AUROC (unrated second moment)"])
    ge = {"defaults": 0, "unrated": 0}
    gain = {"defaults": [], "unrated": []}
    for r in runs:
        p, m = matrix[(r["cell"], r["seed"], "plain")], matrix[(r["cell"], r["seed"], "metalr")]
        for k, x in (("defaults", m), ("unrated", r)):
            ge[k] += x["test_accuracy"] >= p["test_accuracy"]
            gain[k].append(x["test_accuracy"] - p["test_accuracy"])
        lines.append(f"| {r['cell']} | {r['seed']} | {p['test_accuracy']:.3f} | {m['test_accuracy']:.3f} / "
                     f"{m['rate_auroc']:.3f} | {r['test_accuracy']:.3f} / {r['rate_auroc']:.3f} |")
    if runs:
        lines += ["", f"Runs at or above plain: defaults {ge['defaults']} of {len(runs)}, unrated second moment "
                  f"{ge['unrated']}; mean gain over plain: {np.mean(gain['defaults']):+.4f} / "
                  f"{np.mean(gain['unrated']):+.4f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = R.cell_seed_parser(__doc__, HERE).parse_args(argv)
    matrix = R.matrix_runs()
    R.run_diagnostic(args.output_dir, "adam_unrated_moment", "results/variants/adam_unrated_moment/adam_unrated_moment.py",
                     argv, R.select_cells(args.cells), args.seeds, run_seed, "unrated moment",
                     lambda runs, command: render(runs, matrix, command), methods=("metalr_unrated_moment",))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
