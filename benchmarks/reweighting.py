"""The reweighting methods users compare with, on the robustness matrix, driven by MetaLR's own meta-gradient.

MetaLR learns one rate per training example from the visits of that example alone, summed over the run. The two
best-known meta-learned reweightings use the same per-example signal, ``∂L_meta/∂e_i`` (how the meta loss after
the step changes with the weight of example ``i`` in it), in other ways:

- ``mwnet``, Meta-Weight-Net (Shu et al., NeurIPS 2019): one function ``w_i = V_φ(L_i)`` of each example's
  current training loss (an MLP 1-100-1 with a sigmoid, Adam 1e-3 with weight decay 1e-4, weights not
  normalized, as the authors' code; ``--normalize`` divides each batch's weights by their mean, the paper's
  option). Every visit of every example trains the same ``φ``, so a signal too weak to rank one example from
  its few visits may still shape a curve over the loss. Each step, as in the authors' code, the lookahead takes
  the batch at ``V_φ(L_i)``, ``φ`` takes one Adam step on ``Σ_i ∂L_meta/∂e_i · ∂e_i/∂φ`` (the chain rule
  through the library's ``∂L_meta/∂e_i``), and the real step uses the updated ``V_φ(L_i)``.
- ``l2rw``, Learning to Reweight (Ren et al., ICML 2018): no memory at all. Each step weighs its batch by
  ``max(-∂L_meta/∂e_i, 0)``, normalized to sum to one, with the derivative taken where the paper takes it, at
  ``θ`` (``lookahead_step=0``, the first-order meta-gradient); a batch with no positive weight adds no gradient.
  ``--meta_gradient paper`` (its default) also takes the paper's meta-gradient: each step's own meta batch (no
  running average), the cross-entropy meta loss and the whole model; ``library`` keeps MetaLR's defaults for
  those three. Each run records ``one_class_steps``, the share of its steps in which one class takes 90 % or
  more of the batch's weight.

And the two combined, the lead the Meta-Weight-Net comparison left:

- ``prior``: MetaLR's own per-example rates times a learned function of the loss, ``w_i = r_i · V_φ(L_i) /
  mean_batch V_φ`` (:func:`loss_prior`); the rates step as the library steps them (probes included), ``φ`` by the
  chain rule through ``w_i``. The ranking read is the product's at each example's last visit
  (``rates_alone_auroc``: the rates' own).

Everything else is the library's, as MetaLR runs it (its optimizer-aware lookahead, meta-gradient averaging and
meta batches; the same model, data and recipe), so the columns differ only in what the signal is turned into.
Probe batches are off for the two baselines (an unvisited example has no loss for ``V_φ`` and no step to weigh). The
rate table keeps each example's weight at its last visit: the ranking reported. The plain and MetaLR runs are the
matrix's own (read from ``--matrix``, or trained here when missing).

    python benchmarks/reweighting.py --baseline mwnet --cells 'mnist-cnn-*' --seeds 0 1 2
    python benchmarks/reweighting.py --baseline prior --cells 'mnist-cnn-*' --seeds 0 1 2

Writes reweighting.json (every run; a rerun skips the runs already there), reweighting.md and, for
Meta-Weight-Net and the prior, reweighting.png (the learned weight curves) to --output_dir (default
benchmarks/results/reweighting/<baseline>).
"""


from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness as R  # noqa: E402  (the matrix's cells, data, models and recipes)

from hf_ddlr.meta import rates as rates_mod  # noqa: E402
from hf_ddlr.schedules import Schedule  # noqa: E402

BASELINES = ("mwnet", "l2rw", "prior")
NAMES = {"mwnet": "Meta-Weight-Net", "l2rw": "Learning to Reweight", "prior": "MetaLR × V_φ(loss)"}
# Learning to Reweight's own meta-gradient: each step's meta batch alone, the validation cross-entropy, all weights
PAPER_META_GRADIENT = {"meta_grad_average": 0.0, "meta_objective": "loss", "meta_parameters": "all"}
CURVE_POINTS = 41  # where each run's learned V_φ is recorded: 0 .. the largest training loss it saw


