"""A held-out check of ``meta_objective="log"`` on a causal LM: ``examples/sft_noisy_data.py`` with another mixture
of sources and another kind of wrong answer, chosen before any run — three sources 5 % / 30 % / 50 % wrong
(``wiki`` / ``forum`` / ``ocr``), a wrong answer being a near miss (the right sum ± 1..5, within the sums' range
0..98) instead of a random number. Everything else is the example's (model, recipe, meta and held-out sets, instance
x source rates).

    python benchmarks/results/variants/sft_log_heldout/heldout.py SEED TAG [example flags]

writes ``seedSEED_TAG/sft_noisy_data_results.{json,md}`` beside this file (the models and trajectories go to a
temporary folder). The runs kept here:

    heldout.py S defaults   --library_defaults                        # plain and MetaLR, the library's defaults
    heldout.py S log        --library_defaults --methods metalr --meta_objective log
    heldout.py S avg0.1     --library_defaults --methods metalr --meta_grad_average_epochs 0.1
    heldout.py S log_avg0.1 --methods metalr                          # the example's own two settings
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "examples"))
import sft_noisy_data as ex  # noqa: E402

SOURCES = {"wiki": 0.05, "forum": 0.3, "ocr": 0.5}


def near_miss(rng: np.random.Generator, a: int, b: int) -> int:
    """A wrong answer close to the right one: the sum ± 1..5, within the sums' range."""
    return int(rng.choice([v for v in range(a + b - 5, a + b + 6) if 0 <= v <= 2 * (ex.MAX_OPERAND - 1) and v != a + b]))


_example_data = ex.make_data


def make_data(s: ex.SFTOptions, seed: int) -> dict:
    """The example's split with this file's sources and near-miss wrong answers."""
    return _example_data(s, seed, sources=SOURCES, wrong_answer=near_miss, salt=17)


if __name__ == "__main__":
    seed, tag, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    ex.SOURCES.clear()
    ex.SOURCES.update(SOURCES)
    ex.make_data = make_data
    out = os.path.join(HERE, f"seed{seed}_{tag}")
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ex.main(["--seed", seed, "--output_dir", tmp, *flags])
        for name in ("sft_noisy_data_results.json", "sft_noisy_data_results.md"):
            shutil.copy(os.path.join(tmp, name), out)
