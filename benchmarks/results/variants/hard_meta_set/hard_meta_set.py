"""A meta set that vouches for the atypical clean examples: do the rates then stop slowing them?

The rates' errors that cost accuracy are clean examples they rank lowest — atypical images or words, which a meta
set drawn at random (mostly typical examples) does not vouch for (docs/robustness.md, "What the runs below plain
are made of"). This variant swaps the meta set for one made of such examples, chosen with knowledge no user has
(an oracle of the composition): for a cell and seed it trains plain on the matrix's split, ranks the *clean*
training examples of every label by that model's training loss, and moves the hardest of each label (as many as
the meta set holds per class) into the meta set, the matrix's meta examples (clean, random) into the training set
in their place. Plain and MetaLR (defaults) are trained on that split (``*_hard``), and on a control split that
swaps as many *random* clean training examples of each label the same way (``*_random``), which separates the
meta set's hardness from the swap itself.

    python benchmarks/results/variants/hard_meta_set/hard_meta_set.py --cells mnist-cnn-sgd-flip35 \\
        mnist-cnn-adamw-flip35 digits-cnn-sgd-flip35 --seeds 0 1 2
"""

from __future__ import annotations

import os
import sys

import datasets
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import robustness as R  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = ("random", "hard")
METHODS = tuple(f"{m}_{s}" for s in SPLITS for m in ("plain", "metalr"))


def meta_rows(losses: np.ndarray | None, labels: np.ndarray, noisy: np.ndarray, per_label: dict[int, int],
              seed: int) -> np.ndarray:
    """The training rows that become the meta set: for every label, ``per_label[label]`` clean rows — those of
    highest ``losses`` (None: drawn at random with ``seed``)."""
    rng = np.random.default_rng([seed, 11])
    rows = []
    for label, k in sorted(per_label.items()):
        clean = np.flatnonzero((labels == label) & ~noisy)
        if len(clean) < k:
            raise ValueError(f"label {label} has {len(clean)} clean training examples, fewer than the {k} needed")
        rows.append(clean[np.argsort(-losses[clean], kind="stable")[:k]] if losses is not None
                    else rng.choice(clean, k, replace=False))
    return np.sort(np.concatenate(rows))


def swapped(ds: datasets.DatasetDict, noisy: np.ndarray, rows: np.ndarray) -> tuple[datasets.DatasetDict, np.ndarray]:
    """The split with training ``rows`` as the meta set and the old meta examples (clean) appended to the training
    set; ``sample_index`` renumbered in both, the noisy mask to match."""
    fmt = ds["train"].format["type"]
    keep = np.setdiff1d(np.arange(len(ds["train"])), rows)
    train = datasets.concatenate_datasets([ds["train"].select(keep.tolist()), ds["meta"]])
    out = datasets.DatasetDict({"train": R._reindex(train.with_format(fmt), np.arange(len(train))),
                                "meta": R._reindex(ds["train"], rows), "test": ds["test"]})
    return out, np.concatenate([noisy[keep], np.zeros(len(ds["meta"]), dtype=bool)])


def run_seed(cell: R.Cell, seed: int, methods: list[str], bar) -> list[dict]:
    ds, noisy = R.load_data(cell, seed)
    labels = np.asarray(ds["train"]["label"])
    meta_labels, counts = np.unique(np.asarray(ds["meta"]["label"]), return_counts=True)
    per_label = dict(zip(meta_labels.tolist(), counts.tolist()))
    losses = {}
    if any(m.endswith("_hard") for m in methods):
        R.run_cell(cell, seed, "plain", data=(ds, noisy),
                   after_train=lambda tr: losses.update(hard=R.train_losses(tr, ds["train"])[0]))
    out = []
    for split in SPLITS:
        todo = [m for m in methods if m.endswith(f"_{split}")]
        if not todo:
            continue
        rows = meta_rows(losses.get("hard") if split == "hard" else None, labels, noisy, per_label, seed)
        data = swapped(ds, noisy, rows)
        for method in todo:
            run = R.run_cell(cell, seed, method.split("_")[0], data=data)
            out.append({**run, "method": method, "meta_rows": rows.tolist()})
            bar.update()
    return out


def render(runs: list[dict], command: str) -> str:
    lines = R.table_head(command, "plain and MetaLR (defaults) with the meta set swapped for random or for the "
                         "hardest clean training examples of each label (mean over the seeds; runs ≥ plain on the "
                         "same split)", ["cell", "seeds", *[f"{s} meta set: plain acc / MetaLR acc / rate AUROC / "
                                                            "loss AUROC (plain) / MetaLR ≥ plain" for s in SPLITS]])
    for cell, rs, _ in R.runs_by_cell(runs):
        by = {m: sorted((r for r in rs if r["method"] == m), key=lambda r: r["seed"]) for m in METHODS}
        if len({tuple(r["seed"] for r in v) for v in by.values()}) != 1:
            continue  # a seed not finished for every method
        cols = []
        for s in SPLITS:
            p, m = by[f"plain_{s}"], by[f"metalr_{s}"]
            ge = sum(b["test_accuracy"] >= a["test_accuracy"] for a, b in zip(p, m))
            cols.append(f"{np.mean([r['test_accuracy'] for r in p]):.3f} / {np.mean([r['test_accuracy'] for r in m]):.3f}"
                        f" / {np.mean([r['rate_auroc'] for r in m]):.3f} / {np.mean([r['loss_auroc'] for r in p]):.3f}"
                        f" / {ge} of {len(m)}")
        lines.append(f"| {cell} | {', '.join(str(r['seed']) for r in by[METHODS[0]])} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = R.cell_seed_parser(__doc__, HERE).parse_args(argv)
    R.run_diagnostic(args.output_dir, "hard_meta_set", "results/variants/hard_meta_set/hard_meta_set.py", argv,
                     R.select_cells(args.cells), args.seeds, run_seed, "hard meta set", render, methods=METHODS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
