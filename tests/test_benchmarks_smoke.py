"""The benchmark scripts import, parse their flags and turn measurements into tables.

The benchmarks themselves take minutes (see benchmarks/); the slow test runs a one-round BERT step-cost pass, and
the robustness matrix runs two cells at --quick (tiny data, one epoch) in a subprocess.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from load_file import load_file

from hf_ddlr import MetaLRConfig

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name: str):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return load_file(os.path.join(BENCH, f"{name}.py"))


def _rows(jvp_time: float, cos: float) -> dict:
    rows = {}
    for name, t in [
        ("plain", 1.0),
        ("exact", 4.5),
        ("jvp", jvp_time),
        ("finite_difference", 3.0),
        ("last_layer", 1.3),
        ("jvp/delayed", 3.0),
        ("finite_difference/delayed", 2.4),
        ("last_layer/delayed", 1.3),
    ]:
        rows[name] = dict(
            time_s=t / 10,
            time_x_plain=t,
            time_x_exact=t / 4.5,
            work_mb=100 * min(t, 2.0),
            peak_rss_mb=500.0,
            mem_x_plain=min(t, 2.0) if name != "finite_difference/delayed" else 1.2,
        )
        if name != "plain":
            rows[name].update(cos=cos, spearman=1.0, max_rel_err=1e-7)
    return rows


def test_step_cost_reports_measured_ratios_without_verdicts():
    """The benchmark prints what it measured, every configuration a row; the targets these ratios are read
    against live in the README, so no PASS / FAIL (or target) line is printed."""
    sc = _load("step_cost")
    rows = _rows(3.2, 1.0)
    res = dict(model_description="m", environment="e", rounds=1, warmup=0, acc_warm_steps=0, rows=rows)
    md = sc.render(res)
    for name in rows:
        assert f"| {name} |" in md
    assert "| jvp | 320 | – | 3.20 | – | 200 (×2.00) | 500 | 1.0000000 | 1.0000 | 1.0e-07 |" in md
    assert "PASS" not in md and "FAIL" not in md and "target" not in md


def test_step_cost_paired_ratios_are_medians_of_per_round_ratios():
    sc = _load("step_cost")
    rows = {"plain": {"times_s": [1.0, 2.0, 1.0]}, "exact": {"times_s": [4.0, 4.0, 4.0]},
            "jvp": {"times_s": [3.0, 3.0, 1.5]}}
    sc.add_paired(rows)
    assert rows["jvp"]["time_x_plain_paired"] == 1.5  # ratios 3, 1.5, 1.5 (the ratio of medians would be 3)
    assert rows["jvp"]["time_x_exact_paired"] == 0.75
    assert rows["plain"]["time_x_plain_paired"] == 1.0


def test_strategy_accuracy_render():
    sa = _load("strategy_accuracy")
    runs = [
        dict(
            config=c,
            seed=s,
            test_accuracy=0.9 + 0.01 * s,
            auroc=0.9,
            rate_clean=1.2,
            rate_noisy=0.3,
            train_time_s=50.0,
        )
        for c in ("jvp (default)", "last_layer")
        for s in (0, 1)
    ]
    md = sa.render(runs, [0, 1], 8)
    assert "| jvp (default) | 0.9050 ± 0.0071 |" in md
    assert "+0.0000 ± 0.0000" in md


@pytest.mark.slow
def test_step_cost_bert_one_round(tmp_path):
    sc = _load("step_cost")
    sc.main(
        [
            "--model",
            "bert",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--no-mem",
            "--acc-warm",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert (tmp_path / "step_cost_bert.json").is_file()
    assert (tmp_path / "step_cost_bert.md").is_file()


def test_step_cost_measures_forward_mode_beside_the_default_on_bert_only(tmp_path):
    """On the BERT the default takes the per-layer products; 'jvp/forward_mode' is the same configuration with
    layerwise_dots=False (on the ResNet, a BatchNorm model, both would be forward mode: not measured twice)."""
    sc = _load("_tasks")
    assert "jvp/forward_mode" in sc.configs_for("bert") and "jvp/forward_mode" not in sc.configs_for("resnet")
    assert sc.OPTIONS["jvp/forward_mode"] == {"layerwise_dots": False}
    task = sc.make_task("bert", 32, n_train=64)
    for cfg, expected in (("jvp", True), ("jvp/forward_mode", False)):
        tr = sc.make_trainer(task, cfg, 1, str(tmp_path / cfg.replace("/", "_")))
        assert tr.args.layerwise_dots is expected and tr.args.meta_strategy == "jvp"


def test_step_cost_lora_task_trains_only_the_adapters_on_the_per_layer_path(tmp_path):
    """'bert_lora' is the benchmark's BERT under peft LoRA r=8 (query, value): plain LoRA training against the
    default, exact and forward mode; only adapters and the classifier head train, and the default takes the
    per-layer products."""
    pytest.importorskip("peft")
    sc = _load("_tasks")
    assert sc.configs_for("bert_lora") == ["plain", "exact", "jvp", "jvp/delayed", "jvp/forward_mode"]
    task = sc.make_task("bert_lora", 32, n_train=32)
    tr = sc.make_trainer(task, "jvp", 1, str(tmp_path))
    trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any(".query.lora_A" in n for n in trainable) and any(".value.lora_B" in n for n in trainable)
    tr.train()
    assert tr._layerwise == "verified"


def test_step_cost_decoder_and_batchnorm_tasks(tmp_path):
    """'llama' (a causal LM: no last-layer rows) takes the per-layer products through its RMSNorm layers;
    'cnn4' (BatchNorm: forward mode already, no separate forward-mode row) has four conv stages."""
    sc = _load("_tasks")
    assert sc.configs_for("llama") == ["plain", "exact", "jvp", "finite_difference", "jvp/delayed",
                                       "finite_difference/delayed", "jvp/forward_mode"]
    assert "jvp/forward_mode" not in sc.configs_for("cnn4") and "last_layer" in sc.configs_for("cnn4")
    tr = sc.make_trainer(sc.make_task("llama", 32, n_train=32), "jvp", 1, str(tmp_path / "llama"))
    tr.train()
    assert tr._layerwise == "verified"
    cnn = sc.make_task("cnn4", 32, n_train=64).make_model()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules()) == 4
    pytest.importorskip("peft")
    assert sc.configs_for("llama_lora") == sc.LORA_CONFIGS
    lora = sc.make_task("llama_lora", 32, n_train=32).make_model()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and all("lora_" in n for n in trainable)  # 2 layers x 7 projections x A, B


def test_robustness_matrix_covers_every_axis_and_lists_times(capsys):
    rb = _load("robustness")
    cells = rb.select_cells(None)  # the default selection: the extra cells run by name only
    assert len({c.name for c in rb.CELLS}) == len(rb.CELLS)
    assert cells + rb.EXTRA_CELLS == rb.CELLS and rb.select_cells(["*-adafactor-*"]) == rb.EXTRA_CELLS[2:3]
    # `python benchmarks/robustness.py` with no --cells reruns the committed matrix (the README's first table)
    with open(os.path.join(BENCH, "results", "robustness.md")) as f:
        committed = f.read().split("--cells ", 1)[1]
    assert [c.name for c in cells] == committed.split("`", 1)[0].split()
    for axis, values in (("data", {"mnist", "digits", "vader", "afinn", "textblob"}), ("model", {"cnn", "resnet", "minilm"}),
                         ("recipe", set(rb.RECIPES)), ("noise", set(rb.NOISES))):
        assert {getattr(c, axis) for c in rb.CELLS} == values, axis
    assert {c.data for c in cells if c.model == "resnet"} == {"mnist"}
    assert [c.name for c in rb.select_cells(["mnist-cnn-sgdm-*", "vader-minilm-ft-flip30"])] == [
        "mnist-cnn-sgdm-flip35", "mnist-cnn-sgdm-uniform20", "mnist-cnn-sgdm-pair30", "mnist-cnn-sgdm-classdep",
        "vader-minilm-ft-flip30", "mnist-cnn-sgdm-flip40"]
    assert rb.main(["--list", "--seeds", "0", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "mnist-cnn-sgd-flip35" in out and f"{len(cells)} cells, estimated" in out
    total_min = float(out.split("estimated ")[1].split(" min")[0])
    assert 45 <= total_min <= 125  # the default matrix (19 cells) is meant to run in about 60-120 min on 2 CPU cores
    # MetaLR runs are keyed by the MetaLRConfig defaults, so changing a default reruns them (and only them)
    cell = cells[0]
    assert rb.fingerprint(cell, "metalr", False) != rb.fingerprint(cell, "plain", False)
    assert rb.fingerprint(cell, "plain", False) != rb.fingerprint(cell, "plain", True)
    # the thread count changes where these chaotic trainings end: a run made with another count is not reused
    plain_one_thread, quick_one_thread = rb.fingerprint(cell, "plain", False), rb.fingerprint(cell, "plain", True)
    rb.RUN_SETTINGS["threads"] = 2
    try:
        assert rb.fingerprint(cell, "plain", False) != plain_one_thread
        assert rb.fingerprint(cell, "plain", True) == quick_one_thread  # --quick always runs on one thread
    finally:
        rb.RUN_SETTINGS["threads"] = 1
    assert rb.metalr_defaults()["meta_lr"] == MetaLRConfig.__dataclass_fields__["meta_lr"].default


def test_robustness_fingerprint_resolves_the_cap_rule_as_the_trainer_does():
    """A run's fingerprint holds ``instance_rate_at_cap="auto"`` resolved the trainer's way
    (``instance_rate_at_cap_choice``): relative under SGD without momentum and on the pretrained encoder's head,
    clamped under momentum, and clamped for a variant without instance rates (``lr_level="class"``), whatever the
    recipe."""
    rb = _load("robustness")
    cells = {c.name: c for c in rb.CELLS}
    sgd, sgdm, ft = cells["mnist-cnn-sgd-flip35"], cells["mnist-cnn-sgdm-flip35"], cells["vader-minilm-ft-flip30"]
    try:
        for level, expected in (("instance", ("relative", "clamp", "relative")),
                                ("both", ("relative", "clamp", "relative")),
                                ("class", ("clamp", "clamp", "clamp"))):
            rb.OVERRIDES.clear()
            rb.OVERRIDES["lr_level"] = level
            assert tuple(rb._resolved(c, "instance_rate_at_cap", "auto") for c in (sgd, sgdm, ft)) == expected, level
            assert rb._resolved(sgd, "instance_rate_at_cap", "clamp") == "clamp"  # an explicit rule stays
    finally:
        rb.OVERRIDES.clear()


def test_robustness_quick_writes_results_and_resumes(tmp_path):
    """One image cell and the MiniLM / VADER cell at --quick: tables, JSON, heat map and per-visit plot hold sane metrics, and a
    second run with the same JSON retrains nothing."""
    cells = ["digits-cnn-sgd-flip35", "vader-minilm-ft-flip30"]
    cmd = [sys.executable, os.path.join(BENCH, "robustness.py"), "--quick", "--cells", *cells, "--seeds", "0",
           "--output_dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    blob = json.loads((tmp_path / "robustness.json").read_text())
    runs = blob["runs"]
    assert sorted((r["cell"], r["method"]) for r in runs) == sorted(
        (c, m) for c in cells for m in ("plain", "metalr", "oracle"))
    for r in runs:
        assert r["quick"] is True and r["seed"] == 0 and r["steps"] > 0 and r["train_s"] > 0
        assert r["threads"] == 1 and r["torch"] == torch.__version__
        assert r["cpu"] == torch.backends.cpu.get_cpu_capability()
        assert 0.0 <= r["test_accuracy"] <= 1.0
        if r["method"] == "metalr":
            assert 0.0 <= r["rate_auroc"] <= 1.0 and r["rate_clean"] >= 0 and r["rate_noisy"] >= 0
        if r["method"] == "plain":
            assert 0.0 <= r["loss_auroc"] <= 1.0 and r["loss_noisy"] > 0
        if r["method"] == "oracle":
            assert r["n_train"] < next(x["n_train"] for x in runs if x["cell"] == r["cell"] and x["method"] == "plain")
    assert blob["metalr_defaults"]["meta_lr"] == MetaLRConfig.__dataclass_fields__["meta_lr"].default
    summ = blob["summary"]
    assert summ["paired_runs"] == 2 and 0.0 <= summ["frac_metalr_ge_plain"] <= 1.0
    assert -1.0 <= summ["mean_acc_gain_noisy_cells"] <= 1.0 and 0.0 <= summ["min_rate_auroc"]["auroc"] <= 1.0
    md = (tmp_path / "robustness.md").read_text()
    assert all(f"| {c} |" in md for c in cells) and "**Summary**" in md and "min rate AUROC" in md
    assert f"runs made with 1 thread(s), torch {torch.__version__}" in md and ": 6)" in md
    for name in ("robustness_auroc.png", "robustness_visits.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-4000:]
    assert second.stdout.count("done, skipped") == 2 and ": acc " not in second.stdout
    assert json.loads((tmp_path / "robustness.json").read_text())["runs"] == runs

    # --jobs: the same runs from two worker processes (only the timings differ)
    jobs = subprocess.run(cmd[:-1] + [str(tmp_path / "jobs"), "--jobs", "2"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert jobs.returncode == 0, jobs.stdout[-2000:] + jobs.stderr[-4000:]
    timing = {"train_s", "wall_s"}
    by_key = {(r["cell"], r["method"]): r for r in json.loads((tmp_path / "jobs" / "robustness.json").read_text())["runs"]}
    assert set(by_key) == {(r["cell"], r["method"]) for r in runs}
    for r in runs:
        other = by_key[(r["cell"], r["method"])]
        assert {k: v for k, v in other.items() if k not in timing} == {k: v for k, v in r.items() if k not in timing}
    # ... and the workers take the parent's --metalr_args: frozen rates stay at 1, so they rank nothing
    frozen = subprocess.run([sys.executable, os.path.join(BENCH, "robustness.py"), "--quick", "--cells", cells[0],
                             "--seeds", "0", "--output_dir", str(tmp_path / "frozen"), "--jobs", "2",
                             "--metalr_args", "meta_lr=0"], env=env, capture_output=True, text=True, timeout=300)
    assert frozen.returncode == 0, frozen.stderr[-4000:]
    (metalr,) = [r for r in json.loads((tmp_path / "frozen" / "robustness.json").read_text())["runs"]
                 if r["method"] == "metalr"]
    assert metalr["rate_auroc"] == 0.5 and metalr["rate_clean"] == metalr["rate_noisy"] == 1.0


def test_run_cell_train_seed_seeds_the_model_and_the_trainer_only(monkeypatch):
    """robustness.run_cell(train_seed=...): the model's initialisation and the TrainingArguments' seeds take it, the
    data (split, noise, meta set) stays the cell seed's; without it both are the cell's seed."""
    R = _load("robustness")
    seen: dict = {"model": [], "args": []}
    build, args = R.build_model, R.training_args
    monkeypatch.setattr(R, "build_model", lambda cell, seed, size: seen["model"].append(seed) or build(cell, seed, size))
    monkeypatch.setattr(R, "training_args", lambda cell, seed, out, quick: seen["args"].append(seed)
                        or args(cell, seed, out, quick))
    data = R.load_data(R.CELL_BY_NAME["digits-cnn-sgd-flip35"], 3, quick=True)
    first = R.run_cell("digits-cnn-sgd-flip35", 3, "plain", quick=True, data=data)
    again = R.run_cell("digits-cnn-sgd-flip35", 3, "plain", quick=True, data=data, train_seed=1003)
    assert seen == {"model": [3, 1003], "args": [3, 1003]}
    assert (again["seed"], again["n_noisy"], again["n_train"]) == (3, first["n_noisy"], first["n_train"])


def test_run_missing_trains_only_what_is_missing_and_keeps_what_an_interrupted_run_finished(tmp_path):
    """The diagnostics' shared loop: each (cell, seed, method) already in the JSON is skipped, only the missing
    methods of a seed are asked for, the JSON is written after every seed (a crash keeps the finished seeds and the
    rerun goes on from there), and the runs ``keep`` refuses are kept in the file but neither count as done nor
    come back to be shown."""
    rb = _load("robustness")
    cells = rb.select_cells(["digits-cnn-sgd-flip35", "mnist-cnn-sgd-flip35"])
    path = str(tmp_path / "d.json")
    smoke = {"cell": cells[0].name, "seed": 0, "method": "b", "quick": True}  # refused by keep: not done
    runs = [{"cell": cells[0].name, "seed": 0, "method": "a", "quick": False}, smoke]
    asked = []

    def train(cell, seed, missing, bar, crash_at=None):
        asked.append((cell.name, seed, list(missing)))
        if (cell.name, seed) == crash_at:
            raise KeyboardInterrupt
        bar.update(len(missing))
        return [{"cell": cell.name, "seed": seed, "method": m, "quick": False} for m in missing]

    keep = lambda r: not r["quick"]  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        rb.run_missing(path, runs, cells, [0, 1], lambda *a: train(*a, crash_at=(cells[1].name, 0)), "t",
                       methods=("a", "b"), keep=keep)
    assert asked == [(cells[0].name, 0, ["b"]), (cells[0].name, 1, ["a", "b"]), (cells[1].name, 0, ["a", "b"])]
    saved = json.loads(open(path).read())["runs"]
    assert saved[:2] == [runs[0], smoke] and len(saved) == 5  # the two finished seeds, written before the crash
    asked.clear()
    shown = rb.run_missing(path, saved, cells, [0, 1], train, "t", methods=("a", "b"), keep=keep)
    assert asked == [(cells[1].name, 0, ["a", "b"]), (cells[1].name, 1, ["a", "b"])]
    assert smoke in json.loads(open(path).read())["runs"] and smoke not in shown
    assert sorted((r["cell"], r["seed"], r["method"]) for r in shown) == sorted(
        (c.name, s, m) for c in cells for s in (0, 1) for m in ("a", "b"))
    asked.clear()
    one = rb.run_missing(path, [], cells[:1], [3], train, "t")  # one run per seed, no method
    assert asked == [(cells[0].name, 3, [None])] and one[0]["method"] is None


def test_final_step_traces_leave_the_training_unchanged(tmp_path):
    """benchmarks/final_step.py --quick on an image and a text cell: the accuracy traced after the last step is the
    run's final test accuracy (to one example), and the run ends exactly where robustness.py's run without the
    callback ends (the evaluations in between change nothing). A full run already in the folder is neither taken
    for the quick one nor shown in its table."""
    fs = _load("final_step")
    cells = ["digits-cnn-sgd-flip35", "vader-minilm-ft-flip30"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    full = {"cell": cells[0], "seed": 0, "method": "plain", "every": 2, "fingerprint": "x", "test_accuracy": 0.123,
            "trace": [[2, 0.123]], "threads": 1}  # recorded before runs carried their quick flag: a full run
    other = {**full, "seed": 5, "test_accuracy": 0.456, "trace": [[2, 0.456]]}  # a seed the quick run has not
    (tmp_path / "final_step.json").write_text(json.dumps({"runs": [full, other]}))
    assert fs.main(["--quick", "--cells", *cells, "--seeds", "0", "--every", "2", "--output_dir", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "final_step.json").read_text())["runs"]
    assert runs[:2] == [full, other] and all(r["quick"] for r in runs[2:])
    runs = runs[2:]
    assert sorted((r["cell"], r["method"]) for r in runs) == sorted((c, m) for c in cells for m in ("plain", "metalr"))
    rb = sys.modules["robustness"]
    for r in runs:
        steps = [s for s, _ in r["trace"]]
        assert steps == sorted(steps) and len(steps) >= 2 and steps[-1] > steps[-2]
        test_size = rb.QUICK["test"]
        assert abs(r["trace"][-1][1] - r["test_accuracy"]) <= 1 / test_size + 1e-9
        alone = rb.run_cell(r["cell"], 0, r["method"], quick=True)
        assert alone["test_accuracy"] == r["test_accuracy"], (r["cell"], r["method"])
    md = (tmp_path / "final_step.md").read_text()
    assert "MetaLR ≥ plain:" in md and "digits-cnn-sgd-flip35" in md and "0.123" not in md and "0.456" not in md


def test_wallclock_quick_writes_the_table_and_the_breakdown(tmp_path):
    """benchmarks/wallclock.py --quick (one round, tiny data) on the ResNet: whole-run times of plain and MetaLR,
    their ratio and the per-phase breakdown, in wallclock.json and wallclock.md; and the DPO task."""
    wc = _load("wallclock")
    res = wc.main(["--quick", "--tasks", "resnet", "--output_dir", str(tmp_path)])
    t = res["tasks"]["resnet"]
    assert set(t["times_s"]) == {"plain", *wc.DEFAULT_CONFIGS} and all(len(v) == 1 for v in t["times_s"].values())
    assert all(r > 0 for r in t["ratio"].values())
    for cfg, phases in t["phases_ms"].items():
        assert set(phases) == {*wc.PHASES, "total"} and phases["total"] > 0 and phases["real step"] > 0
        if cfg != "plain":
            assert phases["meta loss"] > 0 and phases["dots"] > 0
    md = (tmp_path / "wallclock.md").read_text()
    assert "| resnet | defaults |" in md and "| meta batch |" in md and "shared 2-core CPU" in md
    assert json.loads((tmp_path / "wallclock.json").read_text())["tasks"]["resnet"]["ratio"] == t["ratio"]
    pytest.importorskip("trl")  # the DPO task: trl.DPOTrainer against MetaDPOTrainer, scored on its test pairs
    dpo = wc.main(["--quick", "--tasks", "dpo", "--output_dir", str(tmp_path / "dpo")])["tasks"]["dpo"]
    assert all(r > 0 for r in dpo["ratio"].values()) and dpo["phases_ms"]["defaults"]["meta loss"] > 0
    assert 0 <= dpo["metrics"]["plain"]["test_accuracy"] <= 1 and 0 <= dpo["metrics"]["defaults"]["rate_auroc"] <= 1


def test_torch_compile_quick_times_each_run_and_compares_the_rates(tmp_path):
    """benchmarks/torch_compile.py --quick on the CNN: plain and MetaLR, eager and compiled; each compiled run
    compiles afresh (its own inductor cache), and the compiled MetaLR run learns the eager run's rates."""
    tc = _load("torch_compile")
    res = tc.main(["--quick", "--tasks", "cnn", "--output_dir", str(tmp_path)])
    t = res["tasks"]["cnn"]
    assert set(t["runs"]) == set(tc.RUNS) and all(len(v) == 1 and v[0]["steps"] > 1 for v in t["runs"].values())
    assert all(m["seconds"] > 0 and m["steady_ms"] > 0 for m in t["median"].values())
    assert t["max_rate_difference"] < 1e-2
    assert abs(t["scores"]["MetaLR"]["rate_auroc"] - t["scores"]["MetaLR compiled"]["rate_auroc"]) < 1e-2
    md = (tmp_path / "torch_compile.md").read_text()
    assert "| cnn | MetaLR compiled |" in md and "compiles from scratch" in md
    assert json.loads((tmp_path / "torch_compile.json").read_text())["tasks"]["cnn"]["median"] == t["median"]


