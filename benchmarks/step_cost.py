"""Step cost of `MetaLRTrainer` against a plain `transformers.Trainer` step (time, memory, agreement).

For a CIFAR ResNet-18 (batch 64, 100 classes, random 32x32 inputs) and a small BERT classifier (hidden 128,
2 layers, seq 64, batch 32) — and on request a 4-conv BatchNorm CNN, the BERT under LoRA and a tiny Llama-style
causal LM (the tasks of ``_tasks.py``) — it measures, for every meta strategy x update mode
(jvp / finite_difference / exact / last_layer x same_step / delayed; exact only same_step; on the BERT also
"jvp/forward_mode", the default with ``layerwise_dots=False``, to show what the per-layer products save):

* **time per optimizer step** as a ratio to a plain ``Trainer`` step and to the ``"exact"`` strategy, all
  measured in the same process. Every configuration runs the *real* ``trainer.train()`` loop (same model
  init, SGD with momentum 0.9, weight decay 5e-4, same data) in its own thread; the threads are driven
  round-robin (rotated order every round) by a callback that blocks in ``on_step_end`` until it is that
  configuration's turn again, so exactly one training loop runs at any time and the timed interval is one
  full iteration of ``Trainer._inner_training_loop``: ``get_batch_samples`` (data + the same-step meta step,
  which runs *before* ``on_step_begin``), ``training_step`` (real forward/backward; the delayed meta step),
  clipping, ``optimizer.step``, scheduler, ``zero_grad`` and the callbacks. The first ``--warmup`` rounds
  are discarded; the reported time is the median over ``--rounds``.
* **working memory per step**: each configuration in its own subprocess with ``MALLOC_MMAP_THRESHOLD_=131072``
  (freed tensors go back to the OS, so RSS tracks live tensor memory); after one warm-up step, ``gc`` and
  ``malloc_trim(0)``, the high-water mark is reset through ``/proc/self/clear_refs`` and VmHWM minus the RSS
  just before is the per-step working set. Whole-process peak RSS (imports included) is reported too.
* **agreement with "exact"**: from one deep copy of the same model state (after ``--acc-warm`` plain steps,
  rate table set to U[0.5, 1.5] so the lookahead is non-uniform) every configuration does one
  ``trainer.train()`` step on the same batch and the same meta batch; ``trainer.last_meta_gradients`` is
  compared with exact's (cosine, Spearman, max relative error, weight-decay meta-gradient), every strategy in
  the optimizer's metric (``rate_metric="optimizer"``: exact's; the timed rows run the default). The tests check
  that the strategies agree on small models (tests/test_meta_engine.py, tests/test_layerwise.py); this
  measures by how much on the benchmark's full-size models (the README quotes it).

The script prints a Markdown table of what it measured (the targets these ratios are read against are in the
README's "Speed" section, not here) and writes ``benchmarks/results/step_cost_<model>.json`` and ``.md``. It
is a benchmark, not a test: the exit code is 0 unless something crashed. The tasks and trainers are those of
``_tasks.py``.

    .venv/bin/python benchmarks/step_cost.py                 # both models, ResNet width 64 (~10 min, 2 cores)
    .venv/bin/python benchmarks/step_cost.py --quick         # width 32, fewer rounds (~3 min)
    .venv/bin/python benchmarks/step_cost.py --model resnet --width 32 --rounds 8
    .venv/bin/python benchmarks/step_cost.py --model bert_lora   # the BERT under LoRA r=8 vs plain LoRA training
    .venv/bin/python benchmarks/step_cost.py --model llama       # a tiny Llama-style causal LM, seq 128
    .venv/bin/python benchmarks/step_cost.py --model llama_lora  # the same under LoRA r=8 vs plain LoRA training
    .venv/bin/python benchmarks/step_cost.py --model cnn4        # a 4-conv BatchNorm CNN, batch 64

On a machine shared with other jobs: ``--clock cpu --threads 1`` (process CPU time, robust to load), memory
separately (``--mem-only``, load-independent; then ``merge`` folds it into a ``--no-mem`` timing run). To A/B
a change to ``hf_ddlr`` without editing it, ``--patch FILE`` runs FILE (which monkeypatches the package)
first, in the memory subprocesses too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tasks import Task, configs_for, make_task, make_trainer  # noqa: E402

# wall clock by default; ``--clock cpu`` (process CPU time) is robust on a machine shared with other jobs
# when combined with ``--threads 1`` (with 2+ threads OpenMP spin-waits count as CPU time)
CLOCK = time.perf_counter
CUDA = torch.cuda.is_available()  # on a GPU: time after a synchronize, memory from the CUDA allocator


def _now() -> float:
    """CLOCK, after the GPU has finished the work queued so far (kernels run asynchronously)."""
    if CUDA:
        torch.cuda.synchronize()
    return CLOCK()


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# ---------------------------------------------------------------------------------------------- timing
class _Turnstile(TrainerCallback):
    """A TrainerCallback that lets its training loop run one optimizer step per turn."""

    def __init__(self) -> None:
        self.go = threading.Semaphore(0)
        self.done = threading.Semaphore(0)
        self.times: list[float] = []
        self.t0 = 0.0
        self.error: BaseException | None = None
        self.finished = False

    def _wait_turn(self) -> None:
        self.done.release()
        self.go.acquire()
        self.t0 = _now()

    def on_train_begin(self, args, state, control, **kw):
        self._wait_turn()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(_now() - self.t0)
        self._wait_turn()


def time_configs(
    task: Task, configs: list[str], rounds: int, warmup: int, log=print
) -> dict[str, list[float]]:
    """Per-step times (s) of every configuration, interleaved round-robin in one process."""
    total = warmup + rounds
    tmp = tempfile.mkdtemp(prefix="hf_ddlr_bench_")
    turns: dict[str, _Turnstile] = {}
    threads: dict[str, threading.Thread] = {}
    for cfg in configs:  # start one at a time: each thread sets itself up, then waits in on_train_begin
        turn = _Turnstile()
        tr = make_trainer(task, cfg, total, os.path.join(tmp, cfg.replace("/", "_")), callbacks=[turn])

        def run(tr=tr, turn=turn):
            try:
                tr.train()
            except BaseException as e:  # noqa: BLE001 - reported by the coordinator
                turn.error = e
            finally:
                turn.finished = True
                turn.done.release()

        th = threading.Thread(target=run, name=cfg, daemon=True)
        th.start()
        turn.done.acquire()
        if turn.error is not None:
            raise RuntimeError(f"{cfg}: {turn.error!r}") from turn.error
        turns[cfg], threads[cfg] = turn, th
    for r in range(total):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for cfg in order:
            turn = turns[cfg]
            turn.go.release()
            turn.done.acquire()
            if turn.error is not None:
                raise RuntimeError(f"{cfg}: {turn.error!r}") from turn.error
        if r >= warmup:
            line = "  ".join(f"{c}={turns[c].times[-1] * 1e3:.0f}" for c in configs)
            log(f"  round {r - warmup + 1}/{rounds} ms: {line}")
        else:
            log(f"  warm-up round {r + 1}/{warmup}")
    for cfg in configs:  # let every loop finish train()
        turns[cfg].go.release()
        threads[cfg].join()
        if turns[cfg].error is not None:
            raise RuntimeError(f"{cfg}: {turns[cfg].error!r}") from turns[cfg].error
    return {cfg: turns[cfg].times[warmup:] for cfg in configs}


# ---------------------------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


class _MemProbe(TrainerCallback):
    """Resets the RSS high-water mark after step 1 and reads it after the last step."""

    def __init__(self, last: int) -> None:
        self.last, self.base, self.hwm, self.times, self.t0 = last, None, None, [], None
        self.setup_hwm = 0.0

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        if self.t0 is not None:
            self.times.append(now - self.t0)
        if state.global_step == 1:
            self.setup_hwm = _status_kb("VmHWM") / 1024  # imports, set-up and the first step
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base = _status_kb("VmRSS") / 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        if state.global_step == self.last:
            self.hwm = _status_kb("VmHWM") / 1024
        self.t0 = time.perf_counter()


def mem_child(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    task = make_task(a.model, a.width, n_train=a.batch_mult * 64)
    gc.collect()
    setup = _status_kb("VmRSS") / 1024
    probe = _MemProbe(a.steps)
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(task, a.config, a.steps, tmp, callbacks=[probe])
        tr.train()
    # not ru_maxrss: Linux carries it over fork+exec, so it would report the (large) parent's RSS
    peak = max(probe.setup_hwm, probe.hwm)
    print(
        json.dumps(
            dict(
                config=a.config,
                setup_mb=setup,
                peak_rss_mb=peak,
                base_mb=probe.base,
                hwm_mb=probe.hwm,
                work_mb=probe.hwm - probe.base,
                step_s=statistics.median(probe.times),
            )
        )
    )


class _CudaMemProbe(TrainerCallback):
    """On a GPU: the allocator's peak during steps 2..last above what was allocated after step 1 (model,
    optimizer state, rate table), and the whole run's peak."""

    def __init__(self, last: int) -> None:
        self.last, self.base, self.hwm, self.times, self.t0 = last, None, None, [], None

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        now = time.perf_counter()
        if self.t0 is not None:
            self.times.append(now - self.t0)
        if state.global_step == 1:
            self.base = torch.cuda.memory_allocated() / 2**20
            self.peak_setup = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        if state.global_step == self.last:
            self.hwm = torch.cuda.max_memory_allocated() / 2**20
        self.t0 = time.perf_counter()


