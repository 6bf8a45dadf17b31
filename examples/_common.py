"""Shared plumbing of the example scripts (not a public API; each script documents its own experiment).

* :func:`parse_args` — ``HfArgumentParser`` over (script options, :class:`~hf_ddlr.MetaLRConfig`), with
  per-dataset presets that apply only to the flags the user did not give.
* :func:`image_data` — CIFAR-100 variants from the Hub (on-the-fly transforms) or the embedded MNIST digits
  (decoded once into normalised tensors), as train / meta / test views with exactly the columns each consumer
  needs (``sample_index`` only where the MetaLR trainer wants it).
* :func:`build_image_model` — ResNet-18 / VGG-16-BN / WRN-28-10 / the small CNN by name.
* :func:`trainer_class` — adds a step ("multi-step") learning-rate schedule to ``Trainer`` / ``MetaLRTrainer``,
  given as fractions of the run (the published schedules are all of this form).
* :func:`plan_image_run` — model, sizes, LR steps and methods an image example's options ask for.
* :func:`run_one` — train one method, evaluate every epoch, collect best / final accuracy, rates and plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer

from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.meta.rates import INSTANCE_LEVELS

IMAGE_MODELS = ("resnet18", "vgg16", "wrn28_10", "small_cnn")


@dataclasses.dataclass
class ImageExampleOptions:
    """The options every image example shares (the script-specific ones come after them in ``--help``)."""

    dataset: str = dataclasses.field(default="cifar100", metadata={
        "help": "'cifar100' (uoft-cs/cifar100 from the Hub) or 'embedded' (offline MNIST digits).",
        "choices": ["cifar100", "embedded"]})
    model: str | None = dataclasses.field(default=None, metadata={
        "help": "Classifier: resnet18, vgg16, wrn28_10 or small_cnn (default: the script's paper model on "
        "cifar100, small_cnn on embedded).",
        "choices": list(IMAGE_MODELS)})
    quick: bool = dataclasses.field(default=False, metadata={
        "help": "Smoke test: 400 train / 200 test examples, 1 epoch."})
    max_train_samples: int | None = dataclasses.field(default=None, metadata={"help": "Subsample train (seeded)."})
    max_test_samples: int | None = dataclasses.field(default=None, metadata={"help": "Subsample test (seeded)."})


def is_main_process() -> bool:
    """True on the process that prints and writes the results (rank 0 under ``accelerate launch``/torchrun)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def end_distributed() -> None:
    """Wait for every rank, then tear the process group down: a gloo group left to the interpreter's exit can
    abort the process ("terminate called without an active exception") after the work is done."""
    from accelerate import PartialState

    state = PartialState()
    if state.use_distributed:
        state.wait_for_everyone()
    state.destroy_process_group()


