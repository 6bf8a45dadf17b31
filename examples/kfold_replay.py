"""The paper's protocol for final numbers (§3.1): learn on k folds, average, replay on the full train set.

Each fold holds out 1/k of the train set as its meta set and learns a learning-rate trajectory with
MetaLRTrainer. The k trajectories are averaged (per example over the folds that trained on it) and the
average is replayed on the *full* train set with the same schedule and no meta set. A plain Trainer on
the same schedule is the baseline. Writes results.json, each fold's trajectory (fold_<i>/), the averaged
trajectory (+ plots, averaged_trajectory/), the replayed model with its trajectory (replay/) and the plain
model (plain/); with --push_to_hub, uploads the replayed model together with the trajectory and a model card.

Offline (embedded MNIST digits, small CNN, the offline demo's recipe: SGD 0.05 + momentum, 1-epoch warm-up then
a constant LR, 8 epochs, as noisy_cifar100.py's --dataset embedded):
    python examples/kfold_replay.py --dataset embedded --output_dir outputs/kfold --k 3
CIFAR-100 from the Hub, ResNet-18, on GPUs:
    accelerate launch examples/kfold_replay.py --dataset cifar100 --model resnet18 --k 5 \
        --num_train_epochs 200 --learning_rate 0.1 --output_dir outputs/kfold_cifar
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
from accelerate import PartialState
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

from hf_ddlr import MetaLRConfig, MetaLRTrainer  # noqa: E402
from hf_ddlr.data import (  # noqa: E402
    CIFAR100_MEAN,
    CIFAR100_STD,
    compute_mean_std,
    kfold_splits,
    make_transform,
)
from hf_ddlr.trajectory import LRTrajectory, dataset_signature  # noqa: E402


@dataclass
class ScriptArguments:
    dataset: str = field(default="embedded", metadata={"help": "'embedded' (offline MNIST digits) or 'cifar100' (Hub)."})
    model: str = field(default="auto", metadata={"help": "'small_cnn', 'resnet18' or 'auto' (small_cnn offline).",
                                                  "choices": ["auto", "small_cnn", "resnet18"]})
    k: int = field(default=3, metadata={"help": "Number of folds."})
    quick: bool = field(default=False, metadata={"help": "Tiny budget (600 train / 200 test images drawn "
                                                           "class-balanced, 1 epoch) for tests."})


def presets(s: ScriptArguments) -> dict:
    """The image examples' SGD recipe (the offline demo's on the embedded digits); no evaluation set and no
    checkpoints: the script evaluates the replay and the plain run on the test split at the end."""
    p = {**common.sgd_image_presets(s, "kfold_replay", cifar_epochs=200), "eval_strategy": "no", "save_strategy": "no"}
    if s.dataset == "embedded":  # the demo's schedule (without it, the Trainer's linear decay to 0)
        p["lr_scheduler_type"] = "constant_with_warmup"
    return p


def _materialize(split: datasets.Dataset, to_tensor) -> datasets.Dataset:
    cols = to_tensor(split.select_columns(["img", "label", "sample_index"])[:])
    shape = tuple(cols["pixel_values"][0].shape)
    cols["pixel_values"] = torch.stack(cols["pixel_values"]).numpy()
    feats = datasets.Features({"pixel_values": datasets.Array3D(shape, "float32"), "label": split.features["label"],
                               "sample_index": datasets.Value("int64")})
    return datasets.Dataset.from_dict(cols, features=feats).with_format("torch")


def _model(name: str, num_labels: int, channels: int, size: int, seed: int):
    from hf_ddlr.models import (
        CifarResNetConfig,
        CifarResNetForImageClassification,
        SmallCNNConfig,
        SmallCNNForImageClassification,
    )

    torch.manual_seed(seed)
    if name == "resnet18":
        return CifarResNetForImageClassification(CifarResNetConfig(num_channels=channels, num_labels=num_labels))
    return SmallCNNForImageClassification(
        SmallCNNConfig(num_channels=channels, image_size=size, channels=[16, 32], num_labels=num_labels)
    )


def _load(script: ScriptArguments, args: MetaLRConfig) -> tuple[datasets.DatasetDict, list]:
    """The raw splits (labels as ``label``, with ``sample_index``) and the k folds; --quick draws 600 train and
    200 test images class-balanced (the splits are in class order: a first-600 cut would hold two digits)."""
    raw = common.load_raw(script.dataset, *((600, 200) if script.quick else (None, None)), seed=args.seed)
    folds = kfold_splits(raw, script.k, seed=args.seed)  # fold i: train = other folds, meta = fold i
    raw = datasets.DatasetDict({
        k: v.rename_column("fine_label", "label").add_column("sample_index", list(range(len(v))))
        for k, v in raw.items()
    })
    return raw, folds


def _fold_trajectories(folds: list, args: MetaLRConfig, make_model, to_tensor, is_main: bool):
    """One learned trajectory per fold, and the fold's train rows as indices into the full train set."""
    trajectories, indices = [], []
    for i, fold in enumerate(folds):
        if is_main:
            print(f"[kfold] fold {i + 1}/{len(folds)}: {len(fold['train'])} train, {len(fold['meta'])} meta",
                  flush=True)
        # dataclasses.replace, not to_dict(): to_dict() masks hub_token as "<HUB_TOKEN>"
        fold_args = dataclasses.replace(args, output_dir=os.path.join(args.output_dir, f"fold_{i}"),
                                        push_to_hub=False, report_to=[])
        trainer = MetaLRTrainer(
            model=make_model(), args=fold_args,
            train_dataset=_materialize(fold["train"], to_tensor), meta_dataset=_materialize(fold["meta"], to_tensor),
        )
        trainer.train()
        if is_main:  # the fold's own trajectory beside the average, to compare folds (hf-ddlr show fold_i)
            trainer.lr_trajectory.save_pretrained(fold_args.output_dir)
        trajectories.append(trainer.lr_trajectory)
        indices.append(torch.as_tensor(fold["train"]["source_index"]))
    return trajectories, indices


