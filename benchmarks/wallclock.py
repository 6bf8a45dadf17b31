"""Whole-run wall time of `MetaLRTrainer` against a plain `transformers.Trainer` on real fine-tunes.

``step_cost.py`` times one optimizer step of benchmark models; this times the whole ``trainer.train()`` call
(data loading, the meta batch, the meta step, the real step, callbacks, bookkeeping), where every fixed cost
of the meta step shows on a small model. Tasks:

* ``minilm``: all-MiniLM-L6-v2 sentiment fine-tune on the VADER lexicon (the robustness matrix's
  ``vader-minilm-ft-flip30`` pipeline: AdamW 5e-5, batch 32, seq <= 16, 30 % flipped labels), 600 train /
  20 meta examples, 2 epochs (the cell's recipe, the same 38 steps as one epoch over 1,200);
* ``cnn``: the demo CNN on embedded MNIST (the robustness matrix's ``mnist-cnn-sgdm-flip35``, the demo's
  recipe: SGD momentum 0.9, batch 64), 1 epoch;
* ``resnet``: the CIFAR ResNet-18 (``hf_ddlr.models``) at base width ``--width`` on synthetic CIFAR-sized data
  (``_tasks.make_task("resnet")``: 100 classes, batch 64, SGD momentum 0.9), ``--resnet-steps`` steps;
* ``sft``: the causal-LM SFT of ``examples/sft_noisy_data.py`` (a tiny Llama-style decoder trained from its
  config on addition questions with wrong answers from three data sources, completion-only labels, AdamW 1e-3,
  batch 32), ``--sft-epochs`` epochs, with the example's MetaLR options (instance x source rates:
  ``lr_level="both"``, ``group_column="source"``) on top of each configuration;
* ``dpo``: DPO of the same tiny decoder on preference pairs made from that example's questions (the true sum
  chosen over a wrong one, 30 % of the pairs swapped, its meta questions as trusted pairs), ``trl.DPOTrainer``
  against ``MetaDPOTrainer``, both with the reference log-probabilities precomputed at construction (MetaDPOTrainer
  always does; DPOTrainer's default, a reference forward per batch, would add to the plain step what the other
  does once, outside ``train()``), AdamW 1e-3, batch 32, ``--dpo-epochs`` epochs.

Each round trains plain, then every MetaLR configuration (``defaults``: ``MetaLRConfig()``; ``no_probes``:
``probe_batches=0``, only the step's own examples scored — what the probes cost; ``delayed``:
``meta_update="delayed"``, the meta step from the real step's gradient; ``optimizer_metric``:
``rate_metric="optimizer"``, the products without Adam's metric — what the metric costs under SGD; ``other_classes``:
``instance_signal="other_classes"`` with the median-centred instance rates it is measured with; these two not run
unless asked with ``--configs``), each from a fresh model, in one
process; the ratio of a round is MetaLR / plain of that round and the reported ratio is the median over
rounds. After the rounds, one instrumented run per configuration gives the per-phase breakdown (wall time
per optimizer step, each phase exclusive of the phases it calls). ``--profile`` adds a cProfile table of one
MetaLR run of the first task (where the remaining Python time goes).

    python benchmarks/wallclock.py                          # all tasks, 3 rounds (~10 min on 2 cores)
    python benchmarks/wallclock.py --tasks minilm --rounds 5
    python benchmarks/wallclock.py --tasks minilm --configs defaults --rounds 0 --profile   # profile only
    python benchmarks/wallclock.py --quick                  # smoke run: tiny data, 1 round, temporary output

Writes ``wallclock.json`` and ``wallclock.md`` to ``--output_dir`` (benchmarks/results; ``--quick``: a
temporary folder unless given).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from transformers import PrinterCallback, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tasks  # noqa: E402
import robustness as rb  # noqa: E402

import hf_ddlr._batches as batches_mod  # noqa: E402
import hf_ddlr._recording as recording  # noqa: E402
import hf_ddlr.meta.engine as engine  # noqa: E402
import hf_ddlr.meta.layerwise as layerwise  # noqa: E402
import hf_ddlr.meta.rates as rates_mod  # noqa: E402
import hf_ddlr.schedules as schedules  # noqa: E402
import hf_ddlr.trainer as trainer_mod  # noqa: E402
from hf_ddlr import MetaLRConfig, MetaLRTrainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("minilm", "cnn", "resnet", "sft", "dpo")
CONFIGS: dict[str, dict] = {"defaults": {}, "no_probes": {"probe_batches": 0}, "delayed": {"meta_update": "delayed"},
                            "optimizer_metric": {"rate_metric": "optimizer"},
                            "other_classes": {"instance_signal": "other_classes", "center_instance_rates": True,
                                              "instance_rate_center": "median"}}
DEFAULT_CONFIGS = ("defaults", "no_probes", "delayed")  # those a run without --configs measures
TARGETS = {"minilm": 2.5, "cnn": 3.0, "resnet": 3.2}  # issue 15's whole-run ratios with the defaults
CELLS = {"minilm": "vader-minilm-ft-flip30", "cnn": "mnist-cnn-sgdm-flip35"}
SIZES = {"minilm": 600, "cnn": None}  # train rows used (None: the whole split)
EPOCHS = {"minilm": 2, "cnn": 1}


@dataclass
class Bench:
    """One task: ``build(config, out_dir)`` gives a fresh trainer (config None: the plain Trainer; the MiniLM and
    CNN tasks take more ``TrainingArguments`` as keywords);
    ``score(trainer)`` the rate AUROC and test accuracy of a trained one (empty when not measured)."""

    name: str
    describe: str
    build: Callable[[str | None, str], Trainer]
    score: Callable[[Trainer], dict]


def _robustness_bench(task: str, quick: bool) -> Bench:
    """MiniLM/VADER or the demo CNN on MNIST, through the robustness matrix's data, model and recipe."""
    cell = rb.CELL_BY_NAME[CELLS[task]]
    ds, noisy = rb.load_data(cell, seed=0, quick=quick)
    n = SIZES[task]
    if n is not None and not quick and len(ds["train"]) > n:
        ds["train"], noisy = rb._reindex(ds["train"], np.arange(n)), noisy[:n]
    image_size = 0 if cell.model == "minilm" else int(ds["test"][0]["pixel_values"].shape[-1])
    collate = transformers.DataCollatorWithPadding(rb._tokenizer()) if cell.model == "minilm" else None

    epochs = 1 if quick else EPOCHS[task]

    def build(config: str | None, out_dir: str, **args_extra) -> Trainer:
        kw = {**rb.training_args(cell, 0, out_dir, quick), "num_train_epochs": epochs, **args_extra}
        model = rb.build_model(cell, 0, image_size)
        if config is None:
            return Trainer(model=model, args=TrainingArguments(**kw), data_collator=collate,
                           train_dataset=ds["train"].remove_columns("sample_index"))
        return MetaLRTrainer(model=model, args=MetaLRConfig(**kw, **CONFIGS[config]), data_collator=collate,
                             train_dataset=ds["train"], meta_dataset=ds["meta"])

    def score(trainer: Trainer) -> dict:
        logits, y = rb._predict(trainer, ds["test"])
        out = {"test_accuracy": float((logits.argmax(1) == y).mean())}
        if isinstance(trainer, MetaLRTrainer):
            out.update(rb._rate_metrics(trainer, noisy, np.asarray(ds["train"]["label"])))
        return out

    describe = (f"{cell.name} (robustness matrix), {len(ds['train'])} train / {len(ds['meta'])} meta, "
                f"batch {rb.RECIPES[cell.recipe].batch_size}, {rb.RECIPES[cell.recipe].optim}, "
                f"{epochs} epoch(s)")
    return Bench(task, describe, build, score)


