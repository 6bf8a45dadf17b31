"""2-process CPU DDP (gloo) through torchrun and through `accelerate launch --multi_gpu`.

One launch per launcher runs every check of tests/ddp_worker.py; the single-process reference runs here,
with the worker's own ``run`` and the same global batch (2 x the per-device batch).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from ddp_worker import run, state_of
from launching import run_launch

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def _launch(cmd: list[str], tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # no user accelerate config / caches
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    proc = run_launch(cmd, HERE, env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _load(out: Path, name: str, rank: int) -> tuple[dict, dict]:
    tensors = safetensors.torch.load_file(out / f"{name}_rank{rank}.safetensors")
    return tensors, json.loads((out / f"{name}_rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process, batch 8 = 2 ranks x 4 (also = 2 ranks x GA 2 x 2)."""
    t = run(str(tmp_path_factory.mktemp("single")), per_device_batch=8)
    return state_of(t), t.seen_rows


@pytest.fixture(scope="module")
def single_process_meta_half(tmp_path_factory):
    """One process, batch 8 and a meta batch of half the meta set = 2 ranks x 4, each a quarter of it."""
    t = run(str(tmp_path_factory.mktemp("single_meta_half")), per_device_batch=8, meta_batch=4)
    return state_of(t), t.seen_rows


@pytest.fixture(scope="module")
def single_process_bert(tmp_path_factory):
    t = run(str(tmp_path_factory.mktemp("single_bert")), per_device_batch=8, max_steps=3, model="bert")
    assert t.model_accepts_loss_kwargs  # the trap's precondition: BERT's forward takes **kwargs
    return state_of(t), t.seen_rows


@pytest.fixture(scope="module")
def single_process_bert_head(tmp_path_factory):
    t = run(str(tmp_path_factory.mktemp("single_bert_head")), per_device_batch=8, max_steps=3, model="bert_head")
    return state_of(t), t.seen_rows


def _check_run(out: Path, name: str, single_process, first_step: int = 0, layerwise: str = "verified",
               wrapped: str = "DistributedDataParallel") -> dict:
    """``layerwise``: how the dots were taken on both ranks ("verified": per-layer products, GA: forward mode);
    ``wrapped``: the class of the model the Trainer trains (DDP, or the compiled module around it)."""
    ref, ref_rows = single_process
    (s0, j0), (s1, j1) = _load(out, name, 0), _load(out, name, 1)
    for j in (j0, j1):
        assert j["world_size"] == 2 and j["parallel_mode"] == "ParallelMode.DISTRIBUTED"
        assert j["wrapped"] == wrapped
        assert j["layerwise"] == layerwise, name
    # every rank holds the identical model, rate tables, weight decay and trajectory
    assert set(s0) == set(s1) == set(ref)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{name}: {k} differs between ranks"
    # per-rank batches are disjoint and together are the single process's global batch of every step
    assert len(j0["seen_rows"]) == len(ref_rows) - first_step
    for r0, r1, r in zip(j0["seen_rows"], j1["seen_rows"], ref_rows[first_step:]):
        assert not set(r0) & set(r1)
        assert sorted(r0 + r1) == sorted(r)
    # ... so training matches one process with the global batch
    for k in ref:
        if k.startswith("traj.") and "epoch" in k:
            continue
        torch.testing.assert_close(
            s0[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{name}: {k} vs single process: {m}"
        )  # fp32 sums split over ranks round differently; a semantic error is orders of magnitude larger
    assert not torch.equal(s0["rates.instance"], torch.ones_like(s0["rates.instance"]))
    assert (float(s0["rates.weight_decay"]) != 0.01) is (not name.startswith("bert"))  # learned, except on BERT
    return s0


def test_torchrun_ddp_matches_single_process_and_resumes_exactly(
    tmp_path, single_process, single_process_meta_half, single_process_bert, single_process_bert_head
):
    out = tmp_path / "out"
    out.mkdir()
    _launch(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "ddp_worker.py", str(out), "all"],
        tmp_path,
    )
    ga1 = _check_run(out, "ga1", single_process)  # 2 ranks x 4
    _check_run(out, "ga2", single_process, layerwise="unchecked")  # 2 ranks x GA 2 x 2 (forward mode)
    # meta batches smaller than the meta set: the ranks' slices of one order are one process's meta batch
    quarter = _check_run(out, "meta_quarter", single_process_meta_half)
    assert not torch.equal(quarter["rates.instance"], ga1["rates.instance"])  # the meta batch size matters here
    # exact resume under DDP: stopped after step 3 (mid-epoch), resumed to 6 == never stopped, bit for bit
    resumed = _check_run(out, "resumed", single_process, first_step=3)
    for k in ga1:
        assert torch.equal(resumed[k], ga1[k]), f"resume: {k}"
    logs = lambda name: [h for h in _load(out, name, 0)[1]["log_history"] if "loss" in h]  # noqa: E731
    assert logs("resumed") == logs("ga1")
    # BERT with padding under DDP: the Trainer's x num_processes / no-/GA scaling must not apply
    _check_run(out, "bert", single_process_bert)
    assert all(_load(out, "bert", r)[1]["embedding_rows"] == "verified" for r in (0, 1))
    # the meta step on BERT's head only (meta_parameters="head", the bounded meta objective averaged over the
    # ranks' meta batches): the same on both ranks, == one process
    head = _check_run(out, "bert_head", single_process_bert_head)
    assert not torch.equal(head["rates.instance"], _load(out, "bert", 0)[0]["rates.instance"])
    # compiled (torch_compile=True) under DDP: forward-mode dots, and the run of one eager process
    _check_run(out, "bert_compiled", single_process_bert, layerwise="off", wrapped="OptimizedModule")
    ckpt = out / "resume" / "checkpoint-3"
    assert {"meta_state.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(ckpt))


def test_accelerate_launch_multi_gpu_on_cpu(tmp_path, single_process):
    out = tmp_path / "out"
    out.mkdir()
    _launch(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "ddp_worker.py",
            str(out),
            "parity",
        ],
        tmp_path,
    )
    _check_run(out, "ga1", single_process)
