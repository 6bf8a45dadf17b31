"""Whether each paired run's difference from plain training is larger than its test set can measure.

Issue 13's count bar asks MetaLR's test accuracy to be at or above plain training's in 90 % of the matrix's paired
runs. A paired run compares two models on the same test examples, so its difference has a known noise floor: the
examples one model gets right and the other wrong. For a cell and seed this trains the plain ``Trainer`` and
``MetaLRTrainer`` (defaults) exactly as ``robustness.py`` does — so each run reproduces the committed matrix's
accuracy, which the table checks — keeps which test examples each gets right, and reports:

- the discordant examples: ``b`` right under plain training only, ``c`` right under MetaLR only;
- the difference ``(c − b) / n`` with its 95 % interval (the paired proportions' normal interval);
- McNemar's exact test (two-sided binomial test of ``c`` against ``b``): whether the two models' error rates on
  this test set differ beyond chance.

    python benchmarks/paired_significance.py --cells mnist-cnn-adamw-flip35 --seeds 0 1 2

Writes paired_significance.json (every run, with its per-example correctness; a rerun skips the runs already there)
and paired_significance.md to --output_dir (default benchmarks/results/paired_significance). ``--merge DIR ...``
first takes the runs of other output folders of this script (runs made in parallel processes). ``--training_noise``
also retrains plain training on another training seed of each cell and seed (the model's initialisation, the data
order and the dropout masks; the data, noise and meta set kept) and scores it against plain training as MetaLR is:
what the count bar and the test say of a method no different from plain training.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
from scipy.stats import binomtest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness as R  # noqa: E402  (the matrix's cells, data, models and recipes)

NAME = "paired_significance"
METHODS = ("plain", "metalr")
RESEEDED = "plain_reseeded"  # --training_noise: plain training again, on another training seed
RESEED = 1000  # its training seed: the cell's seed + RESEED (the data, noise and meta set stay the seed's)
ALPHA = 0.05


def correct_on(trainer, ds) -> str:
    """Which examples of ``ds`` the trained model gets right, as a string of 0 / 1 (the JSON stays compact)."""
    logits, y = R._predict(trainer, ds)
    return "".join("1" if ok else "0" for ok in logits.argmax(1) == y)


def train(cell: R.Cell, seed: int, missing: list[str], bar) -> list[dict]:
    """The missing methods of one cell and seed, each with its accuracy and per-example test correctness."""
    data = R.load_data(cell, seed, False)
    out = []
    got: dict = {}
    for method in missing:
        r = R.run_cell(cell, seed, "plain" if method == RESEEDED else method, data=data,
                       after_train=lambda t, m=method: got.__setitem__(m, correct_on(t, data[0]["test"])),
                       train_seed=seed + RESEED if method == RESEEDED else None)
        out.append({k: r[k] for k in ("cell", "seed", "fingerprint", "test_accuracy", "threads", "torch",
                                      "transformers", "cpu")} | {"method": method, "correct": got[method]})
        bar.update()
    return out


def compare(plain: str, metalr: str) -> dict:
    """The paired comparison of two models' per-example correctness on one test set."""
    a = np.frombuffer(plain.encode(), dtype=np.uint8) == ord("1")
    m = np.frombuffer(metalr.encode(), dtype=np.uint8) == ord("1")
    if a.shape != m.shape:
        raise ValueError(f"the two runs were scored on test sets of different sizes ({a.size} and {m.size})")
    n, b, c = a.size, int((a & ~m).sum()), int((~a & m).sum())
    diff = (c - b) / n
    se = math.sqrt(max(b + c - (c - b) ** 2 / n, 0.0)) / n
    p = binomtest(c, b + c, 0.5).pvalue if b + c else 1.0
    return {"n": n, "b": b, "c": c, "diff": diff, "low": diff - 1.96 * se, "high": diff + 1.96 * se, "p": p}


def verdict(cmp: dict) -> str:
    if cmp["p"] >= ALPHA:
        return "within the noise"
    return "MetaLR better" if cmp["c"] > cmp["b"] else "**MetaLR worse**"


def render(runs: list[dict], command: str) -> str:
    matrix = R.matrix_runs()
    by = {(r["cell"], r["seed"], r["method"]): r for r in runs}
    pairs = [(r["cell"], r["seed"]) for r in R.in_matrix_order([r for r in runs if r["method"] == "plain"])
             if (r["cell"], r["seed"], "metalr") in by]
    lines = R.table_head(command, "MetaLRConfig defaults, one thread; each pair scored on the same test examples "
                         "(b: right under plain only, c: right under MetaLR only); McNemar's exact test",
                         ["cell", "seed", "test examples", "plain / MetaLR acc", "as in the matrix",
                          "difference, points (95 % interval)", "b / c", "p", "verdict"])
    rows, moved = [], []  # moved: |accuracy here − the matrix's| of every run the matrix has
    for cell, seed in pairs:
        p, m = by[(cell, seed, "plain")], by[(cell, seed, "metalr")]
        cmp = compare(p["correct"], m["correct"])
        same = all(matrix.get((cell, seed, k), {}).get("test_accuracy") == by[(cell, seed, k)]["test_accuracy"]
                   for k in METHODS)
        moved += [abs(matrix[(cell, seed, k)]["test_accuracy"] - by[(cell, seed, k)]["test_accuracy"])
                  for k in METHODS if (cell, seed, k) in matrix]
        rows.append((cell, seed, cmp, m["test_accuracy"] >= p["test_accuracy"], same))
        lines.append(f"| {cell} | {seed} | {cmp['n']} | {p['test_accuracy']:.3f} / {m['test_accuracy']:.3f} | "
                     f"{'yes' if same else 'no'} | {100 * cmp['diff']:+.1f} ({100 * cmp['low']:+.1f} to "
                     f"{100 * cmp['high']:+.1f}) | {cmp['b']} / {cmp['c']} | {cmp['p']:.3g} | {verdict(cmp)} |")
    if rows:
        below = [r for r in rows if not r[3]]
        better = sum(r[2]["p"] < ALPHA and r[2]["c"] > r[2]["b"] for r in rows)
        worse = sum(r[2]["p"] < ALPHA and r[2]["c"] < r[2]["b"] for r in rows)
        lines += ["", f"- {len(rows)} paired runs: MetaLR at or above plain in {len(rows) - len(below)}; "
                  f"significantly better (p < {ALPHA}) in {better}, significantly worse in {worse}, "
                  f"within the test set's noise in {len(rows) - better - worse}; mean difference "
                  f"{100 * np.mean([r[2]['diff'] for r in rows]):+.2f} points",
                  f"- pairs whose plain and MetaLR accuracies both reproduce the committed matrix's: "
                  f"{sum(r[4] for r in rows)} of {len(rows)}"
                  + (f"; the runs that moved differ from the matrix's by {100 * np.mean([d for d in moved if d]):.2f} "
                     f"points on average (up to {100 * max(moved):.1f})" if any(moved) else ""),
                  f"- of the {len(below)} runs below plain, significantly below: "
                  f"{sum(r[2]['p'] < ALPHA for r in below)}; their differences "
                  + ", ".join(f"{100 * r[2]['diff']:+.1f} ({r[0]} s{r[1]}, p {r[2]['p']:.2f})" for r in below)]
    return "\n".join(lines + training_noise(by, pairs)) + "\n"


