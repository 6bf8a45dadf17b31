"""Where the time of one `MetaLRTrainer` optimizer step goes: wall-clock timers around the engine phases.

Runs ``trainer.train()`` for a few steps of one configuration (the tasks of ``step_cost.py``, from
``_tasks.py``) with timers wrapped around every phase of the meta step and of the real step, and prints
milliseconds per step and the same in units of a plain Trainer step (measured just before, same process).
``--ops NAME`` adds a torch.profiler table of the top operators of one call of NAME.

    .venv/bin/python benchmarks/profile_meta_step.py --model resnet --width 32 --config jvp
    .venv/bin/python benchmarks/profile_meta_step.py --model bert --config jvp --ops meta_loss_gradient
    .venv/bin/python benchmarks/profile_meta_step.py --model resnet --width 64 --no-primal-reuse
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from transformers import Trainer, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tasks import Task, make_task, make_trainer  # noqa: E402

import hf_ddlr._batches as batches_mod  # noqa: E402
import hf_ddlr.meta.engine as engine  # noqa: E402
import hf_ddlr.meta.layerwise as layerwise  # noqa: E402
import hf_ddlr.schedules as schedules  # noqa: E402
import hf_ddlr.trainer as trainer_mod  # noqa: E402

CLOCK = time.perf_counter
PHASES: dict[str, float] = collections.defaultdict(float)
_stack: list[str] = []


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        _stack.append(name)
        t0 = CLOCK()
        try:
            return fn(*a, **k)
        finally:
            PHASES[name] += CLOCK() - t0
            _stack.pop()

    return wrapper


def install() -> None:
    for name in ("lookahead_gradient", "meta_loss_gradient", "jvp_dots", "fd_dots", "_exact", "_last_layer"):
        if hasattr(engine, name):
            setattr(engine, name, timed(f"engine.{name}", getattr(engine, name)))
    engine.lookahead = timed("engine.lookahead (theta')", engine.lookahead)
    engine.tangent = timed("engine.tangent", engine.tangent)
    engine.weight_decay_grad = timed("engine.weight_decay_grad", engine.weight_decay_grad)
    for name in ("backward", "dots", "weighted_grads"):  # per-layer products (jvp on transformers)
        setattr(layerwise.LayerTape, name, timed(f"LayerTape.{name}", getattr(layerwise.LayerTape, name)))
    internals = [  # (owner, name): the schedules' and trainer's pieces of one step; time what exists
        (schedules.MetaStepSchedule, "_meta_step"), (batches_mod.MetaSetSampler, "sample"),
        (batches_mod, "to_microbatch"), (schedules, "to_microbatch"), (trainer_mod.MetaLRTrainer, "get_batch_samples"),
        (schedules.Delayed, "after_backward"), (layerwise.LayerwiseCheck, "meta_step"),
        (schedules.SameStepFused, "_lookahead_grad"), (trainer_mod.MetaLRTrainer, "compute_loss"),
    ]
    for owner, name in internals:
        if hasattr(owner, name):
            label = getattr(owner, "__name__", str(owner)).rsplit(".", 1)[-1]
            setattr(owner, name, timed(f"{label}.{name}", getattr(owner, name)))
    schedules.meta_gradients = timed("engine.meta_gradients (total)", schedules.meta_gradients)
    trainer_mod.param_specs = timed("trainer: param_specs", trainer_mod.param_specs)
    Trainer.training_step = timed("Trainer.training_step (all of the real step)", Trainer.training_step)
    schedules.all_gather_varlen = timed("schedules: gather + rate update", schedules.all_gather_varlen)


class StepClock(TrainerCallback):
    def __init__(self):
        self.t0, self.times, self.snap = None, [], []

    def on_step_end(self, args, state, control, **kw):
        now = CLOCK()
        if self.t0 is not None:
            self.times.append(now - self.t0)
            self.snap.append(dict(PHASES))
        self.t0 = CLOCK()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet", choices=["resnet", "cnn4", "bert", "bert_lora", "llama", "llama_lora"])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--config", default="jvp")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (busy machine)"
    )
    p.add_argument(
        "--ops",
        default=None,
        help="torch.profiler table of one call of this engine / trainer / LayerTape function "
        "(e.g. jvp_dots, meta_loss_gradient, _meta_step, compute_loss)",
    )
    p.add_argument("--ops-rows", type=int, default=20)
    p.add_argument(
        "--no-primal-reuse",
        action="store_true",
        help="the forward-mode pass computes its primal values again instead of taking the real forward's "
        "conv / linear / BatchNorm outputs (the cost before that reuse, for comparison)",
    )
    a = p.parse_args(argv)
    if a.no_primal_reuse:
        schedules.record_outputs = lambda model: contextlib.nullcontext(None)
    torch.set_num_threads(a.threads)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    task = make_task(a.model, a.width, n_train=(a.steps + 2) * task_batch(a.model))
    tmp = tempfile.mkdtemp()
    # plain reference first (no wrappers installed yet)
    clock_p = StepClock()
    make_trainer(task, "plain", a.steps + 1, os.path.join(tmp, "p"), callbacks=[clock_p]).train()
    install()
    clock = StepClock()
    tr = make_trainer(task, a.config, a.steps + 1, os.path.join(tmp, "m"), callbacks=[clock])
    tr.train()
    plain = statistics.median(clock_p.times)
    step = statistics.median(clock.times)
    n = len(clock.times)
    first = clock.snap[0]
    last = clock.snap[-1]
    # phases accumulated over the timed steps (exclude what happened before the first timed step)
    ph = {k: (last.get(k, 0.0) - first.get(k, 0.0)) / max(n - 1, 1) for k in last}
    print(
        f"\n{a.model} ({'w' + str(a.width) if a.model == 'resnet' else ''}) {a.config}"
        f"{' without primal reuse' if a.no_primal_reuse else ''}: "
        f"plain step {plain * 1e3:.0f} ms, meta step {step * 1e3:.0f} ms = {step / plain:.2f}x plain"
    )
    print("| phase | ms/step | × plain step |\n|---|---|---|")
    for k, v in sorted(ph.items(), key=lambda kv: -kv[1]):
        if v > 0:
            print(f"| {k} | {v * 1e3:.1f} | {v / plain:.2f} |")
    if a.ops:
        print_ops(task, a.config, a.ops, a.ops_rows, os.path.join(tmp, "o"))


def print_ops(task: Task, config: str, name: str, rows: int, out_dir: str) -> None:
    """torch.profiler table of the second call (the first one is cold) of the engine / trainer function
    ``name`` in a 3-step run of ``config``."""
    from torch.profiler import ProfilerActivity, profile

    owners = (engine, schedules.MetaStepSchedule, layerwise.LayerTape, trainer_mod.MetaLRTrainer)
    owner = next((o for o in owners if hasattr(o, name)),
                 trainer_mod.MetaLRTrainer)
    orig = getattr(owner, name)
    prof = profile(activities=[ProfilerActivity.CPU])
    calls = {"n": 0}

    def profiled(*x, **k):
        calls["n"] += 1
        if calls["n"] != 2:
            return orig(*x, **k)
        with prof:
            return orig(*x, **k)

    setattr(owner, name, profiled)
    make_trainer(task, config, 3, out_dir).train()
    if calls["n"] < 2:  # e.g. jvp_dots on a model that takes the per-layer products
        print(f"\n{name} was called {calls['n']} time(s) in 3 steps of {config}: nothing to profile")
        return
    print(f"\ntorch.profiler, one call of {name} ({config}):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def task_batch(model):
    return 64 if model == "resnet" else 32


if __name__ == "__main__":
    main()