def main() -> dict:
    script, args = common.parse_args(ScriptArguments, presets)
    if args.replay_trajectory:
        raise SystemExit("kfold_replay.py learns the k folds' trajectories and replays their average itself; "
                         "--replay_trajectory does not apply here. To replay a saved trajectory on the embedded digits, "
                         "pass it to examples/noisy_cifar100.py --replay_trajectory DIR (same --seed as the run "
                         "that learned it).")
    raw, folds = _load(script, args)
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if script.dataset == "cifar100" else compute_mean_std(raw["train"])
    to_tensor = make_transform(augment=False, mean=mean, std=std)
    full_train, test = _materialize(raw["train"], to_tensor), _materialize(raw["test"], to_tensor)
    num_labels = raw["train"].features["label"].num_classes
    channels, size = full_train[0]["pixel_values"].shape[0], full_train[0]["pixel_values"].shape[-1]
    model_name = script.model if script.model != "auto" else ("small_cnn" if script.dataset == "embedded" else "resnet18")
    args.remove_unused_columns = False
    out_dir = args.output_dir
    is_main = PartialState().is_main_process  # every rank runs this script under accelerate launch

    def make_model():
        return _model(model_name, num_labels, channels, size, args.seed)

    # 1. learn one trajectory per fold
    trajectories, indices = _fold_trajectories(folds, args, make_model, to_tensor, is_main)

    # 2. average them, indexed by the full train set
    averaged = LRTrajectory.average(trajectories, instance_indices=indices, dataset=dataset_signature(full_train))
    if is_main:
        averaged.save_pretrained(os.path.join(out_dir, "averaged_trajectory"))
        averaged.save_plots(os.path.join(out_dir, "averaged_trajectory"))

    # 3. replay on the full train set (no meta set) and compare with a plain Trainer on the same schedule
    def evaluate(trainer: Trainer) -> float:
        pred = trainer.predict(test.remove_columns("sample_index"))
        return float((pred.predictions.argmax(-1) == pred.label_ids).mean())

    replay_args = dataclasses.replace(args, output_dir=os.path.join(out_dir, "replay"), report_to=[],
                                      replay_trajectory=averaged)
    replay = MetaLRTrainer(model=make_model(), args=replay_args, train_dataset=full_train)
    replay.train()
    replay.save_model()  # model + the replayed trajectory
    plain_kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    plain = Trainer(model=make_model(),
                    args=TrainingArguments(**{**plain_kw, "output_dir": os.path.join(out_dir, "plain"),
                                              "push_to_hub": False, "report_to": []}),
                    train_dataset=full_train.remove_columns("sample_index"))
    plain.train()
    plain.save_model()  # the baseline's model, as the replay's
    result = {"k": script.k, "dataset": script.dataset, "model": model_name,
              "replay_test_accuracy": evaluate(replay), "plain_test_accuracy": evaluate(plain),
              "averaged_summary": averaged.summary()}
    if is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "averaged_summary"}, indent=2))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    if args.push_to_hub:
        replay.push_to_hub()
    return result


if __name__ == "__main__":
    main()
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()  # a gloo group left to interpreter exit can abort it