def say(*args: Any) -> None:
    """``print`` on the main process only (every rank runs the script under ``accelerate launch``)."""
    if is_main_process():
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------------- arguments
def explicit_flags(argv: Sequence[str]) -> set[str]:
    """Names of the ``--flags`` present on the command line (``--a b`` and ``--a=b`` forms)."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


def wants_help(argv: Sequence[str]) -> bool:
    """Whether argparse would print the help for ``argv``: ``-h`` / ``--help`` before any ``--``."""
    for a in argv:
        if a == "--":
            return False
        if a in ("-h", "--help"):
            return True
    return False


def escape_help_percents(parser: Any) -> None:
    """Double the lone ``%`` of the parser's help texts (e.g. "95 %" in a field's help), which argparse would
    otherwise read as a format directive and fail on; ``%%`` and ``%(default)s`` stay as they are."""
    for action in parser._actions:
        if action.help:
            action.help = re.sub(r"%%|%\([^)]*\)[a-z]|%", lambda m: m.group(0) if len(m.group(0)) > 1 else "%%",
                                 action.help)


def parse_args(script_cls: type, presets: Callable[[Any], dict[str, Any]], argv: Sequence[str] | None = None,
               config_cls: type = MetaLRConfig):
    """Parse ``argv`` into ``(script_options, config)``, the config a ``config_cls`` (``MetaLRConfig``, or a TRL
    config with the meta options such as ``MetaRewardConfig``).

    ``presets(script_options)`` returns defaults for ``MetaLRConfig`` fields that depend on the script options
    (dataset, --quick, ...). They replace the dataclass defaults, so a flag on the command line always wins.

    ``-h`` / ``--help`` prints the script's options followed by every ``config_cls`` flag (MetaLR and
    ``TrainingArguments`` options), with the defaults the presets give for the other flags on the command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # no --help here: the full parser below answers it, with the config flags and their preset defaults
    first = HfArgumentParser(script_cls, allow_abbrev=False, add_help=False)
    (script,) = first.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)[:1]
    explicit = explicit_flags(argv)  # which flags the user set (presets and per-method overrides yield to them)
    script._explicit = explicit
    parser = HfArgumentParser((script_cls, config_cls), allow_abbrev=False)
    parser.set_defaults(**presets(script))
    if wants_help(argv):
        escape_help_percents(parser)
    script, config = parser.parse_args_into_dataclasses(args=argv)
    script._explicit = explicit
    return script, config


def step_decay(script: Any, default: Sequence[float]) -> tuple[float, ...]:
    """The step-decay fractions to use: ``default`` (the script's / paper's schedule), unless the user chose
    a scheduler with ``--lr_scheduler_type`` (then none, so that scheduler is the one that runs)."""
    explicit = getattr(script, "_explicit", set())
    if "lr_scheduler_type" in explicit:
        if "lr_decay_at" in explicit and default:
            raise SystemExit("--lr_scheduler_type and --lr_decay_at both set the LR schedule; pass one of them.")
        return ()
    return tuple(default)


def common_presets(script: Any, name: str, **extra: Any) -> dict[str, Any]:
    """Defaults shared by all scripts: output folder, evaluation every epoch, no checkpoints, CPU when no GPU."""
    out = dict(
        output_dir=os.path.join("outputs", name),
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=50,
        report_to="none",
        remove_unused_columns=False,  # every split below exposes exactly the columns its consumer needs
        per_device_eval_batch_size=512,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    if getattr(script, "quick", False):
        out.update(logging_steps=5)
    out.update(extra)
    return out


def sgd_image_presets(script: Any, name: str, cifar_epochs: int, **extra: Any) -> dict[str, Any]:
    """The SGD recipe of the CIFAR-100 ResNet / VGG examples: momentum 0.9, weight decay 5e-4; on CIFAR-100
    batch 128 at LR 0.1 for ``cifar_epochs`` epochs, on the embedded digits the offline demo's batch 64 at LR
    0.05 with a 1-epoch warm-up for 8 epochs; one epoch under ``--quick``. The schedule after the warm-up is the
    script's (a step decay, or the scheduler it sets). ``extra``: the script's MetaLR defaults."""
    if script.dataset == "embedded":
        p = dict(per_device_train_batch_size=64, learning_rate=0.05, warmup_steps=0.125, num_train_epochs=8)
    else:
        p = dict(per_device_train_batch_size=128, learning_rate=0.1, num_train_epochs=cifar_epochs)
    p.update(optim="sgd", optim_args="momentum=0.9", weight_decay=5e-4, **extra)
    if script.quick:
        p.update(num_train_epochs=1)
    return common_presets(script, name, **p)


def run_config(config: MetaLRConfig, script: Any, method: str, overrides: dict[str, Any],
               forced: dict[str, Any] | None = None) -> MetaLRConfig:
    """The config of one method's run: its own output sub-folder (and Hub repo), plus method defaults
    (``overrides``) for the fields the user did not set on the command line, and the values that define the
    method (``forced``, e.g. ``keep_history=False`` for the no-history ablation) whatever the command line says.

    A ``--probe_batches`` meant for the instance-level runs does not stop a comparison at a method that has no
    instance rates to probe (a class level, no history): that method runs without probes, and says so."""
    changes = {k: v for k, v in overrides.items() if k not in script._explicit}
    changes.update(forced or {})
    level = changes.get("lr_level", config.lr_level)
    history = changes.get("keep_history", config.keep_history)
    probes = changes.get("probe_batches", config.probe_batches)
    if probes and (level not in INSTANCE_LEVELS or not history):
        say(f"[{method}] --probe_batches {probes:g} does not apply to {method} (no instance rates kept between "
            "visits); it runs without probes.")
        changes["probe_batches"] = None
    changes["output_dir"] = os.path.join(config.output_dir, method)
    if config.push_to_hub:
        base = config.hub_model_id or os.path.basename(os.path.normpath(config.output_dir))
        changes["hub_model_id"] = f"{base}-{method}"
    return dataclasses.replace(config, **changes)


def parse_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def chosen_methods(value: str, known: Sequence[str]) -> list[str]:
    """The comma-separated ``--methods`` as a list; exits with the known names on an unknown one."""
    methods = parse_list(value)
    unknown = set(methods) - set(known)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(known)}.")
    return methods