class WeightNet(torch.nn.Module):
    """Meta-Weight-Net's ``V_φ``: per-example loss -> weight in (0, 1) (Linear 1-h, ReLU, Linear h-1, sigmoid)."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(losses.detach().float().reshape(-1, 1))).reshape(-1)


class MetaWeightNet:
    """A ``V_φ`` and its optimizer, stepped on the trainer's ``∂L_meta/∂e_i`` (see the module docstring)."""

    def __init__(self, seed: int, hidden: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4,
                 normalize: bool = False) -> None:
        self.normalize = normalize
        with torch.random.fork_rng():  # its initialisation leaves the training's random stream as it was
            torch.manual_seed(seed)
            self.net = WeightNet(hidden)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        self.window: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, L_i) of the step being taken
        self.max_loss = 0.0

    def _step_weights(self, losses: torch.Tensor) -> torch.Tensor:
        """The ``e_i`` of a batch: ``V_φ(L_i)``, divided by the batch's mean of them with ``normalize``."""
        w = self.net(losses)
        return w / w.mean() if self.normalize else w

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._step_weights(losses)

    def phi_gradient(self, losses: torch.Tensor, example_grad: torch.Tensor) -> list[torch.Tensor]:
        """``∂L_meta/∂φ = Σ_i ∂L_meta/∂e_i · ∂e_i/∂φ`` (``e_i`` as :meth:`weights`, the loss itself held fixed)."""
        w = self._step_weights(losses)
        return list(torch.autograd.grad(w, list(self.net.parameters()), grad_outputs=example_grad.to(w)))

    def step(self, losses: torch.Tensor, example_grad: torch.Tensor) -> None:
        self.max_loss = max(self.max_loss, float(losses.max()))
        self.opt.zero_grad(set_to_none=True)
        for p, g in zip(self.net.parameters(), self.phi_gradient(losses, example_grad)):
            p.grad = g
        self.opt.step()

    def curve(self) -> tuple[list[float], list[float]]:
        """``V_φ`` now, on CURVE_POINTS losses from 0 to the largest training loss it was given."""
        x = torch.linspace(0.0, max(self.max_loss, 1e-3), CURVE_POINTS)
        with torch.no_grad():
            return x.tolist(), self.net(x).tolist()


def _require_instance_rates(table: rates_mod.RateTable) -> None:
    """A baseline replaces the instance rates alone: a table of class or group rates is refused with the fix."""
    if table.instance is None or table.keyed is not None:
        raise SystemExit("reweighting.py replaces instance rates alone: run it with lr_level='instance' (the "
                         "default), not class or group rates.")


def _window_net(schedule: Schedule, made: list, make) -> MetaWeightNet:
    """The ``V_φ`` of the schedule's rate table, made by ``make()`` at its first forward (and appended to
    ``made``); refuses windows of several micro-batches or processes and tables without instance rates."""
    if len(schedule.window) != 1 or schedule.trainer.args.world_size != 1:
        raise SystemExit("reweighting.py runs one micro-batch per step on one process (the matrix's cells).")
    table = schedule.trainer.rates
    if getattr(table, "_weight_net", None) is None:
        _require_instance_rates(table)
        table._weight_net = make(table)
        made.append(table._weight_net)
    return table._weight_net


def _check_window(mw: MetaWeightNet, indices: torch.Tensor) -> None:
    """The meta step must be the one of the batch whose losses ``V_φ`` was given at the forward."""
    if mw.window is None or not torch.equal(indices.cpu(), mw.window[0].cpu()):
        raise RuntimeError("the meta step's examples are not the ones whose losses V_φ was given")


@contextlib.contextmanager
def _patched(forward=None, effective=None, update=None) -> Iterator[None]:
    """Within the block, ``Schedule._forward``, ``RateTable.effective`` and ``RateTable.update`` are the functions
    given (those not given stay); the originals are back after it, an error included."""
    originals = (Schedule._forward, rates_mod.RateTable.effective, rates_mod.RateTable.update)
    Schedule._forward = forward or originals[0]
    rates_mod.RateTable.effective = effective or originals[1]
    rates_mod.RateTable.update = update or originals[2]
    try:
        yield
    finally:
        Schedule._forward, rates_mod.RateTable.effective, rates_mod.RateTable.update = originals


