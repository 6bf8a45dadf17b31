"""How far apart the meta-gradient strategies are on this machine, against its own run-to-run noise.

From one state (``--warm`` plain steps of ``step_cost.py``'s task) and one batch, the per-example meta-gradients of
``exact`` twice, ``jvp`` and ``finite_difference``, each compared with the first ``exact`` (cosine, and the largest
difference relative to the largest value). On a GPU it runs once with torch's defaults (cuDNN picks possibly
non-deterministic kernels; convolutions in TF32) and once with deterministic algorithms; ``--tf32 off`` turns TF32
off for matmuls and convolutions. docs/gpu.md has the H200's numbers: there ``finite_difference`` lost the
meta-gradient under TF32 convolutions (ResNet-18 cosine 0.42–0.59) and matched it without (0.99996), which is why
the trainer now falls back to ``jvp`` there. The strategies are forced here (``finite_difference`` included) by
calling the engine through the trainer with the fallback turned off.

    python benchmarks/gpu_agreement.py --models resnet bert            # defaults, then deterministic
    CUBLAS_WORKSPACE_CONFIG=:4096:8 python benchmarks/gpu_agreement.py --models resnet --tf32 off
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import warnings
from unittest import mock

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tasks import make_task, make_trainer  # noqa: E402

import hf_ddlr.schedules as schedules  # noqa: E402


def example_grads(model_name: str, width: int, warm: int, configs: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Each configuration's per-example meta-gradients for the same state, batch, meta batch and rates."""
    task = make_task(model_name, width, n_train=(warm + 4) * 64)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(task, "plain", warm, tmp, model=task.make_model())
        trainer.train()
        base = trainer.model
    rates = 0.5 + torch.rand(len(task.train), generator=torch.Generator().manual_seed(7))
    out = []
    for cfg in configs:
        with tempfile.TemporaryDirectory() as tmp, mock.patch.object(schedules, "finite_difference_blocker",
                                                                     lambda *a: None):
            trainer = make_trainer(task, cfg, 1, tmp, model=copy.deepcopy(base))
            trainer.rates.instance.copy_(rates)
            trainer.train()
            out.append((cfg, trainer.last_meta_gradients.example_grad.detach().double().cpu()))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet", "bert"], choices=["resnet", "cnn4", "bert", "llama"])
    p.add_argument("--width", type=int, default=64, help="ResNet base width")
    p.add_argument("--warm", type=int, default=10, help="plain steps before the compared step")
    p.add_argument("--tf32", choices=["default", "off"], default="default")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_ddlr").setLevel(logging.ERROR)  # the meta-set check of every short run
    if a.tf32 == "off":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"torch {torch.__version__}, {device}, TF32 {a.tf32}")
    configs = ["exact", "exact", "jvp", "finite_difference"]
    for model_name in a.models:
        for deterministic in (False, True) if a.tf32 == "default" else (False,):
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            torch.backends.cudnn.deterministic = deterministic
            grads = example_grads(model_name, a.width, a.warm, configs)
            ref = grads[0][1]
            cells = []
            for k, (cfg, g) in enumerate(grads[1:], 1):
                cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
                rel = float((g - ref).abs().max() / ref.abs().max())
                cells.append(f"{cfg}{' again' if k == 1 else ''}: cos {cos:.7f}, max rel {rel:.1e}")
            print(f"{model_name}, {'deterministic' if deterministic else 'default'} kernels: " + "; ".join(cells))


if __name__ == "__main__":
    main()
