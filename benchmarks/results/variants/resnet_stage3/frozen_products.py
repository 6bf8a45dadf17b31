"""Where the ResNet's signal sits, read at the end of a plain run: for the plain model of
``mnist-resnet-sgd-flip35`` (seed given), the AUROC (clean > mislabelled) of each training example's loss and of its
product with the meta-loss gradient ``g_i . g_meta`` (whole meta set), over every parameter and restricted to each
group (stem, each stage, classifier; BatchNorm and convolution weights), with BatchNorm on batch statistics
(shuffled batches of 64, as in training) and on running statistics.

    python benchmarks/results/variants/resnet_stage3/frozen_products.py 0 > frozen_products_seed0.json   # ~2 min
"""

from __future__ import annotations

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

CELL = "mnist-resnet-sgd-flip35"


def group(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "stages" else ("stem" if parts[0] in ("conv1", "bn1") else parts[0])


def main(seed: int) -> dict:
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    ds, noisy = R.load_data(R.CELL_BY_NAME[CELL], seed)
    box = {}
    r = R.run_cell(CELL, seed, "plain", data=(ds, noisy), after_train=lambda tr: box.update(model=tr.model))
    model = box["model"].float().cpu()

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

    groups = {"all": lambda n: True, "batchnorm": lambda n: ".bn" in n or n.startswith("bn") or "shortcut.1" in n,
              "conv weights": lambda n: "conv" in n or "shortcut.0" in n}
    for g in dict.fromkeys(group(n) for n in params):
        groups[g] = (lambda q: (lambda n: group(n) == q))(g)
    out = {"cell": CELL, "seed": seed, "plain_test_accuracy": r["test_accuracy"], "auroc": {}}
    for mode in ("batch statistics", "running statistics"):
        model.train(mode == "batch statistics")
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # batch statistics without touching the running ones
                m.track_running_stats = mode != "batch statistics"
        pm = {n: v.clone().requires_grad_(True) for n, v in params.items()}
        g_meta = dict(zip(pm, torch.autograd.grad(ce(logits(pm, xm), ym), list(pm.values()))))
        res = {}
        for name, take in groups.items():
            tangent = {n: g_meta[n] if take(n) else torch.zeros_like(g_meta[n]) for n in params}
            losses, dots = [], []
            for i in range(0, len(xt), 64):
                x, y = xt[i:i + 64], yt[i:i + 64]
                loss, dot = jvp(lambda p, x=x, y=y: ce(logits(p, x), y, reduction="none"), (params,), (tangent,))
                losses.append(loss.detach())
                dots.append(dot.detach())
            if name == "all":
                res["per-example loss"] = round(float(roc_auc_score(clean, -torch.cat(losses).numpy())), 4)
            res[f"product: {name}"] = round(float(roc_auc_score(clean, torch.cat(dots).numpy())), 4)
        out["auroc"][mode] = res
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.track_running_stats = True
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0), indent=1))