@dataclasses.dataclass
class ImageRun:
    """What an image example decides from its options before it loads any data."""

    model_name: str
    meta_size: int
    n_train: int | None  # subsample sizes (None: the whole split)
    n_test: int | None
    decay: tuple[float, ...]  # step-decay fractions of the run (see step_decay)
    methods: list[str]


def plan_image_run(
    script: Any,
    *,
    paper_model: str,
    meta_size: tuple[int, int],
    quick_meta_size: tuple[int, int],
    methods: Sequence[str],
    default_decay: Sequence[float] = (),
) -> ImageRun:
    """Model, sizes, LR steps and methods of an image example's run.

    ``meta_size`` / ``quick_meta_size`` are the (embedded, cifar100) defaults of the meta set and its cap
    under ``--quick`` when ``--meta_size`` is not given (``--quick`` also takes 400 train / 200 test examples
    unless given); the model defaults to
    ``paper_model`` on CIFAR-100 and the small CNN on the embedded digits; ``--lr_decay_at`` (when the
    script has it and it is given) replaces ``default_decay``.
    """
    pick = 0 if script.dataset == "embedded" else 1
    meta = script.meta_size or meta_size[pick]
    n_train, n_test = script.max_train_samples, script.max_test_samples
    if script.quick:  # (a --meta_size given is kept, as every flag given)
        n_train, n_test = n_train or 400, n_test or 200
        meta = script.meta_size or min(meta, quick_meta_size[pick])
    given = getattr(script, "lr_decay_at", None)
    decay = step_decay(script, default_decay if given is None else [float(v) for v in parse_list(given)])
    model_name = script.model or ("small_cnn" if pick == 0 else paper_model)
    return ImageRun(model_name, meta, n_train, n_test, decay, chosen_methods(script.methods, methods))


# ---------------------------------------------------------------------------------------------- data
class ImageData:
    """Train / meta / test of one image variant; ``view(split, index)`` gives the dataset a consumer should get."""

    def __init__(self, raw, make_view: Callable[[str, bool], Any], num_channels: int, image_size: int) -> None:
        self.raw, self._make_view = raw, make_view
        self.num_channels, self.image_size = num_channels, image_size
        fine = raw["train"].features["label"]
        self.num_labels, self.label_names = fine.num_classes, list(fine.names)

    def view(self, split: str, index: bool = False):
        return self._make_view(split, index)

    @property
    def noise_mask(self) -> np.ndarray:
        return np.asarray(self.raw["train"]["is_noisy"], dtype=bool)


