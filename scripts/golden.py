"""Behaviour fingerprint of MetaLRTrainer for refactors: record, then compare bit for bit.

Trains 20 small configurations (every schedule of the meta step, strategies, levels, optimizers, gradient
accumulation, BatchNorm + dropout, ...) on tests/tiny.py's model and records the final weights, rates and the
logged values. A change that must not change behaviour (a refactor, a speed-up) records again and compares:

    python scripts/golden.py record /tmp/before.pt      # on the commit before the change
    python scripts/golden.py record /tmp/after.pt       # after it
    python scripts/golden.py compare /tmp/before.pt /tmp/after.pt   # prints "identical" or the differences

Run both with the same torch build and ``OMP_NUM_THREADS=1``. ~10 s on one CPU core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny import TinyMLP, make_split  # noqa: E402
from transformers import PrinterCallback  # noqa: E402

from hf_ddlr import MetaLRConfig, MetaLRTrainer  # noqa: E402

CONFIGS = {
    "default": {},
    "class": dict(lr_level="class"),
    "both_wd": dict(lr_level="both", learn_weight_decay=True, weight_decay=0.01),
    "ga2": dict(gradient_accumulation_steps=2),
    "ga2_both": dict(gradient_accumulation_steps=2, lr_level="both"),
    "delayed": dict(meta_update="delayed"),
    "delayed_ga2": dict(meta_update="delayed", gradient_accumulation_steps=2),
    "exact": dict(meta_strategy="exact"),
    "fd_delayed": dict(meta_strategy="finite_difference", meta_update="delayed"),
    "last_layer": dict(meta_strategy="last_layer"),
    "no_layerwise": dict(layerwise_dots=False),
    "sgd_paper": dict(lookahead="sgd", meta_grad_average=0.0, meta_lr_scaling="raw", meta_lr=0.5,
                      rate_metric="optimizer"),
    "nohistory": dict(keep_history=False),
    "interval2": dict(meta_interval=2),
    "metabatch8": dict(meta_batch_size=4),
    "adamw": dict(optim="adamw_torch", learning_rate=1e-2),
    "sgdm": dict(optim="sgd", optim_args="momentum=0.9"),
    "bn_dropout": dict(_bn=True),
    "max_rate": dict(max_rate=1.2),
    "cosine_warm": dict(lr_scheduler_type="cosine", warmup_steps=3),
}

def run(kw: dict) -> dict:
    """Train one configuration; its final parameters, rate-table state and log history."""
    kw = dict(kw)
    bn = kw.pop("_bn", False)
    torch.manual_seed(0)
    model = TinyMLP(bn=bn, dropout=0.2 if bn else 0.0)
    with tempfile.TemporaryDirectory() as d:
        base = dict(output_dir=d, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                    per_device_train_batch_size=8, num_train_epochs=2, learning_rate=0.1, optim="sgd",
                    logging_steps=1)
        base.update(kw)
        args = MetaLRConfig(**base)
        t = MetaLRTrainer(model=model, args=args, train_dataset=make_split(64, seed=1, noise=0.3),
                          meta_dataset=make_split(16, seed=2))
        t.remove_callback(PrinterCallback)
        t.train()
        out = {f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()}
        for k, v in t.rates.state_dict().items() if hasattr(t, "rates") else []:
            out[f"rates.{k}"] = v.clone()
        out["log"] = [{k: v for k, v in h.items() if not k.endswith("runtime") and "per_second" not in k}
                      for h in t.state.log_history]
    return out


def compare(a_path: str, b_path: str) -> int:
    """Print every value that differs; 0 when all are bit-identical."""
    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    bad = 0
    for name in a:
        for k, x in a[name].items():
            y = b.get(name, {}).get(k)
            same = y is not None and torch.equal(x, y) if torch.is_tensor(x) else x == y
            if not same:
                bad += 1
                print("DIFF", name, k)
    print("identical" if not bad else f"{bad} differences")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("record").add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args()
    if args.cmd == "compare":
        return compare(args.a, args.b)
    warnings.filterwarnings("ignore")
    torch.save({name: run(kw) for name, kw in CONFIGS.items()}, args.out)
    print(f"recorded {len(CONFIGS)} configurations in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