def test_wallclock_sft_task_times_the_causal_lm_example(tmp_path):
    """The wall-clock benchmark's causal-LM task (examples/sft_noisy_data.py's data, model and recipe, with the
    example's instance x source rates): a plain and a MetaLR run, timed and scored (held-out exact-match,
    the instance rates' AUROC for the wrong answers)."""
    wc = _load("wallclock")
    res = wc.main(["--quick", "--tasks", "sft", "--configs", "defaults", "--output_dir", str(tmp_path)])
    t = res["tasks"]["sft"]
    assert set(t["times_s"]) == {"plain", "defaults"} and t["ratio"]["defaults"] > 0
    assert 0 <= t["metrics"]["plain"]["test_accuracy"] <= 1 and "rate_auroc" not in t["metrics"]["plain"]
    assert 0 <= t["metrics"]["defaults"]["rate_auroc"] <= 1
    assert t["phases_ms"]["defaults"]["meta loss"] > 0 and t["phases_ms"]["defaults"]["dots"] > 0
    md = (tmp_path / "wallclock.md").read_text()
    assert "| sft | defaults |" in md and "lr_level=both by source" in md


def test_the_committed_robustness_runs_are_current():
    """Every run behind the README's robustness table still matches the script and MetaLR's defaults (an option
    added with a neutral default must not outdate them: NEUTRAL_NEW_OPTIONS), so rerunning the script reuses
    them and regenerating the table keeps them."""
    rb = _load("robustness")
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "robustness.json")
    with open(path) as f:
        runs = json.load(f)["runs"]
    cells = {c.name: c for c in rb.CELLS}
    stale = [(r["cell"], r["seed"], r["method"]) for r in runs
             if r["fingerprint"] != rb.fingerprint(cells[r["cell"]], r["method"], r["quick"])]
    assert not stale and sum(r["method"] == "metalr" for r in runs) == 51  # 17 cells x 3 seeds


