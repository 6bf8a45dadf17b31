"""Where in the network the rates' signal comes from: the per-visit meta-gradient split by layer.

An example's rate moves at each visit against ``∂L_meta/∂e_i ∝ −T·∇L_i``, a sum over the model's parameters.
On models that take the per-layer products (transformers: the layer tape), this script trains one
``benchmarks/robustness.py`` cell with the MetaLR defaults — but the meta step over every parameter
(``meta_parameters="all"``, which a pretrained model's default is not) — and, at every meta step, also takes the products
restricted to each group of parameters (embeddings, each encoder/decoder layer, pooler, head): ``T`` with
every other group's entries set to 0. The groups' products add up to the one the rates step on; the training
itself is unchanged. Per group it reports:

- the AUROC (clean > noisy) of the per-visit products, per epoch;
- the AUROC of the per-visit products summed over the run, each visit divided by the batch's mean absolute
  value as the rate step does — what the rates would rank at if that group alone drove them;
- its share of the spread of the whole product (std of the group's part / std of the sum).

    python benchmarks/layer_signal.py                              # MiniLM / VADER, seeds 0 1 2 (~3 min each)
    python benchmarks/layer_signal.py --cell vader-minilm-ft-flip30 --seeds 0 --output_dir /tmp/ls

Writes ``layer_signal.md`` and ``layer_signal.json`` under ``--output_dir`` (default
``benchmarks/results/layer_signal``). Models on the forward-mode path (BatchNorm CNNs) take no per-layer
products; the script refuses them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from collections.abc import Iterator

import numpy as np
import robustness as R  # the robustness matrix's cells and runner (this folder)
import torch

from hf_ddlr.meta import layerwise

HERE = os.path.dirname(os.path.abspath(__file__))
_LAYER = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def group_of(name: str) -> str:
    """The parameter group of a parameter name: ``layerNN`` for a numbered transformer block, else the
    name's first component below the base model (``embeddings``, ``pooler``, ``classifier``, ...)."""
    m = _LAYER.search(name)
    if m:
        return f"layer{int(m.group(1)):02d}"
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[0] in ("bert", "roberta", "model", "transformer") else parts[0]


def _order(group: str) -> tuple[int, str]:
    """Input to output: embeddings, the numbered blocks, then the rest with the classification head last."""
    rank = 0 if group.startswith("emb") else 1 if group.startswith("layer") else 3
    return (rank if group not in ("classifier", "score", "lm_head") else 4, group)


@contextlib.contextmanager
def split_products(sink: list[dict[str, np.ndarray]]) -> Iterator[None]:
    """While active, every ``LayerTape.dots(T)`` also appends its per-group parts to ``sink`` (the returned
    products are the unchanged whole)."""
    whole = layerwise.LayerTape.dots

    def dots(self, T):
        out = whole(self, T)
        groups = sorted({group_of(n) for n in T})
        sink.append({g: whole(self, {n: t if group_of(n) == g else torch.zeros_like(t) for n, t in T.items()})
                     .detach().cpu().double().numpy() for g in groups})
        return out

    layerwise.LayerTape.dots = dots
    try:
        yield
    finally:
        layerwise.LayerTape.dots = whole


class GroupVisits(R.VisitRecorder):
    """The robustness matrix's visit recorder, plus each visit's per-group products."""

    def __init__(self, trainer, sink: list) -> None:
        super().__init__(trainer)
        self.sink, self.groups = sink, []

    def on_step_end(self, args, state, control, **kw):
        n = len(self.rows)
        super().on_step_end(args, state, control, **kw)
        if len(self.rows) > n:
            if not self.sink:
                raise RuntimeError("this model takes no per-layer products (forward-mode path): nothing to split")
            self.groups.append(self.sink[-1])
        self.sink.clear()


