"""Robust learning under uniform label noise (paper §3.4): WRN-28-10 on CIFAR-100 with 20 / 40 / 60 % noise.

A clean, class-balanced meta set of 1,000 training images is held out (as in Learning to Reweight and
Meta-Weight-Net); the remaining 49,000 training labels are corrupted with uniform noise
(``hf_ddlr.data.apply_label_noise``; ``--noise_mode uniform`` draws the new label from all classes, as
MW-Net does, ``flip`` from the other classes only). Each method is trained on the same data and schedule and
evaluated on the clean test set after every epoch; the table reports the best and the final test accuracy and,
for per-example rates, how well the learned rates separate clean from noisy examples (AUROC, clean = positive)
and their mean on each group.

Methods (``--methods``, comma-separated): ``plain`` (``transformers.Trainer``), ``metalr`` (MetaLRTrainer with
the MetaLR flags given, default instance level with history), ``metalr_nohistory`` (rates reset every step:
the paper's no-history ablation, close to Learning to Reweight) and ``metalr_class`` (class-level rates).

The two published schedules (``--setting``):

* ``A`` — Learning to Reweight (Ren et al., ICML 2018, §5 "Experimental setup" for CIFAR noisy labels): SGD
  with momentum 0.9, initial learning rate 0.1, mini-batch 100; for WRN-28-10 the learning rate decays ×0.1 at
  40k and 50k steps, 60k steps in total. Weight decay 5e-4 (as in the MW-Net code; the L2RW text does not
  restate it for this table).
* ``B`` — Meta-Weight-Net (Shu et al., NeurIPS 2019, §4.1 and the authors' code
  github.com/xjtushujun/meta-weight-net): WRN-28-10 for uniform noise, SGD momentum 0.9, weight decay 5e-4,
  initial learning rate 0.1, batch 100, 1,000 clean meta images, 40 epochs with the learning rate ×0.1 after
  epochs 36 and 38 (the WRN-28-10 ``adjust_learning_rate`` of that code family; the ResNet-32 runs decay at 40
  and 50 of 60). (The MW-Net code uses Nesterov momentum; ``--optim_args momentum=0.9,nesterov=True`` if your
  transformers parses it.)

The step decays are given as fractions of the run (``--lr_decay_at``), so ``--max_steps`` / ``--num_train_epochs``
rescale them. ``--dataset embedded`` runs offline on 4,000 real MNIST digits (100 clean meta images, small CNN,
the offline demo's recipe: SGD 0.05, momentum 0.9, 1-epoch warm-up, 8 epochs) — that is what
``scripts/make_results.py`` reports. ``--quick`` is a smoke test (a few hundred examples, one epoch).

Examples::

    python examples/noisy_cifar100.py --noise_rate 0.4 --setting B --output_dir outputs/noisy40
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/noisy_cifar100.py \\
        --noise_rate 0.6 --setting A --methods metalr --push_to_hub --hub_model_id me/wrn-noisy60-metalr
    python examples/noisy_cifar100.py --dataset embedded --output_dir outputs/noisy_embedded
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

from hf_ddlr import MetaLRTrainer  # noqa: E402

METHODS = {
    "plain": (Trainer, {}),
    "metalr": (MetaLRTrainer, {}),
    "metalr_nohistory": (MetaLRTrainer, {"keep_history": False}),
    "metalr_class": (MetaLRTrainer, {"lr_level": "class"}),
}
SETTINGS = {  # (training length, LR decay points as fractions of the run)
    "A": ({"max_steps": 60_000}, (40 / 60, 50 / 60)),
    "B": ({"num_train_epochs": 40}, (36 / 40, 38 / 40)),
}


@dataclass
class NoisyOptions(common.ImageExampleOptions):
    methods: str = field(default="plain,metalr", metadata={"help": f"Comma-separated subset of {list(METHODS)}."})
    noise_rate: float = field(default=0.4, metadata={"help": "Fraction of training labels replaced (0.2/0.4/0.6)."})
    noise_mode: str = field(default="uniform", metadata={"choices": ["uniform", "flip"], "help": "See apply_label_noise."})
    meta_size: int | None = field(default=None, metadata={"help": "Clean meta images (default 1000; 100 embedded)."})
    setting: str = field(default="B", metadata={"choices": list(SETTINGS), "help": "A: L2RW schedule, B: MW-Net."})
    lr_decay_at: str | None = field(default=None, metadata={
        "help": "LR ×lr_decay_factor at these fractions of the run, comma-separated (default: the setting's)."})
    lr_decay_factor: float = field(default=0.1, metadata={"help": "Multiplier at each decay point."})
    dropout_rate: float = field(default=0.0, metadata={"help": "WRN dropout (MW-Net: 0)."})


def presets(s: NoisyOptions) -> dict:
    if s.dataset == "embedded":
        p = dict(per_device_train_batch_size=64, learning_rate=0.05, optim="sgd", optim_args="momentum=0.9",
                 weight_decay=5e-4, warmup_steps=0.125, lr_scheduler_type="constant_with_warmup", num_train_epochs=8)
    else:
        length, _ = SETTINGS[s.setting]
        if "num_train_epochs" in getattr(s, "_explicit", ()):  # the user's length replaces the setting's
            length = {"max_steps": -1}
        p = dict(per_device_train_batch_size=100, learning_rate=0.1, optim="sgd", optim_args="momentum=0.9",
                 weight_decay=5e-4, lr_scheduler_type="constant", **length)
    if s.quick:
        p.update(num_train_epochs=1, max_steps=-1)
    return common.common_presets(s, "noisy_cifar100", **p)


def main(argv: list[str] | None = None) -> dict:
    s, config = common.parse_args(NoisyOptions, presets, argv)
    embedded = s.dataset == "embedded"
    # quick: CIFAR's meta set stays class-balanced, one image per class
    plan = common.plan_image_run(s, paper_model="wrn28_10", meta_size=(100, 1000), quick_meta_size=(50, 100),
                                 methods=list(METHODS),
                                 default_decay=() if embedded else SETTINGS[s.setting][1])
    model_name, meta_size, decay = plan.model_name, plan.meta_size, plan.decay
    data = common.image_data(s.dataset, "noisy", noise_rate=s.noise_rate, noise_mode=s.noise_mode,
                             meta_size=meta_size, seed=config.seed,
                             max_train=plan.n_train, max_test=plan.n_test)
    noisy = data.noise_mask
    common.say(f"[noisy] {s.dataset}: {len(data.raw['train'])} train ({noisy.mean():.1%} wrong labels), "
               f"{len(data.raw['meta'])} clean meta, {len(data.raw['test'])} test; model {model_name}")
    runs = []
    for method in plan.methods:
        base, forced = METHODS[method]
        args = common.run_config(config, s, method, {}, forced)
        meta = base is MetaLRTrainer
        common.say(f"[noisy] training {method} ...")
        model = common.build_image_model(model_name, data, config.seed, s.dropout_rate)
        cls = common.trainer_class(base, decay, s.lr_decay_factor)
        run = common.run_one(method, cls, model, args, data.view("train", index=meta), data.view("test"),
                             meta=data.view("meta") if meta else None, noise_mask=noisy)
        common.say(f"[noisy]   best {run['best_accuracy']:.4f}  final {run['final_accuracy']:.4f}")
        runs.append(run)

    rows = ["| method | best test acc | final test acc | rate AUROC clean>noisy | mean rate clean / noisy | "
            "learned wd | train time (s) |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        sep = (f"{r['rate_clean']:.2f} / {r['rate_noisy']:.2f}" if "rate_clean" in r else "–")
        wd = common.fmt(r.get("learned_weight_decay"), 6) if "learned_weight_decay" in r else "fixed"
        auroc = common.fmt(r.get("auroc_clean_vs_noisy"), 3)
        rows.append(f"| {r['method']} | {r['best_accuracy']:.4f} | {r['final_accuracy']:.4f} | "
                    f"{auroc} | {sep} | {wd} | {r['train_time_s']:.0f} |")
    table = "\n".join(rows)
    payload = {
        "experiment": "noisy_cifar100", "dataset": s.dataset, "model": model_name, "noise_rate": s.noise_rate,
        "noise_mode": s.noise_mode, "wrong_label_fraction": float(noisy.mean()), "meta_size": meta_size,
        "setting": s.setting if not embedded else "embedded", "lr_decay_at": list(decay),
        "runs": [common.strip(r) for r in runs],
    }
    common.write_outputs(config.output_dir, "noisy_cifar100", payload, table, runs)
    return payload


if __name__ == "__main__":
    main()
    common.end_distributed()
