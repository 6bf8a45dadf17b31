"""A probe, not a feature: MetaLR runs whose instance rates step on the meta-gradient split by class.

``benchmarks/class_signal.py`` finds, at the checkpoints of a plain run, that a training image's product with the
meta examples of its own label ranks the mislabelled images *above* the clean ones, and that leaving that share out
(``--signal other``) or taking the lowest of the other classes' shares (``--signal worst``) ranks them far better
than the product with the whole meta set. This asks whether the rates learned on such a signal rank and train
better. It patches the meta step of this process only: after the library's meta step, the instance rates' gradient
of the step's examples and of its probes is replaced by ``−s_i / N`` (N: the step's normalizer), where ``s_i`` is
the split product of the example's gradient with the meta set's per-class gradients at θ (every parameter,
per-example gradients by ``torch.func``, eval-mode BatchNorm, in the metric of the step's products: Adam's
preconditioner or the second moment the default keeps under SGD), the per-class gradients averaged as the default
averages the meta gradient (β 0.97). The rest of the run (the real step, the class rates, the lookahead, the
normalized step, the probes' rows) is the default's. Single process, image cells only.

    python benchmarks/class_rates_probe.py --signal other --cells mnist-cnn-adamw-flip35 --seeds 0 1 2 \\
        --output_dir benchmarks/results/variants/class_signal_other

Every other argument is ``benchmarks/robustness.py``'s; the plain and oracle runs are the matrix's (reused as in any
variant), the MetaLR runs land in ``--output_dir``'s robustness.json / .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import weakref
from collections.abc import Mapping, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import class_signal as CS  # noqa: E402
import robustness as R  # noqa: E402

import hf_ddlr.schedules as schedules  # noqa: E402
from hf_ddlr.meta.distributed import world_size  # noqa: E402

BETA = 0.97  # the default meta_grad_average


def metric_of(name: str, param: torch.Tensor, specs: Mapping, metric) -> torch.Tensor:
    """The flattened metric the step's products take for this tensor: the optimizer's preconditioner (Adam), the
    second moment the default keeps for an SGD tensor (``rate_metric``, applied by its own ``precondition_``), or 1."""
    spec = specs.get(name)
    if spec is not None and spec.preconditioner is not None:
        return spec.preconditioner.float().reshape(-1)
    ones = {name: torch.ones_like(param, dtype=torch.float32)}
    if metric is not None:
        metric.precondition_(ones)
    return ones[name].reshape(-1)


def split_products(model: torch.nn.Module, params: Mapping[str, torch.Tensor], P: torch.Tensor,
                   class_grads: torch.Tensor, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   signal: str) -> torch.Tensor:
    """For every example of ``batches`` ((pixel_values, labels) pairs): its gradient's products with the per-class
    meta gradients ``class_grads`` ([classes, flattened ``params``]) in the metric ``P``, reduced by ``signal``
    ("worst": the lowest over the other classes; "other": the sum over them). Eval mode is the caller's."""
    loss = CS.example_loss(model, params)
    targets = (class_grads * P).T
    out = []
    for x, y in batches:
        d = CS.per_example_grads(loss, {n: p.detach() for n, p in params.items()}, x, y,
                                 lambda g: g @ targets.to(g.dtype)).double()
        out.append(CS.worst_other(d, y) if signal == "worst" else CS.other_than_own(d, y))
    return torch.cat(out).float()


def class_gradients(model: torch.nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    num_classes: int) -> torch.Tensor:
    """[classes, flattened ``params``]: each class's share of the meta set's mean gradient (eval mode)."""
    g = CS.per_example_grads(CS.example_loss(model, params), {n: p.detach() for n, p in params.items()}, x, y,
                             lambda g: g)
    # (class_signal.class_products(g.T, …).T is the same sum, but its transposed product rounds otherwise, and the
    # recorded runs, chaotic, moved by a test image with it)
    return torch.nn.functional.one_hot(y, num_classes).to(g.dtype).T @ g / len(y)


def install(signal: str) -> None:
    """Patch the trainer's meta step (this process) so that the instance rates step on the split signal."""
    original = schedules.meta_gradients
    averages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per model (an id can be reused)

    def patched(model, params, window, meta, specs, **kw):
        res = original(model, params, window, meta, specs, **kw)
        was = model.training
        model.eval()
        try:
            names = [n for n, _ in model.named_parameters() if n in params]
            trainable = {n: params[n] for n in names}
            P = torch.cat([metric_of(n, params[n], specs, kw.get("metric")) for n in names])
            G = class_gradients(model, trainable, meta.inputs["pixel_values"], meta.labels, model.config.num_labels)
            avg = averages.get(model)
            if avg is None:
                avg = averages[model] = G.clone()
            else:
                avg.mul_(BETA).add_(G, alpha=1 - BETA)
            norm = kw["normalizer"] * world_size()

            def grads_of(mbs):
                s = split_products(model, trainable, P, avg, [(mb.inputs["pixel_values"], mb.labels) for mb in mbs],
                                   signal)
                return -s / norm

            res.example_grad = grads_of(window).to(res.example_grad.dtype)
            if kw.get("probes") and res.probe_grad is not None:
                res.probe_grad = grads_of(kw["probes"]).to(res.probe_grad.dtype)
        finally:
            model.train(was)
        return res

    schedules.meta_gradients = patched


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--signal", choices=("worst", "other"), required=True)
    a, rest = p.parse_known_args(argv)
    if "--output_dir" not in rest:
        raise SystemExit("give the probe its own --output_dir (e.g. benchmarks/results/variants/class_signal_other)")
    if "--jobs" in rest:
        raise SystemExit("the patch holds in this process only: run without --jobs")
    install(a.signal)
    code = R.main(rest)
    # the table's first line names robustness.py's command: name this probe's instead
    out = rest[rest.index("--output_dir") + 1]
    path = os.path.join(out, "robustness.md")
    with open(path) as f:
        lines = f.read().split("\n")
    mine = "python benchmarks/class_rates_probe.py --signal " + a.signal + " " + " ".join(rest)
    lines[0] = lines[0].replace("python benchmarks/robustness.py " + " ".join(rest), mine, 1)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