def _resnet_bench(width: int, steps: int) -> Bench:
    task = _tasks.make_task("resnet", width, n_train=steps * 64)
    names = {None: "plain", "defaults": "jvp", "no_probes": "jvp", "delayed": "jvp/delayed", "optimizer_metric": "jvp",
             "other_classes": "jvp"}

    def build(config: str | None, out_dir: str) -> Trainer:
        extra = {k: v for k, v in CONFIGS.get(config, {}).items() if k != "meta_update"}  # (the name sets it)
        return _tasks.make_trainer(task, names[config], steps, out_dir, meta_options=extra)

    return Bench("resnet", f"{task.describe}, {steps} steps", build, lambda trainer: {})


def _sft_bench(quick: bool, epochs: float) -> Bench:
    """The SFT example's data, model and recipe (seed 0); score: held-out exact-match and, for MetaLR, the AUROC
    of the instance rates for the wrong answers."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
    import sft_noisy_data as sft

    s = sft.SFTOptions(quick=quick)
    tok = sft.char_tokenizer()
    data = sft.make_data(s, 0)
    corrupted = np.array([r["is_corrupted"] for r in data["train"]], dtype=bool)
    train, meta = sft.to_dataset(tok, data["train"], extra=("source",)), sft.to_dataset(tok, data["meta"])
    # The example's own recipe and MetaLR settings (sft.presets), with the benchmark's epochs and fixed seeds.
    recipe = {k: v for k, v in sft.presets(s).items() if k != "output_dir"}
    recipe.update(num_train_epochs=epochs, disable_tqdm=True, seed=0, data_seed=0)

    def build(config: str | None, out_dir: str) -> Trainer:
        model = sft.tiny_llama(s, len(tok), 0)
        if config is None:
            plain = {k: v for k, v in recipe.items() if k in TrainingArguments.__dataclass_fields__}  # no meta options
            return Trainer(model=model, args=TrainingArguments(out_dir, **plain),
                           train_dataset=train.remove_columns("source"))
        args = MetaLRConfig(out_dir, **recipe, **CONFIGS[config], lr_level="both", group_column="source")
        return MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta)

    def score(trainer: Trainer) -> dict:
        out = {"test_accuracy": sft.exact_match(trainer.model, tok, data["test"])}
        if isinstance(trainer, MetaLRTrainer):
            out["rate_auroc"] = sft.auroc(~corrupted, trainer.rates.instance.detach().cpu().numpy())
        return out

    batch = recipe["per_device_train_batch_size"]
    steps = -(-len(train) // batch)
    describe = (f"examples/sft_noisy_data.py (tiny Llama, seq {sft.SEQ_LEN}), {len(train)} train / {len(meta)} "
                f"meta, batch {batch}, adamw_torch, {epochs:g} epochs ({steps} steps each), lr_level=both by source, "
                f"the example's meta_objective={recipe.get('meta_objective', 'auto')} and "
                f"meta_grad_average_epochs={recipe.get('meta_grad_average_epochs')}; "
                "test acc: held-out exact-match")
    return Bench("sft", describe, build, score)


def _dpo_bench(quick: bool, epochs: float) -> Bench:
    """DPO on the SFT example's questions and model (seed 0); score: the test pairs' reward accuracy and, for
    MetaLR, the AUROC of the rates for the swapped pairs."""
    import datasets
    import trl

    from hf_ddlr import MetaDPOConfig, MetaDPOTrainer

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
    import sft_noisy_data as sft

    s = sft.SFTOptions(quick=quick)
    tok = sft.char_tokenizer()
    data = sft.make_data(s, 0, sources={"all": 0.0})  # every answer true: the pairs' chosen side
    rng = np.random.default_rng([0, 29])

    def pairs(rows: list[dict], swap: float) -> tuple[datasets.Dataset, np.ndarray]:
        swapped = rng.random(len(rows)) < swap
        out = []
        for r, sw in zip(rows, swapped):
            a, b = (int(x) for x in r["prompt"][:-1].split("+"))
            good, bad = r["answer"], str(sft.random_wrong_answer(rng, a, b))
            out.append({"prompt": r["prompt"], "chosen": bad if sw else good, "rejected": good if sw else bad})
        return datasets.Dataset.from_list(out), swapped

    (train, swapped), (meta, _), (test, _) = pairs(data["train"], 0.3), pairs(data["meta"], 0), pairs(data["test"], 0)
    recipe = dict(per_device_train_batch_size=32, learning_rate=1e-3, optim="adamw_torch", num_train_epochs=epochs,
                  lr_scheduler_type="linear", beta=0.1, max_length=16, report_to=[], save_strategy="no",
                  logging_steps=50, disable_tqdm=True, seed=0, data_seed=0, bf16=False, gradient_checkpointing=False,
                  use_cpu=not torch.cuda.is_available(), dataset_num_proc=None)

    def build(config: str | None, out_dir: str) -> Trainer:
        model = sft.tiny_llama(s, len(tok), 0)
        if config is None:
            return trl.DPOTrainer(model=model, train_dataset=train, eval_dataset=test, processing_class=tok,
                                  args=trl.DPOConfig(out_dir, **recipe, precompute_ref_log_probs=True))
        return MetaDPOTrainer(model=model, args=MetaDPOConfig(out_dir, **recipe, **CONFIGS[config]),
                              train_dataset=train, eval_dataset=test, meta_dataset=meta, processing_class=tok)

    def score(trainer: Trainer) -> dict:
        out = {"test_accuracy": float(trainer.evaluate()["eval_rewards/accuracies"])}
        if isinstance(trainer, MetaDPOTrainer):
            out["rate_auroc"] = sft.auroc(~swapped, trainer.rates.instance.detach().cpu().numpy())
        return out

    steps = -(-len(train) // recipe["per_device_train_batch_size"])
    describe = (f"DPO on examples/sft_noisy_data.py's questions and tiny Llama, {len(train)} pairs (30 % swapped) / "
                f"{len(meta)} trusted, batch 32, adamw_torch, {epochs:g} epoch(s) ({steps} steps each); "
                "test acc: the test pairs' reward accuracy")
    return Bench("dpo", describe, build, score)


def make_bench(task: str, quick: bool, width: int, steps: int, sft_epochs: float = 2,
               dpo_epochs: float = 1) -> Bench:
    if task == "resnet":
        return _resnet_bench(4 if quick else width, 2 if quick else steps)
    if task == "sft":
        return _sft_bench(quick, 1 if quick else sft_epochs)
    if task == "dpo":
        return _dpo_bench(quick, 1 if quick else dpo_epochs)
    return _robustness_bench(task, quick)


def train_time(bench: Bench, config: str | None, tmp: str) -> tuple[float, Trainer]:
    """Seconds of ``trainer.train()`` of a freshly built trainer (construction not counted)."""
    tr = bench.build(config, os.path.join(tmp, config or "plain"))
    tr.remove_callback(PrinterCallback)
    _sync()
    t0 = time.perf_counter()
    tr.train()
    _sync()
    return time.perf_counter() - t0, tr


def _sync() -> None:
    """Wait for the GPU's queued work, so that a timed interval ends when the work does."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- phases
