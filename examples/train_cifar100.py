"""CIFAR-100 classification with learned learning rates (paper §3.2): ResNet-18 / VGG-16-BN, instance or class
level, with the learned weight decay (§2.3), against SGD / Adam / AdamW baselines on the same schedule.

Methods (``--methods``, comma-separated; each is trained on the same data and schedule, evaluated on the test set
after every epoch):

* ``sgd`` — ``transformers.Trainer``, SGD with momentum 0.9 (the recipe below);
* ``adam`` — Adam with coupled L2 weight decay (``torch.optim.Adam(weight_decay=...)``), learning rate 1e-3;
* ``adamw`` — AdamW (decoupled weight decay 0.05), learning rate 1e-3;
* ``metalr`` — :class:`~hf_ddlr.MetaLRTrainer` with SGD + momentum, the level given by ``--lr_level``
  (``instance`` / ``class`` / ``both``) and, by default here, ``--learn_weight_decay true``;
* ``metalr_nohistory`` — the same with rates reset to 1 after every step (``--keep_history false``, the paper's
  Table-1 ablation; ``--keep_history false`` on ``metalr`` does the same).

(The per-method learning rates / weight decays apply only when the flag is not given on the command line.)

Protocol (``--protocol``):

* ``holdout`` (default): ``meta_size`` class-balanced training images are held out as the meta set; every
  method, baselines included, trains on the remaining images.
* ``kfold``: the paper's protocol (§3.1). The training set is split into ``k`` folds; fold ``i`` learns a
  trajectory on the other folds with fold ``i`` as meta set; the ``k`` trajectories are averaged
  (:meth:`hf_ddlr.LRTrajectory.average`, instance rates mapped back through ``source_index``) and replayed
  on the *full* training set without a meta set (``replay_trajectory``). Baselines train on the full set.

Recipe (the common CIFAR-100 ResNet-18 / VGG-16 recipe; the paper's exact budget is not restated here):
batch 128, SGD momentum 0.9, learning rate 0.1, weight decay 5e-4, 200 epochs, learning rate ×0.2 at 30 / 60 /
80 % of the run (epochs 60 / 120 / 160), standard augmentation (4-pixel padded random crop, horizontal flip).
``--dataset embedded`` runs offline on the MNIST digits with the small CNN and the offline demo's budget
(8 epochs, SGD 0.05 with a 1-epoch warm-up, the same ×0.2 steps). ``--quick`` is a smoke test.

Examples::

    python examples/train_cifar100.py --model resnet18 --methods sgd,adam,adamw,metalr --output_dir outputs/c100
    python examples/train_cifar100.py --model vgg16 --methods metalr --lr_level class --keep_history false
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train_cifar100.py \\
        --model resnet18 --methods metalr --protocol kfold --k 5 --push_to_hub --hub_model_id me/r18-c100-ddlr
    python examples/train_cifar100.py --dataset embedded --methods sgd,adam,adamw,metalr
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

METHODS = ("sgd", "adam", "adamw", "metalr", "metalr_nohistory")
# method -> (trainer, defaults for flags the user did not give, values that define the method)
METHOD_SPECS = {
    "sgd": (Trainer, {}, {}),
    "adam": (Trainer, {"learning_rate": 1e-3}, {}),
    "adamw": (Trainer, {"learning_rate": 1e-3, "weight_decay": 0.05}, {"optim": "adamw_torch"}),
    "metalr": (MetaLRTrainer, {}, {}),
    "metalr_nohistory": (MetaLRTrainer, {}, {"keep_history": False}),
}


@dataclass
class TrainOptions(common.ImageExampleOptions):
    methods: str = field(default="metalr", metadata={"help": f"Comma-separated subset of {list(METHODS)}."})
    protocol: str = field(default="holdout", metadata={"choices": ["holdout", "kfold"],
                                                       "help": "holdout meta set, or the paper's k-fold + replay."})
    k: int = field(default=5, metadata={"help": "Folds of --protocol kfold."})
    meta_size: int | None = field(default=None, metadata={"help": "Held-out meta images (default 1000; 100 embedded)."})
    lr_decay_at: str = field(default="0.3,0.6,0.8", metadata={"help": "LR steps at these fractions of the run."})
    lr_decay_factor: float = field(default=0.2, metadata={"help": "Multiplier at each LR step."})


def presets(s: TrainOptions) -> dict:
    return common.sgd_image_presets(s, "train_cifar100", cifar_epochs=200, learn_weight_decay=True)


def _full_train(fold):
    """The whole training set in the variant schema, rows in source order (= the folds' ``source_index``)."""
    import datasets

    full = datasets.concatenate_datasets([fold["train"], fold["meta"]]).sort("source_index")
    full = full.remove_columns("sample_index").add_column("sample_index", list(range(len(full))))
    return datasets.DatasetDict(train=full, meta=fold["meta"], test=fold["test"])


def _make_trainer_kwargs(method: str, args) -> dict:
    if method == "adam":
        return {"optimizer_cls_and_kwargs": (torch.optim.Adam, {"lr": args.learning_rate})}
    return {}


def main(argv: list[str] | None = None) -> dict:
    s, config = common.parse_args(TrainOptions, presets, argv)
    # quick: a class-balanced meta split of 5 per digit / 1 per CIFAR-100 class
    plan = common.plan_image_run(s, paper_model="resnet18", meta_size=(100, 1000), quick_meta_size=(50, 100),
                                 methods=METHODS)
    model_name, decay = plan.model_name, plan.decay
    if s.protocol == "holdout":
        raw = common.load_variant(s.dataset, "clean", meta_size=plan.meta_size, seed=config.seed,
                                  max_train=plan.n_train, max_test=plan.n_test)
        data = common.image_views(raw, s.dataset)
        folds, stats = None, None
    else:
        from hf_ddlr.data import compute_mean_std, kfold_splits

        raw = common.load_raw(s.dataset, plan.n_train, plan.n_test, config.seed)
        folds = kfold_splits(raw, s.k, seed=config.seed)
        full = _full_train(folds[0])
        stats = None if s.dataset != "embedded" else compute_mean_std(full["train"])
        data = common.image_views(full, s.dataset, stats=stats)
    n_meta = len(data.raw["meta"]) if folds is None else f"{s.k} folds as"
    common.say(f"[cifar100] {s.dataset}: {len(data.raw['train'])} train, {n_meta} meta, "
               f"{len(data.raw['test'])} test; model {model_name}; protocol {s.protocol}")

    runs = []
    for method in plan.methods:
        base, defaults, forced = METHOD_SPECS[method]
        args = common.run_config(config, s, method, defaults, forced)
        cls = common.trainer_class(base, decay, s.lr_decay_factor)
        model = common.build_image_model(model_name, data, config.seed)
        common.say(f"[cifar100] training {method} ...")
        if base is MetaLRTrainer and folds is not None:
            run = _kfold_run(method, cls, model_name, data, folds, args, s, stats)
        elif base is MetaLRTrainer:
            run = common.run_one(method, cls, model, args, data.view("train", index=True), data.view("test"),
                                 meta=data.view("meta"))
        else:
            run = common.run_one(method, cls, model, args, data.view("train"), data.view("test"),
                                 **_make_trainer_kwargs(method, args))
        common.say(f"[cifar100]   best {run['best_accuracy']:.4f}  final {run['final_accuracy']:.4f}")
        runs.append(run)

    payload = {"experiment": "train_cifar100", "dataset": s.dataset, "model": model_name, "protocol": s.protocol,
               "lr_decay_at": list(decay), "lr_decay_factor": s.lr_decay_factor,
               "runs": [common.strip(r) for r in runs]}
    common.write_outputs(config.output_dir, "train_cifar100", payload, _table(runs), runs)
    return payload


def _table(runs: list[dict]) -> str:
    """The Markdown results table, one row per method."""
    rows = ["| method | optimizer | lr | best test acc | final test acc | learned wd | rates (mean) | time (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        a = r["trainer"].args
        opt = "Adam" if r["method"] == "adam" else str(getattr(a.optim, "value", a.optim))
        rates = (common.fmt(r.get("instance_rate_mean"), 3) if "instance_rate_mean" in r
                 else common.fmt(sum(r["class_rates"]) / len(r["class_rates"]), 3) if "class_rates" in r
                 else "–")
        wd = (common.fmt(r.get("learned_weight_decay"), 6) if "learned_weight_decay" in r
              else f"{a.weight_decay:g} (fixed)")
        rows.append(f"| {r['method']} | {opt} | {a.learning_rate:g} | {r['best_accuracy']:.4f} | "
                    f"{r['final_accuracy']:.4f} | {wd} | {rates} | {r['train_time_s']:.0f} |")
    return "\n".join(rows)


def _kfold_run(method, cls, model_name, data, folds, args, s, stats):
    """Learn one trajectory per fold, average them, replay the average on the full training set."""
    from hf_ddlr.trajectory import LRTrajectory, dataset_signature

    trajs, indices = [], []
    for i, fold in enumerate(folds):
        fd = common.image_views(fold, s.dataset, stats=stats)
        fargs = dataclasses.replace(args, output_dir=os.path.join(args.output_dir, f"fold{i}"), push_to_hub=False)
        common.say(f"[cifar100]   fold {i + 1}/{len(folds)}: learning the trajectory")
        model = common.build_image_model(model_name, fd, args.seed)
        r = common.run_one(f"{method}_fold{i}", cls, model, fargs, fd.view("train", index=True),
                           fd.view("test"), meta=fd.view("meta"))
        trajs.append(r["trainer"].lr_trajectory)
        indices.append(torch.as_tensor(fold["train"]["source_index"]))
    train = data.view("train", index=True)
    avg = LRTrajectory.average(trajs, instance_indices=indices, dataset=dataset_signature(train))
    path = os.path.join(args.output_dir, "averaged_trajectory")
    avg.save_pretrained(path)
    common.say(f"[cifar100]   replaying the average of {len(trajs)} trajectories on the full train set")
    rargs = dataclasses.replace(args, replay_trajectory=path)
    model = common.build_image_model(model_name, data, args.seed)
    run = common.run_one(method, cls, model, rargs, train, data.view("test"))
    run["protocol"] = f"kfold({len(folds)}) + replay"
    return run


if __name__ == "__main__":
    main()
    common.end_distributed()
