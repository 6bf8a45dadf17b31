"""Whether the rule that turns each visit's meta-gradient into a rate loses the ranking, or the signal itself does.

For a robustness cell and seed this trains MetaLR (defaults) as ``robustness.py`` does, recording every update
of the instance rates: the examples of the step's window and probes, their classes and their ``∂L_meta/∂e_i``.
It then replays the recorded signals offline through other rules — the same signals, with no feedback on the
training, so a rule's number says what it would make of what the run saw — and reports the AUROC (clean above
mislabelled) of each rule's final scores:

- ``as run``: the trainer's rule (the normalized step, rates clamped to [0, cap], ``"relative"`` at the cap where
  the run resolved it), replayed here in numpy; ``replay check`` is the largest difference between the replayed
  and the trainer's final rates (a replay that does not reproduce the run says nothing about the others).
- ``no clamps``: the running sum of the same normalized steps, unbounded.
- ``sign``: ``meta_lr`` per visit in the direction of the signal, its size dropped.
- ``cap 2``: room up to 2 (rates start at 1, in the middle of their range instead of at its top).
- ``linear read``: the best linear combination of each example's mean normalized signal in 8 time bins of the
  run, fitted with the noisy mask (5-fold logistic regression): a ceiling that uses the labels, not a method.
- ``per bin``: the AUROC of each time bin's mean signal alone, first to last.

    python benchmarks/rate_rules.py --cells mnist-cnn-adamw-flip35 mnist-cnn-sgd-flip35 --seeds 0 1 2

Writes rate_rules.json (a rerun skips the cell-seeds already there) and rate_rules.md to --output_dir (default
benchmarks/results/rate_rules).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections.abc import Iterator

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness as R  # noqa: E402  (the matrix's cells, data, models and recipes)

from hf_ddlr.meta import rates as rates_mod  # noqa: E402

BINS = 8
# (name, replay options) of the rules compared with the one the run used
RULES = {"no clamps": {"clamp": False}, "sign": {"sign": True}, "cap 2": {"cap": 2.0}}

Update = tuple[np.ndarray, np.ndarray, np.ndarray]  # (rows, class keys, ∂L_meta/∂e) of one update, probes included


@contextlib.contextmanager
def recording_updates() -> Iterator[list[Update]]:
    """Every instance-rate update made while the context is open, window and probes concatenated as the rate
    table concatenates them."""
    log: list[Update] = []
    original = rates_mod.RateTable.update

    def update(self, indices, labels, example_grad, weight_decay_grad=None, keyed_grad=None, probes=None):
        applied = original(self, indices, labels, example_grad, weight_decay_grad, keyed_grad, probes)
        if applied and self.instance is not None:
            parts = [(indices, labels, example_grad)] + ([probes] if probes is not None else [])
            log.append(tuple(np.concatenate([p[k].detach().cpu().double().numpy() for p in parts])
                             for k in range(3)))  # type: ignore[arg-type]
        return applied

    rates_mod.RateTable.update = update
    try:
        yield log
    finally:
        rates_mod.RateTable.update = original


def _lower_median_per_key(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For every entry, the lower median of the values that share its key (``torch.median``'s convention)."""
    out = np.empty_like(values)
    for key in np.unique(keys):
        sel = keys == key
        v = np.sort(values[sel])
        out[sel] = v[(len(v) - 1) // 2]
    return out


def replay(log: list[Update], n: int, lr: float, cap: float | None, at_cap: str = "clamp", clamp: bool = True,
           sign: bool = False) -> np.ndarray:
    """The instance rates (or, without clamps, the scores) that ``log``'s signals give under a rule: every rate
    starts at 1 and steps by ``lr`` times the signal summed per example, divided by the update's mean |signal|
    (``sign``: ``lr`` times its sign); clamped to [0, cap] unless ``clamp`` is False; ``at_cap="relative"``: a step
    that would take a rate past the cap is its signal minus the lower median of its class's signals."""
    r = np.ones(n)
    for idx, keys, g in log:
        rows, inv = np.unique(idx.astype(np.int64), return_inverse=True)
        summed = np.zeros(len(rows))
        np.add.at(summed, inv, g)
        if sign:
            factor, step = lr, lr * np.sign(summed)
        else:
            scale = np.abs(summed).mean()
            if not scale > 0:
                continue
            factor = lr / scale
            step = factor * summed
        if at_cap == "relative" and cap is not None and clamp:
            ref = np.zeros(len(rows))
            np.add.at(ref, inv, _lower_median_per_key(g, keys.astype(np.int64)))
            step = np.where(r[rows] - step > cap, step - factor * ref, step)
        r[rows] = np.clip(r[rows] - step, 0.0, cap) if clamp else r[rows] - step
    return r


def binned_signal(log: list[Update], n: int, bins: int = BINS) -> np.ndarray:
    """Each example's mean normalized signal in each of ``bins`` equal spans of the run's updates (0 where it had
    no visit)."""
    sums, counts = np.zeros((n, bins)), np.zeros((n, bins))
    for k, (idx, _, g) in enumerate(log):
        b = min(bins - 1, k * bins // len(log))
        scale = np.abs(g).mean()
        np.add.at(sums[:, b], idx.astype(np.int64), g / scale if scale > 0 else g)
        np.add.at(counts[:, b], idx.astype(np.int64), 1)
    return sums / np.maximum(counts, 1)


def _auroc(clean: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(clean.astype(int), score))


def run_seed(cell: R.Cell, seed: int, quick: bool = False) -> dict:
    """MetaLR on one cell and seed, its recorded signals replayed through every rule."""
    # the replay follows uncentred steps on the whole products: the rule of instance_signal="mean" (the default
    # before 2026-12-08, which the recorded runs were made with); the default's centred split is not replayed
    R.OVERRIDES["instance_signal"] = "mean"
    data = R.load_data(cell, seed, quick)
    noisy = data[1]
    got: dict = {}

    def after(trainer) -> None:
        table = trainer.rates.instance
        group = next(g for g in trainer.rates.optimizer.param_groups if any(p is table for p in g["params"]))
        got.update(rates=table.detach().cpu().double().numpy(), lr=group["lr"], cap=group["max_rate"],
                   at_cap=trainer.rates.at_cap, options=(trainer.rates.center_instance, trainer.rates.instance_scale,
                                                         trainer.meta_args.lr_level))

    with recording_updates() as log:
        metalr = R.run_cell(cell, seed, "metalr", quick=quick, data=data, after_train=after)
    if got["options"] != (False, "batch", "instance"):
        raise ValueError(f"the replay follows instance-level rates without centring or per-key scale; this run has "
                         f"(center_instance, instance_scale, lr_level) = {got['options']}")
    n, clean = len(noisy), ~noisy
    as_run = replay(log, n, got["lr"], got["cap"], got["at_cap"])
    out = {"cell": cell.name, "seed": seed, "quick": quick, "test_accuracy": metalr["test_accuracy"],
           "trainer": _auroc(clean, got["rates"]), "as run": _auroc(clean, as_run),
           "replay_check": float(np.abs(as_run - got["rates"]).max()), "at_cap": got["at_cap"], "updates": len(log)}
    for name, kw in RULES.items():
        opts = {"cap": got["cap"], "at_cap": got["at_cap"], **kw}
        out[name] = _auroc(clean, replay(log, n, got["lr"], **opts))
    feats = binned_signal(log, n)
    out["per bin"] = [_auroc(clean, -feats[:, b]) for b in range(feats.shape[1])]
    folds = min(5, int(noisy.sum()), int(clean.sum()))
    proba = cross_val_predict(LogisticRegression(max_iter=2000), feats, noisy.astype(int), cv=folds,
                              method="predict_proba")[:, 1]
    out["linear read"] = _auroc(clean, -proba)
    return out


COLUMNS = ("as run", "no clamps", "sign", "cap 2", "linear read")


def render(runs: list[dict], command: str) -> str:
    lines = R.table_head(command, "MetaLRConfig defaults; rate AUROC (clean > mislabelled) of each rule replayed on "
                         "the run's recorded signals, mean over seeds (and each seed's)",
                         ["cell", "seeds", "replay check (max \\|diff\\|)", *COLUMNS, "per bin, first → last"])
    for cell, rs, seeds in R.runs_by_cell(runs):
        cols = " | ".join(R.mean_and_each(rs, c) for c in COLUMNS)
        bins = " → ".join(f"{v:.2f}" for v in np.mean([r["per bin"] for r in rs], axis=0))
        lines.append(f"| {cell} | {seeds} | "
                     f"{max(r['replay_check'] for r in rs):.1e} | {cols} | {bins} |")
    return "\n".join(lines) + "\n"


def train(cell: R.Cell, seed: int, _missing: list, bar, *, quick: bool) -> list[dict]:
    """:func:`robustness.run_missing`'s unit of work (module-level, so that ``--jobs`` workers can run it)."""
    run = run_seed(cell, seed, quick)
    bar.write(f"[rate_rules] {cell.name} seed {seed}: " + ", ".join(
        f"{c} {run[c]:.3f}" for c in COLUMNS) + f" (replay check {run['replay_check']:.1e})")
    bar.update()
    return [run]


def main(argv: list[str] | None = None) -> int:
    p = R.cell_seed_parser(__doc__, os.path.join(R.HERE, "results", "rate_rules"), jobs=True)
    p.add_argument("--quick", action="store_true", help="tiny subsample, 1 epoch (smoke test)")
    args = p.parse_args(argv)
    path, runs, command = R.open_results(args.output_dir, "rate_rules", "rate_rules.py", argv)
    shown = sorted(R.run_missing(path, runs, R.select_cells(args.cells), args.seeds,
                                 functools.partial(train, quick=args.quick), "rate rules",
                                 keep=lambda r: r["quick"] == args.quick, jobs=args.jobs),
                   key=lambda r: (r["cell"], r["seed"]))
    md = render(shown, command)
    R.write_table(args.output_dir, "rate_rules", md)
    bad = [r for r in shown if not math.isfinite(r["replay_check"]) or r["replay_check"] > 1e-4]
    if bad:
        print(f"the replay does not reproduce the trainer's rates on {len(bad)} run(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