# (owner, attribute, phase): every function timed by the breakdown. A phase's time excludes the timed
# functions it calls (those count to their own phase); what no timed function covers is "Trainer loop".
PHASE_FUNCTIONS: list[tuple[object, str, str]] = [
    (batches_mod.MetaSetSampler, "sample", "meta batch"),
    (schedules.SameStepFused, "_lookahead_grad", "lookahead"),
    (schedules.Delayed, "_real_gradient", "lookahead"),
    (layerwise.LayerwiseCheck, "meta_step", "lookahead"),
    (engine, "lookahead_gradient", "lookahead"),
    (engine, "lookahead", "lookahead"),
    (engine, "clip_coefficient", "lookahead"),
    (engine, "meta_loss_gradient", "meta loss"),
    (engine, "_meta_tangent", "meta loss"),
    (engine, "_dots", "dots"),
    (engine, "weight_decay_grad", "weight-decay gradient"),
    (rates_mod.RateTable, "update", "rate update"),
    (schedules, "all_gather_varlen", "rate update"),
    (schedules.Schedule, "_refresh", "rate update"),
    (Trainer, "training_step", "real step"),
    (trainer_mod.MetaLRTrainer, "training_step", "real step"),
    (schedules.SameStepFused, "loss", "real step"),
    (schedules.Schedule, "loss", "real step"),
    (schedules.Delayed, "loss", "real step"),
    (schedules.MetaStepSchedule, "_meta_step", "bookkeeping"),
    (schedules, "meta_gradients", "bookkeeping"),
    (schedules.Schedule, "_open", "bookkeeping"),
    (trainer_mod.MetaLRTrainer, "get_batch_samples", "bookkeeping"),
    (trainer_mod.MetaLRTrainer, "log", "bookkeeping"),
    (recording.TrajectoryRecorder, "on_step_end", "bookkeeping"),
    (Trainer, "get_batch_samples", "data"),
    (trainer_mod, "check_meta_set", "meta-set check"),  # once, after training (a per-run cost, shown per step)
]
PHASES = ("meta batch", "lookahead", "meta loss", "dots", "weight-decay gradient", "rate update", "real step",
          "bookkeeping", "data", "meta-set check", "Trainer loop")