def test_robustness_rows_average_the_same_seeds_for_every_method():
    """A variant run on seeds 3-5 reuses the matrix's plain runs of seeds 0-5: its row averages plain, MetaLR and
    the oracle over seeds 3-5 only (the plain runs of seeds 0-2 would otherwise move the plain column and the
    loss AUROC); a cell without MetaLR runs keeps every seed."""
    rb = _load("robustness")
    cell = rb.CELLS[0]

    def run(seed, method, acc):
        r = {"cell": cell.name, "seed": seed, "method": method, "quick": False, "test_accuracy": acc,
             "fingerprint": rb.fingerprint(cell, method, False), "train_s": 1.0, "n_train": 10, "n_noisy": 3}
        if method == "plain":
            r["loss_auroc"] = 0.5 + seed / 100
        if method == "metalr":
            r.update(rate_auroc=0.9, rate_auroc_within_label=0.9, rate_clean=1.0, rate_noisy=0.1)
        return r

    runs = [run(s, m, 0.1 * s) for s in range(6) for m in ("plain", "oracle")] + [run(s, "metalr", 0.5) for s in (3, 4, 5)]
    by = rb.cell_stats(runs, quick=False)[cell.name]
    assert [[r["seed"] for r in by[m]] for m in rb.METHODS] == [[3, 4, 5]] * 3
    md = rb.render(rb.cell_stats(runs, quick=False), rb.summary(rb.cell_stats(runs, quick=False)), "cmd")
    assert "| 0.400 ± 0.100 | 0.500 ± 0.000 | 0.400 ± 0.100 |" in md and "| 0.540 ± 0.010 |" in md
    plain_only = rb.cell_stats([r for r in runs if r["method"] == "plain"], quick=False)[cell.name]
    assert [r["seed"] for r in plain_only["plain"]] == list(range(6))


def test_robustness_summary_counts_pairs_with_their_interval_and_the_oracles():
    """The summary's count of runs at or above plain, its 95 % Wilson interval (checked against scipy's, an
    independent implementation) and the oracle's count on the same seeds."""
    from scipy.stats import binomtest

    rb = _load("robustness")
    cell = rb.CELLS[0]

    def run(seed, method, acc):
        return {"cell": cell.name, "seed": seed, "method": method, "quick": False, "test_accuracy": acc,
                "fingerprint": rb.fingerprint(cell, method, False), "train_s": 1.0, "n_train": 10, "n_noisy": 3,
                "rate_auroc": 0.9, "loss_auroc": 0.9}

    plain, metalr, oracle = [0.5, 0.6, 0.7, 0.8], [0.55, 0.6, 0.65, 0.9], [0.4, 0.5, 0.8, 0.9]
    runs = [run(s, m, acc[s]) for s in range(4) for m, acc in (("plain", plain), ("metalr", metalr),
                                                                 ("oracle", oracle))]
    summ = rb.summary(rb.cell_stats(runs, quick=False))
    assert (summ["paired_runs"], summ["metalr_ge_plain"]) == (4, 3)  # seed 1 is a tie: it counts
    assert (summ["oracle_paired_runs"], summ["oracle_ge_plain"]) == (4, 2)
    for k, n in ((3, 4), (44, 51), (51, 51), (0, 7)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert rb.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)
    md = rb.render(rb.cell_stats(runs, quick=False), summ, "cmd")
    lo, hi = rb.wilson_interval(3, 4)
    assert (f"≥ plain in 75% of 4 paired runs (3; 95 % Wilson interval {lo:.0%}–{hi:.0%}; the oracle (noisy examples "
            "dropped): 2 of 4)") in md


def test_robustness_metalr_args_keep_integers_integers():
    """--metalr_args meta_batch_size=200 (an option whose default is None) gives the int 200, not 200.0, which
    MetaLRConfig refuses; floats stay floats."""
    rb = _load("robustness")
    got = rb.parse_metalr_args(["meta_batch_size=200", "meta_lr=1", "meta_grad_average_epochs=0.5",
                                "max_rate=none", "keep_history=false"])
    assert got == {"meta_batch_size": 200, "meta_lr": 1.0, "meta_grad_average_epochs": 0.5, "max_rate": None,
                   "keep_history": False}
    assert type(got["meta_batch_size"]) is int and type(got["meta_lr"]) is float


def test_robustness_metalr_args_are_checked_before_any_run():
    """A name for an option off by default stays a name; a value MetaLRConfig refuses, or text for a number, stops
    the script at once with the option's own message (not after the plain runs, nor as a bare float() error)."""
    rb = _load("robustness")
    assert rb.parse_metalr_args(["lr_level=group", "group_column=source"]) == {"lr_level": "group",
                                                                             "group_column": "source"}
    for pair, expected in [("meta_lr=-1", "meta_lr must be >= 0"), ("meta_lr=fast", "meta_lr takes a number"),
                           ("lookahead_step=2", "lookahead_step must be in [0, 1]")]:
        with pytest.raises(SystemExit, match=re.escape(expected)):
            rb.parse_metalr_args([pair])


def test_robustness_jobs_keeps_the_runs_that_finish_when_one_fails(tmp_path):
    """A run that fails in a --jobs worker (here MetaLR asked for a group column the data lacks, which only the
    trainer can tell) does not lose the others: they are saved, and the script exits non-zero naming the run and
    its error."""
    cmd = [sys.executable, os.path.join(BENCH, "robustness.py"), "--quick", "--cells", "digits-cnn-sgd-flip35",
           "--seeds", "0", "--jobs", "2", "--metalr_args", "lr_level=group", "group_column=nosuch",
           "--output_dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "1 of 3 runs failed (the others are saved): digits-cnn-sgd-flip35 seed 0 metalr" in out.stderr
    assert "no 'nosuch' column" in out.stderr
    runs = json.loads((tmp_path / "robustness.json").read_text())["runs"]
    assert sorted(r["method"] for r in runs) == ["oracle", "plain"]



def test_layer_signal_quick_splits_the_products_into_groups_that_add_up(tmp_path):
    """benchmarks/layer_signal.py --quick on the MiniLM cell: one group per encoder block plus the embeddings,
    pooler and head, whose products add up to the meta-gradient the rates stepped on; AUROCs in range."""
    ls = _load("layer_signal")
    assert ls.group_of("bert.encoder.layer.3.attention.self.query.weight") == "layer03"
    assert ls.group_of("bert.embeddings.word_embeddings.weight") == "embeddings"
    assert ls.group_of("classifier.weight") == "classifier"
    assert ls.group_of("model.layers.11.mlp.up_proj.weight") == "layer11"
    assert ls.main(["--quick", "--seeds", "0", "--output_dir", str(tmp_path)]) == 0
    (run,) = json.loads((tmp_path / "layer_signal.json").read_text())
    assert run["parts_vs_whole_cosine"] > 0.9999
    groups = run["groups"]
    assert list(groups) == ["embeddings", *(f"layer{i:02d}" for i in range(6)), "pooler", "classifier", "all"]
    for g in groups.values():
        assert all(0.0 <= a <= 1.0 for a in g["per_visit_auroc"]) and 0.0 <= g["summed_auroc"] <= 1.0
        assert g["share"] >= 0
    assert groups["all"]["share"] == 1.0
    assert "| **all (what the rates step on)** |" in (tmp_path / "layer_signal.md").read_text()


def test_class_rate_trace_reads_the_class_rates_over_the_run(capsys):
    """benchmarks/class_rate_trace.py --quick on a digits cell with lr_level='both': nine steps from 0 to the
    last, ten classes, rates starting at 1 and moved by the end; a run without class rates is refused."""
    crt = _load("class_rate_trace")
    rb = sys.modules["robustness"]
    saved = dict(rb.OVERRIDES)
    try:
        assert crt.main(["--cell", "digits-cnn-sgd-flip35", "--seeds", "0", "--quick"]) == 0
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "step" not in line]
        steps = [int(r.split("|")[1]) for r in rows]
        rates = [[float(x) for x in r.split("|")[2:-1]] for r in rows]
        assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 2 and all(len(x) == 10 for x in rates)
        assert rates[0] == [1.0] * 10 and rates[-1] != rates[0]
        rb.OVERRIDES.clear()
        with pytest.raises(SystemExit, match="no class rates"):
            crt.trace("digits-cnn-sgd-flip35", 0, quick=True)
    finally:
        rb.OVERRIDES.clear()
        rb.OVERRIDES.update(saved)