def training_noise(by: dict, pairs: list[tuple[str, int]]) -> list[str]:
    """The null comparison, where ``--training_noise`` made it: plain training against plain training on another
    training seed (the same data, noise, meta set and test set), scored as the MetaLR pairs are. What the count
    bar and the test would say of a method no different from plain training."""
    rows = [(cell, seed, compare(by[(cell, seed, "plain")]["correct"], by[(cell, seed, RESEEDED)]["correct"]))
            for cell, seed in pairs if (cell, seed, RESEEDED) in by]
    if not rows:
        return []
    lines = ["", f"**Plain training against itself on another training seed** (seed + {RESEED}: the model's "
             "initialisation, the data order and the dropout masks; the same data, noise, meta set and test set)", "",
             "| cell | seed | plain / plain again | difference, points (95 % interval) | b / c | p | verdict |",
             "|---|---|---|---|---|---|---|"]
    acc = {k: r["test_accuracy"] for k, r in by.items()}
    for cell, seed, cmp in rows:
        lines.append(f"| {cell} | {seed} | {acc[(cell, seed, 'plain')]:.3f} / {acc[(cell, seed, RESEEDED)]:.3f} | "
                     f"{100 * cmp['diff']:+.1f} ({100 * cmp['low']:+.1f} to {100 * cmp['high']:+.1f}) | "
                     f"{cmp['b']} / {cmp['c']} | {cmp['p']:.3g} | {verdict(cmp).replace('MetaLR', 'the second run')} |")
    ge = sum(acc[(c, s, RESEEDED)] >= acc[(c, s, "plain")] for c, s, _ in rows)
    sig = sum(cmp["p"] < ALPHA for _, _, cmp in rows)
    above_mean = sum(acc[(c, s, "metalr")] >= (acc[(c, s, "plain")] + acc[(c, s, RESEEDED)]) / 2 for c, s, _ in rows)
    lines += ["", f"- {len(rows)} pairs of plain runs: the second at or above the first in {ge}; significantly "
              f"different (p < {ALPHA}) in {sig}; mean |difference| "
              f"{100 * np.mean([abs(cmp['diff']) for _, _, cmp in rows]):.2f} points",
              f"- MetaLR at or above the mean of the two plain runs in {above_mean} of {len(rows)} (at or above the "
              f"first: {sum(acc[(c, s, 'metalr')] >= acc[(c, s, 'plain')] for c, s, _ in rows)})"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = R.cell_seed_parser(__doc__, os.path.join(R.HERE, "results", NAME), jobs=True)
    parser.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                        help="other output folders of this script whose runs to take in first")
    parser.add_argument("--training_noise", action="store_true",
                        help=f"also retrain plain on another training seed (seed + {RESEED}) and compare it with "
                             "plain as MetaLR is: the null comparison")
    args = parser.parse_args(argv)
    R.datasets.disable_progress_bars()
    R.transformers.logging.set_verbosity_error()  # the MiniLM head's "newly initialized" notice, once per run
    path, runs, command = R.open_results(args.output_dir, NAME, "paired_significance.py", argv)
    have = {(r["cell"], r["seed"], r["method"]) for r in runs}
    for folder in args.merge:
        for r in R.load_runs(os.path.join(folder, f"{NAME}.json")):
            if (r["cell"], r["seed"], r["method"]) not in have:
                runs.append(r)
                have.add((r["cell"], r["seed"], r["method"]))
    R.write_json_atomic(path, {"runs": runs})
    R.torch.set_num_threads(R.RUN_SETTINGS["threads"])
    cells = R.select_cells(args.cells)
    names = {c.name for c in cells}
    methods = (*METHODS, RESEEDED) if args.training_noise else METHODS
    shown = R.run_missing(path, runs, cells, args.seeds, train, "paired runs", methods,
                          keep=lambda r: r["fingerprint"] == R.fingerprint(R.CELL_BY_NAME[r["cell"]], r["method"], False),
                          jobs=args.jobs)
    R.write_table(args.output_dir, NAME, render([r for r in shown if r["cell"] in names and r["seed"] in args.seeds],
                                                command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