class PhaseClock:
    """Exclusive wall time per phase while installed (``with PhaseClock() as clock``)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._inner: list[float] = []  # time of timed callees, per open frame
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*a, **k):
            self._inner.append(0.0)
            _sync()  # on a GPU a phase's kernels are charged to it, not to the next phase that waits
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync()
                dt = time.perf_counter() - t0
                self.total[label] += dt - self._inner.pop()
                if self._inner:
                    self._inner[-1] += dt

        return timed

    def __enter__(self) -> PhaseClock:
        for owner, name, label in PHASE_FUNCTIONS:
            if name in vars(owner):
                fn = vars(owner)[name]
                self._saved.append((owner, name, fn))
                setattr(owner, name, self._wrap(label, fn))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()


def breakdown(bench: Bench, config: str | None, tmp: str) -> dict[str, float]:
    """Milliseconds per optimizer step of every phase in one instrumented run ("Trainer loop": the rest)."""
    with PhaseClock() as clock:
        seconds, tr = train_time(bench, config, tmp)
    steps = max(tr.state.global_step, 1)
    out = {k: 1e3 * v / steps for k, v in clock.total.items()}
    out["Trainer loop"] = 1e3 * seconds / steps - sum(out.values())
    out["total"] = 1e3 * seconds / steps
    return out


def profile(bench: Bench, config: str, tmp: str, rows: int = 35) -> str:
    """cProfile of one MetaLR run: the functions with the most own time (where Python overhead hides)."""
    prof = cProfile.Profile()
    tr = bench.build(config, os.path.join(tmp, "profile"))
    tr.remove_callback(PrinterCallback)
    prof.runcall(tr.train)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- runs
def measure(bench: Bench, configs: list[str], rounds: int, tmp: str, log=print) -> dict:
    """Interleaved rounds (plain, then each MetaLR configuration; the order of the MetaLR ones rotates), the
    per-round ratios and their medians, the metrics of the first round's runs, and the breakdowns."""
    times: dict[str, list[float]] = {c: [] for c in ["plain", *configs]}
    metrics: dict[str, dict] = {}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for cfg in ["plain", *order]:
            seconds, tr = train_time(bench, None if cfg == "plain" else cfg, tmp)
            times[cfg].append(seconds)
            if cfg not in metrics:
                metrics[cfg] = bench.score(tr)
            log(f"  {bench.name} round {r}: {cfg} {seconds:.2f} s")
    out: dict = {"describe": bench.describe, "times_s": times, "metrics": metrics, "ratio": {}, "median_s": {}}
    for cfg, ts in times.items():
        out["median_s"][cfg] = statistics.median(ts) if ts else None
        if cfg != "plain" and ts:
            out["ratio"][cfg] = statistics.median(t / p for t, p in zip(ts, times["plain"]))
    out["phases_ms"] = {cfg: breakdown(bench, None if cfg == "plain" else cfg, tmp) for cfg in ["plain", *configs]}
    return out


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def render(res: dict, baseline: dict | None = None) -> str:
    """The Markdown report: the whole-run table, then per task the per-phase breakdown (ms per step)."""
    lines = [f"`{res['command']}` — {res['environment']}", "",
             "Whole `trainer.train()` wall time, plain `Trainer` and `MetaLRTrainer`, interleaved in one process "
             f"({res['rounds']} rounds); ratio: median over rounds of MetaLR / plain of the same round. Numbers "
             f"from {'one GPU' if res.get('device') == 'cuda' else 'a shared 2-core CPU: noisy'}, compare within a "
             "row.", "",
             "| task | config | plain (s) | MetaLR (s) | ratio | target (defaults) | rate AUROC | test acc |",
             "|---|---|---|---|---|---|---|---|"]
    for task, t in res["tasks"].items():
        for cfg, ratio in t["ratio"].items():
            m = t["metrics"].get(cfg, {})
            target = f"<= {TARGETS[task]}" if cfg == "defaults" and task in TARGETS else ""
            lines.append(f"| {task} | {cfg} | {_fmt(t['median_s']['plain'])} | {_fmt(t['median_s'][cfg])} | "
                         f"{ratio:.2f}x | {target} | {_fmt(m.get('rate_auroc'), '.4f')} | "
                         f"{_fmt(m.get('test_accuracy'), '.4f')} |")
    for task, t in res["tasks"].items():
        cols = list(t["phases_ms"])
        before = (baseline or {}).get("tasks", {}).get(task, {}).get("phases_ms", {}).get("defaults")
        head = [*cols, *(["defaults, before"] if before else [])]
        lines += ["", f"**{task}**: {t['describe']}. Milliseconds per optimizer step by phase (one instrumented "
                  "run each; a phase excludes the timed phases it calls):", "",
                  "| phase | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for ph in [*PHASES, "total"]:
            vals = [t["phases_ms"][c][ph] for c in cols] + ([before.get(ph)] if before else [])
            lines.append(f"| {ph} | " + " | ".join(_fmt(v, ".1f") for v in vals) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64: the standard one)")
    p.add_argument("--resnet-steps", type=int, default=16)
    p.add_argument("--sft-epochs", type=float, default=2, help="epochs of the sft task")
    p.add_argument("--dpo-epochs", type=float, default=1, help="epochs of the dpo task")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 round")
    p.add_argument("--profile", action="store_true", help="cProfile one MetaLR run of the first task")
    p.add_argument("--baseline", default=None, help="an earlier wallclock.json: its breakdown as 'before'")
    p.add_argument("--output_dir", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    rounds = 1 if a.quick else a.rounds
    out_dir = a.output_dir or (tempfile.mkdtemp(prefix="hf_ddlr_wallclock_") if a.quick else
                               os.path.join(HERE, "results"))
    tmp = tempfile.mkdtemp(prefix="hf_ddlr_wallclock_runs_")
    res: dict = {"command": "python benchmarks/wallclock.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "environment": f"{platform.machine()}, {os.cpu_count()} CPUs, {a.threads} thread(s), "
                                + (f"{torch.cuda.get_device_name(0)}, " if torch.cuda.is_available() else "")
                                + f"torch {torch.__version__}, transformers {transformers.__version__}",
                 "device": "cuda" if torch.cuda.is_available() else "cpu", "rounds": rounds, "tasks": {}}
    for task in a.tasks:
        bench = make_bench(task, a.quick, a.width, a.resnet_steps, a.sft_epochs, a.dpo_epochs)
        res["tasks"][task] = measure(bench, a.configs, rounds, tmp)
        if a.profile and task == a.tasks[0]:
            print(profile(bench, a.configs[0], tmp))
    baseline = None
    if a.baseline:
        with open(a.baseline) as f:
            baseline = json.load(f)
    md = render(res, baseline)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "wallclock.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "wallclock.md"), "w") as f:
        f.write(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
