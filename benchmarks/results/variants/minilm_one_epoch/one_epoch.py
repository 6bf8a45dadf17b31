"""vader-minilm-ft-flip30 trained for one epoch instead of two: plain, and MetaLR with ``meta_parameters`` "head"
and "all", per seed. One JSON line per seed (test accuracy, rate AUROC). (The runs were made when "auto" took the
head for every fine-tune; since they were measured, "auto" takes every parameter for a run shorter than two
epochs.)

    python benchmarks/results/variants/minilm_one_epoch/one_epoch.py 0 1 2 > runs.jsonl
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


def main(seeds: list[int]) -> None:
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    R.RECIPES["ft"] = dataclasses.replace(R.RECIPES["ft"], epochs=1)
    for seed in seeds:
        data = R.load_data(R.CELL_BY_NAME[CELL], seed)
        r = R.run_cell(CELL, seed, "plain", data=data)
        out = {"seed": seed, "plain": r["test_accuracy"], "loss_auroc": r["loss_auroc"]}
        for choice in ("head", "all"):
            R.OVERRIDES.clear()
            R.OVERRIDES["meta_parameters"] = choice
            r = R.run_cell(CELL, seed, "metalr", data=data)
            out[choice] = (r["test_accuracy"], round(r["rate_auroc"], 4))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [0, 1, 2])