def measure_cuda_memory(model: str, width: int, configs: list[str], steps: int, log=print) -> dict:
    """GPU memory per configuration, one after another in this process (the allocator's statistics are exact,
    so no subprocess is needed as for RSS). Reported under the RSS keys: 'peak_rss_mb' is the GPU peak."""
    out = {}
    task = make_task(model, width, n_train=8 * 64)
    for cfg in configs:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        setup = torch.cuda.memory_allocated() / 2**20
        probe = _CudaMemProbe(steps)
        with tempfile.TemporaryDirectory() as tmp:
            tr = make_trainer(task, cfg, steps, tmp, callbacks=[probe])
            tr.train()
        out[cfg] = dict(config=cfg, setup_mb=setup, peak_rss_mb=max(probe.peak_setup, probe.hwm) - setup,
                        base_mb=probe.base, hwm_mb=probe.hwm, work_mb=probe.hwm - probe.base,
                        step_s=statistics.median(probe.times))
        del tr
        log(f"  GPU memory {cfg}: working {out[cfg]['work_mb']:.1f} MB, peak {out[cfg]['peak_rss_mb']:.0f} MB")
    return out


def measure_memory(
    model: str, width: int, configs: list[str], steps: int, threads: int, log=print, patch: str | None = None
) -> dict:
    if CUDA:
        return measure_cuda_memory(model, width, configs, steps, log=log)
    out = {}
    for cfg in configs:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "_mem",
            "--model",
            model,
            "--width",
            str(width),
            "--config",
            cfg,
            "--steps",
            str(steps),
            "--threads",
            str(threads),
        ] + (["--patch", patch] if patch else [])
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            log(f"  memory {cfg}: FAILED (rc {p.returncode})\n{p.stderr[-2000:]}")
            out[cfg] = None
            continue
        out[cfg] = json.loads(lines[-1])
        log(
            f"  memory {cfg}: working {out[cfg]['work_mb']:.1f} MB, peak RSS {out[cfg]['peak_rss_mb']:.0f} MB"
        )
    return out


