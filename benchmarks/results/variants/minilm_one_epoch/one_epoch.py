"""vader-minilm-ft-flip30 trained for one epoch instead of two: plain, and MetaLR with ``meta_parameters`` "head"
and "all", per seed. One JSON line per seed (test accuracy, rate AUROC; "head" is what "auto" takes there).

    python benchmarks/results/variants/minilm_one_epoch/one_epoch.py 0 1 2 > runs.jsonl
    python benchmarks/results/variants/minilm_one_epoch/one_epoch.py afinn-minilm-ft-flip30 0 1 2 > runs_afinn.jsonl

(A first argument that is not a seed names another cell of the ``ft`` recipe.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import datasets  # noqa: E402
import robustness as R  # noqa: E402
import transformers  # noqa: E402

CELL = "vader-minilm-ft-flip30"


def main(seeds: list[int], cell: str = CELL) -> None:
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    R.RECIPES["ft"] = dataclasses.replace(R.RECIPES["ft"], epochs=1)
    for seed in seeds:
        data = R.load_data(R.CELL_BY_NAME[cell], seed)
        r = R.run_cell(cell, seed, "plain", data=data)
        out = {"seed": seed, "plain": r["test_accuracy"], "loss_auroc": r["loss_auroc"]}
        for choice in ("head", "all"):
            R.OVERRIDES.clear()
            R.OVERRIDES["meta_parameters"] = choice
            r = R.run_cell(cell, seed, "metalr", data=data)
            out[choice] = (r["test_accuracy"], round(r["rate_auroc"], 4))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    cell = args.pop(0) if args and not args[0].isdigit() else CELL
    main([int(s) for s in args] or [0, 1, 2], cell)
