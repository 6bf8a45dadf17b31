"""The 20 meta words of afinn-minilm-ft-flip30, per seed, as the plain fine-tune sees them at the end of training:
each word's AFINN label and the plain model's probability of it, and how many of the 20 it gets wrong. One JSON
line per seed.

    python benchmarks/results/variants/afinn_meta_words/meta_words.py 0 1 2 > runs.jsonl   # ~5 min
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

from hf_ddlr.data import make_lexicon_variant  # noqa: E402

CELL = "afinn-minilm-ft-flip30"


def main(seeds: list[int]) -> None:
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    for seed in seeds:
        raw = make_lexicon_variant(R.load_afinn_lexicon(), train_size=R.DATA["afinn"]["n_train"],
                                   meta_per_class=R.DATA["afinn"]["meta_size"] // 2, test_size=1000, seed=seed,
                                   **R.NOISES["flip30"])
        data = R.load_data(R.CELL_BY_NAME[CELL], seed)
        box = {}
        r = R.run_cell(CELL, seed, "plain", data=data,
                       after_train=lambda tr, box=box, meta=data[0]["meta"]: box.update(pred=R._predict(tr, meta)))
        logits, y = box["pred"]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p_label = (p / p.sum(1, keepdims=True))[np.arange(len(y)), y]
        words = [{"word": w, "label": int(lab), "p_label": round(float(q), 3)}
                 for w, lab, q in zip(raw["meta"]["text"], y, p_label)]
        print(json.dumps({"seed": seed, "plain_test_accuracy": r["test_accuracy"],
                          "meta_words_wrong": int((p_label < 0.5).sum()),
                          "meta_loss": round(float(-np.log(p_label).mean()), 4), "words": words}), flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [0, 1, 2])