def test_the_afinn_cell_reads_the_packaged_lexicon_with_the_sign_of_each_rating_as_its_label():
    """The held-out AFINN cell's data: every nonzero entry of the afinn package's AFINN-en-165.txt once, labelled
    positive exactly when its rating is > 0, split like the VADER cell (20 balanced meta words, 30 % flipped)."""
    afinn = pytest.importorskip("afinn")
    rb = _load("robustness")
    path = os.path.join(os.path.dirname(afinn.__file__), "data", "AFINN-en-165.txt")
    with open(path, encoding="utf-8") as f:
        rated = dict(line.rstrip("\n").rsplit("\t", 1) for line in f if line.strip())
    lexicon = rb.load_afinn_lexicon()
    expected = {w: int(int(v) > 0) for w, v in rated.items() if int(v) != 0}
    assert dict(zip(lexicon["text"], lexicon["label"])) == expected and len(lexicon) == len(expected) == 3380
    ds, noisy = rb.load_data(rb.CELL_BY_NAME["afinn-minilm-ft-flip30"], seed=0)
    assert (len(ds["train"]), len(ds["meta"]), len(ds["test"])) == (2000, 20, 1000)
    assert sorted(ds["meta"]["label"]) == [0] * 10 + [1] * 10 and abs(noisy.mean() - 0.3) < 0.01


def test_the_textblob_cell_averages_each_adjectives_senses_and_keeps_the_clear_ones():
    """The held-out TextBlob cell's data: every adjective of textblob's en-sentiment.xml whose polarity, averaged
    over its senses, is at least 0.1 away from 0, once, labelled by its sign (read here with a regular expression,
    not the loader's XML parser); 600 train words, 20 balanced meta words, the rest the test set."""
    textblob = pytest.importorskip("textblob")
    rb = _load("robustness")
    with open(os.path.join(os.path.dirname(textblob.__file__), "en", "en-sentiment.xml"), encoding="utf-8") as f:
        tags = re.findall(r"<word\b[^>]*>", f.read())
    senses: dict[str, list[float]] = {}
    for tag in tags:
        form, polarity = re.search(r'form="([^"]*)"', tag)[1], re.search(r'polarity="([^"]*)"', tag)[1]
        senses.setdefault(form, []).append(float(polarity))
    means = {w: sum(p) / len(p) for w, p in senses.items()}
    expected = {w: int(m > 0) for w, m in means.items() if abs(m) >= 0.1}
    lexicon = rb.load_textblob_lexicon()
    assert len(tags) == 2918 and len(senses) == 1528
    assert dict(zip(lexicon["text"], lexicon["label"])) == expected and len(lexicon) == len(expected) == 1203
    ds, noisy = rb.load_data(rb.CELL_BY_NAME["textblob-minilm-ft6-flip30"], seed=0)
    assert (len(ds["train"]), len(ds["meta"]), len(ds["test"])) == (600, 20, 583)
    assert sorted(ds["meta"]["label"]) == [0] * 10 + [1] * 10 and abs(noisy.mean() - 0.3) < 0.01


def test_fixed_weights_selects_by_each_ranking_and_weights_each_example_loss():
    """benchmarks/fixed_weights.py: each variant's weights (the rates' and the loss's selections of as many
    examples as are clean, and the clean mask with either error of the rates' selection), and the weighted loss
    Σ w_i·loss_i / batch size against a log-softmax taken by hand."""
    fw = _load("fixed_weights")
    noisy = np.array([False, True, False, True, False])
    rates, loss = np.array([0.9, 0.1, 0.2, 0.8, 1.0]), np.array([0.1, 3.0, 0.2, 2.5, 4.0])
    w = {k: v.tolist() for k, v in fw.weightings(rates, loss, noisy).items()}
    assert set(w) == set(fw.WEIGHTINGS)
    assert w["metalr_keep"] == [1, 0, 0, 1, 1] and w["loss_keep"] == [1, 0, 1, 1, 0] and w["clean"] == [1, 0, 1, 0, 1]
    assert w["clean_minus_dropped"] == [1, 0, 0, 0, 1] and w["clean_plus_kept"] == [1, 0, 1, 1, 1]
    assert np.allclose(w["metalr_final"], rates)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)

    class Out:
        def __init__(self, logits):
            self.logits = logits

    weights = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25])
    x, y, idx = torch.randn(3, 4), torch.tensor([2, 0, 1]), torch.tensor([4, 1, 2])
    holder = types.SimpleNamespace(example_weights=weights)
    got = fw.FixedWeightTrainer.compute_loss(holder, lambda **kw: Out(model(kw["x"])),
                                             {"x": x, "labels": y, "sample_index": idx})
    by_hand = -(weights[idx] * torch.log_softmax(model(x), -1)[torch.arange(3), y]).sum() / 3
    assert torch.allclose(got, by_hand)


def test_paired_significance_counts_the_discordant_examples_and_tests_them_exactly(tmp_path, monkeypatch):
    """benchmarks/paired_significance.py: b (right under plain only) and c (right under MetaLR only) counted from the
    per-example correctness, McNemar's exact p against the binomial sum taken by hand, the paired difference's
    interval, and the summary's counts; a run that does not reproduce the matrix's accuracy is flagged."""
    from math import comb

    ps = _load("paired_significance")
    plain, metalr = "1" * 80 + "10" * 6 + "0" * 8, "1" * 80 + "01" * 6 + "1" * 8  # 100 examples: b = 6, c = 6 + 8
    got = ps.compare(plain, metalr)
    assert (got["n"], got["b"], got["c"]) == (100, 6, 14)
    by_hand = min(1.0, 2 * sum(comb(20, k) for k in range(0, 7)) / 2**20)  # two-sided: 2 · P(X ≤ 6), X ~ Bin(20, ½)
    assert got["p"] == pytest.approx(by_hand, rel=1e-9) and 0.05 < got["p"] < 0.2
    assert got["diff"] == pytest.approx(0.08)
    half = 1.96 * np.sqrt(20 - 8**2 / 100) / 100
    assert (got["low"], got["high"]) == (pytest.approx(0.08 - half), pytest.approx(0.08 + half))
    assert ps.compare(plain, plain)["p"] == 1.0 and ps.verdict(ps.compare(plain, plain)) == "within the noise"
    strong = ps.compare("1" * 60 + "0" * 40, "1" * 100)
    assert strong["p"] < 1e-9 and ps.verdict(strong) == "MetaLR better"
    assert ps.verdict(ps.compare("1" * 100, "1" * 60 + "0" * 40)) == "**MetaLR worse**"
    with pytest.raises(ValueError, match="different sizes"):
        ps.compare("1" * 10, "1" * 11)

    cell = "digits-cnn-sgd-flip35"
    monkeypatch.setattr(ps.R, "matrix_runs", lambda: {(cell, 0, "plain"): {"test_accuracy": 0.86},
                                                     (cell, 0, "metalr"): {"test_accuracy": 0.94},
                                                     (cell, 1, "plain"): {"test_accuracy": 0.99},
                                                     (cell, 1, "metalr"): {"test_accuracy": 0.63}})
    runs = [{"cell": cell, "seed": 0, "method": "plain", "test_accuracy": 0.86, "correct": plain},
            {"cell": cell, "seed": 0, "method": "metalr", "test_accuracy": 0.94, "correct": metalr},
            {"cell": cell, "seed": 1, "method": "plain", "test_accuracy": 1.0, "correct": "1" * 100},
            {"cell": cell, "seed": 1, "method": "metalr", "test_accuracy": 0.6, "correct": "1" * 60 + "0" * 40}]
    md = ps.render(runs, "cmd")
    assert "| digits-cnn-sgd-flip35 | 0 | 100 | 0.860 / 0.940 | yes | +8.0 (" in md and "| 6 / 14 |" in md
    assert "| digits-cnn-sgd-flip35 | 1 | 100 | 1.000 / 0.600 | no | -40.0 (" in md
    assert ("2 paired runs: MetaLR at or above plain in 1; significantly better (p < 0.05) in 0, significantly worse "
            "in 1, within the test set's noise in 1; mean difference -16.00 points") in md
    assert ("both reproduce the committed matrix's: 1 of 2; the runs that moved differ from the matrix's by 2.00 "
            "points on average (up to 3.0)") in md  # seed 1: 1.0 against 0.99, 0.6 against 0.63
    assert "of the 1 runs below plain, significantly below: 1" in md
    assert "Plain training against itself" not in md  # no --training_noise runs: no null section

    again = "1" * 80 + "01" * 6 + "0" * 8  # seed 0 retrained: b = 6, c = 6 against plain
    runs.append({"cell": cell, "seed": 0, "method": ps.RESEEDED, "test_accuracy": 0.86, "correct": again})
    md = ps.render(runs, "cmd")
    assert "| digits-cnn-sgd-flip35 | 0 | 0.860 / 0.860 | +0.0 (" in md and "| 6 / 6 | 1 | within the noise |" in md
    assert ("1 pairs of plain runs: the second at or above the first in 1; significantly different (p < 0.05) in 0; "
            "mean |difference| 0.00 points") in md
    assert "MetaLR at or above the mean of the two plain runs in 1 of 1 (at or above the first: 1)" in md
    runs[-1] |= {"test_accuracy": 0.98}  # plain runs 0.86 and 0.98: their mean, 0.92, is below MetaLR's 0.94
    assert "in 1 of 1 (at or above the first: 1)" in ps.render(runs, "cmd")
    runs[1] |= {"test_accuracy": 0.90}  # MetaLR 0.90: below that mean, above the first plain run
    assert "in 0 of 1 (at or above the first: 1)" in ps.render(runs, "cmd")


def test_a_run_predicts_each_data_set_once_per_model_state():
    """The run's accuracy and a diagnostic's per-example correctness (paired_significance's ``after_train``) share
    one prediction pass of the test set; another data set or a later optimizer step predicts again."""
    from types import SimpleNamespace

    ps = _load("paired_significance")
    calls = []

    class Data(SimpleNamespace):
        def remove_columns(self, _):
            return self

    def predict(ds):
        calls.append(ds._fingerprint)
        logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
        return SimpleNamespace(predictions=logits, label_ids=np.array([0, 1, 1]))

    trainer = SimpleNamespace(state=SimpleNamespace(global_step=7), predict=predict)
    test, train = Data(_fingerprint="test"), Data(_fingerprint="train")
    assert ps.correct_on(trainer, test) == "110"
    assert ps.R.accuracy_on(trainer, test) == pytest.approx(2 / 3)
    assert calls == ["test"]
    ps.R.train_losses(trainer, train)
    trainer.state.global_step = 8
    ps.R.accuracy_on(trainer, train)
    assert calls == ["test", "train", "train"]


