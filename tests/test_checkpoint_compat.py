"""Checkpoints written by older versions still resume, exactly.

``tests/fixtures/checkpoint_v0/`` is ``checkpoint-3`` of a 6-step run written by commit 15ed5d8, whose rate table
saved its state as the flat v0 dict (tables, ``weight_decay``, ``wd_sq_avg``, ``num_updates``) before it had its
own optimizer; tests/fixtures/make_checkpoint_fixture.py wrote it and defines the run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch
from ddp_worker import state_of
from test_trainer_features import _assert_states
from transformers import TrainerCallback

from hf_ddlr.trainer import META_STATE_NAME


def _fixture_module():
    path = Path(__file__).parent / "fixtures" / "make_checkpoint_fixture.py"
    spec = importlib.util.spec_from_file_location("make_checkpoint_fixture", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FX = _fixture_module()


class _GrabLoaded(TrainerCallback):
    """The meta state as the resume loaded it (the checkpoint is loaded before on_train_begin)."""

    def __init__(self, trainer) -> None:
        self.trainer, self.seen = trainer, {}

    def on_train_begin(self, args, state, control, **kwargs):
        r = self.trainer.rates
        self.seen.update(
            instance=r.instance.clone(),
            per_class=r.per_class.clone(),
            weight_decay=r.weight_decay,
            wd_sq_avg=r.wd_sq_avg,
            num_updates=r.num_updates,
        )


def _resume(tmp_path: Path, name: str, meta_state: dict[str, torch.Tensor] | None = None):
    """Resume the fixture's run from a copy of the fixture (with ``meta_state`` written over its meta state)."""
    out = tmp_path / name
    ckpt = out / f"checkpoint-{FX.STOP_AT}"
    shutil.copytree(FX.FIXTURE, ckpt)
    if meta_state is not None:
        safetensors.torch.save_file(meta_state, os.path.join(ckpt, META_STATE_NAME))
    trainer = FX.fixture_trainer(str(out))
    grab = _GrabLoaded(trainer)
    trainer.add_callback(grab)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == FX.MAX_STEPS
    return trainer, grab.seen


def test_v0_checkpoint_resumes_exactly(tmp_path):
    saved = safetensors.torch.load_file(os.path.join(FX.FIXTURE, META_STATE_NAME))
    assert set(saved) == {
        "instance",
        "per_class",
        "weight_decay",
        "wd_sq_avg",
        "num_updates",
    }  # the v0 format
    assert float(saved["wd_sq_avg"]) > 0 and int(saved["num_updates"]) == FX.STOP_AT

    resumed, loaded = _resume(tmp_path, "resume")
    assert torch.equal(loaded["instance"], saved["instance"]) and torch.equal(
        loaded["per_class"], saved["per_class"]
    )
    assert loaded["weight_decay"] == float(saved["weight_decay"]) != 0.01  # learned, not the initial value
    assert loaded["wd_sq_avg"] == float(saved["wd_sq_avg"])
    assert loaded["num_updates"] == int(saved["num_updates"])

    straight = FX.fixture_trainer(str(tmp_path / "straight"))
    straight.train()
    _assert_states(state_of(resumed), state_of(straight), exact=True)  # params, rates, wd, trajectory tensors
    assert resumed.rates.num_updates == straight.rates.num_updates == FX.MAX_STEPS
    assert resumed.rates.wd_sq_avg == straight.rates.wd_sq_avg
    assert resumed.lr_trajectory == straight.lr_trajectory
    logs = lambda t: [h for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert logs(resumed) == logs(straight)

    # negative control: a loader that dropped the weight decay's running RMS and update count (restarting the
    # bias correction) would not continue the run exactly, so the equalities above would catch it
    forgetful = {
        **saved,
        "wd_sq_avg": torch.tensor(0.0, dtype=torch.float64),
        "num_updates": torch.tensor(0, dtype=torch.int64),
    }
    broken, _ = _resume(tmp_path, "forgetful", forgetful)
    assert broken.rates.weight_decay != straight.rates.weight_decay