def analyse(rec: GroupVisits, noisy: np.ndarray) -> dict[str, dict]:
    """Per group (and ``all``, the products the rates stepped on): per-epoch AUROC, summed AUROC, share."""
    if not rec.groups:
        raise RuntimeError("no meta step was recorded")
    names = sorted(rec.groups[0], key=_order)
    full = [sum(v[g] for g in names) for v in rec.groups]
    out = {}
    for g in [*names, "all"]:
        parts = full if g == "all" else [v[g] for v in rec.groups]
        summed = np.zeros(len(noisy))
        per_epoch: dict[int, list] = {}
        for (ep, idx, _), x in zip(rec.rows, parts):
            summed[idx] += x / (np.abs(x).mean() + 1e-30)
            per_epoch.setdefault(math.ceil(ep) - 1, []).append((idx, x))
        pe = [R._auroc(~noisy[np.concatenate([i for i, _ in v])], np.concatenate([x for _, x in v]))
              for _, v in sorted(per_epoch.items())]
        share = float(np.mean([np.std(p) / (np.std(f) + 1e-30) for p, f in zip(parts, full)]))
        out[g] = {"per_visit_auroc": pe, "summed_auroc": R._auroc(~noisy, summed), "share": share}
    return out


def run(cell: str, seed: int, quick: bool = False) -> dict:
    # the products over every parameter, split by group (a pretrained model's default takes its head only); the
    # rates on the whole products (instance_signal="mean", the default before 2026-12-08: the groups add up to them)
    R.OVERRIDES["meta_parameters"] = "all"
    R.OVERRIDES["instance_signal"] = "mean"
    data = R.load_data(R.CELL_BY_NAME[cell], seed, quick)
    sink: list = []
    made: list[GroupVisits] = []
    # run_cell builds its own VisitRecorder: substitute this one for the duration of the run
    R.VisitRecorder, original = (lambda trainer: made.append(GroupVisits(trainer, sink)) or made[-1]), R.VisitRecorder
    try:
        with split_products(sink):
            res = R.run_cell(cell, seed, "metalr", quick=quick, data=data)
    finally:
        R.VisitRecorder = original
    rec = made[0]
    whole = np.concatenate([-g for _, _, g in rec.rows])  # −∂L_meta/∂e_i = the products / N: what the rates used
    parts = np.concatenate([sum(v.values()) for v in rec.groups])
    cos = float(parts @ whole / (np.linalg.norm(parts) * np.linalg.norm(whole) + 1e-30))
    return {"cell": cell, "seed": seed, "test_accuracy": res["test_accuracy"], "rate_auroc": res["rate_auroc"],
            "parts_vs_whole_cosine": cos, "groups": analyse(rec, data[1])}


def render(runs: list[dict], command: str) -> str:
    names = list(runs[0]["groups"])
    lines = [f"`{command}` — MetaLRConfig defaults, the meta step over every parameter; {runs[0]['cell']}, seeds "
             f"{', '.join(str(r['seed']) for r in runs)} (mean over seeds; per-seed values in layer_signal.json)",
             "", f"Learned rate AUROC: {np.mean([r['rate_auroc'] for r in runs]):.3f}; test accuracy "
             f"{np.mean([r['test_accuracy'] for r in runs]):.3f}.", "",
             "| parameter group | per-visit AUROC by epoch | AUROC of the summed visits | share of the spread |",
             "|---|---|---|---|"]
    for g in names:
        pe = np.mean([r["groups"][g]["per_visit_auroc"] for r in runs], axis=0)
        sm = np.mean([r["groups"][g]["summed_auroc"] for r in runs])
        sh = np.mean([r["groups"][g]["share"] for r in runs])
        label = "**all (what the rates step on)**" if g == "all" else g
        lines.append(f"| {label} | {' → '.join(f'{x:.3f}' for x in pe)} | {sm:.3f} | {sh:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="vader-minilm-ft-flip30")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output_dir", default=os.path.join(HERE, "results", "layer_signal"))
    p.add_argument("--quick", action="store_true", help="tiny subsample, 1 epoch (smoke test)")
    a = p.parse_args(argv)
    os.makedirs(a.output_dir, exist_ok=True)
    runs = []
    for s in a.seeds:
        runs.append(run(a.cell, s, a.quick))
        g = runs[-1]["groups"]
        print(f"[layer_signal] {a.cell} seed {s}: rate AUROC {runs[-1]['rate_auroc']:.3f}; summed per group "
              + ", ".join(f"{k} {v['summed_auroc']:.3f}" for k, v in g.items()), flush=True)
    command = "python benchmarks/layer_signal.py --cell " + a.cell + " --seeds " + " ".join(map(str, a.seeds))
    with open(os.path.join(a.output_dir, "layer_signal.json"), "w") as f:
        json.dump(runs, f, indent=1)
    with open(os.path.join(a.output_dir, "layer_signal.md"), "w") as f:
        f.write(render(runs, command))
    print(render(runs, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