def test_rate_rules_replay_reproduces_the_trainers_rates(monkeypatch):
    """benchmarks/rate_rules.py replays a run's recorded rate signals in numpy: under the rule the run used it must
    land on the trainer's own final rates — the clamped step under AdamW, the step relative to the class's median
    at the cap under plain SGD — or its comparison of other rules on the same signals says nothing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rr = _load("rate_rules")
    for cell, at_cap in (("mnist-cnn-adamw-flip35", "clamp"), ("digits-cnn-sgd-flip35", "relative")):
        out = rr.run_seed(rr.R.CELL_BY_NAME[cell], 0, quick=True)
        assert out["at_cap"] == at_cap and out["updates"] > 0
        assert out["replay_check"] < 1e-5, (cell, out["replay_check"])
        assert out["as run"] == pytest.approx(out["trainer"], abs=1e-9)
        assert len(out["per bin"]) == rr.BINS and 0 <= out["linear read"] <= 1
    # the recorder leaves the rate table as it found it
    assert rr.rates_mod.RateTable.update.__name__ == "update" and rr.rates_mod.RateTable.update.__qualname__ == (
        "RateTable.update")


def test_lookahead_momentum_buffer_is_torchs_momentum_buffer():
    """benchmarks/lookahead_momentum.py lands the lookahead where torch's SGD with momentum would step: its buffer,
    kept beside a plain SGD optimizer, must be the one torch.optim.SGD(momentum=μ) keeps at the same iterates and
    gradients (weight decay included, per param group)."""
    lm = _load("lookahead_momentum")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD([{"params": [model.weight], "weight_decay": 0.05}, {"params": [model.bias]}], lr=0.1)
    buffers = lm.MomentumBuffer(opt, 0.9)
    shadow = {p: torch.nn.Parameter(p.detach().clone()) for p in model.parameters()}
    ref = torch.optim.SGD([{"params": [shadow[model.weight]], "weight_decay": 0.05},
                           {"params": [shadow[model.bias]]}], lr=0.1, momentum=0.9)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        for p, q in shadow.items():  # the reference steps from the same iterate with the same gradient
            q.data.copy_(p.data)
            q.grad = p.grad.clone()
        ref.step()
        opt.step()
        for p, q in shadow.items():
            torch.testing.assert_close(buffers.buffers[id(p)], ref.state[q]["momentum_buffer"])


def _quick_runs(mod, name: str, output_dir) -> dict[str, dict]:
    """A diagnostic's ``--quick`` run on one digits cell and seed, its runs by method (every method it has)."""
    assert mod.main(["--quick", "--cells", "digits-cnn-sgd-flip35", "--seeds", "0", "--output_dir", str(output_dir)]) == 0
    runs = {r["method"]: r for r in json.loads((output_dir / f"{name}.json").read_text())["runs"]}
    assert set(runs) == set(mod.METHODS)
    assert "digits-cnn-sgd-flip35" in (output_dir / f"{name}.md").read_text()
    return runs


