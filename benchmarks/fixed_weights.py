"""What MetaLR's shortfall against the oracle is made of: training with fixed per-example weights from step 0.

For a robustness cell and seed this trains the plain ``Trainer`` and ``MetaLRTrainer`` (defaults) as
``robustness.py`` does, then the same recipe again with fixed weights on every example's loss, each set from
the first step on:

- ``metalr_final``: MetaLR's final instance rates. Above MetaLR: the rates fell too late; at or below it: not
  the timing.
- ``metalr_keep`` / ``loss_keep``: weight 1 for as many examples as are clean, those the rates (highest) or the
  plain model's own training loss (lowest, the free detector) rank first, 0 for the rest: the selection each
  ranking makes.
- ``clean``: the true clean mask (the oracle, at the plain run's number of steps).
- ``clean_minus_dropped`` / ``clean_plus_kept``: the clean mask without the clean examples ``metalr_keep``
  drops, or with the noisy ones it keeps, to tell which of the ranking's two errors costs the accuracy.

The weighted loss is ``Σ w_i · loss_i`` divided by the batch's number of examples, as MetaLR divides it.

    python benchmarks/fixed_weights.py --cells mnist-cnn-adamw-flip35 --seeds 0 1 2

Writes fixed_weights.json (every run; a rerun skips the cell-seeds already there) and fixed_weights.md to
--output_dir (default benchmarks/results).
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness as R  # noqa: E402  (the matrix's cells, data, models and recipes)

WEIGHTINGS = ("metalr_final", "metalr_keep", "loss_keep", "clean", "clean_minus_dropped", "clean_plus_kept")


class FixedWeightTrainer(Trainer):
    """The plain Trainer with a fixed weight on every training example's cross-entropy (indexed by
    ``sample_index``); prediction, which has no index, is the model's own loss."""

    def __init__(self, *args, weights: torch.Tensor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.example_weights = weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "sample_index" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        idx, labels = inputs.pop("sample_index"), inputs.pop("labels")
        outputs = model(**inputs)
        losses = torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="none")
        loss = (self.example_weights.to(losses.device)[idx] * losses).mean()
        return (loss, outputs) if return_outputs else loss


def keep_top(score: np.ndarray, k: int) -> np.ndarray:
    """1 for the ``k`` highest scores, 0 elsewhere."""
    mask = np.zeros(len(score), dtype=np.float32)
    mask[np.argsort(-score, kind="stable")[:k]] = 1
    return mask


def weightings(rates: np.ndarray, loss: np.ndarray, noisy: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed weights of each variant (see the module's docstring)."""
    clean = (~noisy).astype(np.float32)
    k = int(clean.sum())
    metalr_keep = keep_top(rates, k)
    return {"metalr_final": rates.astype(np.float32), "metalr_keep": metalr_keep, "loss_keep": keep_top(-loss, k),
            "clean": clean, "clean_minus_dropped": clean * metalr_keep,
            "clean_plus_kept": np.maximum(clean, metalr_keep)}


def run_fixed(cell: R.Cell, seed: int, data, weights: np.ndarray) -> float:
    """Test accuracy of the cell's recipe trained with ``weights`` on every example from step 0."""
    ds, _ = data
    model, collate = R.model_and_collator(cell, seed, ds)
    with tempfile.TemporaryDirectory(prefix="hf_ddlr_fixed_") as tmp:
        args = TrainingArguments(**R.training_args(cell, seed, tmp, False), remove_unused_columns=False)
        trainer = FixedWeightTrainer(model=model, args=args, data_collator=collate, train_dataset=ds["train"],
                                     weights=torch.as_tensor(weights))
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        return R.accuracy_on(trainer, ds["test"])


def run_seed(cell: R.Cell, seed: int, bar: tqdm) -> dict:
    """Plain, MetaLR and every fixed weighting of one cell and seed."""
    data = R.load_data(cell, seed, False)
    noisy = data[1]
    got: dict = {}
    plain = R.run_cell(cell, seed, "plain", data=data,
                       after_train=lambda t: got.setdefault("loss", R.train_losses(t, data[0]["train"])[0]))
    bar.update()
    metalr = R.run_cell(cell, seed, "metalr", data=data,
                        after_train=lambda t: got.setdefault("rates", t.rates.instance.detach().cpu().double().numpy()))
    bar.update()
    out = {"cell": cell.name, "seed": seed, "plain": plain["test_accuracy"], "metalr": metalr["test_accuracy"],
           "rate_auroc": metalr["rate_auroc"], "loss_auroc": plain["loss_auroc"]}
    weights = weightings(got["rates"], got["loss"], noisy)
    for name, w in weights.items():
        out[name] = run_fixed(cell, seed, data, w)
        bar.update()
    for name in ("metalr_keep", "loss_keep"):  # the share of clean examples in each selection
        out[f"{name}_precision"] = float((~noisy)[weights[name] > 0].mean())
    return out


def train(cell: R.Cell, seed: int, _missing: list, bar: tqdm) -> list[dict]:
    """:func:`robustness.run_missing`'s unit of work: one seed's row."""
    return [run_seed(cell, seed, bar)]


def render(runs: list[dict], command: str) -> str:
    cols = ("plain", "metalr", *WEIGHTINGS)
    lines = R.table_head(command, "MetaLRConfig defaults; every column trained in the same run, test accuracy, mean "
                         "over seeds (and each seed's), the fixed weights applied from the first step",
                         ["cell", "seeds", "rate / loss AUROC", "kept clean: rates / loss", *cols])
    for cell, rs, seeds in R.runs_by_cell(runs):
        per = " | ".join(R.mean_and_each(rs, c) for c in cols)
        lines.append(f"| {cell} | {seeds} | "
                     f"{np.mean([r['rate_auroc'] for r in rs]):.3f} / {np.mean([r['loss_auroc'] for r in rs]):.3f} | "
                     f"{np.mean([r['metalr_keep_precision'] for r in rs]):.3f} / "
                     f"{np.mean([r['loss_keep_precision'] for r in rs]):.3f} | {per} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = R.cell_seed_parser(__doc__, os.path.join(R.HERE, "results"), jobs=True).parse_args(argv)
    path, runs, command = R.open_results(args.output_dir, "fixed_weights", "fixed_weights.py", argv)
    shown = R.run_missing(path, runs, R.select_cells(args.cells), args.seeds, train, "fixed weights",
                          bar_per_method=2 + len(WEIGHTINGS), jobs=args.jobs)
    md = render(sorted(shown, key=lambda r: (r["cell"], r["seed"])), command)
    R.write_table(args.output_dir, "fixed_weights", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