@contextlib.contextmanager
def meta_weight_net(seed: int, **options) -> Iterator[list[MetaWeightNet]]:
    """Within the block, every MetaLR trainer's instance rates are Meta-Weight-Net's ``V_φ(L_i)`` (a
    :class:`MetaWeightNet` with ``options``, made at its first forward and appended to the yielded list)."""
    made: list[MetaWeightNet] = []
    forward, effective, update = Schedule._forward, rates_mod.RateTable.effective, rates_mod.RateTable.update

    def patched_forward(self, model, inputs, mb, **kw):
        out = forward(self, model, inputs, mb, **kw)
        mw = _window_net(self, made, lambda table: MetaWeightNet(seed, **options))
        mw.window = (mb.indices, mb.losses)
        # The lookahead reads the weights the step opened with (mb.weights, read before this forward): they become
        # V_φ(L_i) in place, so the meta step sees this step's weights at the current φ.
        mb.weights.copy_(mw.weights(mb.losses).to(mb.weights))
        return out

    def patched_effective(self, indices, labels, divisor=1.0):
        mw = getattr(self, "_weight_net", None)
        if mw is None or mw.window is None or indices is None or not torch.equal(indices, mw.window[0]):
            return effective(self, indices, labels, divisor)  # opening a step: replaced after its forward
        with torch.no_grad():  # the table keeps V_φ(L_i) of each example's last visit (unnormalized: its ranking)
            v = mw.net(mw.window[1])
            self.instance[indices.to(self.instance.device)] = v.to(self.instance)
        w = (v / v.mean() if mw.normalize else v).to(labels.device)  # MetaWeightNet.weights, V_φ evaluated once
        return w if divisor == 1.0 else w / divisor

    def patched_update(self, indices, labels, example_grad, weight_decay_grad=None, keyed_grad=None, probes=None):
        mw = getattr(self, "_weight_net", None)
        if mw is None:
            return update(self, indices, labels, example_grad, weight_decay_grad, keyed_grad, probes)
        _check_window(mw, indices)
        mw.step(mw.window[1], example_grad)
        return True

    with _patched(patched_forward, patched_effective, patched_update):
        yield made


@contextlib.contextmanager
def learning_to_reweight() -> Iterator[list[float]]:
    """Within the block, every MetaLR trainer weighs each step's batch as Learning to Reweight does (see the
    module docstring): its rate table holds the weights the step's meta-gradient gives, which the real step
    then applies. Yields, per step, the largest share of the batch's weight that one class takes (1 when the
    step trains one class alone)."""
    top_class: list[float] = []

    def patched_update(self, indices, labels, example_grad, weight_decay_grad=None, keyed_grad=None, probes=None):
        _require_instance_rates(self)
        w = l2rw_weights(example_grad)
        self.instance[indices.to(self.instance.device)] = w.to(self.instance)
        if float(w.sum()) > 0:
            keys = labels.to(w.device)
            top_class.append(max(float(w[keys == k].sum() / w.sum()) for k in keys.unique()))
        return True

    with _patched(update=patched_update):
        yield top_class


@contextlib.contextmanager
def loss_prior(seed: int, lr: float = 1e-3) -> Iterator[list[MetaWeightNet]]:
    """Within the block, every MetaLR trainer weighs an example by its own rate times a learned function of its
    loss: ``w_i = r_i · V_φ(L_i) / mean_batch V_φ(L)``. ``r_i`` is MetaLR's table, stepped by the library on
    ``∂L_meta/∂w_i`` as its instance rates always are (probes included); ``φ`` (Meta-Weight-Net's MLP, batch-mean
    normalized so that the scale stays the rates') takes one Adam step per meta step on ``Σ_i ∂L_meta/∂w_i · r_i ·
    ∂(V_i / mean V)/∂φ`` (``r_i`` as the lookahead took it). The lookahead takes the batch at the rates and ``φ``
    before the step, the real step at both after it. Each example's last training loss is kept
    (``last_loss``, NaN before its first visit) so that the ranking of the product can be read after the run."""
    made: list[MetaWeightNet] = []
    forward, effective, update = Schedule._forward, rates_mod.RateTable.effective, rates_mod.RateTable.update

    def make(table) -> MetaWeightNet:
        mw = MetaWeightNet(seed, lr=lr, normalize=True)
        mw.last_loss = torch.full((table.instance.numel(),), float("nan"))
        return mw

    def patched_forward(self, model, inputs, mb, **kw):
        out = forward(self, model, inputs, mb, **kw)
        mw = _window_net(self, made, make)
        mw.window = (mb.indices, mb.losses, mb.weights.detach().clone())  # (rows, L_i, r_i the lookahead takes)
        mw.last_loss[mb.indices.cpu()] = mb.losses.detach().float().cpu()
        mb.weights.mul_(mw.weights(mb.losses).to(mb.weights))  # r_i · V_φ(L_i) / mean: the lookahead's weights
        return out

    def patched_effective(self, indices, labels, divisor=1.0):
        e = effective(self, indices, labels, divisor)
        mw = getattr(self, "_weight_net", None)
        if mw is None or mw.window is None or indices is None or not torch.equal(indices, mw.window[0]):
            return e  # opening a step (its weights become the product after the forward) or another batch
        return e * mw.weights(mw.window[1]).to(e)

    def patched_update(self, indices, labels, example_grad, weight_decay_grad=None, keyed_grad=None, probes=None):
        applied = update(self, indices, labels, example_grad, weight_decay_grad, keyed_grad, probes)
        mw = getattr(self, "_weight_net", None)
        if applied and mw is not None:
            _check_window(mw, indices)
            mw.step(mw.window[1], example_grad.detach() * mw.window[2].to(example_grad))
        return applied

    with _patched(patched_forward, patched_effective, patched_update):
        yield made


