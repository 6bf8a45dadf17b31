"""Worker for the 2-process CPU DDP tests (tests/test_distributed.py). Also importable: ``run`` is the one
definition of a training run, used unchanged by the single-process reference in the test.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT [all|parity]
    accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py OUT parity

Every rank writes ``OUT/<run>_rank<r>.safetensors`` (parameters, rates, learned weight decay, the
trajectory's tensors) and ``OUT/<run>_rank<r>.json`` (the training rows of every step's window, log
history), so the test can check that the ranks agree with each other and with one process.

The global batches are the same as one process with ``per_device_train_batch_size × world_size``:
with accelerate's default ``split_batches=False`` the sampler's batches of size ``b`` (one permutation
``randperm(n, seed + epoch)`` shared by all ranks) are dealt round-robin, so optimizer step ``t`` of a
GA=g run covers sampler batches ``[t·g·W, (t+1)·g·W)``, i.e. the same rows as one process with batch
``g·W·b``. Each rank's meta batch is the whole meta set (``meta_batch_size = len(meta set)``), so the
rank-averaged meta gradient equals the single-process one; in the ``meta_quarter`` run a quarter of it, the ranks
taking consecutive slices of one shared order, so together they are the batch of one process with half the set.
"""

from __future__ import annotations

import json
import os
import sys

import safetensors.torch
import torch
from tiny import TinyMLP, make_split
from tiny_text import text_data_splits, tiny_bert
from transformers import DataCollatorWithPadding, TrainerCallback

import hf_ddlr.meta.rows as rows_mod
from hf_ddlr import MetaLRConfig, MetaLRTrainer

N_TRAIN, N_META = 32, 8
MAX_STEPS = 6  # 4 steps per epoch at a global batch of 8: crosses an epoch boundary


def end_process_group() -> None:
    """Barrier, then destroy the process group: a gloo group left to the interpreter's exit can abort the
    process ("terminate called without an active exception", SIGABRT) after the work is done."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class _Recording(MetaLRTrainer):
    """Records the dataset rows of every optimizer step's window on this rank."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, num_items
        self.seen_rows = getattr(self, "seen_rows", [])
        self.seen_rows.append(torch.cat([mb.indices for mb in self._window]).tolist())
        return batch_samples, num_items


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def run(
    out_dir: str,
    per_device_batch: int,
    ga: int = 1,
    stop_at: int | None = None,
    resume: bool = False,
    save_steps: int | None = None,
    max_steps: int = MAX_STEPS,
    model: str = "mlp",
    instance_rate_gradient: str = "effective",
    class_rate_direction: str = "per_step",
    max_instance_rate: float | None = 1.0,
    probe_batches: float = 1.0,
    rate_metric: str = "auto",
    torch_compile: bool = False,
    meta_batch: int | None = None,
    instance_signal: str = "auto",
    center_instance_rates: bool | None = None,
) -> _Recording:
    """``model="bert"``: the tiny BERT of tiny_text.py with padding (its forward takes **kwargs: the GA/DDP
    loss-scaling trap's precondition), 32 train / 16 meta sentences; ``"bert_head"``: the same with the meta step
    on the head only (``meta_parameters="head"``) scored by the bounded meta objective (a fine-tune's default).
    ``torch_compile``: the Trainer compiles the (DDP-wrapped) model. ``meta_batch``: the meta batch per process
    (default: the whole meta set)."""
    if model in ("bert", "bert_head"):
        tok, train, meta = text_data_splits()
        extra = dict(data_collator=DataCollatorWithPadding(tok), processing_class=tok)
        net = tiny_bert()
    else:
        train, meta, extra = make_split(N_TRAIN, seed=11), make_split(N_META, seed=12), {}
        torch.manual_seed(0)
        net = TinyMLP(hidden=12)
    args = MetaLRConfig(
        output_dir=out_dir,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        optim="sgd",
        learning_rate=0.3,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        learn_weight_decay=model == "mlp",
        lr_level="both",
        instance_rate_gradient=instance_rate_gradient,
        class_rate_direction=class_rate_direction,
        max_instance_rate=max_instance_rate,
        probe_batches=probe_batches,
        rate_metric=rate_metric,
        instance_signal=instance_signal,
        center_instance_rates=center_instance_rates,
        meta_parameters="head" if model == "bert_head" else "auto",
        meta_objective="bounded" if model == "bert_head" else "auto",
        meta_lr=0.2,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=ga,
        meta_batch_size=meta_batch or len(meta),
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        torch_compile=torch_compile,
    )
    trainer = _Recording(model=net, args=args, train_dataset=train, meta_dataset=meta, **extra)
    if stop_at is not None:
        trainer.add_callback(_StopAt(stop_at))
    # BERT: the word-embedding lookahead on the looked-up rows too (every rank restricts to its own batch's
    # rows; the thresholds are for real vocabularies; it needs the weight decay's meta-gradient off)
    thresholds = rows_mod.MIN_TABLE_ROWS, rows_mod.MAX_ROW_FRACTION
    if model == "bert":
        rows_mod.MIN_TABLE_ROWS, rows_mod.MAX_ROW_FRACTION = 0, 1.0
    try:
        trainer.train(resume_from_checkpoint=True if resume else None)
    finally:
        rows_mod.MIN_TABLE_ROWS, rows_mod.MAX_ROW_FRACTION = thresholds
    return trainer