def test_lookahead_momentum_quick_moves_the_rates_and_refuses_momentum_cells(tmp_path, monkeypatch):
    """lookahead_momentum.py --quick: the three runs of a plain-SGD cell, the momentum-lookahead run's rates not the
    defaults' (the buffer reached the lookahead), the trainer's method restored afterwards; a cell whose recipe has
    momentum is refused with the reason."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = _load("lookahead_momentum")
    original = lm.MetaLRTrainer._lookahead_specs
    runs = _quick_runs(lm, "lookahead_momentum", tmp_path)
    assert runs["metalr_momentum_lookahead"]["rate_auroc"] != runs["metalr"]["rate_auroc"]
    assert lm.MetaLRTrainer._lookahead_specs is original
    with pytest.raises(SystemExit, match="pick plain-SGD cells"):
        lm.main(["--quick", "--cells", "digits-cnn-sgdm-flip35", "--output_dir", str(tmp_path)])


def _lookahead_meta_loss(seed: int):
    """A linear classifier's 7 training losses ``L_i`` (detached) and its meta loss after one SGD lookahead step
    taken at example weights ``w`` (lr 0.3), as a function of ``w`` that autograd differentiates end to end."""
    torch.manual_seed(seed)
    W = torch.randn(3, 5, requires_grad=True)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    xm, ym = torch.randn(4, 5), torch.randint(0, 3, (4,))

    def meta_loss(w: torch.Tensor) -> torch.Tensor:
        L = torch.nn.functional.cross_entropy(x @ W.T, y, reduction="none")
        (g,) = torch.autograd.grad((w * L).sum() / len(y), W, create_graph=True)
        return torch.nn.functional.cross_entropy(xm @ (W - 0.3 * g).T, ym)

    return torch.nn.functional.cross_entropy(x @ W.T, y, reduction="none").detach(), meta_loss


@pytest.mark.parametrize("normalize", [False, True])
def test_meta_weight_net_phi_gradient_is_the_double_backward_one(normalize):
    """benchmarks/reweighting.py's Meta-Weight-Net steps V_φ on the chain rule through the trainer's ∂L_meta/∂e_i: it must equal
    Meta-Weight-Net's own gradient, a double backward through the lookahead θ' = θ - lr Σ e_i ∇L_i / N with
    e_i = V_φ(L_i) (divided by the batch mean with normalize), computed here by autograd end to end."""
    mw_mod = _load("reweighting")
    mw = mw_mod.MetaWeightNet(seed=3, hidden=8, normalize=normalize)
    L, meta_loss = _lookahead_meta_loss(seed=0)
    exact = torch.autograd.grad(meta_loss(mw._step_weights(L)), list(mw.net.parameters()))
    e = mw.weights(L).requires_grad_(True)
    (example_grad,) = torch.autograd.grad(meta_loss(e), e)  # ∂L_meta/∂e_i, as the trainer hands it over
    for got, want in zip(mw.phi_gradient(L, example_grad), exact):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    before = [p.detach().clone() for p in mw.net.parameters()]
    mw.step(L, example_grad)
    assert all(not torch.equal(a, p) for a, p in zip(before, mw.net.parameters()))


@pytest.mark.parametrize("normalize", [False, True])
def test_meta_weight_net_steps_use_v_phi_and_restore_the_trainer(tmp_path, monkeypatch, normalize):
    """In a --quick run of the Meta-Weight-Net method, every meta step's lookahead takes the window at V_φ(L_i) of
    the φ before the step, and the real step at V_φ(L_i) of the updated φ (φ moved in between; both divided by
    the batch's mean with normalize); the table keeps the
    last visit's V_φ; the trainer's methods are restored afterwards; main writes the table and the curves' plot."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mw_mod = _load("reweighting")
    from hf_ddlr import schedules

    originals = (schedules.Schedule._forward, mw_mod.rates_mod.RateTable.effective,
                 mw_mod.rates_mod.RateTable.update)
    seen = {"meta": [], "real": []}
    made_box: list = []
    real_meta_gradients, real_refresh = schedules.meta_gradients, schedules.Schedule._refresh

    def meta_gradients(model, params, window, *a, **kw):
        mw = made_box[0][0]
        seen["meta"].append(max(float((mb.weights - mw.weights(mb.losses)).abs().max()) for mb in window))
        seen["phi"] = [p.detach().clone() for p in mw.net.parameters()]
        return real_meta_gradients(model, params, window, *a, **kw)

    def refresh(self):
        real_refresh(self)
        if made_box and made_box[0] and all(mb.losses is not None for mb in self.window):
            mw = made_box[0][0]
            moved = any(not torch.equal(a, p) for a, p in zip(seen["phi"], mw.net.parameters()))
            seen["real"].append((max(float((mb.weights - mw.weights(mb.losses)).abs().max()) for mb in self.window),
                                 moved))

    monkeypatch.setattr(schedules, "meta_gradients", meta_gradients)
    monkeypatch.setattr(schedules.Schedule, "_refresh", refresh)
    rb = sys.modules["robustness"]
    mw_mod.R.OVERRIDES["probe_batches"] = 0
    try:
        with mw_mod.meta_weight_net(seed=0, normalize=normalize) as made:
            made_box.append(made)
            trainer_box = []
            run = rb.run_cell("digits-cnn-sgd-flip35", 0, "metalr", quick=True, after_train=trainer_box.append)
    finally:
        mw_mod.R.OVERRIDES.clear()
    assert len(made) == 1 and seen["meta"] and len(seen["real"]) == len(seen["meta"])
    assert max(seen["meta"]) < 1e-6 and max(d for d, _ in seen["real"]) < 1e-6
    assert all(moved for _, moved in seen["real"])
    table = trainer_box[0].rates.instance
    assert 0 < float(table.min()) and float(table.max()) < 1 and table.unique().numel() > 10
    assert run["rate_auroc"] == run["rate_auroc"]  # a ranking was measured
    assert (schedules.Schedule._forward, mw_mod.rates_mod.RateTable.effective,
            mw_mod.rates_mod.RateTable.update) == originals
    monkeypatch.undo()
    out = tmp_path / "mw"
    assert mw_mod.main(["--quick", "--cells", "digits-cnn-sgd-flip35", "--seeds", "0", "--normalize",
                        "--matrix", str(tmp_path / "none.json"), "--output_dir", str(out)]) == 0
    runs = json.loads((out / "reweighting.json").read_text())["runs"]
    assert sorted(r["method"] for r in runs) == ["metalr", "mwnet", "plain"]
    mwr = next(r for r in runs if r["method"] == "mwnet")
    assert mwr["normalize"] is True and len(mwr["curve_weight"]) == mw_mod.CURVE_POINTS
    assert "digits-cnn-sgd-flip35" in (out / "reweighting.md").read_text()
    assert (out / "reweighting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="Meta-Weight-Net's"):
        mw_mod.main(["--quick", "--baseline", "l2rw", "--normalize", "--cells", "digits-cnn-sgd-flip35"])


def test_learning_to_reweight_steps_on_the_batch_weights_of_its_meta_gradient(tmp_path, monkeypatch):
    """reweighting.py --baseline l2rw: every real step weighs its batch by max(-∂L_meta/∂e_i, 0) normalized to a
    mean of 1 (Ren et al.: to a sum of 1, with the loss a sum), from that step's own meta-gradient taken at θ
    (lookahead_step=0); the trainer is restored afterwards and main writes the table beside the matrix's runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rw = _load("reweighting")
    from hf_ddlr import schedules

    update, seen, real_refresh = rw.rates_mod.RateTable.update, [], schedules.Schedule._refresh

    def refresh(self):
        real_refresh(self)
        res = getattr(self.trainer, "last_meta_gradients", None)
        if res is not None and all(mb.losses is not None for mb in self.window):
            args = self.trainer.args
            assert args.lookahead_step == 0.0 and args.probe_batches == 0
            want_meta = (0.0, "loss", "all") if paper[0] else (0.97, "auto", "auto")
            assert (args.meta_grad_average, args.meta_objective, args.meta_parameters) == want_meta
            g = res.example_grad.detach().double().numpy()
            want = np.maximum(-g, 0.0)
            want = want * (len(g) / want.sum()) if want.sum() > 0 else want
            seen.append(float(np.abs(self.window[0].weights.double().numpy() - want).max()))

    monkeypatch.setattr(schedules.Schedule, "_refresh", refresh)
    paper = [False]
    run = rw.run_baseline(rw.R.CELL_BY_NAME["digits-cnn-sgd-flip35"], 0, "l2rw", {"meta_gradient": "library"},
                          None, quick=True)
    assert len(seen) > 3 and max(seen) < 1e-5
    assert run["method"] == "l2rw" and rw.rates_mod.RateTable.update is update and not rw.R.OVERRIDES
    assert 0.0 <= run["one_class_steps"] < 1.0  # ten balanced-ish classes: no step trains one class alone
    paper[0], n = True, len(seen)
    rw.run_baseline(rw.R.CELL_BY_NAME["digits-cnn-sgd-flip35"], 0, "l2rw", {"meta_gradient": "paper"}, None,
                    quick=True)
    assert len(seen) > n + 3 and max(seen) < 1e-5 and not rw.R.OVERRIDES
    monkeypatch.undo()
    out = tmp_path / "l2rw"
    assert rw.main(["--quick", "--baseline", "l2rw", "--cells", "digits-cnn-sgd-flip35", "--seeds", "0",
                    "--matrix", str(tmp_path / "none.json"), "--output_dir", str(out)]) == 0
    md = (out / "reweighting.md").read_text()
    assert "Learning to Reweight" in md and "paper's per-step" in md and not (out / "reweighting.png").exists()
    with pytest.raises(SystemExit, match="Learning to Reweight's"):
        rw.main(["--quick", "--baseline", "mwnet", "--meta_gradient", "paper", "--cells", "digits-cnn-sgd-flip35"])


def test_learning_to_reweight_table_update_and_class_share():
    """The L2RW table update by hand: max(-g, 0) scaled to a mean of 1 over the batch, written to the examples'
    rows; the share of the weight the top class takes, per step (1.0 when one class alone helps)."""
    rw = _load("reweighting")
    table = types.SimpleNamespace(instance=torch.full((6,), 7.0), keyed=None)
    idx, labels = torch.tensor([4, 0, 2, 5]), torch.tensor([0, 0, 1, 1])
    with rw.learning_to_reweight() as top_class:
        assert rw.rates_mod.RateTable.update(table, idx, labels, torch.tensor([-3.0, -1.0, 0.5, 0.0]))
        torch.testing.assert_close(table.instance, torch.tensor([1.0, 7.0, 0.0, 7.0, 3.0, 0.0]))
        rw.rates_mod.RateTable.update(table, idx, labels, torch.tensor([-1.0, -1.0, -1.0, -1.0]))
        torch.testing.assert_close(table.instance[idx], torch.ones(4))
        rw.rates_mod.RateTable.update(table, idx, labels, torch.tensor([1.0, 2.0, 0.0, 3.0]))  # none helps
        torch.testing.assert_close(table.instance[idx], torch.zeros(4))
    assert top_class == [1.0, 0.5]


def test_adam_unrated_moment_is_torchs_adamw_with_the_second_moment_from_another_gradient():
    """The variant's AdamW step (benchmarks/results/variants/adam_unrated_moment): with no unweighted gradient left
    by the real step it is torch's AdamW to the bit; with one, the second moment is built from it (clipped to the
    max norm) and the first moment from the real gradient, as written out here."""
    mod = load_file(os.path.join(BENCH, "results", "variants", "adam_unrated_moment", "adam_unrated_moment.py"), register=None)
    torch.manual_seed(0)
    ref, ours = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        x = torch.randn(8, 5)
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            model(x).pow(2).sum().backward()
        opt_ref.step()
        mod.adamw_step(opt)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ours.parameters()))
    # one more step whose second moment comes from another gradient, clipped to norm 1
    p = ours.weight
    m, v, t = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(), float(opt.state[p]["step"]) + 1
    for q in ours.parameters():
        q.grad = torch.randn_like(q)
        q._unrated_grad = 10 * torch.randn_like(q)
    unrated = {id(q): q._unrated_grad.clone() for q in ours.parameters()}
    norm = float(torch.linalg.vector_norm(torch.cat([u.flatten() for u in unrated.values()])))
    g, u, before = p.grad.clone(), unrated[id(p)] / (norm + 1e-6), p.detach().clone()
    mod.adamw_step(opt, max_norm=1.0)
    m_new, v_new = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * u * u
    expected = before * (1 - 1e-2 * 0.1) - 1e-2 / (1 - 0.9**t) * m_new / ((v_new / (1 - 0.999**t)).sqrt() + 1e-8)
    assert torch.allclose(opt.state[p]["exp_avg_sq"], v_new, rtol=1e-5, atol=1e-9)
    assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-7)
    assert not any(hasattr(q, "_unrated_grad") for q in ours.parameters())


def test_loss_prior_phi_gradient_is_the_double_backward_one_through_the_product():
    """The loss prior's weights are ``w_i = r_i · V_φ(L_i) / mean V_φ``: stepping φ on the trainer's ``∂L_meta/∂w_i``
    times ``r_i`` (what benchmarks/reweighting.py hands V_φ) must be the double backward through a lookahead taken
    at those weights, computed here by autograd end to end."""
    mw_mod = _load("reweighting")
    mw = mw_mod.MetaWeightNet(seed=3, hidden=8, normalize=True)
    L, meta_loss = _lookahead_meta_loss(seed=1)
    r = torch.rand(7) * 0.9 + 0.1
    exact = torch.autograd.grad(meta_loss(r * mw._step_weights(L)), list(mw.net.parameters()))
    w = (r * mw.weights(L)).requires_grad_(True)
    (example_grad,) = torch.autograd.grad(meta_loss(w), w)
    for got, want in zip(mw.phi_gradient(L, example_grad * r), exact):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_loss_prior_weighs_each_step_by_rate_times_prior_and_restores_the_trainer(tmp_path, monkeypatch):
    """In a --quick run of the loss prior, every meta step's lookahead takes the batch at the table's rates times
    V_φ(L_i)/mean of the φ before the step; V_φ steps on ∂L_meta/∂w_i times those rates; the real step takes the
    updated rates times the updated prior; after the run the table holds r_i · V_φ(last loss), the rates alone
    are kept, and the trainer's methods are restored."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mw_mod = _load("reweighting")
    from hf_ddlr import schedules

    originals = (schedules.Schedule._forward, mw_mod.rates_mod.RateTable.effective,
                 mw_mod.rates_mod.RateTable.update)
    seen = {"meta": [], "real": [], "phi_grad": []}
    box: dict = {}
    real_meta_gradients, real_refresh, real_step = (schedules.meta_gradients, schedules.Schedule._refresh,
                                                    mw_mod.MetaWeightNet.step)

    def meta_gradients(model, params, window, *a, **kw):
        mw, table = box["made"][0], box["trainer"].rates.instance
        mb = window[0]
        r = table[mb.indices.to(table.device)].detach().clone()
        seen["meta"].append(float((mb.weights - r.to(mb.weights) * mw.weights(mb.losses)).abs().max()))
        box["r"], box["phi"] = r, [p.detach().clone() for p in mw.net.parameters()]
        res = real_meta_gradients(model, params, window, *a, **kw)
        box["example_grad"] = res.example_grad.detach().clone()
        return res

    def step(self, losses, example_grad):
        seen["phi_grad"].append(float((example_grad - box["example_grad"] * box["r"].to(example_grad)).abs().max()))
        return real_step(self, losses, example_grad)

    def refresh(self):
        real_refresh(self)
        mb = self.window[0]
        if box.get("made") and mb.losses is not None and "phi" in box:
            mw, table = box["made"][0], self.trainer.rates.instance
            r = table[mb.indices.to(table.device)].to(mb.weights)
            moved = any(not torch.equal(a, p) for a, p in zip(box["phi"], mw.net.parameters()))
            seen["real"].append((float((mb.weights - r * mw.weights(mb.losses)).abs().max()), moved))

    monkeypatch.setattr(schedules, "meta_gradients", meta_gradients)
    monkeypatch.setattr(schedules.Schedule, "_refresh", refresh)
    monkeypatch.setattr(mw_mod.MetaWeightNet, "step", step)
    rb = sys.modules["robustness"]
    cell = rb.CELL_BY_NAME["digits-cnn-sgd-flip35"]
    orig_init = rb.MetaLRTrainer.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        box["trainer"] = self

    monkeypatch.setattr(rb.MetaLRTrainer, "__init__", init)
    with mw_mod.loss_prior(seed=0) as made:
        box["made"] = made
        run = rb.run_cell(cell, 0, "metalr", quick=True, after_train=mw_mod.product_ranking(made))
    assert len(made) == 1 and seen["meta"] and len(seen["phi_grad"]) == len(seen["meta"])
    assert max(seen["meta"]) < 1e-6 and max(seen["phi_grad"]) < 1e-6
    assert len(seen["real"]) >= len(seen["meta"]) and max(d for d, _ in seen["real"]) < 1e-6
    assert all(moved for _, moved in seen["real"])
    mw, table = made[0], box["trainer"].rates.instance
    visited = ~torch.isnan(mw.last_loss)
    assert visited.any() and not torch.equal(mw.rates_alone, table.cpu())
    torch.testing.assert_close(table.cpu()[visited], (mw.rates_alone * mw.net(mw.last_loss).detach())[visited])
    assert run["rate_auroc"] == run["rate_auroc"]
    assert (schedules.Schedule._forward, mw_mod.rates_mod.RateTable.effective,
            mw_mod.rates_mod.RateTable.update) == originals


def test_centered_average_helpers_are_the_averages_they_name():
    """benchmarks/centered_average.py: its one-sided average is what MetaGradientAverage returns step by step, to
    the bit; its two-sided one, fed a run's own meta gradients step by step with the same run's recording ahead, the
    brute-force Σ β^|r−s| g_r / Σ β^|r−s| (and with another recording ahead, that one's terms after s); the matched
    factor averages as many steps as the one-sided default (the effective sample size (Σw)²/Σw², summed out)."""
    ca = _load("centered_average")
    g = torch.Generator().manual_seed(0)
    grads = [{"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)} for _ in range(9)]
    live = ca.MetaGradientAverage(0.8)
    for got, g_s in zip(ca.past_average(grads, 0.8), grads):
        want = live.update(g_s)
        for n in g_s:
            assert torch.equal(got[n], want[n])
    other = [{n: t + 1.0 for n, t in g_s.items()} for g_s in grads]
    for ahead in (grads, other):
        two_sided = ca.TwoSidedAverage(ahead, 0.7)
        for s, g_s in enumerate(grads):
            got = two_sided(s, g_s)
            w = torch.tensor([0.7 ** abs(r - s) for r in range(len(grads))])
            for n in g_s:
                want = sum(w[r] * (grads if r <= s else ahead)[r][n] for r in range(len(grads))) / w.sum()
                torch.testing.assert_close(got[n], want)
    beta = 0.97
    b2 = ca.matched_beta(beta)
    k = torch.arange(20000, dtype=torch.float64)
    one = (1 - beta) * beta**k
    two = torch.cat([b2 ** k.flip(0)[:-1], b2**k])
    assert abs(one.sum() ** 2 / (one**2).sum() - two.sum() ** 2 / (two**2).sum()) < 1e-6 * (1 + beta) / (1 - beta)
    assert 0.93 < b2 < 0.95


def test_centered_average_quick_feeds_the_trainer_its_average_and_restores_it(tmp_path, monkeypatch):
    """centered_average.py --quick: fed back the one-sided average rebuilt from the first run's recording, the
    second run learns the first run's rates; fed the two-sided ones, or keeping the double average, it learns
    others; MetaGradientAverage.update is restored afterwards."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ca = _load("centered_average")
    original = ca.MetaGradientAverage.update
    runs = _quick_runs(ca, "centered_average", tmp_path)
    assert runs["metalr_replayed"]["rate_auroc"] == runs["metalr"]["rate_auroc"]
    assert runs["metalr_replayed"]["per_visit_auroc"] == runs["metalr"]["per_visit_auroc"]
    for other in ("metalr_centered", "metalr_centered_matched", "metalr_zero_lag"):
        assert runs[other]["rate_auroc"] != runs["metalr"]["rate_auroc"], other
    assert ca.MetaGradientAverage.update is original
    with pytest.raises(SystemExit, match="needs 'plain'"):
        ca.main(["--quick", "--cells", "digits-cnn-sgd-flip35", "--methods", "metalr", "--output_dir", str(tmp_path)])
    some = tmp_path / "some"  # --methods: the runs asked for, the others' columns left empty
    assert ca.main(["--quick", "--cells", "digits-cnn-sgd-flip35", "--seeds", "0", "--methods", "plain",
                    "metalr_centered", "--output_dir", str(some)]) == 0
    assert {r["method"] for r in json.loads((some / "centered_average.json").read_text())["runs"]} == {
        "plain", "metalr_centered"}
    row = [line for line in (some / "centered_average.md").read_text().splitlines() if "digits-cnn" in line][-1]
    assert row.count("—") == len(ca.METHODS) - 2  # every MetaLR column but the centered one


def test_per_class_meta_objective_weighs_each_class_by_the_inverse_of_its_loss():
    """results/variants/meta_objective_per_class: under "class_log" a meta example's loss pulls with weight
    1 / (C · n_c · class mean loss) (its class's relative change), under "class_mean" 1 / (C · n_c); the patch
    replaces only a single-label classifier's "loss" objective and is undone afterwards."""
    pc = load_file(os.path.join(BENCH, "results", "variants", "meta_objective_per_class", "meta_objective_per_class.py"), register=None)
    from hf_ddlr.meta.losses import SINGLE_LABEL, task_loss

    labels = torch.tensor([0, 0, 0, 2, 2, 5])
    losses = torch.tensor([0.2, 0.4, 0.9, 2.0, 1.0, 0.05], dtype=torch.float64, requires_grad=True)
    n = {0: 3, 2: 2, 5: 1}
    mean = {c: float(losses.detach()[labels == c].mean()) for c in n}
    for variant, want in (("class_log", lambda c: 1 / (3 * n[c] * (mean[c] + pc.LOG_FLOOR))),
                          ("class_mean", lambda c: 1 / (3 * n[c]))):
        (g,) = torch.autograd.grad(pc.per_class_objective(losses, labels, variant), losses)
        torch.testing.assert_close(g, torch.tensor([want(int(c)) for c in labels], dtype=torch.float64))
    original = type(SINGLE_LABEL).meta_objective
    with pc.per_class_meta_objective("class_log") as count:
        assert SINGLE_LABEL.meta_objective(losses, labels) == pc.per_class_objective(losses, labels, "class_log")
        assert SINGLE_LABEL.meta_objective(losses, labels, "bounded") == original(SINGLE_LABEL, losses, labels,
                                                                                   "bounded")
        regression = task_loss("regression")
        assert regression.meta_objective(losses, labels) == original(regression, losses, labels)
        assert count["patched"] == 1
    assert type(SINGLE_LABEL).meta_objective is original


def test_hard_meta_set_moves_the_hardest_clean_examples_of_each_label_into_the_meta_set():
    """results/variants/hard_meta_set: the meta rows are, per label, the clean training rows of highest loss (or
    random clean ones), never a mislabelled one; the swapped split holds them as its meta set, the old meta examples
    at the end of its training set, every sample_index renumbered and the noisy mask following its rows."""
    import datasets

    hm = load_file(os.path.join(BENCH, "results", "variants", "hard_meta_set", "hard_meta_set.py"), register=None)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    noisy = np.array([0, 1, 0, 0, 0, 0, 1, 0, 0], dtype=bool)
    losses = np.array([0.5, 9.0, 2.0, 1.0, 0.1, 3.0, 8.0, 0.2, 4.0])
    assert hm.meta_rows(losses, labels, noisy, {0: 2, 1: 1}, seed=0).tolist() == [2, 3, 8]
    for seed in range(5):
        rows = hm.meta_rows(None, labels, noisy, {0: 2, 1: 2}, seed=seed)
        assert not noisy[rows].any() and np.bincount(labels[rows]).tolist() == [2, 2]
    with pytest.raises(ValueError, match="fewer than the 4 needed"):
        hm.meta_rows(losses, labels, noisy, {0: 4}, seed=0)

    def split(values, offset):
        return datasets.Dataset.from_dict({"x": values, "label": [v % 2 for v in values],
                                           "sample_index": list(range(offset, offset + len(values)))})
    ds = datasets.DatasetDict({"train": split(list(range(9)), 0), "meta": split([100, 101], 50),
                               "test": split([7], 0)})
    out, mask = hm.swapped(ds, noisy, np.array([2, 8]))
    assert out["meta"]["x"] == [2, 8] and out["meta"]["sample_index"] == [0, 1]
    assert out["train"]["x"] == [0, 1, 3, 4, 5, 6, 7, 100, 101]
    assert out["train"]["sample_index"] == list(range(9))
    assert mask.tolist() == [bool(noisy[x]) if x < 9 else False for x in out["train"]["x"]]


def test_reward_preferences_quick_writes_the_table_and_resumes(tmp_path):
    """benchmarks/reward_preferences.py --quick: the VADER pairs split into disjoint vocabularies with the flipped
    share asked for, the three methods recorded once (a rerun trains nothing) and the table shows them."""
    rp = _load("reward_preferences")
    pairs, flipped = rp.preference_pairs(0, 0.3, 1.0)
    words = {s: {w for p in pairs[s] for w in p} for s in ("train", "meta", "test")}
    assert not (words["train"] & words["test"]) and not (words["meta"] & words["test"])
    assert len(pairs["train"]) == rp.SIZES["train"] and 0.25 < flipped.mean() < 0.35
    from hf_ddlr.data import load_vader_lexicon

    score = dict(zip(load_vader_lexicon(0.5)["text"], load_vader_lexicon(0.5)["score"]))
    order = np.array([score[c] > score[r] for c, r in pairs["train"]])
    assert np.array_equal(order, ~flipped) and all(score[c] - score[r] >= 1.0 for c, r in pairs["test"])
    assert rp.main(["--quick", "--seeds", "0", "--output_dir", str(tmp_path)]) == 0
    runs = json.load(open(tmp_path / "reward_preferences.json"))["runs"]
    assert sorted(r["method"] for r in runs) == ["metalr", "oracle", "plain"]
    m = next(r for r in runs if r["method"] == "metalr")
    assert 0 <= m["rate_auroc"] <= 1 and m["rate_clean"] > 0 and 0 <= m["test_accuracy"] <= 1
    md = (tmp_path / "reward_preferences.md").read_text()
    assert "| 0 |" in md and "rate AUROC" in md
    assert rp.main(["--quick", "--seeds", "0", "--output_dir", str(tmp_path)]) == 0  # nothing left to run
    assert json.load(open(tmp_path / "reward_preferences.json"))["runs"] == runs


def test_head_signal_hessian_and_dots_are_autograds():
    """head_signal.py's closed forms against autograd: the classifier's Hessian of the mean cross-entropy, and
    each training row's gradient of the classifier (``dot``, ``adam``) and of pooler + classifier (``head``)
    dotted with the meta set's mean gradient, from per-example backward passes of a real BERT classifier."""
    from tiny_text import text_data_splits
    from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

    hs = _load("head_signal")
    torch.manual_seed(0)
    x, y, w0 = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2]), torch.randn(3, 4)

    def mean_ce(flat):  # a linear classifier [W | b] on x, flattened class-major
        wb = flat.reshape(3, 4)
        return torch.nn.functional.cross_entropy(x @ wb[:, :3].T + wb[:, 3], y)

    xb = hs._with_bias(x)
    want = torch.autograd.functional.hessian(mean_ce, w0.double().reshape(-1))
    assert torch.allclose(hs.classifier_hessian(torch.softmax(xb @ w0.double().T, 1), xb), want, atol=1e-12)

    tok, train, meta = text_data_splits()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).double()
    collate = DataCollatorWithPadding(tok)
    optimizer = torch.optim.AdamW(model.parameters())
    model.train()
    batch = collate([train[i] for i in range(8)])
    model(**batch).loss.backward()
    optimizer.step()  # an Adam second moment to take the products in
    got = hs.signals(model, optimizer, train, meta, collate)

    model.eval()
    head = [model.bert.pooler.dense.weight, model.bert.pooler.dense.bias, model.classifier.weight,
            model.classifier.bias]

    def grad(row) -> list[torch.Tensor]:
        b = collate([row])
        loss = model(**{k: v for k, v in b.items() if k != "labels"}).logits.log_softmax(-1)[0, b["labels"][0]]
        return [g.reshape(-1) for g in torch.autograd.grad(-loss, head)]

    meta_g = [torch.stack(gs).mean(0) for gs in zip(*(grad(meta[i]) for i in range(len(meta))))]
    rows = [grad(train[i]) for i in range(len(train))]
    v = torch.cat([optimizer.state[q]["exp_avg_sq"].reshape(-1) for q in head[2:]])
    dot = torch.tensor([float(g[2] @ meta_g[2] + g[3] @ meta_g[3]) for g in rows])
    both = torch.tensor([float(sum(a @ b for a, b in zip(g, meta_g))) for g in rows])
    adam = torch.tensor([float(torch.cat(g[2:]) @ (torch.cat(meta_g[2:]) / (v.sqrt() + 1e-8))) for g in rows])
    v_all = [optimizer.state[q]["exp_avg_sq"].reshape(-1) for q in head]
    both_adam = torch.tensor([float(sum(a @ (b / (s.sqrt() + 1e-8)) for a, b, s in zip(g, meta_g, v_all)))
                              for g in rows])
    for name, expected in (("dot", dot), ("head", both), ("adam", adam), ("head adam", both_adam)):
        assert np.allclose(got[name], expected.numpy(), rtol=1e-7, atol=1e-10), name
    assert not np.allclose(got["dot"], got["head"])  # the pooler's part is not negligible here

    # newton: the classifier's rows through (H + λI)⁻¹, H by autograd on the eval-mode pooled features
    with torch.no_grad():
        pooled = torch.cat([model.bert(**{k: v for k, v in collate([train[i]]).items() if k != "labels"})[1]
                            for i in range(len(train))])
    labels = torch.tensor(train["label"])

    def train_ce(flat):
        return torch.nn.functional.cross_entropy(pooled @ flat[:32].reshape(2, 16).T + flat[32:], labels)

    h = torch.autograd.functional.hessian(train_ce, torch.cat([q.detach().reshape(-1) for q in head[2:]]))
    solved = torch.linalg.solve(h + 0.01 * torch.eye(len(h), dtype=h.dtype), torch.cat(meta_g[2:]))
    newton = torch.tensor([float(torch.cat(g[2:]) @ solved) for g in rows])
    assert np.allclose(got["newton 0.01"], newton.numpy(), rtol=1e-6, atol=1e-10)


def test_head_signal_table_and_plot_average_each_checkpoint_over_the_seeds(tmp_path):
    """head_signal.py's table: each signal's AUROC per checkpoint as the mean over the seeds, and the mean of the
    second half's checkpoints; its plot is written from the same runs."""
    hs = _load("head_signal")
    runs = [{"cell": "vader-minilm-ft-flip30", "seed": s,
             "checkpoints": [{k: 0.5 + 0.05 * i + 0.1 * s for k in hs.SIGNALS} for i in range(4)]} for s in (0, 1)]
    md = hs.render(runs, "cmd")
    # checkpoint i: mean of 0.5 + 0.05 i and 0.6 + 0.05 i; second half: checkpoints 2 and 3, (0.65 + 0.70) / 2
    assert "| vader-minilm-ft-flip30 (0, 1) | newton 0.01 | 0.550 0.600 0.650 0.700 | 0.675 |" in md
    assert md.count("| vader-minilm-ft-flip30 (0, 1) |") == len(hs.SIGNALS)
    hs.plot(runs, str(tmp_path / "h.png"))
    png = (tmp_path / "h.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_class_signal_products_are_brute_force_per_example_gradients():
    """class_signal.py's scores against per-example backward passes of a real CNN (eval mode): the product with the
    meta set's mean gradient, split into the meta examples of each class, in the parameters' own scale and in the
    metric of the batch-mean gradients' second moment, over every parameter and over the head only."""
    import hf_ddlr.models as M

    cs = _load("class_signal")
    torch.manual_seed(0)
    model = M.SmallCNNForImageClassification(M.SmallCNNConfig(num_channels=1, image_size=8, channels=[3, 4],
                                                              num_labels=3)).double()
    x, xm = torch.randn(7, 1, 8, 8, dtype=torch.float64), torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y, ym = torch.tensor([0, 1, 2, 2, 1, 0, 1]), torch.tensor([0, 0, 1, 2, 2, 2])
    model.train()
    got = cs.signals(model, x, y, xm, ym, 3)
    assert model.training  # left in the mode it was in

    model.eval()
    params = list(model.parameters())

    def flat_grad(xi, yi):
        out = model(pixel_values=xi[None]).logits
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            torch.nn.functional.cross_entropy(out, yi[None]), params)])

    g = torch.stack([flat_grad(a, b) for a, b in zip(x, y)])
    gm = torch.stack([flat_grad(a, b) for a, b in zip(xm, ym)])
    v = g.mean(0) ** 2  # one batch of 7
    metric = torch.where(v > 0, 1 / (v.sqrt() + 1e-8), torch.zeros_like(v))
    last = model.classifier if hasattr(model, "classifier") else [m for m in model.modules()
                                                                  if isinstance(m, torch.nn.Linear)][-1]
    head = torch.cat([torch.full((p.numel(),), any(p is q for q in last.parameters())) for p in params])
    assert 0 < int(head.sum()) < len(head)

    def per_class(gmeta):  # [7, 3]: Σ over each class's meta examples of <g_i, gmeta_j>, over all 6 meta examples
        return torch.stack([(g @ gmeta[ym == c].T).sum(1) for c in range(3)], 1) / len(ym)

    def worst(C):
        return torch.stack([min(C[i, c] for c in range(3) if c != y[i]) for i in range(len(y))])

    raw, adam, adam_head = per_class(gm), per_class(gm * metric), per_class(gm * metric * head)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y, reduction="none")
    want = {"loss": -loss, "mean": adam.sum(1), "own class": adam[torch.arange(7), y],
            "other classes": adam.sum(1) - adam[torch.arange(7), y], "worst other class": worst(adam),
            "worst other class, head": worst(adam_head), "mean, no metric": (g @ gm.T).mean(1),
            "worst other class, no metric": worst(raw), "own class, head": adam_head[torch.arange(7), y],
            "mean minus own class's head share": adam.sum(1) - adam_head[torch.arange(7), y]}
    assert set(got) == set(cs.SIGNALS) == set(want)
    for k in cs.SIGNALS:
        np.testing.assert_allclose(got[k], want[k].numpy(), rtol=1e-7, atol=1e-12, err_msg=k)