def _subsample(dd, n_train: int | None, n_test: int | None, seed: int):
    """At most ``n_train`` / ``n_test`` rows, drawn class-balanced (seeded), so that class-balanced meta
    splits stay possible on a small budget (``--quick`` on CIFAR-100 keeps 4 images of each class)."""
    import datasets

    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        split = dd[name]
        if not n or n >= len(split):
            out[name] = split
            continue
        labels = np.asarray(split["fine_label"], dtype=np.int64)
        rng = np.random.default_rng(seed)
        per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
        # round-robin over the classes: every class gets n // C rows (the first n % C classes one more)
        order = [rows[k] for k in range(max(len(r) for r in per_class)) for rows in per_class if k < len(rows)]
        out[name] = split.select(sorted(order[:n])).flatten_indices()
    return datasets.DatasetDict(out)


def load_variant(
    dataset: str,
    variant: str,
    *,
    noise_rate: float = 0.0,
    noise_mode: str = "uniform",
    superclass: str | None = None,
    meta_size: int = 1000,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
):
    """A :func:`hf_ddlr.data.make_variant` DatasetDict (train / meta / test) of CIFAR-100 (Hub) or the embedded
    MNIST digits (offline; optionally subsampled before the split, for smoke tests)."""
    from hf_ddlr.data import load_cifar100, make_variant

    kw = dict(noise_rate=noise_rate, noise_mode=noise_mode, superclass=superclass, meta_size=meta_size, seed=seed)
    if variant != "superclass":
        kw.pop("superclass")
    if dataset == "cifar100" and not (max_train or max_test):
        return load_cifar100(variant, **kw)
    return make_variant(load_raw(dataset, max_train, max_test, seed), variant, **kw)


def load_raw(dataset: str, max_train: int | None = None, max_test: int | None = None, seed: int = 0):
    """The raw CIFAR-100-schema DatasetDict (train / test) of ``dataset``, optionally subsampled (seeded)."""
    import datasets

    from hf_ddlr.data import CIFAR100_REPO_ID, load_embedded

    if dataset == "cifar100":
        raw = datasets.load_dataset(CIFAR100_REPO_ID)  # the call load_cifar100 makes
    elif dataset == "embedded":
        raw = load_embedded("mnist")
    else:
        raise ValueError(f"unknown dataset {dataset!r}; use 'cifar100' (Hub) or 'embedded' (offline MNIST digits).")
    return _subsample(raw, max_train, max_test, seed)


def image_views(raw, dataset: str, augment: bool = True, stats=None) -> ImageData:
    """Views of a variant's splits for the trainers.

    ``dataset="cifar100"``: on-the-fly transforms (standard augmentation on train, CIFAR-100 statistics).
    ``dataset="embedded"``: decoded once into normalised tensors (no augmentation: the digits are small and not
    flip-symmetric). ``stats=(mean, std)`` overrides the statistics (default: CIFAR-100's / the train split's).
    """
    import datasets

    from hf_ddlr.data import CIFAR100_MEAN, CIFAR100_STD, compute_mean_std, make_transform

    if dataset == "cifar100":
        mean, std = stats or (CIFAR100_MEAN, CIFAR100_STD)

        def make_view(split: str, index: bool):
            cols = ["img", "label"] + (["sample_index"] if index else [])
            fn = make_transform(augment=augment and split == "train", mean=mean, std=std, crop_padding=4, flip=True)
            ds = raw[split] if index else raw[split].remove_columns("sample_index")
            return ds.with_transform(fn, columns=cols)

        return ImageData(raw, make_view, num_channels=3, image_size=32)

    mean, std = stats or compute_mean_std(raw["train"])
    to_tensor = make_transform(augment=False, mean=mean, std=std)
    tensors = {}
    for name, split in raw.items():  # small data: decode once, keep normalised tensors
        cols = to_tensor(split.select_columns(["img", "label", "sample_index"])[:])
        feats = datasets.Features({
            "pixel_values": datasets.Array3D(tuple(cols["pixel_values"][0].shape), "float32"),
            "label": split.features["label"], "sample_index": datasets.Value("int64"),
            "is_noisy": datasets.Value("bool"),
        })
        cols["pixel_values"] = torch.stack(cols["pixel_values"]).numpy()
        cols["is_noisy"] = split["is_noisy"]
        tensors[name] = datasets.Dataset.from_dict(cols, features=feats)

    def make_view(split: str, index: bool):
        cols = ["pixel_values", "label"] + (["sample_index"] if index else [])
        return tensors[split].with_format("torch", columns=cols)

    return ImageData(raw, make_view, num_channels=1, image_size=int(np.asarray(tensors["train"][0]["pixel_values"]).shape[-1]))


