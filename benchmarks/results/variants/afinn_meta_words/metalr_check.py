"""The default MetaLR runs of a matrix cell and what ``trainer.meta_set_check`` reports after each: how many of
the meta examples the trained model gets wrong and its meta loss. One JSON line per seed.

    python benchmarks/results/variants/afinn_meta_words/metalr_check.py afinn-minilm-ft-flip30 0 1 2
    python benchmarks/results/variants/afinn_meta_words/metalr_check.py vader-minilm-ft-flip30 0 1 2
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import datasets  # noqa: E402
import robustness as R  # noqa: E402
import transformers  # noqa: E402


def main(cell: str, seeds: list[int]) -> None:
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    for seed in seeds:
        box = {}
        r = R.run_cell(cell, seed, "metalr", after_train=lambda tr, box=box: box.update(check=tr.meta_set_check))
        check = box["check"]
        print(json.dumps({"cell": cell, "seed": seed, "acc": r["test_accuracy"], "auroc": round(r["rate_auroc"], 4),
                          "meta_wrong": int(check.wrong.sum()), "n": len(check.wrong),
                          "meta_loss": round(float(check.losses.mean()), 4)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2:]] or [0, 1, 2])