def test_class_signal_sums_checkpoints_in_units_of_their_mean_absolute_score_and_leaves_the_own_class_out():
    cs = _load("class_signal")
    clean = np.array([True, True, False, False])
    # in units of their mean |score|: [1.6, 1.2, 0.4, 0.8] + [1, 0, 2, 1] = [2.6, 1.2, 2.4, 1.8], AUROC 0.5 whatever
    # the second checkpoint's scale (a plain sum of the two: [1004, 3, 2001, 1002], AUROC 0.25)
    first, second = np.array([4.0, 3.0, 1.0, 2.0]), np.array([1.0, 0.0, 2.0, 1.0])
    assert cs.summed_auroc(clean, [first]) == 1.0
    assert cs.summed_auroc(clean, [first, 1000 * second]) == cs.summed_auroc(clean, [first, second]) == 0.5
    # the worst other class leaves the own label's out even where it is the lowest (a gradient rarely hurts its own
    # label's meta examples, so the brute-force test above never meets that case)
    C = torch.tensor([[0.0, 1.0, 2.0], [5.0, -1.0, 3.0]])
    assert cs.worst_other(C, torch.tensor([0, 1])).tolist() == [1.0, 3.0]
    runs = [{"cell": "digits-cnn-sgd-flip35", "seed": s, "checkpoints": [
        {**{k: 0.5 + 0.1 * i + 0.1 * s for k in cs.SIGNALS}, **{f"summed {k}": 0.6 + s * 0.2 for k in cs.SIGNALS}}
        for i in range(3)]} for s in (0, 1)]
    md = cs.render(runs, "cmd")
    assert "| digits-cnn-sgd-flip35 (0, 1) | worst other class | 0.550 0.650 0.750 | 0.700 |" in md
    assert md.count("| digits-cnn-sgd-flip35 (0, 1) |") == len(cs.SIGNALS)