def l2rw_weights(example_grad: torch.Tensor) -> torch.Tensor:
    """Learning to Reweight's weights of one batch as MetaLR's ``e_i`` (its loss is ``Σ e_i L_i / N``): ``N``
    times ``max(-g_i, 0) / Σ_j max(-g_j, 0)``, all zero where no example helps the meta loss."""
    w = (-example_grad.detach().double()).clamp_min(0.0)
    total = w.sum()
    return (w * (len(w) / total) if total > 0 else w).float()


def product_ranking(made: list[MetaWeightNet]):
    """An ``after_train`` for the prior: the run's table, which the matrix's metrics read, becomes each example's
    weight at its last visit, ``r_i · V_φ(L_i)`` (V_φ of the end of the run; the batch mean is the same for every
    example, so the ranking needs none), after the rates alone are kept as ``rates_alone``."""
    def after(trainer) -> None:
        mw, table = made[0], trainer.rates.instance
        mw.rates_alone = table.detach().cpu().clone()
        seen = ~torch.isnan(mw.last_loss)
        v = torch.zeros_like(mw.last_loss)
        v[seen] = mw.net(mw.last_loss[seen]).detach()
        with torch.no_grad():
            table.copy_((mw.rates_alone * v).to(table))
    return after


def run_baseline(cell: R.Cell, seed: int, baseline: str, options: dict, data, quick: bool) -> dict:
    """One run of a baseline: MetaLR with its rate table replaced (see the module docstring)."""
    data = data if data is not None else R.load_data(cell, seed, quick)
    saved = dict(R.OVERRIDES)
    if baseline != "prior":  # the prior keeps MetaLR's table, probes included
        R.OVERRIDES["probe_batches"] = 0
    if baseline == "l2rw":
        R.OVERRIDES["lookahead_step"] = 0.0  # the derivative at θ, where Learning to Reweight takes it
        if options["meta_gradient"] == "paper":
            R.OVERRIDES.update(PAPER_META_GRADIENT)
    try:
        if baseline == "mwnet":
            with meta_weight_net(seed, **options) as made:
                run = R.run_cell(cell, seed, "metalr", quick=quick, data=data)
            x, y = made[0].curve()
            run.update(curve_loss=x, curve_weight=y)
        elif baseline == "prior":
            with loss_prior(seed, **options) as made:
                run = R.run_cell(cell, seed, "metalr", quick=quick, data=data, after_train=product_ranking(made))
            x, y = made[0].curve()
            run.update(curve_loss=x, curve_weight=y,
                       rates_alone_auroc=R._auroc(~data[1], made[0].rates_alone.double().numpy()))
        else:
            with learning_to_reweight() as top_class:
                run = R.run_cell(cell, seed, "metalr", quick=quick, data=data)
            run["one_class_steps"] = float(np.mean(np.asarray(top_class) >= 0.9)) if top_class else float("nan")
    finally:
        R.OVERRIDES.clear()
        R.OVERRIDES.update(saved)
    run.update(method=baseline, **options)
    return run


def run_seed(cell: R.Cell, seed: int, methods: list[str], known: dict, options: dict, bar,
             quick: bool = False) -> list[dict]:
    """Every missing method of one cell and seed (the splits shared); plain and MetaLR from ``known`` if there,
    the baseline (the last of ``methods``) with ``options``."""
    data, out = None, []
    for method in methods:
        if (cell.name, seed, method) in known:
            out.append({**known[(cell.name, seed, method)], "from_matrix": True})
            bar.update(1)
            continue
        data = data or R.load_data(cell, seed, quick)
        if method in BASELINES:
            out.append(run_baseline(cell, seed, method, options, data, quick))
        else:
            out.append(R.run_cell(cell, seed, method, quick=quick, data=data))
        bar.update(1)
    return out


