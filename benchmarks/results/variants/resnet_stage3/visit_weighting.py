"""Would a different sum of the same visits rank better? Trains one default MetaLR run of a matrix cell, records
every rate update's ∂L_meta/∂e_i (the step's examples and the probes), and ranks the examples by other sums of
those visits: as the rates take them (each visit divided by its batch's mean |value|, no clamping), by ranks
within each batch, by signs, with later visits weighted up linearly, and the last epoch alone; beside the final
rates. Prints one JSON object.

    python benchmarks/results/variants/resnet_stage3/visit_weighting.py mnist-resnet-sgd-flip35 0   # ~2 min
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import robustness as R  # noqa: E402
import transformers  # noqa: E402
from scipy.stats import rankdata  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from hf_ddlr import trainer as T  # noqa: E402


def main(cell: str, seed: int) -> dict:
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    visits: list[tuple[float, np.ndarray, np.ndarray]] = []
    init = T.MetaLRTrainer.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        update = self.rates.update

        def recorded(idx, labels, grad, wd_grad, keyed_grad=None, probes=None):
            rows, g = idx.cpu().numpy(), grad.detach().double().cpu().numpy()
            if probes is not None:
                rows = np.concatenate([rows, probes[0].cpu().numpy()])
                g = np.concatenate([g, probes[2].detach().double().cpu().numpy()])
            visits.append((float(self.state.epoch or 0), rows, g))
            return update(idx, labels, grad, wd_grad, keyed_grad=keyed_grad, probes=probes)

        self.rates.update = recorded

    T.MetaLRTrainer.__init__ = recording_init
    R.MetaLRTrainer = T.MetaLRTrainer
    data = R.load_data(R.CELL_BY_NAME[cell], seed)
    noisy = data[1]
    final = {}
    r = R.run_cell(cell, seed, "metalr", data=data,
                   after_train=lambda tr: final.update(rates=tr.rates.instance.detach().cpu().numpy().copy()))
    clean, epochs = ~noisy, max(e for e, _, _ in visits)
    sums = {k: np.zeros(len(noisy)) for k in ("as the rates sum them", "ranks within the batch", "signs",
                                              "later visits weighted up", "last epoch only")}
    for e, rows, g in visits:
        step = -g / np.mean(np.abs(g))
        sums["as the rates sum them"][rows] += step
        sums["ranks within the batch"][rows] += rankdata(-g) / len(g)
        sums["signs"][rows] += np.sign(-g)
        sums["later visits weighted up"][rows] += step * e / epochs
        if e > epochs - 1:
            sums["last epoch only"][rows] += step
    out = {"cell": cell, "seed": seed, "test_accuracy": r["test_accuracy"],
           "auroc": {k: round(float(roc_auc_score(clean, v)), 4) for k, v in sums.items()}}
    out["auroc"]["final rates"] = round(float(roc_auc_score(clean, final["rates"][:len(noisy)])), 4)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0), indent=1))
