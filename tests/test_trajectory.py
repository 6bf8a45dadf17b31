"""LRTrajectory: recording, save/load, averaging across folds, replay queries, compatibility, plots, summary."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from hf_ddlr.trajectory import (
    SCHEMA_VERSION,
    TRAJECTORY_CONFIG_NAME,
    TRAJECTORY_TENSORS_NAME,
    LRTrajectory,
    dataset_signature,
)

N, C = 12, 3


def make_trajectory(seed: int = 0, *, epochs: int = 3, steps_per_epoch: int = 4, noise: bool = True) -> LRTrajectory:
    """A small run: per-step records, class rates every 2 steps, instance rates at step 0 and every epoch end."""
    g = torch.Generator().manual_seed(seed)
    noise_mask = torch.zeros(N, dtype=torch.bool)
    noise_mask[-3:] = True
    traj = LRTrajectory(
        dataset={"id": "toy", "config": None, "revision": None, "split": "train", "fingerprint": "f00d",
                 "num_examples": N},
        label_names=["cat", "dog", "eel"],
        noise_mask=noise_mask if noise else None,
        config={"lr_level": "both", "meta_lr": 0.1, "strategy": "jvp"},
        model_name="toy-resnet",
    )
    traj.record_class_rates(0, 0.0, torch.ones(C))
    traj.record_instance_rates(0, 0.0, torch.ones(N))
    inst = torch.ones(N)
    for step in range(1, epochs * steps_per_epoch + 1):
        epoch = step / steps_per_epoch
        meta = float(torch.rand((), generator=g)) if step % 3 else None  # some steps without a meta step
        traj.record_step(step, epoch, 0.1 * (1 - step / 100), 5e-4 + 1e-5 * step, meta)
        if step % 2 == 0:
            traj.record_class_rates(step, epoch, 1 + 0.1 * torch.randn(C, generator=g))
        if step % steps_per_epoch == 0:
            inst = (inst + 0.05 * torch.randn(N, generator=g)).clamp(min=0)
            inst[noise_mask] *= 0.3  # noisy examples get low rates, as in the paper
            traj.record_instance_rates(step, epoch, inst)
    return traj


def test_save_load_round_trip_is_equal(tmp_path):
    traj = make_trajectory()
    paths = traj.save_pretrained(tmp_path)
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == sorted([TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME])
    loaded = LRTrajectory.from_pretrained(tmp_path)
    assert loaded == traj
    assert torch.equal(loaded.instance_rates, traj.instance_rates)
    assert torch.isnan(loaded.meta_loss).sum() == 4  # steps 3, 6, 9, 12 had no meta step; NaN survives
    assert loaded.noise_mask.dtype == torch.bool
    meta = json.loads((tmp_path / TRAJECTORY_CONFIG_NAME).read_text())
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["tensors"]["instance_rates"] == [4, N]
    assert meta["tensors"]["class_rates"] == [7, C]
    # equality is not trivially true: one changed value or one metadata field breaks it
    other = LRTrajectory.from_pretrained(tmp_path)
    other._instance[-1][2][0] += 1e-3
    assert other != traj
    other = LRTrajectory.from_pretrained(tmp_path)
    other.config["meta_lr"] = 0.2
    assert other != traj


def test_only_one_level_round_trip(tmp_path):
    traj = LRTrajectory(dataset={"num_examples": 5})
    traj.record_instance_rates(0, 0.0, torch.ones(5))
    traj.record_instance_rates(7, 1.0, torch.arange(5.0))
    traj.save_pretrained(tmp_path)
    loaded = LRTrajectory.from_pretrained(tmp_path)
    assert loaded == traj
    assert not loaded.has_class_rates and loaded.num_steps == 0
    with pytest.raises(ValueError, match="no class snapshots"):
        loaded.class_rates_at(3)


def test_newer_schema_and_missing_files_give_clear_errors(tmp_path):
    make_trajectory().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / TRAJECTORY_CONFIG_NAME).read_text())
    meta["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / TRAJECTORY_CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"schema version {SCHEMA_VERSION + 1}.*Upgrade hf_ddlr"):
        LRTrajectory.from_pretrained(tmp_path)
    (tmp_path / TRAJECTORY_TENSORS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=TRAJECTORY_TENSORS_NAME):
        LRTrajectory.from_pretrained(tmp_path)


def test_recording_rules():
    traj = LRTrajectory(dataset={"num_examples": 4}, label_names=["a", "b"])
    traj.record_step(1, 0.5, 0.1, 0.01, 0.3)
    traj.record_step(1, 0.5, 0.1, 0.02, 0.3)  # same step again replaces
    assert traj.weight_decay.tolist() == [0.02]
    with pytest.raises(ValueError, match="truncate"):
        traj.record_step(0, 0.0, 0.1, 0.0, None)
    with pytest.raises(ValueError, match="3 entries but .* have 2"):
        traj.record_class_rates(1, 0.5, torch.ones(3))
    with pytest.raises(ValueError, match="5 entries but .* have 4"):
        traj.record_instance_rates(0, 0.0, torch.ones(5))
    traj.record_step(2, 1.0, 0.1, 0.03, None)
    traj.record_class_rates(2, 1.0, torch.ones(2))
    traj.truncate(1)  # resume from a checkpoint at step 1
    assert traj.steps.tolist() == [1] and not traj.has_class_rates
    traj.record_step(2, 1.0, 0.1, 0.04, None)
    assert traj.weight_decay.tolist() == [0.02, 0.04]


def test_replay_interpolation():
    traj = make_trajectory()
    snaps, snap_epochs = traj.instance_rates, traj.instance_epochs.tolist()
    assert snap_epochs == [0.0, 1.0, 2.0, 3.0]
    for k, e in enumerate(snap_epochs):  # at a snapshot epoch every mode returns the snapshot exactly
        for mode in ("linear", "previous", "next"):
            assert torch.equal(traj.instance_rates_at(e, mode=mode), snaps[k])
    mid = traj.instance_rates_at(1.25)
    assert torch.allclose(mid, 0.75 * snaps[1] + 0.25 * snaps[2])
    assert torch.equal(traj.instance_rates_at(1.25, mode="next"), snaps[2])
    assert torch.equal(traj.instance_rates_at(1.25, mode="previous"), snaps[1])
    assert torch.equal(traj.instance_rates_at(-1.0), snaps[0])
    assert torch.equal(traj.instance_rates_at(10.0), snaps[-1])

    cls, cls_steps = traj.class_rates, traj.class_steps.tolist()
    assert cls_steps == [0, 2, 4, 6, 8, 10, 12]
    assert torch.equal(traj.class_rates_at(4), cls[2])
    assert torch.allclose(traj.class_rates_at(5), 0.5 * (cls[2] + cls[3]))
    assert torch.equal(traj.class_rates_at(5, mode="previous"), cls[2])
    assert torch.equal(traj.class_rates_at(epoch=1.0), cls[2])  # step 4 is epoch 1.0
    assert torch.equal(traj.class_rates_at(100), cls[-1])
    with pytest.raises(ValueError, match="exactly one of step= or epoch="):
        traj.class_rates_at(3, epoch=1.0)

    assert traj.weight_decay_at(7) == pytest.approx(5e-4 + 7e-5)
    assert traj.weight_decay_at(epoch=0.5) == pytest.approx(5e-4 + 2e-5)
    assert traj.weight_decay_at(0) == pytest.approx(5e-4 + 1e-5)  # before the first step: first value
    assert traj.learning_rate_at(12) == pytest.approx(0.1 * 0.88)


def test_average_of_folds_full_positions_with_nan():
    """Three folds indexed by full position; each leaves out a third of the examples (NaN there)."""
    k, folds = 3, []
    for f in range(k):
        t = make_trajectory(seed=f)
        held_out = torch.arange(N) % k == f
        for _, _, row in t._instance:
            row[held_out] = float("nan")
        folds.append(t)
    avg = LRTrajectory.average(folds)
    assert avg.instance_coverage.tolist() == [k - 1] * N
    tables = torch.stack([t.instance_rates.double() for t in folds])
    for i in range(N):
        trained = [f for f in range(k) if i % k != f]
        expected = tables[trained, :, i].mean(0).float()
        assert torch.allclose(avg.instance_rates[:, i], expected)
    assert torch.allclose(avg.class_rates, torch.stack([t.class_rates for t in folds]).mean(0))
    assert torch.allclose(avg.weight_decay, folds[0].weight_decay)
    expected_meta = torch.stack([t.meta_loss for t in folds]).nanmean(0)
    assert _nan_allclose(avg.meta_loss, expected_meta)
    assert avg.steps.tolist() == folds[0].steps.tolist()
    assert avg.config["averaged_over_runs"] == k
    assert torch.equal(avg.noise_mask, folds[0].noise_mask)
    assert not torch.isnan(avg.instance_rates_at(1.5)).any()


def _nan_allclose(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs() < 1e-9).logical_or(torch.isnan(a) & torch.isnan(b)).all())


def test_average_with_fold_local_indices():
    full = {"id": "toy", "fingerprint": "full", "num_examples": 6, "split": "train"}
    folds, indices = [], [[0, 1, 2, 3], [2, 3, 4, 5], [0, 1, 4, 5]]
    for f, idx in enumerate(indices):
        t = LRTrajectory(dataset={"num_examples": 4}, noise_mask=torch.tensor(idx) >= 4)
        t.record_instance_rates(0, 0.0, torch.ones(4))
        t.record_instance_rates(10, 1.0, torch.tensor(idx, dtype=torch.float32) + f)
        folds.append(t)
    avg = LRTrajectory.average(folds, instance_indices=indices, dataset=full)
    assert avg.dataset == full
    assert avg.instance_coverage.tolist() == [2] * 6
    # example 0 is in folds 0 (value 0+0) and 2 (value 0+2) -> 1; example 4 in folds 1 (5) and 2 (6) -> 5.5
    assert avg.instance_rates[1].tolist() == [1.0, 2.0, 2.5, 3.5, 5.5, 6.5]
    assert avg.noise_mask.tolist() == [False] * 4 + [True] * 2
    with pytest.raises(ValueError, match="needs dataset="):
        LRTrajectory.average(folds, instance_indices=indices)


def test_average_truncates_and_rejects_misaligned():
    a, b = make_trajectory(0, epochs=3), make_trajectory(1, epochs=2)
    with pytest.warns(UserWarning, match="truncated to the shortest"):
        avg = LRTrajectory.average([a, b])
    assert avg.num_steps == b.num_steps and avg.instance_rates.shape[0] == b.instance_rates.shape[0]
    c = make_trajectory(2, steps_per_epoch=5)  # different schedule: steps no longer line up with epochs
    with pytest.raises(ValueError, match=r"record 0 is at epoch \(per step\) 0.25 in trajectory 0 but 0.2"), \
            pytest.warns(UserWarning, match="truncated"):
        LRTrajectory.average([a, c])


def test_compatibility_errors_name_both_sides():
    traj = make_trajectory()
    traj.check_compatible({"num_examples": N, "fingerprint": "f00d"})
    traj.check_compatible({"num_examples": N, "fingerprint": None})  # torch dataset: size only
    with pytest.raises(ValueError, match=rf"learned on {N} examples.*has 7"):
        traj.check_compatible({"num_examples": 7, "fingerprint": "f00d"})
    with pytest.raises(ValueError, match=r"fingerprint 'f00d'.*fingerprint 'beef'"):
        traj.check_compatible({"num_examples": N, "fingerprint": "beef"})
    traj.check_compatible({"num_examples": N, "fingerprint": "beef"}, check_fingerprint=False)


def test_dataset_signature_and_for_dataset():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"x": datasets.Value("int32"), "label": datasets.ClassLabel(names=["a", "b"]),
                                  "is_noisy": datasets.Value("bool")})
    data = {"x": list(range(6)), "label": [0, 1, 0, 1, 0, 1], "is_noisy": [False] * 4 + [True] * 2}
    ds = datasets.Dataset.from_dict(data, features=features)
    ds.set_transform(lambda batch: {"y": [v * 2 for v in batch["x"]]})  # must not hide is_noisy
    sig = dataset_signature(ds, "train")
    assert sig["num_examples"] == 6 and sig["split"] == "train" and sig["fingerprint"] == ds._fingerprint
    traj = LRTrajectory.for_dataset(ds, split="train", config={"lr_level": "instance"})
    assert traj.label_names == ["a", "b"]
    assert traj.noise_mask.tolist() == [False] * 4 + [True] * 2
    traj.check_dataset(ds)
    other = datasets.Dataset.from_dict({**data, "x": [9] * 6}, features=features)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        traj.check_dataset(other)
    with pytest.raises(ValueError, match="size mismatch"):
        traj.check_dataset(ds.select(range(5)))
    torch_ds = torch.utils.data.TensorDataset(torch.zeros(6, 2))
    tsig = dataset_signature(torch_ds)
    assert tsig["fingerprint"] is None and tsig["num_examples"] == 6
    traj.check_dataset(torch_ds)


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(32)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plots_are_real_pngs(tmp_path):
    traj = make_trajectory()
    paths = traj.save_plots(tmp_path)
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == sorted(f"lr_trajectory_{k}.png" for k in ("class", "instance", "weight_decay", "meta_loss"))
    for p in paths:
        w, h = _png_size(p)
        assert w >= 300 and h >= 200
        assert (tmp_path / p.rsplit("/", 1)[-1]).stat().st_size > 10_000  # lines, labels, legend: not blank
    figs = traj.plot("instance")
    ax = figs["instance"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["clean (9)", "noisy (3)"]
    no_noise = make_trajectory(noise=False).plot("instance")["instance"].axes[0]
    assert "mean" in [t.get_text() for t in no_noise.get_legend().get_texts()]
    with pytest.raises(ValueError, match="unknown plot kind"):
        traj.plot("rates")
    only_inst = LRTrajectory()
    only_inst.record_instance_rates(0, 0.0, torch.ones(3))
    assert list(only_inst.plot()) == ["instance"]
    with pytest.raises(ValueError, match="cannot plot 'class'"):
        only_inst.plot("class")


def test_summary_auroc_and_markdown():
    traj = make_trajectory()
    s = traj.summary()
    assert s["auroc_clean_vs_noisy"] == 1.0  # every noisy rate (x0.3 per epoch) is below every clean one
    assert s["num_steps"] == 12 and s["num_epochs"] == 3.0 and s["num_instance_snapshots"] == 4
    final = traj.instance_rates[-1]
    assert s["instance_rate_near_zero_fraction"] == pytest.approx(float((final < 0.05).float().mean()))
    assert s["final_weight_decay"] == pytest.approx(5e-4 + 12e-5)
    assert s["lowest_classes"][0][1] == pytest.approx(float(traj.class_rates[-1].min()))
    assert s["highest_classes"][0][1] == pytest.approx(float(traj.class_rates[-1].max()))
    assert {name for name, _ in s["lowest_classes"]} == {"cat", "dog", "eel"}
    # a partly overlapping case with a hand-computed AUROC: clean [0.9, 0.2], noisy [0.5, 0.1] -> 3/4 pairs
    t = LRTrajectory(noise_mask=torch.tensor([False, False, True, True]))
    t.record_instance_rates(5, 1.0, torch.tensor([0.9, 0.2, 0.5, 0.01]))
    s2 = t.summary()
    assert s2["auroc_clean_vs_noisy"] == pytest.approx(0.75)
    assert s2["instance_rate_near_zero_fraction"] == 0.25
    md = traj.summary_markdown()
    assert "| AUROC of final instance rate, clean vs noisy | 1 |" in md
    assert "**Lowest final class rates:**" in md
    assert not any(math.isnan(v) for v in s.values() if isinstance(v, float))


def test_average_refuses_rows_of_different_train_sets_and_class_level_replays_anywhere():
    a, b = make_trajectory(0), make_trajectory(1)
    b.dataset["fingerprint"] = "beef"  # same size, other rows (e.g. two folds of a stratified k-fold split)
    with pytest.raises(ValueError, match="another train set.*instance_indices"):
        LRTrajectory.average([a, b])
    # with the folds' full-train positions it is well defined
    avg = LRTrajectory.average([a, b], instance_indices=[torch.arange(N), torch.arange(N)],
                               dataset={"num_examples": N, "fingerprint": None})
    assert avg.has_instance_rates
    # class-level rates are indexed by label: an average of folds replays on the full train set
    for t in (a, b):
        t._instance = []
    cls_avg = LRTrajectory.average([a, b])
    cls_avg.check_compatible({"num_examples": 10 * N, "fingerprint": "full"})
    with pytest.raises(ValueError, match="size mismatch"):
        make_trajectory(0).check_compatible({"num_examples": 10 * N, "fingerprint": "full"})


def test_average_refuses_repeated_positions_and_mixed_levels_and_warns_without_fingerprints():
    """A fold's positions must be distinct (a repeat would let one row overwrite another); runs of different rate
    levels are refused as such (not by a label-name mismatch that follows from it); runs whose train sets have no
    fingerprint cannot be checked to hold the same rows: averaged, with a warning naming the fix."""
    a, b = make_trajectory(0), make_trajectory(1)
    with pytest.raises(ValueError, match=r"instance_indices\[0\] names a full-train position more than once"):
        LRTrajectory.average([a, b], instance_indices=[torch.zeros(N, dtype=torch.int64), torch.arange(N)],
                             dataset={"num_examples": N, "fingerprint": None})
    instance_only = make_trajectory(1)
    instance_only._class, instance_only.label_names = [], None
    with pytest.raises(ValueError, match="different levels .* average runs of one rate level"):
        LRTrajectory.average([a, instance_only])
    for t in (a, b):
        t.dataset["fingerprint"] = None
    with pytest.warns(UserWarning, match="no fingerprint .* cannot be checked"):
        LRTrajectory.average([a, b])


def test_average_refuses_runs_a_replay_reads_differently_and_names_other_train_sets_first():
    """Runs whose meta_update or probes differ are replayed by different rules: refused, naming the setting (the
    average kept the first run's). Runs on train sets of other sizes and schedules are refused as other train
    sets (the schedule's misalignment follows from it and was named instead)."""
    a, b = make_trajectory(0), make_trajectory(1)
    a.config["meta_update"], b.config["meta_update"] = "same_step", "delayed"
    with pytest.raises(ValueError, match=r"different meta_update \(\['same_step', 'delayed'\]\).*one meta_update"):
        LRTrajectory.average([a, b])
    b.config["meta_update"] = "same_step"
    a.config["probe_batches"], b.config["probe_batches"] = 1.0, 0.0
    with pytest.raises(ValueError, match=r"different probe_batches"):
        LRTrajectory.average([a, b])
    small = make_trajectory(2, steps_per_epoch=2)  # a smaller train set: fewer steps an epoch, a smaller table
    small.dataset["fingerprint"] = None
    small._instance = [(s, e, r[: N - 2]) for s, e, r in small._instance]
    with pytest.raises(ValueError, match=r"instance tables have sizes .*train sets of other sizes"):
        LRTrajectory.average([make_trajectory(0), small])