def describe(baseline: str, options: dict) -> str:
    if baseline == "prior":
        return (f"MetaLR's rates times a learned function of the loss (V_φ normalized by the batch mean, Adam lr "
                f"{options['lr']:g}; the ranking is the product's at each example's last visit)")
    if baseline == "l2rw":
        return ("Learning to Reweight (per-step weights, derivative at θ; "
                + ("the paper's per-step meta-gradient)" if options["meta_gradient"] == "paper"
                   else "MetaLR's averaged meta-gradient)"))
    return (f"Meta-Weight-Net with V_φ's Adam lr {options['lr']:g}, weights "
            f"{'normalized by the batch mean' if options['normalize'] else 'not normalized'}")


def render(runs: list[dict], command: str, baseline: str, options: dict) -> str:
    """Per cell: accuracy, runs at or above plain and the ranking of MetaLR's rates and the baseline's weights
    (at each example's last visit), beside the plain model's loss ranking; then the totals."""
    name = NAMES[baseline]
    lines = R.table_head(command, f"{describe(baseline, options)}: test accuracy and rankings (mean over the "
                         "seeds, then each seed)",
                         ["cell", "seeds", "plain acc", f"MetaLR acc / {name} acc", f"runs ≥ plain: MetaLR / {name}",
                          f"AUROC: MetaLR rates / {name} weights", "loss AUROC (plain)",
                          f"mean weight clean / noisy: MetaLR, {name}"])
    total = {"n": 0, "metalr": 0, baseline: 0, "gain_metalr": [], f"gain_{baseline}": [], "inverted_metalr": 0,
             f"inverted_{baseline}": 0, "under_metalr": [], f"under_{baseline}": []}
    for cell, rs, _ in R.runs_by_cell(runs):
        by = {m: sorted((r for r in rs if r["method"] == m), key=lambda r: r["seed"])
              for m in ("plain", "metalr", baseline)}
        if not all(len(v) == len(by["plain"]) and v for v in by.values()):
            continue  # a cell and seed not finished for every method
        a, b = by["metalr"], by[baseline]
        total["n"] += len(a)
        ge = []
        for m, x in (("metalr", a), (baseline, b)):
            ge.append(sum(q["test_accuracy"] >= p["test_accuracy"] for p, q in zip(by["plain"], x)))
            total[m] += ge[-1]
            total[f"gain_{m}"] += [q["test_accuracy"] - p["test_accuracy"] for p, q in zip(by["plain"], x)]
            total[f"inverted_{m}"] += sum(q["rate_auroc"] < 0.5 for q in x)
            if np.mean([r["loss_auroc"] for r in by["plain"]]) >= 0.9 > np.mean([q["rate_auroc"] for q in x]):
                total[f"under_{m}"].append(cell)
        lines.append(f"| {cell} | {', '.join(str(r['seed']) for r in a)} | {R.mean_and_each(by['plain'], 'test_accuracy')}"
                     f" | {R.mean_and_each(a, 'test_accuracy')} / {R.mean_and_each(b, 'test_accuracy')} | "
                     f"{ge[0]} / {ge[1]} of {len(a)} | {R.mean_and_each(a, 'rate_auroc')} / "
                     f"{R.mean_and_each(b, 'rate_auroc')} | {R.mean_and_each(by['plain'], 'loss_auroc')} | "
                     f"{np.mean([r['rate_clean'] for r in a]):.2f} / {np.mean([r['rate_noisy'] for r in a]):.2f}, "
                     f"{np.mean([r['rate_clean'] for r in b]):.2f} / {np.mean([r['rate_noisy'] for r in b]):.2f} |")
    if total["n"]:
        under = {m: f"{len(total[f'under_{m}'])} ({', '.join(total[f'under_{m}']) or 'none'})"
                 for m in ("metalr", baseline)}
        lines += ["", f"Runs at or above plain: MetaLR {total['metalr']} of {total['n']}, {name} "
                  f"{total[baseline]} of {total['n']}; mean accuracy gain over plain: MetaLR "
                  f"{np.mean(total['gain_metalr']):+.4f}, {name} {np.mean(total[f'gain_{baseline}']):+.4f}; "
                  f"rankings below chance (AUROC < 0.5): MetaLR {total['inverted_metalr']}, {name} "
                  f"{total[f'inverted_{baseline}']}; cells whose mean AUROC is under 0.9 where the loss detector's "
                  f"is 0.9 or more: MetaLR {under['metalr']}, {name} {under[baseline]}."]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: str, method: str = "mwnet") -> None:
    """One panel per cell: each seed's learned ``V_φ`` (of ``method``: mwnet or prior) over the training losses it
    saw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys(r["cell"] for r in runs if r["method"] == method))
    if not cells:
        return
    cols = min(4, len(cells))
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, cell in zip(axes.flat, cells):
        for r in (r for r in runs if r["method"] == method and r["cell"] == cell):
            ax.plot(r["curve_loss"], r["curve_weight"], label=f"seed {r['seed']}")
        ax.set_title(cell, fontsize=8)
        ax.set_xlabel("training loss L_i", fontsize=7)
        ax.set_ylabel("V_φ(L_i)", fontsize=7)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    fig.suptitle("Meta-Weight-Net: the learned weight of an example as a function of its loss (end of training)"
                 if method == "mwnet" else "MetaLR × V_φ(loss): the learned prior over the loss (end of training; "
                 "applied divided by its batch mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(cell: R.Cell, seed: int, missing: list[str], bar, *, known: dict, options: dict,
          quick: bool) -> list[dict]:
    """:func:`robustness.run_missing`'s unit of work (module-level, so that ``--jobs`` workers can run it)."""
    return run_seed(cell, seed, missing, known, options, bar, quick)


