"""The offline demo: label noise on real digits, plain Trainer vs MetaLRTrainer, same budget.

``python -m hf_ddlr.demo --output_dir outputs/demo`` (what ``make demo`` runs) trains a small CNN on the
embedded MNIST digits with 40 % of the training labels changed to another class and a small clean meta
set, once with ``transformers.Trainer`` and once with :class:`~hf_ddlr.MetaLRTrainer` (instance level),
then prints and writes a table (test accuracy, how well the learned rates separate clean from noisy
examples) and a plot of the clean vs noisy rates over training.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from transformers import Trainer, TrainingArguments

from .config import MetaLRConfig
from .trainer import MetaLRTrainer

__all__ = ["NoisyDigitsSetup", "prepare_noisy_digits", "run_noisy_experiment", "main"]


@dataclass
class NoisyDigitsSetup:
    """Everything that defines one run of the noisy-label experiment (the demo's defaults)."""

    dataset: str = "mnist"
    noise_rate: float = 0.4
    noise_mode: str = "flip"
    meta_size: int = 100
    epochs: float = 8
    batch_size: int = 64
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_ratio: float = 0.125
    channels: tuple[int, ...] = (16, 32)
    seed: int = 0
    meta: dict = field(default_factory=dict)  # extra MetaLRConfig options (meta_lr, lr_level, ...)


def prepare_noisy_digits(setup: NoisyDigitsSetup):
    """Train (noisy) / meta (clean) / test splits as tensors-producing datasets, plus the noise mask."""
    import datasets

    from .data import compute_mean_std, load_embedded, make_transform, make_variant

    raw = make_variant(
        load_embedded(setup.dataset), "noisy", noise_rate=setup.noise_rate, noise_mode=setup.noise_mode,
        meta_size=setup.meta_size, seed=setup.seed,
    )
    noisy = np.asarray(raw["train"]["is_noisy"], dtype=bool)
    mean, std = compute_mean_std(raw["train"])
    to_tensor = make_transform(augment=False, mean=mean, std=std)
    ds = datasets.DatasetDict()
    for name, split in raw.items():  # small data: decode once, keep normalised tensors
        cols = to_tensor(split.select_columns(["img", "label", "sample_index"])[:])
        feats = datasets.Features({
            "pixel_values": datasets.Array3D(tuple(cols["pixel_values"][0].shape), "float32"),
            "label": split.features["label"], "sample_index": datasets.Value("int64"),
        })
        cols["pixel_values"] = torch.stack(cols["pixel_values"]).numpy()
        ds[name] = datasets.Dataset.from_dict(cols, features=feats).with_format("torch")
    return ds, noisy


def _model(setup: NoisyDigitsSetup, num_labels: int, image_size: int):
    from .models import SmallCNNConfig, SmallCNNForImageClassification

    torch.manual_seed(setup.seed)
    cfg = SmallCNNConfig(num_channels=1, image_size=image_size, channels=list(setup.channels), num_labels=num_labels)
    return SmallCNNForImageClassification(cfg)


def _accuracy(trainer: Trainer, test) -> float:
    pred = trainer.predict(test.remove_columns("sample_index"))
    return float((pred.predictions.argmax(-1) == pred.label_ids).mean())


def run_noisy_experiment(setup: NoisyDigitsSetup, method: str, output_dir: str, data=None) -> dict:
    """Train one method ("plain" or "metalr") and return its metrics."""
    ds, noisy = data if data is not None else prepare_noisy_digits(setup)
    image_size = ds["test"][0]["pixel_values"].shape[-1]
    num_labels = ds["train"].features["label"].num_classes
    common = dict(
        output_dir=output_dir, per_device_train_batch_size=setup.batch_size, num_train_epochs=setup.epochs,
        learning_rate=setup.learning_rate, optim="sgd", optim_args=f"momentum={setup.momentum}",
        weight_decay=setup.weight_decay, warmup_steps=setup.warmup_ratio, lr_scheduler_type="constant_with_warmup",
        seed=setup.seed, data_seed=setup.seed, report_to=[], save_strategy="no", logging_steps=50,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, per_device_eval_batch_size=512,
        dataloader_num_workers=0,
    )
    model = _model(setup, num_labels, image_size)
    t0 = time.time()
    out: dict = {"method": method, "seed": setup.seed}
    if method == "plain":
        train = ds["train"].remove_columns("sample_index")  # a plain model takes no index
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=train)
        trainer.train()
    else:
        args = MetaLRConfig(**common, **setup.meta)
        trainer = MetaLRTrainer(model=model, args=args, train_dataset=ds["train"], meta_dataset=ds["meta"])
        trainer.lr_trajectory.noise_mask = torch.as_tensor(noisy)  # plots and summary split clean / noisy
        trainer.train()
        out["weight_decay"] = float(trainer.rates.weight_decay)
        if trainer.rates.instance is not None:
            r = trainer.rates.instance.detach().cpu().numpy()
            out["auroc"] = float(roc_auc_score(~noisy, r))
            out["rate_clean"] = float(r[~noisy].mean())
            out["rate_noisy"] = float(r[noisy].mean())
        out["trajectory"] = trainer.lr_trajectory
    out["test_accuracy"] = _accuracy(trainer, ds["test"])
    out["train_time_s"] = time.time() - t0
    return out


