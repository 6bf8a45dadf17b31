"""Whether the meta-gradient split by the meta examples' class would give the instance rates a better signal.

A training example's per-visit signal is its gradient's product with the meta set's mean gradient: a sum over
the meta examples of every class. The matrix's from-scratch image cells rank the mislabelled examples below the
plain model's loss (docs/robustness.md, "The rule or the signal"), so this asks where in that sum the ranking is
lost. It trains the plain run of an image cell (the matrix's recipe) and at eight checkpoints scores every
training image by its gradient's product with each class's share of the meta gradient (every parameter, eval-mode
BatchNorm, per-example gradients by ``torch.func``), then by:

- ``loss``: minus its cross-entropy with its (noisy) label: the free detector the rates must clear;
- ``mean``: the product with the whole meta set's mean gradient, in an Adam-like metric (``1/sqrt(v)``, ``v`` the
  mean square of the checkpoint's batch-mean gradients, batches of 64): what the rates step on, at θ;
- ``own class``: the share of the meta examples of the image's own (noisy) label;
- ``other classes``: ``mean`` without that share;
- ``worst other class``: the lowest product over the other classes' shares: the class a step on the image would
  hurt most;
- ``worst other class, head``: the same over the classifier head's parameters only (a closed form the meta step
  could take cheaply);
- ``own class, head``: the own label's share over the head only;
- ``mean minus own class's head share``: ``mean`` without that share — what ``instance_signal="other_classes"``
  steps on (there at the lookahead, with the batch's BatchNorm statistics);
- ``mean, no metric`` and ``worst other class, no metric``: the two in the parameters' own scale.

Every score ranks clean above mislabelled when high. The table gives each score's AUROC at every checkpoint and of
its sum over the checkpoints (each checkpoint's scores divided by their mean absolute value, as the rates'
normalized step divides a batch's; no clamps).

    python benchmarks/class_signal.py --cells digits-cnn-sgd-flip35 --seeds 0 1 2   # ~1.5 min a seed, one thread

Writes class_signal.json (every run; a rerun skips the runs already there), class_signal.md and class_signal.png
to --output_dir (default benchmarks/results/class_signal).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness as R  # noqa: E402  (the matrix's cells, data, models and recipes)

CHECKPOINTS = 8
SIGNALS = ("loss", "mean", "own class", "other classes", "worst other class", "worst other class, head",
           "mean, no metric", "worst other class, no metric", "own class, head", "mean minus own class's head share")


def per_example_grads(loss: Callable, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                      reduce: Callable[[torch.Tensor], torch.Tensor], chunk: int = 128) -> torch.Tensor:
    """``reduce`` of the flattened per-example gradients of ``loss(params, x_i, y_i)``, chunk by chunk (the
    gradients of a whole training set are not kept)."""
    out = []
    for s in range(0, len(x), chunk):
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x[s:s + chunk], y[s:s + chunk])
        out.append(reduce(torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], 1)))
    return torch.cat(out)


def example_loss(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> Callable:
    """``loss(p, x_i, y_i)``: one image's cross-entropy with ``params`` replaced by ``p`` (the model's other parameters
    and its buffers held as they are), for :func:`per_example_grads`."""
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, xi, yi):
        out = functional_call(model, ({**p, **frozen}, buffers), kwargs={"pixel_values": xi[None]})
        return F.cross_entropy(out.logits, yi[None])

    return loss


def class_products(G: torch.Tensor, meta_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[n, classes]: each row of ``G`` (training examples × meta examples products) summed over each class's meta
    examples and divided by the number of meta examples, so a row's classes add up to its product with the mean
    meta gradient."""
    onehot = F.one_hot(meta_labels, num_classes).to(G.dtype)
    return G @ onehot / len(meta_labels)