def main(argv: list[str] | None = None) -> int:
    p = R.cell_seed_parser(__doc__, "", jobs=True)
    p.add_argument("--baseline", choices=BASELINES, default="mwnet", help="the reweighting method beside MetaLR")
    p.add_argument("--matrix", default=os.path.join(R.HERE, "results", "robustness.json"),
                   help="robustness.py's JSON: its plain and MetaLR runs with current fingerprints are reused")
    p.add_argument("--lr", type=float, default=1e-3, help="mwnet, prior: V_φ's Adam learning rate (the authors': 1e-3)")
    p.add_argument("--normalize", action="store_true",
                   help="mwnet: divide each batch's weights by their mean (the paper's optional normalization)")
    p.add_argument("--meta_gradient", choices=("paper", "library"), default=None,
                   help="l2rw: the paper's meta-gradient (default: each step's own meta batch, cross-entropy, whole "
                        "model) or MetaLR's defaults for those")
    p.add_argument("--quick", action="store_true", help="tiny subsample, 1 epoch (smoke test; robustness.py's)")
    args = p.parse_args(argv)
    if args.baseline != "l2rw" and not args.lr > 0:
        raise SystemExit(f"--lr must be > 0, got {args.lr}.")
    if args.baseline == "l2rw" and (args.normalize or args.lr != 1e-3):
        raise SystemExit("--lr and --normalize are Meta-Weight-Net's (--baseline mwnet); Learning to Reweight has "
                         "neither: drop them.")
    if args.baseline == "prior" and args.normalize:
        raise SystemExit("--baseline prior always normalizes V_φ by the batch mean: drop --normalize.")
    if args.baseline != "l2rw" and args.meta_gradient is not None:
        raise SystemExit(f"--meta_gradient is Learning to Reweight's (--baseline l2rw): drop it for {args.baseline}.")
    if args.baseline == "mwnet":
        options = {"lr": args.lr, "normalize": args.normalize}
    elif args.baseline == "prior":
        options = {"lr": args.lr}
    else:
        options = {"meta_gradient": args.meta_gradient or "paper"}
    name = args.baseline + ("_library" if options.get("meta_gradient") == "library" else "")
    output_dir = args.output_dir or os.path.join(R.HERE, "results", "reweighting", name)
    cells = R.select_cells(args.cells)
    path, runs, command = R.open_results(output_dir, "reweighting", "reweighting.py", argv)
    torch.set_num_threads(R.RUN_SETTINGS["threads"])
    known = R.matrix_runs(args.matrix, args.quick)
    methods = ("plain", "metalr", args.baseline)

    def keep(r: dict) -> bool:  # a baseline run of other options is another method here: kept in the JSON, not shown
        return r["quick"] == args.quick and r["method"] in methods and (
            r["method"] != args.baseline or all(r.get(k) == v for k, v in options.items()))

    runs_now = R.run_missing(
        path, runs, cells, args.seeds,
        functools.partial(train, known=known, options=options, quick=args.quick),
        args.baseline, methods=methods, keep=keep, jobs=args.jobs)
    shown = R.in_matrix_order(runs_now)
    R.write_table(output_dir, "reweighting", render(shown, command, args.baseline, options))
    if args.baseline in ("mwnet", "prior"):
        plot(shown, os.path.join(output_dir, "reweighting.png"), args.baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
