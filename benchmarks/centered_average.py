"""Whether the running average's lag costs the rates their signal: the meta gradient averaged around each step.

Every example's rate steps on how its gradient agrees with a running average of the meta gradient
(``meta_grad_average=0.97``, about 33 meta steps). That average holds the meta gradients *before* the step it
is used at — on MNIST half an epoch back, on the 1,337 digits 1.6 epochs — while the example's gradient is the
model's now. The spans measured so far trade that lag against noise (shorter: less lag, more noise; no span
won everywhere). This separates the two: for a cell and seed it trains

- ``metalr``: the defaults, recording every meta step's own meta gradient (the value the average is fed);
- ``metalr_replayed``: a control, the same average rebuilt from that recording and fed back in a second run,
  which retraces the first to the bit (feeding an average in changes nothing else);
- ``metalr_centered``: the second run fed the two-sided average ``Σ_r β^|r−s| g_r / Σ_r β^|r−s|`` around each
  step ``s``: its own meta gradients up to ``s``, the recording's after it — the same factor, no lag, half its
  weight on meta gradients still to come (an oracle no online run has, its future taken from the first run's
  trajectory, which the second leaves as its rates differ);
- ``metalr_centered_matched``: the same with the factor β' that averages as many meta steps as the default's
  one-sided average (β' ≈ 0.94 for 0.97): the same noise, no lag (``metalr_centered`` averages twice as many);
- ``metalr_zero_lag``: an online estimate with less lag, the double exponential average ``2·m − EMA(m)``
  (one more buffer), which a trainer could keep;

and plain training beside them. Each reports accuracy, rate AUROC and the per-visit AUROC by epoch.

    python benchmarks/centered_average.py --cells digits-cnn-sgd-flip35 --seeds 0 1 2 [--methods plain metalr ...]

Writes centered_average.json (every run; a rerun skips the runs already there) and centered_average.md to
--output_dir (default benchmarks/results/centered_average).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Mapping

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness as R  # noqa: E402  (the matrix's cells, data, models and recipes)

from hf_ddlr.meta.averaging import MetaGradientAverage  # noqa: E402

METHODS = ("plain", "metalr", "metalr_replayed", "metalr_centered", "metalr_centered_matched", "metalr_zero_lag")
SECOND_RUNS = ("metalr_replayed", "metalr_centered", "metalr_centered_matched")  # fed from the first run's recording


def matched_beta(beta: float) -> float:
    """The factor β' of a two-sided average ``β'^|k|`` that averages as many meta steps as the one-sided
    ``(1 − β)·β^k``: the same effective sample size ``(Σw)² / Σw²`` — ``(1 + β)/(1 − β)`` one-sided,
    ``(1 + β')³ / ((1 − β')(1 + β'²))`` two-sided (β' ≈ 1 − 2(1 − β)), solved by bisection."""
    target = (1 + beta) / (1 - beta)
    lo, hi = 0.0, beta
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 + mid) ** 3 / ((1 - mid) * (1 + mid * mid)) < target else (lo, mid)
    return (lo + hi) / 2


def past_average(grads: list[dict[str, torch.Tensor]], beta: float) -> list[dict[str, torch.Tensor]]:
    """What :class:`MetaGradientAverage` returns at each step for this sequence (``m_0 = g_0``,
    ``m_s = β·m_{s−1} + (1 − β)·g_s``), with its in-place arithmetic: fed back, it retraces the run to the bit."""
    out, m = [], None
    for g in grads:
        if m is None:
            m = {n: t.clone() for n, t in g.items()}
        else:
            m = {n: m[n].clone().mul_(beta).add_(g[n], alpha=1.0 - beta) for n in g}
        out.append(m)
    return out


class TwoSidedAverage:
    """``c_s = Σ_r β^|r−s| g_r / Σ_r β^|r−s|`` at step ``s`` of a run whose own meta gradients ``g_r`` (``r ≤ s``)
    arrive one by one, and whose future ones (``r > s``) are taken from a recording of ``n`` steps (the first
    run's: the oracle no online run has). Fed a recording of the same run, it is the two-sided average of it."""

    def __init__(self, recording: list[dict[str, torch.Tensor]], beta: float) -> None:
        self.beta, self.n, self.past = beta, len(recording), None
        self.future: list[dict[str, torch.Tensor] | None] = [None] * self.n  # Σ_{r>s} β^(r−s) g_r
        ahead = None
        for s in reversed(range(self.n)):
            self.future[s] = ahead
            g = recording[s]
            ahead = ({k: beta * t for k, t in g.items()} if ahead is None else
                     {k: beta * (g[k] + ahead[k]) for k in g})

    def __call__(self, s: int, g: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The average at step ``s`` (0, 1, … in order) given this run's meta gradient ``g`` there."""
        if s >= self.n:
            raise RuntimeError(f"the second run made more meta steps ({s + 1}) than the recording ({self.n})")
        g = {k: t.detach().float().cpu() for k, t in g.items()}
        self.past = dict(g) if self.past is None else {k: self.beta * self.past[k] + g[k] for k in g}
        b = self.beta
        weight = (1 - b ** (s + 1)) / (1 - b) + b * (1 - b ** (self.n - 1 - s)) / (1 - b)
        ahead = self.future[s]
        return {k: (self.past[k] + (ahead[k] if ahead is not None else 0.0)) / weight for k in g}


@contextlib.contextmanager
def patched_average(mode: str, recording: list | None = None, fed=None) -> Iterator[None]:
    """Within the block every :class:`MetaGradientAverage` ``"record"``s each finite meta gradient it is fed (into
    ``recording``) and averages as usual; returns ``fed[k]`` at its k-th finite update (``"feed"``; ``fed`` a list,
    or a :class:`TwoSidedAverage` given the k-th meta gradient too); or returns the double exponential average
    ``2·m − EMA(m)`` (``"zero_lag"``)."""
    original = MetaGradientAverage.update

    def update(self, g_meta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        counted = self.num_updates
        out = original(self, g_meta)
        if self.num_updates == counted:
            return out  # a non-finite meta gradient, which the average skipped: skipped here too
        k = counted
        if mode == "record":
            recording.append({n: g.detach().float().cpu().clone() for n, g in g_meta.items()})
            return out
        if mode == "feed":
            if isinstance(fed, TwoSidedAverage):
                value = fed(k, g_meta)
            elif k < len(fed):
                value = fed[k]
            else:
                raise RuntimeError(f"the second run made more meta steps ({k + 1}) than the recording ({len(fed)})")
            return {n: value[n].to(g_meta[n].device, g_meta[n].dtype) for n in g_meta}
        m = self.average
        if not hasattr(self, "_second"):
            self._second = {n: t.clone() for n, t in m.items()}
        else:
            for n, t in m.items():
                self._second[n].mul_(self.beta).add_(t, alpha=1 - self.beta)
        return {n: (2 * m[n] - self._second[n]).to(g_meta[n].dtype) for n in g_meta}

    MetaGradientAverage.update = update
    try:
        yield
    finally:
        MetaGradientAverage.update = original


def run_seed(cell: R.Cell, seed: int, methods: list[str], bar, quick: bool = False) -> list[dict]:
    """Every method of one cell and seed (the splits shared); the first run's recording feeds the second runs."""
    data = R.load_data(cell, seed, quick)
    beta = R.metalr_defaults()["meta_grad_average"]
    out, recording = [], []
    need_recording = any(m in SECOND_RUNS for m in methods)
    order = [m for m in METHODS if m in methods or (m == "metalr" and need_recording)]
    for method in order:
        if method == "metalr":
            with patched_average("record", recording=recording):
                run = R.run_cell(cell, seed, "metalr", quick=quick, data=data)
        elif method in SECOND_RUNS:
            fed = (past_average(recording, beta) if method == "metalr_replayed" else
                   TwoSidedAverage(recording, beta if method == "metalr_centered" else matched_beta(beta)))
            with patched_average("feed", fed=fed):
                run = R.run_cell(cell, seed, "metalr", quick=quick, data=data)
        elif method == "metalr_zero_lag":
            with patched_average("zero_lag"):
                run = R.run_cell(cell, seed, "metalr", quick=quick, data=data)
        else:
            run = R.run_cell(cell, seed, method, quick=quick, data=data)
        run.update(method=method)
        if method in methods:
            out.append(run)
            bar.update(1)
    return out


def render(runs: list[dict], command: str) -> str:
    """Per cell: test accuracy, rate AUROC, per-visit AUROC by epoch of every MetaLR variant, and the runs at or
    above plain."""
    variants = METHODS[1:]
    lines = R.table_head(command, "mean over the seeds; per-visit AUROC: each epoch's visits of −∂L_meta/∂e_i",
                         ["cell", "seeds", "plain acc", "loss AUROC (plain)",
                          *[f"{v}: acc / rate AUROC / per-visit by epoch / ≥ plain" for v in variants]])
    for cell, rs, _ in R.runs_by_cell(runs):
        by = {m: sorted((r for r in rs if r["method"] == m), key=lambda r: r["seed"]) for m in METHODS}
        if not by["plain"] or not all(len(v) in (0, len(by["plain"])) for v in by.values()):
            continue  # a seed not finished for every method the cell was run with
        cols = []
        for v in variants:
            x = by[v]
            if not x:
                cols.append("—")  # not run on this cell (--methods)
                continue
            visits = " ".join(f"{a:.2f}" for a in np.mean([r["per_visit_auroc"] for r in x], axis=0))
            ge = sum(q["test_accuracy"] >= p["test_accuracy"] for p, q in zip(by["plain"], x))
            cols.append(f"{np.mean([r['test_accuracy'] for r in x]):.3f} / "
                        f"{np.mean([r['rate_auroc'] for r in x]):.3f} / {visits} / {ge} of {len(x)}")
        lines.append(f"| {cell} | {', '.join(str(r['seed']) for r in by['plain'])} | "
                     f"{np.mean([r['test_accuracy'] for r in by['plain']]):.3f} | "
                     f"{np.mean([r['loss_auroc'] for r in by['plain']]):.3f} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = R.cell_seed_parser(__doc__, os.path.join(R.HERE, "results", "centered_average"), jobs=True)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="the runs to make (the second runs make the recording run too; default: all)")
    p.add_argument("--quick", action="store_true", help="tiny subsample, 1 epoch (smoke test; robustness.py's)")
    args = p.parse_args(argv)
    if "plain" not in args.methods:
        raise SystemExit("--methods needs 'plain': the table counts every run against it.")
    R.run_diagnostic(args.output_dir, "centered_average", "centered_average.py", argv, R.select_cells(args.cells),
                     args.seeds, functools.partial(run_seed, quick=args.quick), "centered average", render,
                     methods=args.methods, keep=lambda r: r["quick"] == args.quick, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