def worst_other(C: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The lowest of each row's class products over the classes other than the row's own label."""
    masked = C.clone()
    masked[torch.arange(len(labels)), labels] = float("inf")
    return masked.min(1).values


def other_than_own(C: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum of each row's class products over the classes other than the row's own label."""
    return C.sum(1) - C[torch.arange(len(labels)), labels]


def head_mask(model: torch.nn.Module) -> torch.Tensor:
    """Over the flattened parameters (``named_parameters`` order): True on the last ``nn.Linear``'s."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    head = {id(p) for p in last.parameters()}
    return torch.cat([torch.full((p.numel(),), id(p) in head) for p in model.parameters()])


def signals(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, xm: torch.Tensor, ym: torch.Tensor,
            num_classes: int) -> dict[str, np.ndarray]:
    """Every training image's score by each of :data:`SIGNALS` at the model's current parameters (eval mode)."""
    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = example_loss(model, params)
    with torch.no_grad():
        train_loss = F.cross_entropy(model(pixel_values=x).logits, y, reduction="none")
    gm = per_example_grads(loss, params, xm, ym, lambda g: g)
    sums = []  # the metric: the mean square of batch-mean gradients, in a fixed order

    def batch_squares(g: torch.Tensor) -> torch.Tensor:
        sums.extend(b.mean(0) ** 2 for b in g.split(64))
        return g[:, :0]

    per_example_grads(loss, params, x, y, batch_squares, chunk=128)
    v = torch.stack(sums).mean(0)
    metric = torch.where(v > 0, 1.0 / (v.sqrt() + 1e-8), torch.zeros_like(v))
    head = head_mask(model)
    targets = torch.cat([gm * metric, gm * metric * head, gm], 0).T  # [parameters, 3 × meta]
    prods = per_example_grads(loss, params, x, y, lambda g: g @ targets).double()
    m = len(ym)
    adam, adam_head, raw = (class_products(prods[:, k * m:(k + 1) * m], ym, num_classes) for k in range(3))
    own = adam[torch.arange(len(y)), y]
    out = {"loss": -train_loss.double(), "mean": adam.sum(1), "own class": own, "other classes": other_than_own(adam, y),
           "worst other class": worst_other(adam, y), "worst other class, head": worst_other(adam_head, y),
           "mean, no metric": raw.sum(1), "worst other class, no metric": worst_other(raw, y),
           "own class, head": adam_head[torch.arange(len(y)), y],
           "mean minus own class's head share": adam.sum(1) - adam_head[torch.arange(len(y)), y]}
    model.train(was_training)
    return {k: s.numpy() for k, s in out.items()}


def summed_auroc(clean: np.ndarray, per_checkpoint: list[np.ndarray]) -> float:
    """AUROC of the scores summed over the checkpoints, each checkpoint's divided by its mean absolute value."""
    total = sum(s / max(float(np.abs(s).mean()), 1e-300) for s in per_checkpoint)
    return R._auroc(clean, total)


class Checkpoints(TrainerCallback):
    """At :data:`CHECKPOINTS` evenly spaced optimizer steps: every signal's AUROC, and of its sum so far."""

    def __init__(self, trainer: Trainer, data: tuple, noisy: np.ndarray, num_classes: int) -> None:
        self.trainer, self.data, self.noisy, self.num_classes = trainer, data, noisy, num_classes
        self.rows: list[dict] = []
        self.history: dict[str, list[np.ndarray]] = {k: [] for k in SIGNALS}

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % max(1, state.max_steps // CHECKPOINTS):
            return
        scores = signals(self.trainer.model, *self.data, self.num_classes)
        row = {"step": state.global_step, "epoch": state.epoch}
        for k, s in scores.items():
            self.history[k].append(s)
            row[k] = R._auroc(~self.noisy, s)
            row[f"summed {k}"] = summed_auroc(~self.noisy, self.history[k])
        self.rows.append(row)


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack(list(ds["pixel_values"])).float(), torch.as_tensor(ds["label"])


def run_seed(cell: R.Cell, seed: int, bar) -> list[dict]:
    """The plain run of one image cell and seed, with every signal's AUROC at each checkpoint."""
    ds, noisy = R.load_data(cell, seed)
    train, meta = (ds[s].remove_columns("sample_index") for s in ("train", "meta"))
    model, collate = R.model_and_collator(cell, seed, ds)
    num_classes = int(model.config.num_labels)
    with tempfile.TemporaryDirectory(prefix="hf_ddlr_class_signal_") as tmp:
        trainer = Trainer(model=model, args=TrainingArguments(**R.training_args(cell, seed, tmp, False)),
                          data_collator=collate, train_dataset=train)
        trainer.remove_callback(PrinterCallback)
        probe = Checkpoints(trainer, (*_tensors(train), *_tensors(meta)), noisy, num_classes)
        trainer.add_callback(probe)
        trainer.train()
        acc = R.accuracy_on(trainer, ds["test"])
    bar.update(1)
    return [{"cell": cell.name, "seed": seed, "quick": False, "test_accuracy": acc, "checkpoints": probe.rows,
             **R.environment()}]


def render(runs: list[dict], command: str) -> str:
    """Per cell: each signal's AUROC at every checkpoint and of its sum over all eight (means over the seeds)."""
    lines = R.table_head(command, "AUROC (clean > mislabelled) of each signal over every training image, at eight "
                         "checkpoints of the plain run, and of its sum over them (means over the seeds)",
                         ["cell (seeds)", "signal", "AUROC at each checkpoint", "summed"])
    for cell, rs, seeds in R.runs_by_cell(runs):
        for name in SIGNALS:
            curve = np.mean([[c[name] for c in r["checkpoints"]] for r in rs], axis=0)
            summed = np.mean([r["checkpoints"][-1][f"summed {name}"] for r in rs])
            lines.append(f"| {cell} ({seeds}) | {name} | {' '.join(f'{v:.3f}' for v in curve)} | {summed:.3f} |")
    return "\n".join(lines) + "\n"


PLOTTED = {"loss": ("loss (the free detector)", "tab:red", "--"), "mean": ("mean (what the rates step on)",
           "tab:blue", "-"), "worst other class": ("worst other class", "tab:green", "-"),
           "worst other class, head": ("worst other class, head", "tab:olive", "-"),
           "own class": ("own class", "tab:gray", ":")}


def plot(runs: list[dict], path: str) -> None:
    """Small multiples, one per cell: each plotted signal's AUROC at every checkpoint (mean over the seeds)."""
    R.plot_checkpoint_curves(runs, path, PLOTTED, (0.0, 1.0))


def train(cell: R.Cell, seed: int, _methods: list, bar) -> list[dict]:
    """:func:`robustness.run_missing`'s unit of work (module-level, so that ``--jobs`` workers can run it)."""
    return run_seed(cell, seed, bar)


def main(argv: list[str] | None = None) -> int:
    p = R.cell_seed_parser(__doc__, os.path.join(R.HERE, "results", "class_signal"), jobs=True)
    args = p.parse_args(argv)
    R.datasets.disable_progress_bars()
    cells = R.select_cells(args.cells)
    if bad := [c.name for c in cells if c.model == "minilm"]:
        raise SystemExit(f"{bad} are MiniLM fine-tunes; class_signal.py needs an image cell (e.g. "
                         "digits-cnn-sgd-flip35). For the fine-tunes' head see benchmarks/head_signal.py.")
    shown = R.run_diagnostic(args.output_dir, "class_signal", "class_signal.py", argv, cells, args.seeds,
                             train, "class signal", render, jobs=args.jobs)
    if shown:
        plot(shown, os.path.join(args.output_dir, "class_signal.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