def image_data(dataset: str, variant: str, *, augment: bool = True, **kw) -> ImageData:
    """:func:`load_variant` + :func:`image_views`."""
    return image_views(load_variant(dataset, variant, **kw), dataset, augment=augment)


# ---------------------------------------------------------------------------------------------- models
def build_image_model(name: str, data: ImageData, seed: int, dropout_rate: float = 0.0):
    """A freshly initialised classifier (seeded) for ``data``'s channels, size and labels."""
    from hf_ddlr.models import (
        CifarResNetConfig,
        CifarResNetForImageClassification,
        CifarVGGConfig,
        CifarVGGForImageClassification,
        SmallCNNConfig,
        SmallCNNForImageClassification,
        WideResNetConfig,
        WideResNetForImageClassification,
    )

    labels = dict(
        num_labels=data.num_labels,
        id2label=dict(enumerate(data.label_names)),
        label2id={n: i for i, n in enumerate(data.label_names)},
    )
    torch.manual_seed(seed)
    if name == "resnet18":
        return CifarResNetForImageClassification(CifarResNetConfig(num_channels=data.num_channels, **labels))
    if name == "vgg16":
        return CifarVGGForImageClassification(CifarVGGConfig(num_channels=data.num_channels, **labels))
    if name == "wrn28_10":
        cfg = WideResNetConfig(num_channels=data.num_channels, dropout_rate=dropout_rate, **labels)
        return WideResNetForImageClassification(cfg)
    if name == "small_cnn":
        cfg = SmallCNNConfig(num_channels=data.num_channels, image_size=data.image_size, channels=[16, 32], **labels)
        return SmallCNNForImageClassification(cfg)
    raise ValueError(f"unknown model {name!r}; choose one of {IMAGE_MODELS}.")


# ---------------------------------------------------------------------------------------------- schedule
class _StepSchedule:
    """Linear warm-up (the args' warmup_steps) then the LR times ``factor`` after each milestone fraction."""

    lr_decay_at: tuple[float, ...] = ()
    lr_decay_factor: float = 0.1

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.lr_decay_at:
            warm = self.args.get_warmup_steps(num_training_steps)
            milestones = [int(round(f * num_training_steps)) for f in self.lr_decay_at]
            factor = self.lr_decay_factor

            def multiplier(step: int) -> float:
                w = step / warm if step < warm else 1.0
                return w * factor ** sum(step >= m for m in milestones)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, multiplier)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's card lists ``lr_scheduler_type`` from the args, which this schedule replaces."""
        super().create_model_card(*args, **kwargs)
        path = os.path.join(self.args.output_dir, "README.md")
        if self.lr_decay_at and self.is_world_process_zero() and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            steps = ", ".join(f"{x:g}" for x in self.lr_decay_at)
            text = re.sub(r"^- lr_scheduler_type: .*$",
                          f"- lr_scheduler_type: step decay (x{self.lr_decay_factor:g} at {steps} of the run, "
                          "after the warm-up)", text, count=1, flags=re.M)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)


def trainer_class(base: type[Trainer], lr_decay_at: Sequence[float] = (), lr_decay_factor: float = 0.1) -> type:
    """``base`` with a step schedule: LR ×``lr_decay_factor`` at each fraction of the run in ``lr_decay_at``
    (e.g. ``(2/3, 5/6)`` = 40k and 50k of 60k steps). Empty: the args' ``lr_scheduler_type`` as usual."""
    if not lr_decay_at:
        return base
    bad = [f for f in lr_decay_at if not 0 < f < 1]
    if bad:
        raise ValueError(f"lr_decay_at takes fractions of the run in (0, 1), got {bad}.")
    return type(f"{base.__name__}StepLR", (_StepSchedule, base),
                {"lr_decay_at": tuple(lr_decay_at), "lr_decay_factor": lr_decay_factor})


