"""Mixed-precision check of MetaLRTrainer: one short run per precision on a tiny BERT (built locally, nothing
downloaded), all from the same initial weights and batches.

    python benchmarks/gpu_check.py [--steps 20] [--batch 32] [--json out.json]

For every precision (fp32 reference, bf16, fp16) it prints: whether the rates moved, whether the
meta-gradients were finite, the cosine of the first step's per-example meta-gradients against fp32 (same
weights, same batch), how many meta steps were skipped as non-finite, how many optimizer steps the fp16
GradScaler skipped, the mean step time, and whether the per-layer products (``layerwise_dots``) passed their
check against forward mode ("verified") or the run fell back to forward mode ("off"). fp16 needs a GPU (accelerate ignores fp16 on CPU): on a CPU it is
skipped with a message, and so is bf16 on a GPU without bf16 support. Exit status 1 when a check fails
(a precision with no finite meta step, rates that did not move, or a cosine below --min-cos).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import datasets
import torch
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tasks import tiny_bert  # noqa: E402

import hf_ddlr.schedules as schedules  # noqa: E402
from hf_ddlr import MetaLRConfig, MetaLRTrainer  # noqa: E402


def make_data(n: int, seq: int, vocab: int, seed: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, seq), generator=g)
    labels = (ids[:, : seq // 2] < vocab // 2).float().mean(1).gt(0.5).long()
    flip = torch.rand(n, generator=g) < 0.2  # some label noise, so the rates have something to learn
    labels = torch.where(flip, 1 - labels, labels)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "label": labels.tolist()}
    )


class _Timer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.opt_skipped = 0
        self._t0 = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    # end-to-end step time, end of one step to the end of the next: the meta step runs in get_batch_samples,
    # before on_step_begin, so on_step_begin -> on_step_end would leave it out
    def on_train_begin(self, args, state, control, **kw):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        now = time.perf_counter()
        self.times.append(now - self._t0)
        self._t0 = now
        self.opt_skipped += int(bool(self.trainer.accelerator.optimizer_step_was_skipped))


def _config(precision: str, a: argparse.Namespace, out_dir: str) -> MetaLRConfig:
    """One precision's run: SGD, both rate levels and the learned weight decay (every meta-gradient used)."""
    return MetaLRConfig(
        output_dir=out_dir,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=a.lr,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=max(1, a.steps // 4),
        lr_level="both",
        weight_decay=0.01,
        learn_weight_decay=True,
        meta_lr=0.1,
    )


def run_one(precision: str, a: argparse.Namespace, train, meta, out_dir: str) -> dict:
    results = []
    orig = schedules.meta_gradients

    def spy(*args, **kw):  # every meta step's result, finite or not, and the loss scale it ran under
        r = orig(*args, **kw)
        results.append((r, kw.get("loss_scale", 1.0)))
        return r

    args = _config(precision, a, out_dir)
    timer = _Timer()
    model = tiny_bert(a.vocab, a.seq, hidden=64, heads=4, ffn=128, dropout=False)
    t = MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta, callbacks=[timer])
    timer.trainer = t
    t.remove_callback(PrinterCallback)
    schedules.meta_gradients = spy
    try:
        t.train()
    finally:
        schedules.meta_gradients = orig
    finite = [r.finite for r, _ in results]
    times = timer.times[1:] or timer.times  # the first step carries warm-up
    return {
        "precision": precision,
        "device": str(t.args.device),
        "grad_scaler": t.accelerator.scaler is not None,
        "loss_scales": sorted({s for _, s in results}),
        "rates_moved": not torch.allclose(t.rates.instance, torch.ones_like(t.rates.instance)),
        "rate_min_max": [float(t.rates.instance.min()), float(t.rates.instance.max())],
        "weight_decay": t.rates.weight_decay,
        "meta_steps": len(results),
        "meta_finite_steps": sum(finite),
        "meta_skipped": len(finite) - sum(finite),
        "optimizer_steps_skipped": timer.opt_skipped,
        "step_time_ms": 1000 * sum(times) / len(times),
        "first_grad": results[0][0].example_grad.detach().double().cpu() if results else None,
        "first_finite": bool(results and results[0][0].finite),
        "first_meta_loss": results[0][0].meta_loss if results else float("nan"),
        # how the dots were taken: "verified" = per-layer products, "off" = forward mode (see layerwise_dots)
        "layerwise": t._layerwise,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: 20 on a GPU, 4 on CPU)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument(
        "--min-cos", type=float, default=0.99, help="smallest acceptable cosine vs fp32 (fp16/bf16)"
    )
    p.add_argument("--out", default="/tmp/hf_ddlr_gpu_check")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")

    cuda = torch.cuda.is_available()
    a.steps = a.steps or (20 if cuda else 4)
    print(f"torch {torch.__version__}; device: {torch.cuda.get_device_name(0) if cuda else 'CPU (no CUDA)'}")
    train = make_data(a.batch * 8, a.seq, a.vocab, seed=1)
    meta = make_data(a.batch * 2, a.seq, a.vocab, seed=2)

    rows = [run_one(prec, a, train, meta, f"{a.out}/{prec}") for prec in _precisions(cuda)]
    ok = _report(rows, a.min_cos)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def _precisions(cuda: bool) -> list[str]:
    """fp32 and whichever of bf16 / fp16 this machine runs (saying why a precision is skipped)."""
    precisions = ["fp32"]
    if cuda and not torch.cuda.is_bf16_supported():
        print("bf16: SKIPPED, this GPU does not support bfloat16.")
    else:
        precisions.append("bf16")
    if cuda:
        precisions.append("fp16")
    else:
        print("fp16: SKIPPED, fp16 with a GradScaler needs a GPU (accelerate ignores fp16=True on CPU).")
    return precisions


def _report(rows: list[dict], min_cos: float) -> bool:
    """Print one line per precision (adding its cosine vs fp32 to its row); True when every check holds."""
    ref = rows[0]["first_grad"]
    ok = True
    header = (
        f"{'precision':9} {'scaler':6} {'rates moved':11} {'meta finite':11} {'cos vs fp32':11} "
        f"{'meta skipped':12} {'opt skipped':11} {'step ms':8} {'rate min/max':15} {'wd':9} {'layerwise':9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        g = r.pop("first_grad")
        cos = float("nan")
        if g is not None and ref is not None and r["first_finite"]:
            cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
        r["cos_vs_fp32"] = cos
        good = r["meta_finite_steps"] > 0 and r["rates_moved"]
        if r["precision"] != "fp32":
            good = good and math.isfinite(cos) and cos >= min_cos
        ok = ok and good
        lo, hi = r["rate_min_max"]
        print(
            f"{r['precision']:9} {str(r['grad_scaler']):6} {str(r['rates_moved']):11} "
            f"{r['meta_finite_steps']:>4}/{r['meta_steps']:<6} {cos:11.6f} {r['meta_skipped']:12d} "
            f"{r['optimizer_steps_skipped']:11d} {r['step_time_ms']:8.1f} {lo:6.3f}/{hi:<8.3f} "
            f"{r['weight_decay']:.2e} {r['layerwise']:9}{'' if good else '  <-- FAILED'}"
        )
        if r["grad_scaler"]:
            print(f"  fp16 loss scales used by the meta step: {r['loss_scales']}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
