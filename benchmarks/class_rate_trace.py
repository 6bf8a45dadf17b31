"""How the class (or group) rates move over a run: one ``benchmarks/robustness.py`` cell trained with MetaLR and
the options given, and its learned class rates read from the run's LR trajectory at nine evenly spaced steps.

    python benchmarks/class_rate_trace.py --cell vader-minilm-ft-flip30 --seeds 0 1 --metalr_args lr_level=both

Prints, per seed, the test accuracy, the rate AUROC, the label shares of the train and meta sets and the class
rates over the run (a Markdown table); nothing is written.
"""

from __future__ import annotations

import argparse

import numpy as np
import robustness as R  # the robustness matrix's cells and runner (this folder)

from hf_ddlr import MetaLRTrainer


def trace(cell: str, seed: int, points: int = 9, quick: bool = False) -> dict:
    """Train ``cell`` / ``seed`` with MetaLR (the options in ``robustness.OVERRIDES``) and read its class rates."""
    trained: list[MetaLRTrainer] = []
    data = R.load_data(R.CELL_BY_NAME[cell], seed, quick)
    res = R.run_cell(cell, seed, "metalr", quick=quick, data=data, after_train=trained.append)
    t = trained[0]
    if not t.lr_trajectory.has_class_rates:
        raise SystemExit("this run learned no class rates: pass --metalr_args lr_level=both (or class)")
    n = t.state.global_step
    steps = sorted({round(k * n / (points - 1)) for k in range(points)})
    share = lambda y: np.bincount(np.asarray(y)) / len(y)  # noqa: E731
    return {"seed": seed, "acc": res["test_accuracy"], "auroc": res.get("rate_auroc"),
            "train_share": share(data[0]["train"]["label"]), "meta_share": share(data[0]["meta"]["label"]),
            "rates": [(s, [float(x) for x in t.lr_trajectory.class_rates_at(step=s)]) for s in steps]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="vader-minilm-ft-flip30")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--metalr_args", nargs="*", default=["lr_level=both"], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="tiny subsample, 1 epoch (smoke test)")
    a = p.parse_args(argv)
    R.OVERRIDES.update(R.parse_metalr_args(a.metalr_args))
    for s in a.seeds:
        r = trace(a.cell, s, quick=a.quick)
        auroc = "–" if r["auroc"] is None else f"{r['auroc']:.3f}"
        print(f"\n{a.cell} seed {s} ({' '.join(a.metalr_args)}): test accuracy {r['acc']:.3f}, rate AUROC {auroc}; "
              f"label shares train {np.round(r['train_share'], 3).tolist()}, meta {np.round(r['meta_share'], 3).tolist()}")
        print("| step | " + " | ".join(f"class {c}" for c in range(len(r["rates"][0][1]))) + " |")
        print("|---|" + "---|" * len(r["rates"][0][1]))
        for step, rates in r["rates"]:
            print(f"| {step} | " + " | ".join(f"{x:.2f}" for x in rates) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
