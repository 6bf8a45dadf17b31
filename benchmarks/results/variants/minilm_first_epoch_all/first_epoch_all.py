"""The lead for ``meta_parameters="auto"`` measured with a patch of the schedule (not the library's behaviour):
every parameter during the first epoch (while a new head is near its random start), the head from then on. One
JSON line per run (test accuracy, rate AUROC, train seconds).

    python benchmarks/results/variants/minilm_first_epoch_all/first_epoch_all.py vader-minilm-ft-flip30 0 1 2
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import datasets  # noqa: E402
import robustness as R  # noqa: E402
import transformers  # noqa: E402

from hf_ddlr import schedules  # noqa: E402

_meta_step = schedules.MetaStepSchedule._meta_step


def _first_epoch_all(self, *args, **kwargs):
    if not hasattr(self, "_head"):
        self._head = self.meta_params  # what "auto" resolved to (the head for a pretrained model)
    self.meta_params = None if self.trainer.state.epoch < 1 else self._head
    return _meta_step(self, *args, **kwargs)


def main(cell: str, seeds: list[int]) -> None:
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    schedules.MetaStepSchedule._meta_step = _first_epoch_all
    for seed in seeds:
        r = R.run_cell(cell, seed, "metalr")
        print(json.dumps({"cell": cell, "seed": seed, "acc": r["test_accuracy"], "auroc": r["rate_auroc"],
                          "t": r["train_s"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2:]] or [0, 1, 2])