def plot_rates(result: dict, noisy: np.ndarray, path: str) -> None:
    """Mean ± std of the learned rates of clean and noisy examples over epochs, and the final rates' means.

    The curves are the trajectory's: the rate each example was trained with in each epoch. Probes move rates
    between visits, so the final table (the results' AUROC and means) can lie below the last curve point; it is
    drawn as a marker at the end so the plot and the table agree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .trajectory.report import _band as band  # mean ± std kept within the rates' range

    traj = result["trajectory"]
    ep = traj.instance_epochs.numpy()
    R = traj.instance_rates.numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mask, name, color in ((~noisy, "clean", "tab:blue"), (noisy, "noisy", "tab:red")):
        m, s = R[:, mask].mean(1), R[:, mask].std(1)
        ax.plot(ep, m, color=color, label=f"{name} examples (n={int(mask.sum())})")
        ax.fill_between(ep, *band(R[:, mask], m, s), color=color, alpha=0.2)
    if "rate_clean" in result:
        ax.scatter([ep[-1]] * 2, [result["rate_clean"], result["rate_noisy"]], marker="D", s=36, zorder=3,
                   facecolors="none", edgecolors=["tab:blue", "tab:red"], label="final rates (the results table)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learned learning-rate multiplier (as trained)")
    ax.set_title(f"Instance rates under {int(round(100 * noisy.mean()))}% label noise (mean ± std)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(plain: dict, meta: dict) -> str:
    rows = [
        "| method | test accuracy | rate AUROC clean>noisy | mean rate clean / noisy | train time (s) |",
        "|---|---|---|---|---|",
        f"| Trainer | {plain['test_accuracy']:.4f} | – | 1 / 1 | {plain['train_time_s']:.0f} |",
        f"| MetaLRTrainer (instance) | {meta['test_accuracy']:.4f} | {meta['auroc']:.3f} | "
        f"{meta['rate_clean']:.2f} / {meta['rate_noisy']:.2f} | {meta['train_time_s']:.0f} |",
    ]
    return "\n".join(rows)


def _positive(text: str) -> float:
    """``--epochs``: a number of epochs > 0 (fractions allowed)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> dict:
    d = NoisyDigitsSetup()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"These four flags are all the demo takes. The rest of the setup is fixed ({d.noise_mode} noise on "
        f"{round(100 * d.noise_rate)} percent of the labels, {d.meta_size} clean meta images, SGD lr "
        f"{d.learning_rate} with momentum {d.momentum}, batch {d.batch_size}; MetaLRTrainer with the MetaLRConfig "
        "defaults). The scripts under "
        "examples/ take every MetaLRConfig and TrainingArguments option as a flag (--meta_lr, --lr_level, "
        "--learning_rate, ...; see their --help).",
    )
    p.add_argument("--output_dir", default="outputs/demo",
                   help="Folder for results.json, results.md, the rate plot and each method's run.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the noise, the meta split, the model and the data order.")
    p.add_argument("--epochs", type=_positive, default=NoisyDigitsSetup.epochs, help="Training epochs of both runs.")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "digits"],
                   help="Embedded digits: 'mnist' (5,000 MNIST digits, 28x28) or 'digits' (scikit-learn's 1,797, 8x8).")
    a = p.parse_args(argv)
    os.makedirs(a.output_dir, exist_ok=True)
    setup = NoisyDigitsSetup(seed=a.seed, epochs=a.epochs, dataset=a.dataset)
    data = prepare_noisy_digits(setup)
    print(f"[demo] {setup.dataset}: {len(data[0]['train'])} train ({setup.noise_rate:.0%} noisy labels), "
          f"{len(data[0]['meta'])} clean meta, {len(data[0]['test'])} test")
    print("[demo] training plain Trainer ...", flush=True)
    plain = run_noisy_experiment(setup, "plain", os.path.join(a.output_dir, "plain"), data)
    print(f"[demo]   test accuracy {plain['test_accuracy']:.4f}", flush=True)
    print("[demo] training MetaLRTrainer (instance-level rates) ...", flush=True)
    meta = run_noisy_experiment(setup, "metalr", os.path.join(a.output_dir, "metalr"), data)
    print(f"[demo]   test accuracy {meta['test_accuracy']:.4f}", flush=True)
    table = format_table(plain, meta)
    print("\n" + table + "\n")
    png = os.path.join(a.output_dir, "rates_clean_vs_noisy.png")
    plot_rates(meta, data[1], png)
    meta["trajectory"].save_pretrained(os.path.join(a.output_dir, "metalr"))
    result = {"setup": {k: v for k, v in setup.__dict__.items()},
              "plain": plain, "metalr": {k: v for k, v in meta.items() if k != "trajectory"}}
    with open(os.path.join(a.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=list)
    with open(os.path.join(a.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(f"[demo] wrote {a.output_dir}/results.json, results.md and {os.path.basename(png)}")
    return result


if __name__ == "__main__":
    main()
