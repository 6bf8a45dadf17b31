"""Checkpoints written by older versions still resume, exactly.

``tests/fixtures/checkpoint_v0/`` is ``checkpoint-3`` of ``ddp_worker.run`` (6 steps) written by commit 15ed5d8,
whose rate table saved its state as the v0 dict (tables, ``weight_decay``, ``wd_sq_avg``, ``num_updates``; no
``format_version``) before it had its own optimizer; tests/fixtures/make_checkpoint_fixture.py wrote it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from ddp_worker import MAX_STEPS, run, state_of
from load_file import load_file
from test_trainer_features import _assert_states

from hf_ddlr.meta import RateTable
from hf_ddlr.trainer import META_STATE_NAME


def _fixture_module():
    path = Path(__file__).parent / "fixtures" / "make_checkpoint_fixture.py"
    return load_file(path, register=None)


FX = _fixture_module()
# the fixture was written before lr_level="both" had instance_rate_gradient and class_rate_direction and before
# the instance rates were capped at 1 and probed: its instance rates followed the exact chain rule, unbounded, moved
# at their own visits only, and its class
# rates the running average, and its products were the optimizer's (no rate_metric), the whole products (no
# instance_signal), uncentred, so the run that continues it (and the straight run it must equal) does too
RUN = {**FX.RUN, "instance_rate_gradient": "chain_rule", "class_rate_direction": "average",
       "max_instance_rate": None, "probe_batches": 0, "rate_metric": "optimizer", "instance_signal": "mean",
       "center_instance_rates": False}


def _resume(tmp_path: Path, name: str, monkeypatch, meta_state: dict[str, torch.Tensor] | None = None):
    """Resume the fixture's run from a copy of the fixture (``meta_state`` written over its meta state);
    also returns the rate table as the resume loaded it."""
    out = tmp_path / name
    ckpt = out / f"checkpoint-{FX.STOP_AT}"
    shutil.copytree(FX.FIXTURE, ckpt)
    if meta_state is not None:
        safetensors.torch.save_file(meta_state, os.path.join(ckpt, META_STATE_NAME))
    loaded = {}
    load = RateTable.load_state_dict

    def spy(table: RateTable, sd, **kw):
        load(table, sd, **kw)
        loaded.update(instance=table.instance.clone(), per_class=table.per_class.clone(),
                      weight_decay=table.weight_decay, wd_sq_avg=table.wd_sq_avg, num_updates=table.num_updates)

    with monkeypatch.context() as m:
        m.setattr(RateTable, "load_state_dict", spy)
        trainer = run(str(out), resume=True, **RUN)
    assert trainer.state.global_step == MAX_STEPS
    return trainer, loaded


def test_v0_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    saved = safetensors.torch.load_file(os.path.join(FX.FIXTURE, META_STATE_NAME))
    assert set(saved) == {"instance", "per_class", "weight_decay", "wd_sq_avg", "num_updates"}  # the v0 format
    assert float(saved["wd_sq_avg"]) > 0 and int(saved["num_updates"]) == FX.STOP_AT

    resumed, loaded = _resume(tmp_path, "resume", monkeypatch)
    assert torch.equal(loaded["instance"], saved["instance"]) and torch.equal(loaded["per_class"], saved["per_class"])
    assert loaded["weight_decay"] == float(saved["weight_decay"]) != 0.01  # learned, not the initial value
    assert loaded["wd_sq_avg"] == float(saved["wd_sq_avg"])
    assert loaded["num_updates"] == int(saved["num_updates"])

    # The fixture's first steps were computed on the machine that wrote it; another CPU's kernels round
    # differently (~1e-7 here), so the continued run equals the straight one to rounding, not bit for bit
    # (on the writing machine it is bit for bit). A wrong or missing piece of state is far larger (below).
    straight = run(str(tmp_path / "straight"), **RUN)
    _assert_states(state_of(resumed), state_of(straight), exact=False)  # params, rates, wd, trajectory tensors
    assert resumed.rates.num_updates == straight.rates.num_updates == MAX_STEPS
    assert resumed.rates.wd_sq_avg == pytest.approx(straight.rates.wd_sq_avg, rel=1e-6)
    assert resumed.lr_trajectory.metadata() == straight.lr_trajectory.metadata()  # (its tensors: state_of above)
    logs = lambda t: [h for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert len(logs(resumed)) == len(logs(straight)) == MAX_STEPS
    for a, b in zip(logs(resumed), logs(straight)):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7) for k in a)

    # negative control: a loader that dropped the weight decay's running RMS and update count (restarting the
    # bias correction) would not continue the run exactly, so the equalities above would catch it
    forgetful = {**saved, "wd_sq_avg": torch.tensor(0.0, dtype=torch.float64),
                 "num_updates": torch.tensor(0, dtype=torch.int64)}
    broken, _ = _resume(tmp_path, "forgetful", monkeypatch, forgetful)
    assert abs(broken.rates.weight_decay / straight.rates.weight_decay - 1) > 1e-4
