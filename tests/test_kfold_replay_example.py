"""examples/kfold_replay.py end to end in --quick mode (offline): k folds -> average -> replay."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from load_file import load_file

from hf_ddlr import LRTrajectory

ROOT = Path(__file__).resolve().parents[1]


def test_kfold_average_replay_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "kfold_replay.py"), "--dataset", "embedded", "--quick", "--k", "2",
         "--output_dir", str(tmp_path), "--per_device_train_batch_size", "32", "--learning_rate", "0.05",
         "--optim", "sgd", "--disable_tqdm", "true", "--report_to", "none"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= result["replay_test_accuracy"] <= 1.0 and 0.0 <= result["plain_test_accuracy"] <= 1.0
    avg = LRTrajectory.from_pretrained(tmp_path / "averaged_trajectory")
    assert avg.instance_rates.shape[1] == 600  # indexed by the full train set
    assert torch.equal(avg.instance_coverage, torch.ones(600, dtype=avg.instance_coverage.dtype))  # k=2: one fold each
    assert avg.config["averaged_over_runs"] == 2
    assert (tmp_path / "averaged_trajectory" / "lr_trajectory_instance.png").is_file()
    replayed = LRTrajectory.from_pretrained(tmp_path / "replay")
    assert replayed.config["mode"] == "replay"
    for i in range(2):  # each fold's learned trajectory, on that fold's 300 train rows
        fold = LRTrajectory.from_pretrained(tmp_path / f"fold_{i}")
        assert fold.instance_rates.shape[1] == 300 and fold.config["mode"] != "replay"
    assert (tmp_path / "plain" / "config.json").is_file()  # the baseline's model saved, as the replay's


def test_quick_draws_every_class_and_the_embedded_run_takes_the_image_recipe(monkeypatch):
    """--quick keeps 600 / 200 images drawn class-balanced (the embedded splits are in class order: a cut of the
    first rows held two digits), and --dataset embedded trains with the examples' recipe, not TrainingArguments'
    defaults."""
    import numpy as np

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mod = load_file(ROOT / "examples" / "kfold_replay.py", register=lambda n, m: monkeypatch.setitem(sys.modules, n, m))
    script, args = mod.common.parse_args(mod.ScriptArguments, mod.presets, ["--dataset", "embedded", "--quick"])
    assert (args.learning_rate, args.per_device_train_batch_size, args.optim_args) == (0.05, 64, "momentum=0.9")
    assert args.num_train_epochs == 1 and args.save_strategy == "no"
    assert args.lr_scheduler_type == "constant_with_warmup" and args.warmup_steps == 0.125  # the demo's schedule
    monkeypatch.setattr(sys, "argv", ["kfold_replay.py", "--dataset", "embedded", "--replay_trajectory", "x"])
    with pytest.raises(SystemExit, match="replays their average itself; --replay_trajectory does not apply"):
        mod.main()
    raw, folds = mod._load(script, args)
    assert np.bincount(raw["train"]["label"]).tolist() == [60] * 10
    assert np.bincount(raw["test"]["label"]).tolist() == [20] * 10
    assert len(folds) == 3
