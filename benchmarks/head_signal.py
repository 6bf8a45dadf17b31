"""Whether a Newton (influence-function) lookahead on a fine-tune's head would give the rates a better signal.

On the MiniLM fine-tunes of the robustness matrix the rates step on the head's meta-gradient: how a training
word's gradient of the classifier head agrees with the meta set's, in Adam's metric. The classical alternative is
the influence function (Koh & Liang, 2017), a Newton lookahead: the meta loss's change when example i is
up-weighted at a minimum is ``-g_meta·H⁻¹·g_i``, with ``H`` the training loss's Hessian. For a linear classifier on
the pooled features that Hessian is small and exact, so the question can be answered without approximations.

For a text cell and seed this trains the plain AdamW fine-tune (the matrix's recipe) and at eight checkpoints
scores every training word by signals that each rank clean above mislabelled when high, all from the same model:

- ``loss``: minus its cross-entropy with its (noisy) label, eval mode: the free detector the rates must clear;
- ``dot``: the classifier's per-example gradient dotted with the meta set's mean gradient (eval mode);
- ``adam``: the same dot in Adam's metric (``1/sqrt(v)`` of the optimizer's second moment);
- ``dropout``: ``dot`` with the training words' gradients taken in train mode (one dropout draw), as the real
  step's masks are replayed;
- ``head``: ``dot`` over the pooler and the classifier (what ``meta_parameters="head"`` covers), eval mode;
- ``head adam``: ``head`` in Adam's metric, the product the rates take by default (at θ, without the lookahead,
  the running average or the bounded meta objective);
- ``newton λ``: ``g_meta·(H + λI)⁻¹·g_i`` with ``H`` the classifier's exact Hessian of the mean training loss.

    python benchmarks/head_signal.py --cells vader-minilm-ft-flip30 --seeds 0 1 2   # ~2 min a seed, one thread

Writes head_signal.json (every run; a rerun skips the runs already there), head_signal.md and head_signal.png (the
curves of the loss, the default's product and the Newton products per cell) to --output_dir
(default benchmarks/results/head_signal).
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness as R  # noqa: E402  (the matrix's cells, data, models and recipes)

CHECKPOINTS = 8
DAMPINGS = (1e-1, 1e-2, 1e-3)
SIGNALS = ("loss", "dot", "adam", "dropout", "head", "head adam", *(f"newton {lam:g}" for lam in DAMPINGS))


def _features(model, ds, collate, train_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the classifier's inputs, the pooler's inputs) for every row of ``ds``, in float64; in train mode the
    encoder's and the classifier's dropout draw their masks as in a training step."""
    model.train(train_mode)
    pooled, cls = [], []
    with torch.no_grad():
        for b in torch.utils.data.DataLoader(ds, batch_size=256, collate_fn=collate):
            out = model.bert(**{k: v for k, v in b.items() if k != "labels"})
            pooled.append(model.dropout(out[1]) if train_mode else out[1])
            cls.append(out[0][:, 0])
    model.train()
    return torch.cat(pooled).double(), torch.cat(cls).double()


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def _residuals(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """(softmax − one-hot, softmax) of a linear classifier: the cross-entropy's gradient w.r.t. the logits."""
    p = torch.softmax(x @ weight.T + bias, 1)
    r = p.clone()
    r[torch.arange(len(labels)), labels] -= 1
    return r, p


def classifier_hessian(p: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
    """The exact Hessian of the mean cross-entropy w.r.t. a linear classifier's [weight | bias], rows class-major:
    ``mean_n (diag(p_n) − p_n p_nᵀ) ⊗ x_n x_nᵀ``."""
    a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    c, d = p.shape[1], xa.shape[1]
    return torch.einsum("nab,ni,nj->aibj", a, xa, xa).reshape(c * d, c * d) / len(p)


def _second_moment(optimizer, layer) -> torch.Tensor:
    """Adam's ``exp_avg_sq`` of a linear layer as one [weight | bias] matrix, flattened row-major."""
    state = optimizer.state
    return torch.cat([state[layer.weight]["exp_avg_sq"].double(), state[layer.bias]["exp_avg_sq"].double()[:, None]],
                     1)


def signals(model, optimizer, train, meta, collate) -> dict[str, np.ndarray]:
    """Every training row's score by each of :data:`SIGNALS` at the model's current parameters."""
    w, b = model.classifier.weight.detach().double(), model.classifier.bias.detach().double()
    y, ym = torch.tensor(train["label"]), torch.tensor(meta["label"])
    (x, c), (xm, cm) = _features(model, train, collate, False), _features(model, meta, collate, False)
    xt, _ = _features(model, train, collate, True)
    r, p = _residuals(x, y, w, b)
    rm, _ = _residuals(xm, ym, w, b)
    rt, _ = _residuals(xt, y, w, b)
    xa, xma = _with_bias(x), _with_bias(xm)
    grads = (r[:, :, None] * xa[:, None, :]).reshape(len(x), -1)
    grads_dropout = (rt[:, :, None] * _with_bias(xt)[:, None, :]).reshape(len(x), -1)
    g_meta = (rm[:, :, None] * xma[:, None, :]).reshape(len(xm), -1).mean(0)
    # the pooler's per-example gradient is (Wᵀr ⊙ (1 − h²)) ⊗ [cls, 1]: its product with a matrix M of the
    # pooler's [weight | bias] shape is d_i·(M [cls_i, 1]), so no per-example gradient is materialised
    d, dm = (r @ w) * (1 - x ** 2), (rm @ w) * (1 - xm ** 2)
    ca = _with_bias(c)
    pooler_meta = dm.T @ _with_bias(cm) / len(xm)
    v, v_pooler = (_second_moment(optimizer, layer) for layer in (model.classifier, model.bert.pooler.dense))
    out = {"loss": torch.log(p[torch.arange(len(y)), y]), "dot": grads @ g_meta,
           "adam": grads @ (g_meta / (v.reshape(-1).sqrt() + 1e-8)), "dropout": grads_dropout @ g_meta}
    out["head"] = out["dot"] + (d * (ca @ pooler_meta.T)).sum(1)
    out["head adam"] = out["adam"] + (d * (ca @ (pooler_meta / (v_pooler.sqrt() + 1e-8)).T)).sum(1)
    hessian = classifier_hessian(p, xa)
    eye = torch.eye(len(hessian), dtype=hessian.dtype)
    for lam in DAMPINGS:
        out[f"newton {lam:g}"] = grads @ torch.linalg.solve(hessian + lam * eye, g_meta)
    return {k: v.numpy() for k, v in out.items()}


class Checkpoints(TrainerCallback):
    """At :data:`CHECKPOINTS` evenly spaced optimizer steps: the AUROC (clean > mislabelled) of every signal."""

    def __init__(self, trainer: Trainer, train, meta, collate, noisy: np.ndarray) -> None:
        self.trainer, self.train, self.meta, self.collate, self.noisy, self.rows = trainer, train, meta, collate, noisy, []

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % max(1, state.max_steps // CHECKPOINTS):
            return
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        rng = torch.get_rng_state()  # the train-mode pass must not move the run's dropout stream
        scores = signals(self.trainer.model, optimizer, self.train, self.meta, self.collate)
        torch.set_rng_state(rng)
        self.rows.append({"step": state.global_step, "epoch": state.epoch,
                          **{k: R._auroc(~self.noisy, s) for k, s in scores.items()}})


def run_seed(cell: R.Cell, seed: int, bar) -> list[dict]:
    """The plain fine-tune of one cell and seed, with every signal's AUROC at each checkpoint."""
    ds, noisy = R.load_data(cell, seed)
    train, meta = (ds[s].remove_columns("sample_index") for s in ("train", "meta"))
    model, collate = R.model_and_collator(cell, seed, ds)
    with tempfile.TemporaryDirectory(prefix="hf_ddlr_head_signal_") as tmp:
        trainer = Trainer(model=model, args=TrainingArguments(**R.training_args(cell, seed, tmp, False)),
                          data_collator=collate, train_dataset=train)
        trainer.remove_callback(PrinterCallback)
        probe = Checkpoints(trainer, train, meta, collate, noisy)
        trainer.add_callback(probe)
        trainer.train()
        acc = R.accuracy_on(trainer, ds["test"])
    bar.update(1)
    return [{"cell": cell.name, "seed": seed, "quick": False, "test_accuracy": acc, "checkpoints": probe.rows,
             **R.environment()}]


def render(runs: list[dict], command: str) -> str:
    """Per cell: each signal's AUROC at every checkpoint (mean over the seeds) and over the second half's."""
    lines = R.table_head(command, "AUROC (clean > mislabelled) of each signal over every training word, at eight "
                         "checkpoints of the plain fine-tune (mean over the seeds); last column: the mean over the "
                         "checkpoints of the second half", ["cell (seeds)", "signal", "AUROC at each checkpoint",
                                                           "second half"])
    for cell, rs, seeds in R.runs_by_cell(runs):
        for name in SIGNALS:
            curve = np.mean([[c[name] for c in r["checkpoints"]] for r in rs], axis=0)
            lines.append(f"| {cell} ({seeds}) | {name} | {' '.join(f'{v:.3f}' for v in curve)} | "
                         f"{curve[len(curve) // 2:].mean():.3f} |")
    return "\n".join(lines) + "\n"


PLOTTED = {"loss": ("loss (the free detector)", "tab:red", "--"),
           "head adam": ("head, Adam's metric (the default's product)", "tab:blue", "-"),
           "adam": ("classifier, Adam's metric", "tab:cyan", "-"), "newton 0.1": ("Newton, λ 0.1", "tab:green", "-"),
           "newton 0.01": ("Newton, λ 0.01", "tab:olive", "-"), "newton 0.001": ("Newton, λ 0.001", "tab:gray", "-")}


def plot(runs: list[dict], path: str) -> None:
    """Small multiples, one per cell: each plotted signal's AUROC at every checkpoint (mean over the seeds)."""
    R.plot_checkpoint_curves(runs, path, PLOTTED, (0.4, 1.0))


def train(cell: R.Cell, seed: int, _methods: list, bar) -> list[dict]:
    """:func:`robustness.run_missing`'s unit of work (module-level, so that ``--jobs`` workers can run it)."""
    return run_seed(cell, seed, bar)


def main(argv: list[str] | None = None) -> int:
    p = R.cell_seed_parser(__doc__, os.path.join(R.HERE, "results", "head_signal"), jobs=True)
    args = p.parse_args(argv)
    R.datasets.disable_progress_bars()
    R.transformers.logging.set_verbosity_error()  # the MiniLM head's "newly initialized" notice, once per run
    cells = R.select_cells(args.cells)
    if bad := [c.name for c in cells if c.model != "minilm"]:
        raise SystemExit(f"{bad} are not MiniLM fine-tunes; head_signal.py needs a text cell (e.g. "
                         "vader-minilm-ft-flip30), whose classifier sits on the pooler's features.")
    shown = R.run_diagnostic(args.output_dir, "head_signal", "head_signal.py", argv, cells, args.seeds,
                             train, "head signal", render, jobs=args.jobs)
    if shown:
        plot(shown, os.path.join(args.output_dir, "head_signal.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