# ---------------------------------------------------------------------------------------------- runs
def accuracy_metric(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def eval_curve(trainer: Trainer) -> tuple[list[float], list[float]]:
    """(epochs, test accuracies) of every evaluation during training."""
    pts = [(h["epoch"], h["eval_accuracy"]) for h in trainer.state.log_history if "eval_accuracy" in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def meta_set(args: MetaLRConfig, meta: Any, method: str) -> Any:
    """The meta set a MetaLR run learns its rates on, or None when ``--replay_trajectory`` replays learned rates
    instead (a trainer takes one or the other)."""
    if meta is not None and getattr(args, "replay_trajectory", None):
        say(f"[{method}] replaying {args.replay_trajectory} (--replay_trajectory) instead of learning rates on the "
            "meta set")
        return None
    return meta


def run_one(
    method: str,
    trainer_cls: type[Trainer],
    model,
    args: MetaLRConfig,
    train,
    test,
    meta=None,
    noise_mask: np.ndarray | None = None,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Train one run, evaluate on ``test`` every epoch (and at the end), and describe it as a JSON-able dict.

    ``meta`` given: a :class:`~hf_ddlr.MetaLRTrainer` run (``trainer_cls`` must be one); its learned rates,
    trajectory summary and plots are added. With ``args.push_to_hub`` the run is pushed (MetaLR runs: model,
    ``lr_trajectory.*``, plots and model card).
    """
    kwargs = dict(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy_metric)
    if meta is not None:
        kwargs["meta_dataset"] = meta_set(args, meta, method)
    kwargs.update(trainer_kwargs)
    trainer = trainer_cls(**kwargs)
    t0 = time.time()
    trainer.train()
    train_time = time.time() - t0
    epochs, accs = eval_curve(trainer)  # before the final evaluate(), which would repeat the last epoch's point
    final = trainer.evaluate()
    out: dict[str, Any] = {
        "method": method,
        "seed": args.seed,
        "final_accuracy": float(final["eval_accuracy"]),
        "best_accuracy": float(max(accs)) if accs else float(final["eval_accuracy"]),
        "curve": {"epoch": epochs, "accuracy": accs},
        "train_time_s": round(train_time, 1),
        "train_size": len(train),
    }
    if isinstance(trainer, MetaLRTrainer) and trainer.rates is not None:
        out.update(rate_summary(trainer.rates, args, noise_mask))
    save_and_push(trainer, args, out)
    out["trainer"] = trainer
    return out


def save_and_push(trainer: Trainer, args: Any, out: dict[str, Any]) -> None:
    """What every example does with a trained run: for a learning run, the trajectory's summary (into ``out``) and
    its plots; the model (with ``lr_trajectory.{safetensors,json}``) where this process saves; the Hub push when
    asked (one repo per method, the trajectory and its card with it)."""
    trajectory = trainer.lr_trajectory if isinstance(trainer, MetaLRTrainer) else None
    if trajectory is not None:
        out["trajectory_summary"] = trajectory.summary()
    if args.should_save:
        trainer.save_model()
        if trajectory is not None:
            out["plots"] = trajectory.save_plots(args.output_dir)
    if args.push_to_hub:
        trainer.push_to_hub()


def rate_summary(rates, args: MetaLRConfig, noise_mask: np.ndarray | None) -> dict[str, Any]:
    """The learned weight decay, class rates and instance-rate mean of a MetaLR run's ``rates``; with a noise
    mask (and history), how well the instance rates separate clean from noisy examples."""
    out: dict[str, Any] = {}
    if args.learn_weight_decay:
        out["learned_weight_decay"] = float(rates.weight_decay)
    if rates.per_class is not None:
        out["class_rates"] = [round(float(v), 4) for v in rates.per_class.cpu()]
    if rates.instance is not None:
        inst = rates.instance.detach().cpu().numpy()
        out["instance_rate_mean"] = float(inst.mean())
        if noise_mask is not None and 0 < noise_mask.mean() < 1 and args.keep_history:
            # (without history the table only holds the last step's values: no separation to report)
            from sklearn.metrics import roc_auc_score

            out["auroc_clean_vs_noisy"] = float(roc_auc_score(~noise_mask, inst))
            out["rate_clean"] = float(inst[~noise_mask].mean())
            out["rate_noisy"] = float(inst[noise_mask].mean())
    return out


def run_pair_trainer(trainer: Trainer, args: Any, method: str, flipped: np.ndarray,
                     scores: Callable[[dict[str, float]], dict[str, float]]) -> dict[str, Any]:
    """Train and evaluate one preference-pair run and describe it: its ``scores`` of the final evaluation's
    metrics, the training time, the pair rates' separation for a learning run (:func:`pair_rate_summary`), saved
    and pushed as every example's run (:func:`save_and_push`)."""
    t0 = time.time()
    trainer.train()
    metrics = trainer.evaluate()
    out = {"method": method, "seed": args.seed, "train_time_s": round(time.time() - t0, 1), **scores(metrics)}
    if method == "metalr":
        out.update(pair_rate_summary(trainer, flipped))
    save_and_push(trainer, args, out)
    return out


def pair_rate_summary(trainer: Any, flipped: np.ndarray) -> dict[str, float]:
    """How a preference trainer's pair rates separate the pairs in their given order from the flipped ones: the
    AUROC (unflipped above flipped) and the mean rate of each kind; empty when the pairs are all of one kind."""
    if not 0 < flipped.sum() < len(flipped):
        return {}
    from sklearn.metrics import roc_auc_score

    rates = trainer.rates.instance.detach().cpu().numpy().astype(np.float64)
    return {"rate_auroc": float(roc_auc_score(~flipped, rates)), "rate_unflipped": float(rates[~flipped].mean()),
            "rate_flipped": float(rates[flipped].mean())}


def pair_rate_cells(run: dict[str, Any]) -> str:
    """The table cells of :func:`pair_rate_summary`: ``AUROC | unflipped / flipped``, dashes without them."""
    if "rate_auroc" not in run:
        return "– | –"
    return f"{run['rate_auroc']:.3f} | {run['rate_unflipped']:.2f} / {run['rate_flipped']:.2f}"


def strip(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "trainer"}


def mean_std(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=float)
    if len(v) == 0 or np.all(np.isnan(v)):
        return "–"
    return f"{np.nanmean(v):.4f} ± {np.nanstd(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"


def fmt(x: Any, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_outputs(output_dir: str, name: str, payload: dict[str, Any], table: str,
                  runs: list[dict[str, Any]] | None = None) -> None:
    """``<name>_results.json``, ``<name>_results.md`` and, given the ``runs``' curves, ``<name>_accuracy.png``
    (test accuracy per epoch), written and printed by the main process only."""
    if not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{name}_results.json"), "w") as f:
        json.dump(payload, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    with open(os.path.join(output_dir, f"{name}_results.md"), "w") as f:
        f.write(table + "\n")
    written = [f"{name}_results.json", f"{name}_results.md"]
    if runs is not None:
        plot_curves(runs, os.path.join(output_dir, f"{name}_accuracy.png"), title=name)
        written.append(f"{name}_accuracy.png")
    print("\n" + table + "\n")
    print(f"[{name}] wrote {output_dir}/{', '.join(written)}")


def plot_curves(runs: list[dict[str, Any]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        c = run.get("curve") or {}
        if c.get("epoch"):
            ax.plot(c["epoch"], c["accuracy"], marker="o", ms=3, label=run["method"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
