"""Where a cell's rate AUROC is lost: the share of clean and noisy examples whose final instance rate sits at the
cap (1) or at 0, and the AUROC those ties cost, for one seed of a robustness cell with the defaults.

    OMP_NUM_THREADS=1 python benchmarks/results/variants/rate_ties/rate_ties.py mnist-resnet-sgd-flip35 0

Writes ``rate_ties_<cell>_seed<seed>.json`` beside this file. A pair of a clean and a noisy example tied at the cap
counts as half a correct pair in the AUROC, so ``share_clean_at_cap * share_noisy_at_cap / 2`` is what those ties
take off it.
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))  # benchmarks/
import robustness as R  # noqa: E402


def main(cell: str, seed: int) -> dict:
    data = R.load_data(R.CELL_BY_NAME[cell], seed, False)
    noisy = data[1]
    store = {}
    run = R.run_cell(cell, seed, "metalr", data=data,
                     after_train=lambda tr: store.update(rates=tr.rates.instance.detach().double().cpu().numpy()))
    r = store["rates"]
    out = {"cell": cell, "seed": seed, "rate_auroc": run["rate_auroc"], "test_accuracy": run["test_accuracy"],
           "per_visit_auroc": run["per_visit_auroc"]}
    for name, sel in (("clean", ~noisy), ("noisy", noisy)):
        x = r[sel]
        out[name] = {"at_cap": float((x >= 1 - 1e-6).mean()), "at_zero": float((x <= 1e-6).mean()),
                     "mean": float(x.mean()), "quantiles_10_25_50_75_90": np.percentile(x, [10, 25, 50, 75, 90]).tolist()}
    out["auroc_lost_to_ties_at_cap"] = out["clean"]["at_cap"] * out["noisy"]["at_cap"] / 2
    with open(os.path.join(HERE, f"rate_ties_{cell}_seed{seed}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2])), indent=1))
