"""The products of a finished plain model, raw and in Adam's metric: for the plain model of a robustness cell (seed
given), the AUROC (clean > mislabelled) of each training example's loss, of its product with the meta-loss gradient
``g_i . g_meta`` (whole meta set) over every parameter, and of the same product in Adam's metric,
``g_i . (g_meta / (sqrt(v) + 1e-8))`` with ``v`` the mean squared training-batch gradient over one pass of the train
set (shuffled batches of 64, BatchNorm on batch statistics as in training) — what ``rate_metric="adam"`` divides by,
read at the end of the run instead of accumulated over it. With ``--groups`` also per parameter group (first two
name parts), in Adam's metric.

    python benchmarks/results/variants/rate_metric_adam/frozen_products.py mnist-resnet-sgd-flip35 0 --groups
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import datasets  # noqa: E402
import robustness as R  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch.func import functional_call, jvp  # noqa: E402


def main(cell: str, seed: int, groups: bool) -> dict:
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    ds, noisy = R.load_data(R.CELL_BY_NAME[cell], seed)
    box = {}
    r = R.run_cell(cell, seed, "plain", data=(ds, noisy), after_train=lambda tr: box.update(model=tr.model))
    model = box["model"].float().cpu().train()
    for m in model.modules():  # batch statistics without touching the running ones
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False

    def tensors(split):
        x = torch.stack([torch.as_tensor(v) for v in ds[split]["pixel_values"]]).float()
        return x, torch.as_tensor(ds[split]["label"])

    (xt, yt), (xm, ym) = tensors("train"), tensors("meta")
    perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed))
    xt, yt, clean = xt[perm], yt[perm], ~noisy[perm.numpy()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    ce = torch.nn.functional.cross_entropy

    def logits(p, x):
        return functional_call(model, (p, buffers), args=(), kwargs={"pixel_values": x}).logits

    def grad_of(x, y):
        pg = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        return dict(zip(pg, torch.autograd.grad(ce(logits(pg, x), y), list(pg.values()))))

    def auroc(tangent: dict[str, torch.Tensor]) -> float:
        dots = []
        for i in range(0, len(xt), 64):
            x, y = xt[i:i + 64], yt[i:i + 64]
            _, dot = jvp(lambda p, x=x, y=y: ce(logits(p, x), y, reduction="none"), (params,), (tangent,))
            dots.append(dot.detach())
        return round(float(roc_auc_score(clean, torch.cat(dots).numpy())), 4)

    with torch.no_grad():
        losses = torch.cat([ce(logits(params, xt[i:i + 64]), yt[i:i + 64], reduction="none")
                            for i in range(0, len(xt), 64)])
    g_meta = grad_of(xm, ym)
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = range(0, len(xt), 64)
    for i in batches:
        for n, g in grad_of(xt[i:i + 64], yt[i:i + 64]).items():
            v[n] += g * g / len(batches)
    in_metric = {n: g_meta[n] / (v[n].sqrt() + 1e-8) for n in params}
    out = {"cell": cell, "seed": seed, "plain_test_accuracy": r["test_accuracy"],
           "auroc": {"per-example loss": round(float(roc_auc_score(clean, -losses.numpy())), 4),
                     "product, raw": auroc(g_meta), "product, Adam's metric": auroc(in_metric)}}
    if groups:
        for gname in dict.fromkeys(".".join(n.split(".")[:2]) for n in params):
            only = {n: t if n.startswith(gname + ".") or n == gname else torch.zeros_like(t)
                    for n, t in in_metric.items()}
            out["auroc"][f"Adam's metric, {gname} only"] = auroc(only)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("cell")
    p.add_argument("seed", type=int)
    p.add_argument("--groups", action="store_true")
    a = p.parse_args()
    print(json.dumps(main(a.cell, a.seed, a.groups), indent=1))