# ---------------------------------------------------------------------------------------------- agreement
def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


def agreement(task: Task, configs: list[str], warm_steps: int, log=print) -> dict:
    """One step of every configuration from the same state, batch and meta batch; compare with exact."""
    tmp = tempfile.mkdtemp(prefix="hf_ddlr_acc_")
    base = task.make_model()
    if warm_steps:
        tr = make_trainer(task, "plain", warm_steps, os.path.join(tmp, "warm"), model=base)
        tr.train()
        base = tr.model
    g = torch.Generator().manual_seed(7)
    rates0 = 0.5 + torch.rand(len(task.train), generator=g)
    res = {}
    for cfg in configs:
        if cfg == "plain":
            continue
        # (the optimizer's metric for every strategy: "exact" has no other, and the strategies are compared on
        # one quantity; the default's Adam metric is tested against an independent computation in the tests)
        tr = make_trainer(task, cfg, 1, os.path.join(tmp, cfg.replace("/", "_")), model=copy.deepcopy(base),
                          meta_options={"probe_batches": 0, "rate_metric": "optimizer"})
        tr.rates.instance.copy_(rates0)
        tr.train()
        mg = tr.last_meta_gradients
        res[cfg] = dict(
            example_grad=mg.example_grad.detach().double().cpu(),
            wd=float(mg.weight_decay_grad),
            meta_loss=float(mg.meta_loss),
        )
    ref = res["exact"]
    out = {}
    for cfg, r in res.items():
        v, e = r["example_grad"], ref["example_grad"]
        out[cfg] = dict(
            cos=float(torch.nn.functional.cosine_similarity(v, e, dim=0)),
            spearman=_spearman(v, e),
            max_rel_err=float((v - e).abs().max() / e.abs().max()),
            wd_grad_rel_err=abs(r["wd"] - ref["wd"]) / max(abs(ref["wd"]), 1e-30),
            meta_loss=r["meta_loss"],
            n=int(v.numel()),
        )
        log(
            f"  agreement {cfg}: cos {out[cfg]['cos']:.7f}  spearman {out[cfg]['spearman']:.4f}  "
            f"max rel err {out[cfg]['max_rel_err']:.1e}"
        )
    return out


