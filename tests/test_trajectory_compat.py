"""Trajectories saved before ``hf_ddlr/trajectory.py`` became a package load, and come out the same.

``tests/data/trajectory_v1/`` was written by the single-module code (commit 15ed5d8) from the trajectories
built below: ``single`` (one run), ``average`` (three folds indexed by full position, NaN where a fold did
not train) and ``average_indexed`` (three folds given by ``instance_indices`` on a full set of 16), each with
the ``summary()`` of that time. The current code must read them, rebuild the same trajectories (the k-fold
average bit for bit), re-save the same files and summarise them identically. Also here: the
:class:`TrajectoryReplayer` the trainer replays with.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from test_trajectory import N, make_trajectory

from hf_ddlr.trajectory import (
    TRAJECTORY_CONFIG_NAME,
    TRAJECTORY_TENSORS_NAME,
    LRTrajectory,
    TrajectoryReplayer,
)

DATA = Path(__file__).resolve().parent / "data" / "trajectory_v1"


def _safetensors_content(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _folds_with_nan() -> list[LRTrajectory]:
    folds = []
    for f in range(3):
        t = make_trajectory(seed=f)
        held_out = torch.arange(N) % 3 == f
        for _, _, row in t._instance:
            row[held_out] = float("nan")
        folds.append(t)
    return folds


def _rebuilt(name: str) -> LRTrajectory:
    """What the files in ``DATA / name`` were saved from, built by the current code."""
    if name == "single":
        return make_trajectory(0)
    if name == "average":
        return LRTrajectory.average(_folds_with_nan())
    return LRTrajectory.average(
        [make_trajectory(seed=f) for f in range(3)],
        instance_indices=[(torch.arange(N) + 2 * f) % 16 for f in range(3)],
        dataset={"id": "toy-full", "num_examples": 16, "fingerprint": None},
    )


@pytest.mark.parametrize("name", ["single", "average", "average_indexed"])
def test_trajectory_saved_by_the_single_module_code_loads_and_resaves_unchanged(tmp_path, name):
    loaded = LRTrajectory.from_pretrained(DATA / name)
    assert loaded == _rebuilt(name)  # every tensor and metadata field (NaN == NaN)
    if name != "single":
        assert torch.equal(loaded.instance_coverage, _rebuilt(name).instance_coverage)
    loaded.save_pretrained(tmp_path)
    assert (tmp_path / TRAJECTORY_CONFIG_NAME).read_bytes() == (DATA / name / TRAJECTORY_CONFIG_NAME).read_bytes()
    # the safetensors header's metadata map has no fixed order: compare its content, not its bytes
    new, old = (_safetensors_content(d / TRAJECTORY_TENSORS_NAME) for d in (tmp_path, DATA / name))
    assert new[0] == old[0] and new[1].keys() == old[1].keys()
    for key, tensor in old[1].items():
        assert new[1][key].dtype == tensor.dtype and torch.equal(new[1][key].view(-1).view(torch.uint8),
                                                                 tensor.view(-1).view(torch.uint8)), key
    expected = json.loads((DATA / name / "summary.json").read_text())
    assert json.loads(json.dumps(loaded.summary())) == expected


class _Rates(SimpleNamespace):
    """The part of a RateTable the replayer sets: ``instance``, ``per_class``, ``per_group``, ``weight_decay``."""


@pytest.mark.parametrize("meta_update", ["same_step", "delayed"])
def test_replayer_sets_the_values_the_original_run_used(tmp_path, meta_update):
    traj = make_trajectory(0)  # 4 steps per epoch, 3 epochs
    traj.config.update(meta_update=meta_update, learn_weight_decay=True, weight_decay=5e-4)
    traj.save_pretrained(tmp_path)
    replayer = TrajectoryReplayer(str(tmp_path))  # loads from a folder like replay_trajectory="path"
    assert replayer.trajectory == traj
    assert replayer.replays_weight_decay(False) is True
    spe = 4
    delayed = meta_update == "delayed"
    for step in range(0, 12):
        rates = _Rates(instance=torch.zeros(N), per_class=torch.zeros(3), per_group=None, weight_decay=-1.0)
        replayer.set_rates(rates, step, spe, lambda s: s / spe, weight_decay=True, default_weight_decay=0.0)
        end = (step if delayed else step + 1) / spe
        mid = (step + 0.5) / spe
        assert torch.equal(rates.instance, traj.instance_rates_at(mid, mode="previous" if delayed else "next"))
        assert torch.equal(rates.per_class, traj.class_rates_at(epoch=end))
        assert rates.weight_decay == (5e-4 if delayed and step == 0 else traj.weight_decay_at(epoch=end))
    no_wd = _Rates(instance=None, per_class=None, per_group=None, weight_decay=-1.0)
    replayer.set_rates(no_wd, 3, spe, lambda s: s / spe, weight_decay=False, default_weight_decay=0.0)
    assert no_wd.weight_decay == -1.0  # not replayed when the run does not set the weight decay


def test_replayer_refuses_another_train_set_and_a_missing_rate_level():
    traj = make_trajectory(0)
    with pytest.raises(ValueError, match="size mismatch"):
        TrajectoryReplayer(traj, list(range(N + 1)))
    TrajectoryReplayer(traj, list(range(N)))  # a sized torch-style dataset of the same size is accepted
    traj._class = []
    replayer = TrajectoryReplayer(traj)
    assert replayer.replays_weight_decay(False) is False  # the toy run's config does not learn it
    with pytest.raises(ValueError, match="no class rates; set lr_level"):
        replayer.set_rates(_Rates(instance=None, per_class=torch.ones(3), per_group=None, weight_decay=0.0), 0, 4, lambda s: s / 4,
                           weight_decay=False, default_weight_decay=0.0)
