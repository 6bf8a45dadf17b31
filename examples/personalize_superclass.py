"""Personalization to one superclass with class-level learned rates (paper §3.5).

The task: a model is trained on the whole CIFAR-100 training set, but what matters is its accuracy on the
images of one superclass (e.g. ``vehicles_1``: bicycle, bus, motorcycle, pickup truck, train), for which a
small labelled set is available (the "personal" data: ``meta_size`` images of that superclass's classes, held
out of train, class-balanced — :func:`hf_ddlr.data.make_variant` ``variant="superclass"``). Test = the test
images of that superclass, scored with the model's full (100-way) prediction. The table also reports the
accuracy on the whole test set (all classes), i.e. what the personalization costs elsewhere.

The four methods, all with the same model, schedule and budget (definitions used here; the paper's §3.5 compares
a learned class-level schedule against fixed and transfer-learning alternatives):

* ``full`` — plain training on all classes with the standard, uniform loss (no personal data used: the model
  everyone gets);
* ``biased`` — plain training on all classes with a *fixed*, hand-set loss weight on the superclass's classes,
  chosen so that its images carry half of the total weight (weight ``(#other classes) / (#superclass classes)``,
  19 for a CIFAR-100 superclass; the hand-designed counterpart of a class-level LR profile; no meta set);
* ``transfer`` — transfer learning: the ``full`` model fine-tuned on the personal (meta) set for
  ``--finetune_epochs`` epochs at ``--finetune_lr_scale`` × the learning rate;
* ``metalr`` — :class:`~hf_ddlr.MetaLRTrainer` with class-level rates (``lr_level=class``) learned online
  against the personal set as meta set: the rates of the classes that help the superclass go up, the others
  down.

Recipe on CIFAR-100: ResNet-18, batch 128, SGD momentum 0.9, learning rate 0.1, weight decay 5e-4, 60 epochs,
×0.2 at 30 / 60 / 80 % of the run. ``--dataset embedded`` runs offline on the MNIST digits (superclass
``curvy`` = digits 2, 3, 5; 90 personal images; small CNN; 8 epochs, SGD 0.05 with warm-up) — what
``scripts/make_results.py`` reports. ``--quick`` is a smoke test.

Examples::

    python examples/personalize_superclass.py --superclass vehicles_1 --output_dir outputs/personal_vehicles
    python examples/personalize_superclass.py --dataset embedded --superclass curvy
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

from hf_ddlr import MetaLRTrainer  # noqa: E402
from hf_ddlr.data import make_variant  # noqa: E402
from hf_ddlr.meta import per_example_loss  # noqa: E402

METHODS = ("biased", "full", "transfer", "metalr")


class ClassWeightedTrainer(Trainer):
    """``Trainer`` whose training loss is ``(1/N) Σ w[y_i] L_i`` with fixed class weights ``w``."""

    def __init__(self, *a, class_weights: torch.Tensor, **kw):
        super().__init__(*a, **kw)
        self.class_weights = class_weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        losses = per_example_loss(outputs.logits, labels, self.args.label_smoothing_factor)
        loss = (self.class_weights.to(losses.device)[labels] * losses).mean()
        return (loss, outputs) if return_outputs else loss


@dataclass
class PersonalOptions(common.ImageExampleOptions):
    superclass: str | None = field(default=None, metadata={
        "help": "Coarse class name (default vehicles_1 on CIFAR-100, curvy on the embedded digits)."})
    methods: str = field(default=",".join(METHODS), metadata={"help": f"Comma-separated subset of {list(METHODS)}."})
    meta_size: int | None = field(default=None, metadata={"help": "Personal (meta) images (default 250; 90 embedded)."})
    bias_weight: float | None = field(default=None, metadata={
        "help": "Loss weight of the superclass's classes for 'biased' (default: #other / #superclass classes)."})
    finetune_epochs: float = field(default=10, metadata={"help": "Epochs over the personal set for 'transfer'."})
    finetune_lr_scale: float = field(default=0.1, metadata={"help": "Fine-tuning LR = this × learning_rate."})
    lr_decay_at: str = field(default="0.3,0.6,0.8", metadata={"help": "LR steps at these fractions of the run."})
    lr_decay_factor: float = field(default=0.2, metadata={"help": "Multiplier at each LR step."})


def presets(s: PersonalOptions) -> dict:
    return common.sgd_image_presets(s, "personalize_superclass", cifar_epochs=60, lr_level="class")


def main(argv: list[str] | None = None) -> dict:
    s, config = common.parse_args(PersonalOptions, presets, argv)
    embedded = s.dataset == "embedded"
    superclass = s.superclass or ("curvy" if embedded else "vehicles_1")
    # quick: balanced over the superclass's fine classes, 10 per digit / 2 per CIFAR-100 class
    plan = common.plan_image_run(s, paper_model="resnet18", meta_size=(90, 250), quick_meta_size=(30, 10),
                                 methods=METHODS)
    raw_all = common.load_raw(s.dataset, plan.n_train, plan.n_test, config.seed)
    raw = make_variant(raw_all, "superclass", superclass=superclass, meta_size=plan.meta_size,
                       seed=config.seed)
    # the whole test set too (all classes), to see what personalization costs on the other classes
    raw["test_all"] = make_variant(raw_all, "clean", meta_size=raw_all["train"].features["fine_label"].num_classes,
                                   seed=config.seed)["test"]
    data = common.image_views(raw, s.dataset)
    targets = sorted(set(data.raw["meta"]["label"]))
    names = [data.label_names[c] for c in targets]
    common.say(f"[personal] {s.dataset}: superclass {superclass!r} = {names}; {len(data.raw['train'])} "
               f"train (all classes), {len(data.raw['meta'])} personal images, {len(data.raw['test'])} test "
               f"images of the superclass; model {plan.model_name}")
    views = {"train": data.view("train"), "test": data.view("test")}

    runs, done = [], {}
    # full before transfer, which fine-tunes it
    order = sorted(plan.methods, key=lambda m: METHODS.index(m) if m != "transfer" else len(METHODS))
    for method in order:
        common.say(f"[personal] training {method} ...")
        run = _train(method, s, config, plan, data, views, targets, done)
        all_classes = run["trainer"].evaluate(data.view("test_all"), metric_key_prefix="all")
        run["all_classes_accuracy"] = float(all_classes["all_accuracy"])
        common.say(f"[personal]   superclass: best {run['best_accuracy']:.4f}  "
                   f"final {run['final_accuracy']:.4f}; all classes {run['all_classes_accuracy']:.4f}")
        runs.append(run)

    runs.sort(key=lambda r: METHODS.index(r["method"]))
    rows = ["| method | superclass test acc (final) | best | all-classes test acc | train time (s) | notes |",
            "|---|---|---|---|---|---|"]
    for r in runs:
        note = _note(r, s, targets, len(data.raw["meta"]), data.num_labels)
        t = r["train_time_s"] + r.get("pretrain_time_s", 0)
        rows.append(f"| {r['method']} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | "
                    f"{r['all_classes_accuracy']:.4f} | {t:.0f} | {note} |")
    table = "\n".join(rows)
    payload = {"experiment": "personalize_superclass", "dataset": s.dataset, "model": plan.model_name,
               "superclass": superclass, "superclass_classes": names, "meta_size": len(data.raw["meta"]),
               "runs": [common.strip(r) for r in runs]}
    common.write_outputs(config.output_dir, "personalize_superclass", payload, table, runs)
    return payload


def _train(method: str, s: PersonalOptions, config, plan: common.ImageRun, data: common.ImageData,
           views: dict, targets: list[int], done: dict) -> dict:
    """Train one method. ``done["full"]`` keeps the full run: transfer fine-tunes it (training it first
    when it was not asked for)."""
    train, test = views["train"], views["test"]

    def fit(name: str, cls: type, args, train_set, **kw) -> dict:
        model = common.build_image_model(plan.model_name, data, config.seed)
        return common.run_one(name, common.trainer_class(cls, plan.decay, s.lr_decay_factor), model, args,
                              train_set, test, **kw)

    args = common.run_config(config, s, method, {})
    if method == "full":
        done["full"] = run = fit(method, Trainer, args, train)
    elif method == "biased":
        w = torch.ones(data.num_labels)
        w[targets] = s.bias_weight or (data.num_labels - len(targets)) / len(targets)
        run = fit(method, ClassWeightedTrainer, args, train, class_weights=w)
        run["class_weights"] = w.tolist()
    elif method == "metalr":
        args = dataclasses.replace(args, lr_level="class")
        run = fit(method, MetaLRTrainer, args, data.view("train", index=True), meta=data.view("meta"))
    else:  # transfer: the full run (trained now if it was not asked for), fine-tuned on the meta set
        if "full" not in done:
            done["full"] = fit("full", Trainer, common.run_config(config, s, "full", {}), train)
        full_run = done["full"]
        ft = dataclasses.replace(args, num_train_epochs=s.finetune_epochs, max_steps=-1, warmup_steps=0,
                                 learning_rate=args.learning_rate * s.finetune_lr_scale,
                                 lr_scheduler_type="constant", logging_steps=5)
        run = common.run_one(method, Trainer, full_run["trainer"].model, ft, data.view("meta"), test)
        run["pretrain_time_s"] = full_run["train_time_s"]
        run["pretrain_final_accuracy"] = full_run["final_accuracy"]
    return run


def _note(r: dict, s: PersonalOptions, targets: list[int], n_meta: int, num_labels: int) -> str:
    if r["method"] == "biased":
        return f"fixed loss weight {r['class_weights'][targets[0]]:.2f} on the {len(targets)} superclass classes"
    if r["method"] == "full":
        return "uniform loss, all classes"
    if r["method"] == "transfer":
        return f"full model + {s.finetune_epochs:g} epochs on the {n_meta} personal images"
    rates = r.get("class_rates")
    if not rates:
        return ""
    others = [v for c, v in enumerate(rates) if c not in targets]
    return (f"learned class rates: superclass {' / '.join(f'{rates[c]:.2f}' for c in targets)}, "
            f"other classes mean {sum(others) / max(1, len(others)):.2f}")


if __name__ == "__main__":
    main()
    common.end_distributed()
