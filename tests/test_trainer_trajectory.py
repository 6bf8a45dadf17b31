"""The trainer's learned trajectory: recorded, saved with the model, replayed, pushed to a (loopback) Hub."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import TinyConfig, TinyMLP, TinyPreTrained, make_split
from transformers import TrainerCallback

from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.hub import HubUploadError
from hf_ddlr.trajectory import TRAJECTORY_CONFIG_NAME, TRAJECTORY_TENSORS_NAME, LRTrajectory

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, optim="sgd",
              learning_rate=0.1, per_device_train_batch_size=8, logging_steps=2)


class AppliedRates(TrainerCallback):
    """What the real step of every optimizer step applied: {(step, example index): effective weight}."""

    def __init__(self, trainer):
        self.trainer, self.applied = trainer, {}

    def on_step_end(self, args, state, control, **kw):
        for mb in self.trainer._window:
            for i, w in zip(mb.indices.tolist(), mb.weights.tolist()):
                self.applied[(state.global_step, i)] = w
        decay = [g["weight_decay"] for g in kw["optimizer"].param_groups if g.get("hf_ddlr_decay")]
        self.applied[(state.global_step, "wd")] = decay[0]


def _train(tmp_path, name, train, meta=None, pretrained=False, **kw):
    args = MetaLRConfig(output_dir=str(tmp_path / name), **{**COMMON, **kw})
    torch.manual_seed(0)
    model = TinyPreTrained(TinyConfig()) if pretrained else TinyMLP()
    t = MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta)
    cb = AppliedRates(t)
    t.add_callback(cb)
    t.train()
    return t, cb.applied


@pytest.mark.parametrize("probes", [0, 1])
@pytest.mark.parametrize(
    "level, update, n, ga",
    [("instance", "same_step", 40, 1), ("both", "same_step", 40, 1), ("instance", "delayed", 40, 1),
     ("both", "delayed", 40, 1),
     ("both", "same_step", 36, 2)],  # 5 micro-batches per epoch, GA 2: every epoch ends on a shorter window
)
def test_replay_reproduces_applied_rates(tmp_path, level, update, n, ga, probes):
    """Without probes an example's rate moves at its own visits only and the trajectory records the table; with
    probes (rates also move between visits) it records what each example was trained with: exact either way."""
    train, meta = make_split(n, seed=1), make_split(16, seed=2)
    wd = dict(learn_weight_decay=True, weight_decay=1e-3) if level == "both" else {}
    orig, applied = _train(tmp_path, "orig", train, meta, num_train_epochs=3, lr_level=level, meta_update=update,
                           gradient_accumulation_steps=ga, max_instance_rate=None,  # uncapped: more rates move
                           probe_batches=probes, **wd)
    traj = orig.lr_trajectory
    assert traj.num_steps == orig.state.global_step == (15 if ga == 1 else 9)
    assert traj.instance_epochs.tolist() == [0.0, 1.0, 2.0, 3.0]
    if not probes:
        torch.testing.assert_close(traj.instance_rates[-1], orig.rates.instance.cpu())
    else:  # the table has moved on since the examples' last visits: the record is not the table
        assert not torch.allclose(traj.instance_rates[-1], orig.rates.instance.cpu())
    if level == "both":
        assert traj.class_rates.shape == (traj.num_steps + 1, 3)  # step 0 and every step
    orig.save_model()
    assert (tmp_path / "orig" / TRAJECTORY_TENSORS_NAME).is_file()
    assert LRTrajectory.from_pretrained(tmp_path / "orig") == traj

    # the replay needs no weight-decay settings: a trajectory that learned it replays it
    rep, replayed = _train(tmp_path, "replay", train, None, num_train_epochs=3, lr_level=level,
                           gradient_accumulation_steps=ga, replay_trajectory=str(tmp_path / "orig"))
    if wd:
        assert len({applied[(s, "wd")] for s in range(1, traj.num_steps + 1)}) > 5  # the weight decay was learned
    assert rep.lr_trajectory.config["mode"] == "replay"
    assert set(replayed) == set(applied)
    moved = sum(abs(v - 1) > 1e-3 for v in applied.values())
    assert moved > len(applied) // 2  # the rates really were learned, so the comparison means something
    for key, w in applied.items():
        assert replayed[key] == pytest.approx(w, rel=1e-5, abs=1e-6), key


def test_replay_refuses_other_train_set(tmp_path):
    train, meta = make_split(40, seed=1), make_split(16, seed=2)
    orig, _ = _train(tmp_path, "orig", train, meta, max_steps=2)
    orig.save_model()
    args = MetaLRConfig(output_dir=str(tmp_path / "r"), replay_trajectory=str(tmp_path / "orig"), **COMMON)
    with pytest.raises(ValueError, match="learned on 40 examples .* has 41"):
        MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(41, seed=1))
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(40, seed=9))


def test_push_to_hub_then_download_in_a_clean_cache(tmp_path, hub_server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.endpoint)
    monkeypatch.setattr("transformers.utils.hub._hf_api", None)  # the Trainer caches one HfApi per process
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    train, meta = make_split(40, seed=1), make_split(16, seed=2)
    t, _ = _train(tmp_path, "out", train, meta, True, num_train_epochs=2, lr_level="both", push_to_hub=True,
                  hub_model_id="me/tiny-metalr", hub_strategy="end", hub_token="hf_test_token")
    t.push_to_hub()
    t.lr_trajectory.save_pretrained(tmp_path / "expected")

    script = f"""
        import json
        from huggingface_hub import hf_hub_download, list_repo_files
        from hf_ddlr.trajectory import LRTrajectory
        files = list_repo_files("me/tiny-metalr")
        t = LRTrajectory.from_pretrained("me/tiny-metalr")
        assert t == LRTrajectory.from_pretrained({str(tmp_path / "expected")!r}), "trajectory differs"
        card = open(hf_hub_download("me/tiny-metalr", "README.md")).read()
        png = open(hf_hub_download("me/tiny-metalr", "lr_trajectory_class.png"), "rb").read()
        print(json.dumps({{"files": files, "card": card, "png": png[:8].hex()}}))
    """
    env = hub_server.client_env(tmp_path / "clean_home")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for f in ("model.safetensors", "config.json", TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME, "README.md",
              "lr_trajectory_class.png", "lr_trajectory_instance.png"):
        assert f in out["files"], f
    assert out["png"] == "89504e470d0a1a0a"  # PNG signature
    assert f"`{TRAJECTORY_TENSORS_NAME}`" in out["card"] and "replay_trajectory" in out["card"]
    assert "generated_from_trainer" in out["card"]


def test_failed_push_leaves_output_complete_and_says_how_to_retry(tmp_path, hub_server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.endpoint)
    monkeypatch.setattr("transformers.utils.hub._hf_api", None)
    train, meta = make_split(24, seed=1), make_split(8, seed=2)
    t, _ = _train(tmp_path, "out", train, meta, True, max_steps=3, push_to_hub=True, hub_model_id="me/fails",
                  hub_strategy="end", hub_token="hf_test_token")
    with socket.socket() as sock:  # a port nobody listens on: the Hub is unreachable from now on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr("transformers.utils.hub._hf_api", None)
    with pytest.raises(HubUploadError, match=r"The folder is complete locally .*retry with `hf upload me/fails"):
        t.push_to_hub()
    out = tmp_path / "out"
    for f in ("model.safetensors", TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME, "README.md",
              "lr_trajectory_instance.png"):
        assert (out / f).is_file(), f
    assert LRTrajectory.from_pretrained(out) == t.lr_trajectory


@pytest.mark.parametrize("normalization", ["median", "none"])
def test_replay_reproduces_rates_divided_by_the_median(tmp_path, normalization):
    """With max_instance_rate above 1 and instance_rate_normalization='median', the examples train at their rate
    divided by the table's median, which changes from step to step: the trajectory records what each example was
    trained with, and the replay applies exactly that, never divided again, even when the replay's own arguments
    ask for the division (the undivided run's record has a median above 1)."""
    train, meta = make_split(40, seed=3), make_split(16, seed=4)  # data on which most rates climb above 1
    medians = []

    class Median(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            medians.append(float(orig.rates.instance.median()))

    args = MetaLRConfig(output_dir=str(tmp_path / "orig"), **{**COMMON, "num_train_epochs": 3, "meta_lr": 0.2,
                                                              "probe_batches": 0, "max_instance_rate": 1.5,
                                                              "instance_rate_normalization": normalization,
                                                              # (uncentred: the whole table can climb)
                                                              "instance_signal": "mean"})
    torch.manual_seed(0)
    orig = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=train, meta_dataset=meta)
    cb = AppliedRates(orig)
    orig.add_callback(cb)
    orig.add_callback(Median())
    orig.train()
    assert len(set(medians)) > 5 and max(medians) > 1.2  # the median climbed above 1, step after step
    final = orig.lr_trajectory.instance_rates[-1]
    if normalization == "median":
        assert orig.lr_trajectory.config["instance_rate_normalization"] == "median"
        assert not torch.allclose(final, orig.rates.instance.cpu())  # the record is the applied rates
        # the last step applied its table divided by its median: at most 1.5 / that median
        last = len(medians)
        assert max(w for (s, i), w in cb.applied.items() if s == last and i != "wd") <= 1.5 / medians[-1] + 1e-6
    else:
        torch.testing.assert_close(final, orig.rates.instance.cpu())
        assert float(final.median()) > 1.2
    orig.save_model()
    rep, replayed = _train(tmp_path, "replay", train, None, num_train_epochs=3, max_instance_rate=1.5,
                           instance_rate_normalization="median", replay_trajectory=str(tmp_path / "orig"))
    assert set(replayed) == set(cb.applied)
    for key, w in cb.applied.items():
        assert replayed[key] == pytest.approx(w, rel=1e-5, abs=1e-6), key


def test_a_replay_that_trains_past_the_trajectorys_end_says_so_once(tmp_path, caplog):
    """A checkpoint's trajectory replayed on the whole run: past its last epoch the replay can only keep the last
    rates, which the original run never applied there, so it warns (once); the final save's trajectory, as long as
    the run, replays without a word."""
    train, meta = make_split(32, seed=1), make_split(8, seed=2)
    kw = {**COMMON, "save_strategy": "steps", "save_steps": 4, "num_train_epochs": 3}
    orig, _ = _train(tmp_path, "orig", train, meta, **kw)
    orig.save_model()
    for source, warnings in (("orig/checkpoint-8", 1), ("orig", 0)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="hf_ddlr.trajectory.replay"):
            _train(tmp_path, "replay", train, None, **{**kw, "save_strategy": "no"},
                   replay_trajectory=str(tmp_path / source))
        said = [r.getMessage() for r in caplog.records if "trains past it" in r.getMessage()]
        assert len(said) == warnings, (source, said)
        if warnings:
            assert "replay_trajectory ends at epoch 2, and this run trains past it (step 9 ends at epoch 2.25)" in said[0]


def test_replaying_at_another_rate_level_names_the_level_recorded(tmp_path):
    train, meta = make_split(32, seed=1), make_split(8, seed=2)
    orig, _ = _train(tmp_path, "orig", train, meta, max_steps=4, lr_level="class")
    orig.save_model()
    with pytest.raises(ValueError, match=r"no instance rates; set lr_level to what it recorded \('class'\)"):
        _train(tmp_path, "replay", train, None, max_steps=4, replay_trajectory=str(tmp_path / "orig"))


def test_a_class_trajectory_replays_only_on_its_classes(tmp_path):
    """Class rates are keyed by label id: a replay on another number of classes, or (where both name them) on
    classes of other names, is refused at construction with the fix; the same classes in new rows replay."""
    import datasets

    def named(ds, names):
        return ds.cast_column("label", datasets.ClassLabel(names=names))

    orig, _ = _train(tmp_path, "orig", named(make_split(32, seed=1), ["ant", "bee", "cat"]),
                     named(make_split(8, seed=2), ["ant", "bee", "cat"]), max_steps=4, lr_level="class")
    orig.save_model()
    saved = str(tmp_path / "orig")
    assert LRTrajectory.from_pretrained(saved).label_names == ["ant", "bee", "cat"]
    common = dict(output_dir=str(tmp_path / "r"), **{**COMMON, "max_steps": 2}, lr_level="class",
                  replay_trajectory=saved)
    with pytest.raises(ValueError, match=r"classes are \['ant', 'bee', 'cat'\]; the train set's are \['x', 'y', 'z'\]"
                                         r".*align_labels_with_mapping"):
        MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(**common),
                      train_dataset=named(make_split(24, seed=5), ["x", "y", "z"]))
    with pytest.raises(ValueError, match=r"class rates cover 3 classes \(ant, bee, cat\); this run has 4"):
        MetaLRTrainer(model=TinyMLP(num_labels=4), args=MetaLRConfig(**common),
                      train_dataset=make_split(24, seed=5, num_labels=4), num_labels=4)
    # the same classes, other rows (a class trajectory's use: e.g. the k folds' average on the whole set)
    t = MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(**common),
                      train_dataset=named(make_split(24, seed=5), ["ant", "bee", "cat"]))
    t.train()
    assert not torch.equal(t.rates.per_class.cpu(), torch.ones(3))  # the trajectory's rates, not the start's
