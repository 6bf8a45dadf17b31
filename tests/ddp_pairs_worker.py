"""Worker for the preference-pair trainers' DDP tests (tests/test_trl_reward.py, tests/test_trl_dpo.py): under
``torchrun --nproc_per_node 2``, ``MODULE.ddp_run`` — the Meta* trainer on the test's pairs (meta_lr 0.1, and 0) and
TRL's own trainer on the same pairs; every rank saves the rates and weights of each run to
``OUT/<run>_rank<r>.safetensors``. Usage: ``ddp_pairs_worker.py MODULE OUT``."""

from __future__ import annotations

import importlib
import os
import sys

import safetensors.torch
import torch


def main(module: str, out: str) -> None:
    ddp_run = importlib.import_module(module).ddp_run
    for name, kw in (("meta", dict(meta_lr=0.1)), ("zero", dict(meta_lr=0.0)), ("plain", dict(plain=True))):
        t = ddp_run(os.path.join(out, name), per_device_batch=4, **kw)
        state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in t.model.state_dict().items()}
        if not kw.get("plain"):
            state["rates.instance"] = t.rates.instance.cpu()
        safetensors.torch.save_file(state, os.path.join(out, f"{name}_rank{os.environ['RANK']}.safetensors"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