# ---------------------------------------------------------------------------------------------- report
def fmt_row(cfg: str, r: dict) -> str:
    def f(v, spec):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    mem = (
        f"{f(r.get('work_mb'), '.0f')} (×{f(r.get('mem_x_plain'), '.2f')})"
        if r.get("work_mb") is not None
        else "–"
    )
    peak = f"{f(r.get('peak_rss_mb'), '.0f')}" if r.get("peak_rss_mb") is not None else "–"
    return (
        f"| {cfg} | {r['time_s'] * 1e3:.0f} | {f(r.get('time_x_plain_paired'), '.2f')} | {r['time_x_plain']:.2f} | "
        f"{f(r.get('time_x_exact_paired'), '.2f')} | {mem} | {peak} | "
        f"{f(r.get('cos'), '.7f')} | {f(r.get('spearman'), '.4f')} | {f(r.get('max_rel_err'), '.1e')} |"
    )


def render(result: dict) -> str:
    lines = [
        f"### {result['model_description']}",
        "",
        f"{result['environment']}; time: median of {result['rounds']} interleaved rounds after "
        f"{result['warmup']} warm-up rounds (×plain, ×exact: median of the per-round ratios); memory: "
        f"per-step working set {'(CUDA allocator)' if result.get('device') == 'cuda' else 'in its own process'}; "
        "agreement: one step "
        f"from the same state after {result['acc_warm_steps']} plain steps, rates U[0.5, 1.5].",
        "",
        "| configuration | ms/step | time ×plain | (ratio of medians) | time ×exact | working mem MB (×plain) | "
        f"{'peak GPU MB' if result.get('device') == 'cuda' else 'peak RSS MB'} | "
        "cos vs exact | Spearman | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [fmt_row(cfg, r) for cfg, r in result["rows"].items()]
    return "\n".join(lines) + "\n"


def run_model(model: str, a: argparse.Namespace) -> dict:
    log = print
    configs = configs_for(model)
    rounds = a.rounds if a.rounds is not None else (a.resnet_rounds if model == "resnet" else a.bert_rounds)
    width = a.width
    t_start = time.time()
    task = make_task(model, width, n_train=(a.warmup + rounds + 2) * 64)
    log(f"\n== {model}: {task.describe}")
    log(f"-- timing {len(configs)} configurations, {a.warmup} warm-up + {rounds} rounds")
    times = time_configs(task, configs, rounds, a.warmup, log=log)
    log("-- agreement with exact")
    acc = agreement(task, configs, a.acc_warm, log=log)
    mem = {}
    mem_path = _base_path(a, model, width) + ".mem.json"
    if a.reuse_mem and os.path.isfile(mem_path):
        with open(mem_path) as f:
            mem = json.load(f)
        log(f"-- memory: reusing {mem_path}")
    elif not a.no_mem:
        log("-- memory (one subprocess per configuration)")
        mem = measure_memory(model, width, configs, a.mem_steps, a.threads, log=log, patch=a.patch)
    med = {c: statistics.median(v) for c, v in times.items()}
    rows = {}
    for c in configs:
        r = dict(
            time_s=med[c],
            time_x_plain=med[c] / med["plain"],
            time_x_exact=med[c] / med["exact"],
            time_iqr_s=[float(q) for q in statistics.quantiles(times[c], n=4)] if len(times[c]) > 1 else None,
            times_s=times[c],
        )
        if c in acc:
            r.update(acc[c])
        rows[c] = r
    add_paired(rows)
    add_memory(rows, mem)
    result = dict(
        model=model,
        width=width if model == "resnet" else None,
        model_description=task.describe,
        environment=_environment(),
        device="cuda" if CUDA else "cpu",
        rounds=rounds,
        warmup=a.warmup,
        acc_warm_steps=a.acc_warm,
        mem_steps=a.mem_steps,
        rows=rows,
        memory_raw=mem,
        wall_s=time.time() - t_start,
        timing_method="real trainer.train() loops in threads, driven round-robin one optimizer step per turn "
        "(on_step_end to on_step_end: get_batch_samples incl. same-step meta step, training_step, "
        "optimizer/scheduler step, callbacks)",
    )
    return result


def _environment() -> str:
    if CUDA:
        from hf_ddlr.schedules import _runs_tf32

        tf32 = {"matmuls": _runs_tf32(torch.backends.cuda.matmul, "allow_tf32"),
                "cuDNN convolutions": _runs_tf32(torch.backends.cudnn, "allow_tf32", "conv")}
        return (f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, fp32 ("
                + ", ".join(f"{k} {'TF32' if v else 'fp32'}" for k, v in tf32.items())
                + "), wall clock after a synchronize; "
                "memory: CUDA allocator (peak MB = the run's GPU peak above what was allocated before it)")
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, fp32, {'CPU-time' if CLOCK is time.process_time else 'wall'} clock")


def _base_path(a: argparse.Namespace, model: str, width: int) -> str:
    suffix = "" if model != "resnet" or width == 64 else f"_w{width}"
    return os.path.join(a.out, f"step_cost_{model}{suffix}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_argument
    sub("mode", nargs="?", default="bench", choices=["bench", "merge", "_mem"])
    sub("--model", default="all", choices=["all", "resnet", "cnn4", "bert", "bert_lora", "llama", "llama_lora"],
        help="'all': resnet and bert; cnn4: a 4-conv BatchNorm CNN at batch 64; bert_lora: the BERT under peft "
        "LoRA r=8 (plain = plain LoRA training); llama: a tiny Llama-style causal LM at seq 128; llama_lora: it under "
        "LoRA r=8")
    sub("--width", type=int, default=64, help="ResNet base width (64 = ResNet-18; 32 runs ~3x faster)")
    sub("--rounds", type=int, default=None, help="timed rounds (default: 8 for ResNet, 30 for the others)")
    sub("--resnet-rounds", type=int, default=8)
    sub("--bert-rounds", type=int, default=30)
    sub("--warmup", type=int, default=2)
    sub("--acc-warm", type=int, default=10, help="plain steps before the agreement step")
    sub("--mem-steps", type=int, default=4, help="steps per memory subprocess (the first is warm-up)")
    sub("--no-mem", action="store_true")
    sub("--mem-only", action="store_true", help="only the memory subprocesses (-> step_cost_<model>.mem.json)")
    sub("--patch", default=None, help="python file run first (monkeypatches hf_ddlr; A/B tests of changes)")
    sub("--configs", default=None, help="with --mem-only: comma-separated subset of the configurations")
    sub("--reuse-mem", action="store_true", help="take memory from step_cost_<model>.mem.json when it exists")
    sub("--quick", action="store_true", help="width 32, 4 ResNet / 12 BERT rounds, 1 warm-up, 3 memory steps")
    sub("--threads", type=int, default=2)
    sub(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="'cpu': process CPU time instead of wall time (use with --threads 1 on a busy machine)",
    )
    sub("--out", default=RESULTS)
    # internal (_mem)
    sub("--config", default="plain")
    sub("--steps", type=int, default=4)
    sub("--batch-mult", type=int, default=8)
    return p


def _merge(a: argparse.Namespace, models: list[str]) -> None:
    """Fold step_cost_<model>.mem.json into step_cost_<model>.json (a timing run with --no-mem)."""
    for model in models:
        base = _base_path(a, model, a.width)
        with open(base + ".json") as f:
            res = json.load(f)
        res.pop("targets", None)  # written by earlier versions of this script
        add_paired(res["rows"])
        if os.path.isfile(base + ".mem.json"):  # else keep the memory measured in the run itself
            with open(base + ".mem.json") as f:
                res["memory_raw"] = json.load(f)
            add_memory(res["rows"], res["memory_raw"])
        write_result(res, base)


def _mem_only(a: argparse.Namespace, models: list[str]) -> None:
    """Memory does not depend on the machine's load: run it separately, reuse it with --reuse-mem."""
    for model in models:
        configs = a.configs.split(",") if a.configs else configs_for(model)
        mem = measure_memory(model, a.width, configs, a.mem_steps, a.threads, patch=a.patch)
        with open(_base_path(a, model, a.width) + ".mem.json", "w") as f:
            json.dump(mem, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    if a.patch:  # A/B-test a change to hf_ddlr without editing it: the file monkeypatches the package
        import runpy

        runpy.run_path(a.patch)
    torch.set_num_threads(a.threads)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if a.mode == "_mem":
        with contextlib.redirect_stderr(io.StringIO()):
            mem_child(a)
        return
    if a.quick:
        a.width, a.resnet_rounds, a.bert_rounds, a.warmup, a.mem_steps = 32, 4, 12, 1, 3
    os.makedirs(a.out, exist_ok=True)
    models = ["resnet", "bert"] if a.model == "all" else [a.model]
    if a.mode == "merge":
        _merge(a, models)
    elif a.mem_only:
        _mem_only(a, models)
    else:
        for model in models:
            write_result(run_model(model, a), _base_path(a, model, a.width))


def add_paired(rows: dict) -> None:
    """Median over rounds of the per-round ratio (robust to load that changes between rounds)."""
    for r in rows.values():
        for ref, key in (("plain", "time_x_plain_paired"), ("exact", "time_x_exact_paired")):
            pairs = [t / b for t, b in zip(r["times_s"], rows[ref]["times_s"])]
            r[key] = statistics.median(pairs) if pairs else None


def add_memory(rows: dict, mem: dict) -> None:
    for c, r in rows.items():
        if mem.get(c) and mem.get("plain"):
            r.update(
                work_mb=mem[c]["work_mb"],
                peak_rss_mb=mem[c]["peak_rss_mb"],
                mem_x_plain=mem[c]["work_mb"] / mem["plain"]["work_mb"],
                peak_x_plain=mem[c]["peak_rss_mb"] / mem["plain"]["peak_rss_mb"],
            )


def write_result(res: dict, base: str) -> None:
    md = render(res)
    print("\n" + md)
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(f"wrote {base}.json and .md ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
