"""What ``torch_compile=True`` does to a MetaLR run's wall time, beside a plain ``Trainer`` compiled the same way.

Under ``torch_compile=True`` the real forward and backward run compiled, while the meta step's own passes stay
eager and its per-example products come from forward mode (nothing can be recorded inside a compiled graph, so
the per-layer products and the reuse of the real forward's layer outputs are off). Whether compiling pays for a
MetaLR run therefore depends on the model: this measures it on the whole-run benchmark's MiniLM fine-tune and
demo CNN (``benchmarks/wallclock.py``'s tasks, the same data, model and recipe), four runs per round — plain and
MetaLR (defaults), each eager and compiled, in a rotating order, each compiled run after ``torch._dynamo.reset()``
so that it compiles from scratch as a user's run does.

Two times per run: the whole ``trainer.train()`` (compilation included: what a short run costs) and the
steady state, the median time of an optimizer step after the first (the first compilation and the
recompilations for new input shapes excluded: what a long run costs per step). The rates of the compiled MetaLR run are compared with the eager run's (the rate AUROC for the
mislabelled examples and the largest difference of a rate).

    python benchmarks/torch_compile.py                      # minilm and cnn, 2 rounds (~10 min on 2 cores)
    python benchmarks/torch_compile.py --tasks cnn --rounds 3
    python benchmarks/torch_compile.py --quick              # smoke run: tiny data, 1 round, temporary output

Writes ``torch_compile.json`` and ``torch_compile.md`` to ``--output_dir`` (benchmarks/results; ``--quick``: a
temporary folder unless given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch
import transformers
from transformers import PrinterCallback, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wallclock  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("minilm", "cnn")
RUNS = ("plain", "plain compiled", "MetaLR", "MetaLR compiled")


class _StepClock(TrainerCallback):
    """The wall-clock time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.ends.append(time.perf_counter())


def fresh_inductor_cache(folder: str) -> contextlib.AbstractContextManager:
    """torch's own context for compiling from scratch: a new inductor cache folder under ``folder``, and the
    in-process caches that name files in it cleared on entry and on exit. Pointing TORCHINDUCTOR_CACHE_DIR at a
    temporary folder by hand is not enough: torch 2.7 keeps the path of the C++ prefix header it wrote there, and
    later compiles in the process (another benchmark, the test suite's) include it after the folder is gone."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache  # its newer name, then the older
    return fresh(dir=folder)


def timed_run(bench: wallclock.Bench, run: str, tmp: str) -> dict:
    """Train one freshly built trainer: whole-run seconds, steady-state ms per step, the trainer."""
    compiled = run.endswith("compiled")
    config = None if run.startswith("plain") else "defaults"
    tr = bench.build(config, os.path.join(tmp, run.replace(" ", "_")), torch_compile=compiled)
    tr.remove_callback(PrinterCallback)
    clock = _StepClock()
    tr.add_callback(clock)
    if compiled:  # compile from scratch, as a user's first run does: no in-memory or on-disk cache
        torch._dynamo.reset()
    with fresh_inductor_cache(tmp) if compiled else contextlib.nullcontext():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the Trainer's note that dynamo's speed-ups need a recent GPU
            tr.train()
        end = time.perf_counter()
    steps = len(clock.ends)
    durations = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    steady = statistics.median(durations) * 1e3 if durations else float("nan")
    return {"seconds": end - t0, "steady_ms": steady, "steps": steps, "trainer": tr}


def measure(task: str, quick: bool, rounds: int, tmp: str, log=print) -> dict:
    bench = wallclock.make_bench(task, quick, width=16, steps=16)
    times: dict[str, list[dict]] = {r: [] for r in RUNS}
    scores: dict[str, dict] = {}
    rates: dict[str, torch.Tensor] = {}
    for r in range(rounds):
        for run in RUNS[r % len(RUNS):] + RUNS[: r % len(RUNS)]:
            res = timed_run(bench, run, tmp)
            tr = res.pop("trainer")
            times[run].append(res)
            if run not in scores:
                scores[run] = bench.score(tr)
                if run.startswith("MetaLR"):
                    rates[run] = tr.rates.instance.detach().cpu().clone()
            log(f"  {task} round {r}: {run} {res['seconds']:.2f} s, {res['steady_ms']:.1f} ms/step")
    med = {run: {k: statistics.median(t[k] for t in ts) for k in ("seconds", "steady_ms")} for run, ts in times.items()}
    return {"describe": bench.describe, "runs": times, "median": med, "scores": scores,
            "max_rate_difference": float((rates["MetaLR"] - rates["MetaLR compiled"]).abs().max())}


def render(res: dict) -> str:
    lines = [f"`{res['command']}` — {res['machine']}", "",
             "Whole `trainer.train()` (compilation included) and the steady state (the median wall time of an "
             "optimizer step after the first: compilations excluded), median over rounds; each compiled run "
             "compiles from scratch (no in-memory or on-disk cache). Numbers from a shared CPU: compare within a "
             "task.", "",
             "| task | run | whole run (s) | steady state (ms/step) | ×plain, whole / steady | rate AUROC | test acc |",
             "|---|---|---|---|---|---|---|"]
    for task, t in res["tasks"].items():
        m = t["median"]
        for run in RUNS:
            base = m["plain compiled" if run.endswith("compiled") else "plain"]
            ratio = ("–" if run.startswith("plain") else
                     f"{m[run]['seconds'] / base['seconds']:.2f}× / {m[run]['steady_ms'] / base['steady_ms']:.2f}×")
            sc = t["scores"][run]
            auroc = f"{sc['rate_auroc']:.4f}" if "rate_auroc" in sc else "–"
            lines.append(f"| {task} | {run} | {m[run]['seconds']:.2f} | {m[run]['steady_ms']:.1f} | {ratio} | "
                         f"{auroc} | {sc.get('test_accuracy', float('nan')):.4f} |")
    lines.append("")
    for task, t in res["tasks"].items():
        m = t["median"]
        lines.append(f"- **{task}**: {t['describe']}. Compiled / eager, steady state: plain "
                     f"{m['plain compiled']['steady_ms'] / m['plain']['steady_ms']:.2f}×, MetaLR "
                     f"{m['MetaLR compiled']['steady_ms'] / m['MetaLR']['steady_ms']:.2f}×; the compiled MetaLR run's "
                     f"rates differ from the eager run's by at most {t['max_rate_difference']:.2g}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (the robustness matrix's 1)")
    p.add_argument("--quick", action="store_true", help="tiny data, 1 round (a smoke run)")
    p.add_argument("--output_dir", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rounds = 1 if a.quick else a.rounds
    out_dir = a.output_dir or (tempfile.mkdtemp(prefix="torch_compile_") if a.quick else os.path.join(HERE, "results"))
    os.makedirs(out_dir, exist_ok=True)
    cmd = "python benchmarks/torch_compile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"command": cmd.strip(),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {a.threads} thread(s), torch {torch.__version__}, "
                      f"transformers {transformers.__version__}",
           "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for task in a.tasks:
            print(f"{task}:")
            res["tasks"][task] = measure(task, a.quick, rounds, tmp)
    text = render(res)
    with open(os.path.join(out_dir, "torch_compile.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "torch_compile.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"written to {out_dir}")
    return res


if __name__ == "__main__":
    main()
