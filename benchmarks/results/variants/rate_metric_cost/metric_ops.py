"""What the rate metric's own operations cost per meta step on a CIFAR ResNet-18 (width 64, 11.2 M parameters in
62 tensors): one second-moment update (with its finiteness scan) and the preconditioning of two tangents (the
averaged one and, with class or group rates, the per-step one), median of 10 after 3 warm-up, 2 threads.

    python benchmarks/results/variants/rate_metric_cost/metric_ops.py
"""

from __future__ import annotations

import time

import torch

from hf_ddlr.meta.averaging import GradientSecondMoment
from hf_ddlr.models import CifarResNetConfig, CifarResNetForImageClassification


def main() -> None:
    torch.set_num_threads(2)
    model = CifarResNetForImageClassification(CifarResNetConfig(num_labels=100))
    params = dict(model.named_parameters())
    print(f"{len(params)} tensors, {sum(p.numel() for p in params.values()) / 1e6:.1f} M parameters")
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    metric = GradientSecondMoment()
    times = []
    for i in range(13):
        tangents = [{n: torch.randn_like(p) for n, p in params.items()} for _ in range(2)]
        t0 = time.perf_counter()
        metric.update(grads, 0.9)
        metric.precondition_(*tangents)  # (as the engine does: one denominator for both)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    print(f"update + 2 preconditionings: median {1000 * sorted(times)[len(times) // 2]:.1f} ms")


if __name__ == "__main__":
    main()
