"""Is this CPU's channels-last 1×1 strided convolution gradient right? The sweep behind docs/speed.md's table.

oneDNN's weight gradient of a 1×1 convolution with a stride, on channels-last inputs with fewer input channels
than its channel block, writes past its workspace (uxlfoundation/oneDNN#6035): on an AVX2 AMD EPYC with
PyTorch 2.13 it crashed or returned a weight gradient 70–140 % off. ``hf_ddlr`` keeps the NCHW layout of the
meta passes for models with such a convolution (``hf_ddlr.meta.layout.unsafe_convolution``, by shape, since a
crash cannot be caught). This script measures the kernel itself, one subprocess per case so that a crash is a
row of the table rather than the end of the sweep, and says whether the shape rule covers every bad case on
this machine:

    python scripts/onednn_1x1_check.py                       # input channels 1..17, 24, 32; 1 and 2 threads
    python scripts/onednn_1x1_check.py --channels 2 4 8 --threads 1 2 4 --repeats 5

Each case: a ``Conv2d(c, 16, kernel_size=1, stride=2)`` on a batch of 8 random 16×16 images, the weight
gradient of ``sum(out * g)`` (a fixed random ``g``) in float32, channels-last and NCHW, against the same in
float64; the table shows the largest relative error over ``--repeats`` runs (a wrong kernel is not always wrong
the same way) or how the process died. A few seconds per case.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

TOLERANCE = 1e-4  # float32 against float64 on a 128-term sum: ~1e-7 when right, ~1 when wrong


def _one_case(channels: int, repeats: int) -> dict[str, float]:
    """The largest relative error of the weight gradient in both layouts over ``repeats`` draws (runs in the
    subprocess; the thread count is set by its environment)."""
    import torch

    worst = {"nchw": 0.0, "channels_last": 0.0}  # NCHW first: it is measured even where channels-last crashes
    for seed in range(repeats):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, channels, 16, 16, generator=g, dtype=torch.float64)
        w = torch.randn(16, channels, 1, 1, generator=g, dtype=torch.float64)
        up = torch.randn(8, 16, 8, 8, generator=g, dtype=torch.float64)

        def weight_grad(x: torch.Tensor, w: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            w = w.detach().requires_grad_(True)
            out = torch.nn.functional.conv2d(x, w, stride=2)
            (out * up).sum().backward()
            return w.grad.double()

        ref = weight_grad(x, w, up)
        scale = float(ref.abs().max())
        for layout in worst:
            xf, upf = x.float(), up.float()
            if layout == "channels_last":
                xf = xf.contiguous(memory_format=torch.channels_last)
                upf = upf.contiguous(memory_format=torch.channels_last)
            err = float((weight_grad(xf, w.float(), upf) - ref).abs().max()) / scale
            worst[layout] = max(worst[layout], err)
            if layout == "nchw":
                print(json.dumps({"nchw": worst["nchw"]}), flush=True)  # survives a crash of the next pass
    return worst


def _run_case(channels: int, threads: int, repeats: int) -> dict[str, object]:
    """One case in a fresh process with ``threads`` OpenMP threads: its errors, or how it died."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--_one", str(channels), str(repeats)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"died": "timed out (300 s)"}
    if proc.returncode != 0:
        partial = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode < 0:
            try:
                how = signal.Signals(-proc.returncode).name
            except ValueError:
                how = f"signal {-proc.returncode}"
        else:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            how = f"exit {proc.returncode}: {tail[:80]}"
        return {"died": how, **(partial[-1] if partial else {})}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(result: dict[str, object], layout: str) -> str:
    if layout == "channels_last" and "died" in result:
        return f"**crash** ({result['died']})"
    if layout not in result:
        return "–"
    err = float(result[layout])  # type: ignore[arg-type]
    return f"**{err:.2g}** (wrong)" if err > TOLERANCE else f"{err:.1g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[*range(1, 18), 24, 32],
                        help="input channels of the 1x1 stride-2 convolution")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OpenMP thread counts")
    parser.add_argument("--repeats", type=int, default=3, help="random draws per case (the worst is shown)")
    parser.add_argument("--_one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(_one_case(*args._one)))
        return

    import torch
    from torch import nn
    from tqdm.auto import tqdm

    from hf_ddlr.meta.layout import channel_block, unsafe_convolution

    block = channel_block()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"hf_ddlr's channel block {block}; relative error of the weight gradient against float64, "
          f"worst of {args.repeats} draws (wrong: > {TOLERANCE:g})\n")
    header = "| input channels | hf_ddlr keeps NCHW | " + " | ".join(
        f"channels-last, {t} thread{'s' if t > 1 else ''} | NCHW, {t} thread{'s' if t > 1 else ''}"
        for t in args.threads) + " |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(args.threads)))
    uncovered = []
    for c in tqdm(args.channels, desc="channels", leave=False, file=sys.stderr):
        kept = unsafe_convolution(nn.Conv2d(c, 16, 1, stride=2)) is not None
        cells = []
        for t in args.threads:
            result = _run_case(c, t, args.repeats)
            bad = "died" in result or float(result["channels_last"]) > TOLERANCE  # type: ignore[arg-type]
            if bad and not kept:
                uncovered.append((c, t))
            cells += [_cell(result, "channels_last"), _cell(result, "nchw")]
        print(f"| {c} | {'yes' if kept else 'no'} | " + " | ".join(cells) + " |", flush=True)
    if uncovered:
        print(f"\nNOT COVERED: channels-last is wrong for {uncovered} (channels, threads) on this CPU, yet "
              "hf_ddlr would run those convolutions channels-last; please report it with this table.")
        sys.exit(1)
    print("\nEvery wrong case on this CPU is one hf_ddlr keeps in NCHW.")


if __name__ == "__main__":
    main()