def state_of(trainer: MetaLRTrainer) -> dict[str, torch.Tensor]:
    """Everything that must agree between ranks and with the single-process run."""
    out = {f"param.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    out["rates.instance"] = trainer.rates.instance.clone()
    out["rates.per_class"] = trainer.rates.per_class.clone()
    out["rates.weight_decay"] = torch.tensor(trainer.rates.weight_decay, dtype=torch.float64)
    if getattr(trainer, "lr_trajectory", None) is not None:
        out.update({f"traj.{k}": v.clone() for k, v in trainer.lr_trajectory.tensors().items()})
    return out


def dump(trainer: MetaLRTrainer, out: str, name: str) -> None:
    rank = trainer.args.process_index
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in state_of(trainer).items()},
        os.path.join(out, f"{name}_rank{rank}.safetensors"),
    )
    info = {
        "world_size": trainer.args.world_size,
        "parallel_mode": str(trainer.args.parallel_mode),
        "wrapped": type(trainer.model_wrapped).__name__,
        "seen_rows": trainer.seen_rows,
        "log_history": trainer.state.log_history,
        "layerwise": trainer._layerwise,
        "embedding_rows": getattr(getattr(trainer._schedule, "embedding_rows", None), "state", None),
    }
    with open(os.path.join(out, f"{name}_rank{rank}.json"), "w") as f:
        json.dump(info, f)


def main() -> None:
    out, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "all")
    dump(run(os.path.join(out, "ga1"), per_device_batch=4), out, "ga1")
    if mode == "all":
        dump(run(os.path.join(out, "ga2"), per_device_batch=2, ga=2), out, "ga2")
        # a meta batch of a quarter of the meta set a process: the ranks' together are one process's half
        dump(run(os.path.join(out, "meta_quarter"), per_device_batch=4, meta_batch=N_META // 4), out, "meta_quarter")
        # exact resume under DDP: stop after 3 steps (mid-epoch, checkpoint-3), resume to 6
        dump(run(os.path.join(out, "resume"), per_device_batch=4, stop_at=3, save_steps=3), out, "stopped")
        dump(run(os.path.join(out, "resume"), per_device_batch=4, resume=True, save_steps=3), out, "resumed")
        # BERT + padding (forward takes **kwargs): no GA/DDP loss-scaling trap, 2 ranks x 4 == 1 x 8
        dump(run(os.path.join(out, "bert"), per_device_batch=4, max_steps=3, model="bert"), out, "bert")
        dump(run(os.path.join(out, "bert_head"), per_device_batch=4, max_steps=3, model="bert_head"), out,
             "bert_head")
        # BERT compiled under DDP (torch_compile=True): the same run as the eager one
        dump(run(os.path.join(out, "bert_compiled"), per_device_batch=4, max_steps=3, model="bert",
                 torch_compile=True), out, "bert_compiled")


if __name__ == "__main__":
    main()
    end_process_group()
