"""Run by tests/test_task_losses.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): a causal LM trained by the
plain Trainer and by MetaLRTrainer with rates that stay 1 (meta_lr=0) under DDP, whose ranks see different
numbers of target tokens. Writes, per rank, how far the two models are apart and how far training moved them."""

from __future__ import annotations

import json
import os
import sys

import test_task_losses as tasks
from ddp_worker import end_process_group
from transformers import Trainer, TrainingArguments

from hf_ddlr import MetaLRConfig, MetaLRTrainer


def main(out: str) -> None:
    task, res = "causal_lm", {}
    for across in (True, False):  # the Trainer's average_tokens_across_devices, both ways
        common = {**tasks.COMMON, "max_steps": 3, "per_device_train_batch_size": 4, "ddp_backend": "gloo",
                  "average_tokens_across_devices": across}
        plain, meta, init = tasks._model(task), tasks._model(task), tasks._model(task)
        Trainer(model=plain, args=TrainingArguments(output_dir=os.path.join(out, f"plain_{across}"), **common),
                train_dataset=tasks._data(task, 24, seed=1), data_collator=tasks._collator(task)).train()
        t = MetaLRTrainer(model=meta, args=MetaLRConfig(output_dir=os.path.join(out, f"meta_{across}"), meta_lr=0.0,
                                                        **common),
                          train_dataset=tasks._data(task, 24, seed=1), meta_dataset=tasks._data(task, 8, seed=2),
                          data_collator=tasks._collator(task))
        t.train()
        states = [m.state_dict() for m in (plain, meta, init)]
        res[f"diff_{across}"] = max(float((a - b).abs().max()) for a, b in zip(states[0].values(), states[1].values()))
        res[f"moved_{across}"] = max(float((a - b).abs().max()) for a, b in zip(states[0].values(), states[2].values()))
        res[f"plain_{across}"] = {k: v.clone() for k, v in states[0].items()}
    res["ways_differ"] = max(float((res["plain_True"][k] - res["plain_False"][k]).abs().max()) for k in res["plain_True"])
    res = {k: v for k, v in res.items() if not k.startswith("plain_")}
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({**res, "world_size": t.args.world_size}, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()
