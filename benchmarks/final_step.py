"""How much of a run's test accuracy is its last step: the accuracy along the end of training.

The robustness matrix compares the plain ``Trainer`` and ``MetaLRTrainer`` by the test accuracy of the final
model. Under a constant learning rate (the matrix's ``sgd`` and ``sgdm`` recipes) that number moves by several
points from one evaluation to the next, so a single pair can end either way. For a cell and seed this trains
the methods exactly as ``robustness.py`` does (the final accuracy reproduces the matrix's) while a callback
evaluates the test split every ``--every`` optimizer steps (eval mode, no gradients: the training is unchanged),
and reports each run's final accuracy beside the mean, minimum and maximum over its last ``--last`` evaluations.

    python benchmarks/final_step.py --cells mnist-cnn-sgdm-flip35 --seeds 4 --every 20

Writes final_step.json (every run with its trace; a rerun skips the runs already there) and final_step.md to
--output_dir (default benchmarks/results/final_step).
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness as R  # noqa: E402  (the matrix's cells, data, models and recipes)


class AccuracyTrace(TrainerCallback):
    """Test accuracy every ``every`` optimizer steps and at the last one, in eval mode without gradients."""

    def __init__(self, test, collate, every: int, batch_size: int = 256):
        self.test = test.remove_columns([c for c in ("sample_index",) if c in test.column_names])
        self.collate, self.every, self.batch_size = collate, every, batch_size
        self.trace: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        was_training = model.training
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(self.test), self.batch_size):
                rows = [self.test[i] for i in range(start, min(start + self.batch_size, len(self.test)))]
                batch = self.collate(rows) if self.collate else {
                    k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}
                labels = batch.pop("labels", None)
                labels = batch.pop("label") if labels is None else labels
                batch = {k: v.to(model.device) for k, v in batch.items()}
                correct += int((model(**batch).logits.argmax(-1).cpu() == torch.as_tensor(labels)).sum())
        model.train(was_training)
        self.trace.append((state.global_step, correct / len(self.test)))


def run_seed(cell: R.Cell, seed: int, methods: list[str], every: int, bar, quick: bool = False) -> list[dict]:
    """Every method of one cell and seed, each with its accuracy trace."""
    data = R.load_data(cell, seed, quick)
    out = []
    for method in methods:
        _, collate = R.model_and_collator(cell, seed, data[0])
        trace = AccuracyTrace(data[0]["test"].with_format("torch") if collate is None else data[0]["test"],
                              collate, every)
        run = R.run_cell(cell, seed, method, quick=quick, data=data, callbacks=[trace])
        out.append({"cell": cell.name, "seed": seed, "method": method, "quick": quick, "every": every,
                    "fingerprint": run["fingerprint"], "test_accuracy": run["test_accuracy"],
                    "trace": trace.trace, **R.environment()})
        bar.update(1)
    return out


def render(runs: list[dict], last: int, command: str) -> str:
    """One row per cell and seed: each method's final accuracy and its mean [min, max] over the last evaluations;
    then how many MetaLR runs are at or above plain by each measure."""
    methods = [m for m in R.METHODS if any(r["method"] == m for r in runs)]
    by = {(r["cell"], r["seed"], r["method"]): r for r in runs}
    pairs = sorted({(r["cell"], r["seed"]) for r in runs})
    lines = [f"`{command}` — test accuracy at the last step, and mean [min, max] over each run's last {last} "
             "evaluations (the final one included)", "",
             "| cell | seed | every (steps) | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    final_ge = mean_ge = n = 0
    for cell, seed in pairs:
        cols = []
        for m in methods:
            r = by.get((cell, seed, m))
            if r is None:
                cols.append("–")
                continue
            tail = [a for _, a in r["trace"][-last:]]
            cols.append(f"{r['test_accuracy']:.3f} ({np.mean(tail):.3f} [{min(tail):.3f}, {max(tail):.3f}])")
        lines.append(f"| {cell} | {seed} | {by[(cell, seed, methods[0])]['every']} | " + " | ".join(cols) + " |")
        p, q = by.get((cell, seed, "plain")), by.get((cell, seed, "metalr"))
        if p and q:
            n += 1
            final_ge += q["test_accuracy"] >= p["test_accuracy"]
            mean_ge += np.mean([a for _, a in q["trace"][-last:]]) >= np.mean([a for _, a in p["trace"][-last:]])
    if n:
        lines += ["", f"MetaLR ≥ plain: {final_ge} of {n} pairs at the last step, {mean_ge} of {n} on the mean over "
                  f"the last {last} evaluations."]
    return "\n".join(lines) + "\n"


def train(cell: R.Cell, seed: int, methods: list[str], bar, *, every: int, quick: bool) -> list[dict]:
    """:func:`robustness.run_missing`'s unit of work (module-level, so that ``--jobs`` workers can run it)."""
    return run_seed(cell, seed, methods, every, bar, quick)


def main(argv: list[str] | None = None) -> int:
    p = R.cell_seed_parser(__doc__, os.path.join(R.HERE, "results", "final_step"), jobs=True)
    p.add_argument("--methods", nargs="+", default=["plain", "metalr"], choices=R.METHODS)
    p.add_argument("--every", type=int, default=20, help="evaluate the test split every this many optimizer steps")
    p.add_argument("--last", type=int, default=5, help="the evaluations at the end that the mean is taken over")
    p.add_argument("--quick", action="store_true", help="tiny subsample, 1 epoch (smoke test; robustness.py's)")
    args = p.parse_args(argv)
    if args.every < 1 or args.last < 1:
        raise SystemExit(f"--every and --last must be >= 1, got {args.every} and {args.last}.")
    path, runs, command = R.open_results(args.output_dir, "final_step", "final_step.py", argv)
    torch.set_num_threads(R.RUN_SETTINGS["threads"])
    shown = R.run_missing(  # runs recorded before the quick flag existed were all full runs
        path, runs, R.select_cells(args.cells), args.seeds,
        functools.partial(train, every=args.every, quick=args.quick),
        "final step", methods=args.methods, keep=lambda r: r.get("quick", False) == args.quick, jobs=args.jobs)
    md = render(sorted(shown, key=lambda r: (r["cell"], r["seed"])), args.last, command)
    R.write_table(args.output_dir, "final_step", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