def test_class_rates_probe_products_are_brute_force_per_example_gradients():
    """class_rates_probe.py's per-class meta gradients and split products against per-example backward passes of a
    real CNN in eval mode, in a given metric, over a subset of its parameters (the others held fixed)."""
    import hf_ddlr.models as M

    probe = _load("class_rates_probe")
    torch.manual_seed(1)
    model = M.SmallCNNForImageClassification(M.SmallCNNConfig(num_channels=1, image_size=8, channels=[3, 4],
                                                              num_labels=3)).double().eval()
    names = [n for n, _ in model.named_parameters()][1:]  # the first tensor is not "trainable" here
    params = {n: p for n, p in model.named_parameters() if n in names}
    x, xm = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y, ym = torch.tensor([0, 1, 2, 2, 1]), torch.tensor([0, 0, 1, 2, 2, 2])

    def flat_grad(xi, yi):
        out = model(pixel_values=xi[None]).logits
        gs = torch.autograd.grad(torch.nn.functional.cross_entropy(out, yi[None]), list(params.values()))
        return torch.cat([g.reshape(-1) for g in gs])

    g = torch.stack([flat_grad(a, b) for a, b in zip(x, y)])
    gm = torch.stack([flat_grad(a, b) for a, b in zip(xm, ym)])
    want_G = torch.stack([gm[ym == c].sum(0) for c in range(3)]) / len(ym)
    G = probe.class_gradients(model, params, xm, ym, 3)
    torch.testing.assert_close(G.double(), want_G, rtol=1e-5, atol=1e-7)
    P = torch.rand(g.shape[1], dtype=torch.float64) + 0.5
    # any per-class directions: with the meta set's own, an image's product is lowest for its own label on no row
    # (its gradient helps that label's meta examples), and the worst-class test would not see the own class left out
    want_G = torch.randn(3, g.shape[1], dtype=torch.float64)
    d = g @ (want_G * P).T  # [5, 3]
    assert (d.argmin(1) == y).any()
    worst = torch.stack([min(d[i, c] for c in range(3) if c != y[i]) for i in range(5)])
    other = torch.stack([sum(d[i, c] for c in range(3) if c != y[i]) for i in range(5)])
    for signal, want in (("worst", worst), ("other", other)):
        got = probe.split_products(model, params, P, want_G, [(x[:2], y[:2]), (x[2:], y[2:])], signal)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7, msg=signal)


def test_a_diagnostic_trains_its_seeds_in_worker_processes(tmp_path, monkeypatch):
    """robustness.run_missing(jobs=2), what paired_significance.py and fixed_weights.py --jobs use: every missing
    seed is trained in a spawned worker set up as the parent is (its --metalr_args), saved as it finishes, a
    failing seed does not lose the others and is named in the error, and a rerun trains only what is missing."""
    R = _load("robustness")
    (tmp_path / "fake_diagnostic.py").write_text(
        "import os\nimport robustness as R\n\n"
        "def train(cell, seed, missing, bar, *, tag=None):\n"
        "    if seed == 3:\n"
        "        raise ValueError('seed 3 breaks')\n"
        "    bar.update(len(missing))\n"
        "    bar.write(f'trained seed {seed}')\n"
        "    return [{'cell': cell.name, 'seed': seed, 'method': m, 'pid': os.getpid(), 'tag': tag,\n"
        "             'meta_lr': R.OVERRIDES.get('meta_lr'), 'threads': R.torch.get_num_threads()} for m in missing]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(R, "OVERRIDES", {"meta_lr": 0.25})
    fake = importlib.import_module("fake_diagnostic")
    cells = [R.CELL_BY_NAME["digits-cnn-sgd-flip35"]]
    path, runs = str(tmp_path / "d.json"), []
    with pytest.raises(RuntimeError, match=r"1 of 3 runs failed.*digits-cnn-sgd-flip35 seed 3: ValueError\('seed 3 breaks"):
        R.run_missing(path, runs, cells, [0, 1, 3], fake.train, "fake", methods=("a", "b"), jobs=2)
    saved = json.loads(open(path).read())["runs"]
    assert sorted((r["seed"], r["method"]) for r in saved) == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert all(r["pid"] != os.getpid() and r["meta_lr"] == 0.25 and r["threads"] == 1 for r in saved)
    runs = saved + [{"cell": cells[0].name, "seed": 2, "method": "a", "pid": 0}]
    shown = R.run_missing(path, runs, cells, [0, 1, 2], functools.partial(fake.train, tag="opt"), "fake",
                          methods=("a", "b"), jobs=2)  # a diagnostic's options reach the workers as keywords
    assert sorted((r["seed"], r["method"]) for r in shown) == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"),
                                                                (2, "b")]
    assert [r["pid"] for r in shown if r["seed"] < 2] == [r["pid"] for r in saved]  # not retrained
    assert {r["method"]: r["pid"] != os.getpid() for r in shown if r["seed"] == 2} == {"a": True, "b": True}
    assert [r["pid"] for r in shown if r["seed"] == 2 and r["method"] == "a"] == [0]  # only "b" was trained
    assert [r["tag"] for r in shown if r["seed"] == 2 and r["method"] == "b"] == ["opt"]
    with pytest.raises(SystemExit):
        R.cell_seed_parser("doc", str(tmp_path), jobs=True).parse_args(["--cells", "x", "--jobs", "0"])
