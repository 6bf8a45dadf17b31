"""Every example script runs to completion offline in ``--quick`` mode and writes sane results.

Each script runs in a subprocess exactly as a user would start it (``python examples/x.py --dataset embedded
--quick ...``) with the Hub switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), into a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import run_launch

from hf_ddlr import LRTrajectory

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(script: str, out: Path, *extra: str, timeout: int = 300, env: dict | None = None,
                launcher: list[str] | None = None, stdout: list[str] | None = None) -> dict:
    """Run ``examples/<script>`` (with ``launcher``, e.g. ``accelerate launch ...``, in front when given);
    the process's stdout is appended to ``stdout`` when given."""
    if env is None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env = {**env, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*(launcher or [sys.executable]), str(EXAMPLES / script), "--dataset", "embedded", "--quick",
           "--output_dir", str(out), "--disable_tqdm", "true", *extra]
    proc = run_launch(cmd, ROOT, env, timeout)  # (a launcher's gloo processes: once more after their teardown abort)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    if stdout is not None:
        stdout.append(proc.stdout)
    name = script.removesuffix(".py")
    for suffix in ("_results.json", "_results.md", "_accuracy.png"):
        assert (out / f"{name}{suffix}").is_file(), f"{name}{suffix} missing; stdout:\n{proc.stdout[-2000:]}"
    return json.loads((out / f"{name}_results.json").read_text())


def check_runs(payload: dict, methods: list[str]) -> dict[str, dict]:
    runs = {r["method"]: r for r in payload["runs"]}
    assert list(runs) == methods
    for r in runs.values():
        assert 0.0 <= r["final_accuracy"] <= 1.0 and 0.0 <= r["best_accuracy"] <= 1.0
        assert r["best_accuracy"] >= r["final_accuracy"] - 1e-9 or not r["curve"]["accuracy"]
        assert r["train_time_s"] > 0
        epochs = r["curve"]["epoch"]
        assert len(set(epochs)) == len(epochs), epochs  # one point per evaluation, the final one not repeated
    return runs


def test_noisy_cifar100(tmp_path):
    payload = run_example("noisy_cifar100.py", tmp_path, "--methods", "plain,metalr", "--noise_rate", "0.4")
    runs = check_runs(payload, ["plain", "metalr"])
    assert abs(payload["wrong_label_fraction"] - 0.36) < 0.03  # uniform noise: 0.4 x 9/10 of the labels wrong
    m = runs["metalr"]
    assert 0.0 <= m["auroc_clean_vs_noisy"] <= 1.0
    assert m["rate_clean"] >= 0 and m["rate_noisy"] >= 0
    assert "auroc_clean_vs_noisy" not in runs["plain"]
    files = {p.name for p in (tmp_path / "metalr").iterdir()}
    assert {"lr_trajectory.safetensors", "lr_trajectory.json", "lr_trajectory_instance.png"} <= files
    # --replay_trajectory (every MetaLR option is a flag): the run replays the saved rates instead of learning
    out: list[str] = []
    again = run_example("noisy_cifar100.py", tmp_path / "replay", "--methods", "metalr", "--noise_rate", "0.4",
                        "--replay_trajectory", str(tmp_path / "metalr"), stdout=out)
    assert "replaying" in out[0] and "instead of learning rates" in out[0]
    replayed = LRTrajectory.from_pretrained(tmp_path / "replay" / "metalr")
    assert replayed.config["mode"] == "replay"
    original = LRTrajectory.from_pretrained(tmp_path / "metalr")  # the rates applied in its epoch, replayed
    assert torch.allclose(replayed.instance_rates[-1], original.instance_rates[-1])
    assert not torch.equal(original.instance_rates[-1], original.instance_rates[0])
    assert again["runs"][0]["method"] == "metalr"


def test_noisy_cifar100_under_accelerate_launch_on_two_processes(tmp_path):
    """`accelerate launch --multi_gpu` (2 CPU processes, gloo): trains, and only rank 0 prints and writes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf_home")}  # no user accelerate config
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out: list[str] = []
    payload = run_example("noisy_cifar100.py", tmp_path / "out", "--methods", "metalr", env=env,
                          launcher=launcher, stdout=out)
    runs = check_runs(payload, ["metalr"])
    assert 0.0 <= runs["metalr"]["auroc_clean_vs_noisy"] <= 1.0
    assert out[0].count("| method |") == 1 and out[0].count("[noisy] training metalr") == 1
    assert (tmp_path / "out" / "metalr" / "lr_trajectory.safetensors").is_file()


def test_noisy_cifar100_through_the_hub(hub_server, synthetic_cifar100, tmp_path):
    """The CIFAR-100 path (download, on-the-fly transforms) on a synthetic copy served by the loopback Hub."""
    from test_cifar_hub import README

    for split in ("train", "test"):
        synthetic_cifar100[split].to_parquet(str(tmp_path / f"{split}.parquet"))
    hub_server.commit_files("dataset", "uoft-cs/cifar100", {
        "README.md": README,
        "cifar100/train-00000-of-00001.parquet": tmp_path / "train.parquet",
        "cifar100/test-00000-of-00001.parquet": tmp_path / "test.parquet",
    })
    env = hub_server.client_env(tmp_path / "hf_home")
    payload = run_example("noisy_cifar100.py", tmp_path / "out", "--dataset", "cifar100", "--model", "small_cnn",
                          "--max_train_samples", "1200", "--meta_size", "100", "--noise_rate", "0.6", env=env)
    runs = check_runs(payload, ["plain", "metalr"])
    assert payload["meta_size"] == 100 and payload["setting"] == "B"
    assert 0.0 <= runs["metalr"]["auroc_clean_vs_noisy"] <= 1.0
    assert runs["metalr"]["train_size"] == 1100


def test_train_cifar100_kfold_and_baselines(tmp_path):
    payload = run_example("train_cifar100.py", tmp_path, "--methods", "adam,metalr", "--protocol", "kfold",
                          "--k", "2", "--max_train_samples", "240", "--max_test_samples", "100")
    runs = check_runs(payload, ["adam", "metalr"])
    assert runs["metalr"]["protocol"] == "kfold(2) + replay"
    assert runs["metalr"]["learned_weight_decay"] > 0
    assert (tmp_path / "metalr" / "averaged_trajectory" / "lr_trajectory.json").is_file()
    assert "learned_weight_decay" not in runs["adam"]


def test_personalize_superclass(tmp_path):
    payload = run_example("personalize_superclass.py", tmp_path)
    runs = check_runs(payload, ["biased", "full", "transfer", "metalr"])
    assert payload["superclass"] == "curvy" and payload["superclass_classes"] == ["two", "three", "five"]
    assert len(runs["metalr"]["class_rates"]) == 10 and min(runs["metalr"]["class_rates"]) >= 0
    assert runs["biased"]["class_weights"][2] > 1 and runs["biased"]["class_weights"][0] == 1
    assert all(0.0 <= r["all_classes_accuracy"] <= 1.0 for r in runs.values())


def test_text_classification(tmp_path):
    payload = run_example("text_classification.py", tmp_path, "--max_train_samples", "240",
                          "--max_test_samples", "100")
    runs = check_runs(payload, ["plain", "metalr"])
    assert 0.0 <= runs["metalr"]["auroc_clean_vs_noisy"] <= 1.0


@pytest.mark.parametrize("lexicon", ["vader", "afinn"])
def test_reward_noisy_preferences(tmp_path, lexicon):
    """The reward-model example: MiniLM on human-rated word pairs with flipped ones, RewardTrainer vs
    MetaRewardTrainer; every flag of MetaRewardConfig reaches the runs (here the meta learning rate)."""
    pytest.importorskip("trl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(EXAMPLES / "reward_noisy_preferences.py"), "--quick", "--output_dir", str(tmp_path),
           "--lexicon", lexicon, "--flip", "0.4", "--meta_lr", "0.2", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    payload = json.loads((tmp_path / "reward_noisy_preferences_results.json").read_text())
    runs = {r["method"]: r for r in payload["runs"]}
    assert list(runs) == ["plain", "metalr"] and payload["lexicon"] == lexicon and 0.3 < payload["observed_flipped"] < 0.5
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in runs.values())
    assert 0.0 <= runs["metalr"]["rate_auroc"] <= 1.0 and runs["metalr"]["rate_unflipped"] > 0
    saved = json.loads((tmp_path / "metalr" / "lr_trajectory.json").read_text())
    assert saved["config"]["meta_lr"] == 0.2 and saved["config"]["meta_set_size"] == 16
    assert (tmp_path / "plain" / "model.safetensors").is_file()


def test_reward_quick_runs_in_float32_unless_bf16_is_asked_for(tmp_path, monkeypatch):
    """RewardConfig's bf16 autocast is emulated on CPUs without native bf16 (about 10x slower): the smoke test runs
    float32; an explicit --bf16 and a full run keep TRL's default."""
    pytest.importorskip("trl")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import _common
    import reward_noisy_preferences as rnp

    from hf_ddlr import MetaRewardConfig

    def bf16(*argv: str) -> bool:
        _, config = _common.parse_args(rnp.RewardOptions, rnp.presets, [*argv, "--output_dir", str(tmp_path)],
                                       config_cls=MetaRewardConfig)
        return config.bf16

    assert (bf16("--quick"), bf16("--quick", "--bf16", "true"), bf16()) == (False, True, True)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_noisy_data(tmp_path, lora):
    """The SFT example: a tiny Llama on noisy addition answers from three sources, plain vs instance x source;
    with ``--lora`` both methods train a peft LoRA adapter (and the embedding) only."""
    if lora:
        pytest.importorskip("peft")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(EXAMPLES / "sft_noisy_data.py"), "--quick", "--output_dir", str(tmp_path),
           "--disable_tqdm", "true", *(["--lora", "true", "--lora_r", "4"] if lora else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "sft_noisy_data_results.md").is_file()
    payload = json.loads((tmp_path / "sft_noisy_data_results.json").read_text())
    runs = {r["method"]: r for r in payload["runs"]}
    assert list(runs) == ["plain", "metalr"]
    wrong = payload["observed_wrong_fraction"]
    assert 0.2 < wrong["all"] < 0.45 and wrong["scraped"] > 0.6 and wrong["textbook"] < 0.25
    for r in runs.values():
        assert 0.0 <= r["heldout_exact_match"] <= 1.0 and r["heldout_loss"] > 0
    m = runs["metalr"]
    assert sorted(m["source_rates"]) == ["qa_site", "scraped", "textbook"]
    assert all(v >= 0 for v in m["source_rates"].values())
    assert 0.0 <= m["instance_rate_auroc"] <= 1.0 and 0.0 <= m["effective_rate_auroc"] <= 1.0
    assert "source_rates" not in runs["plain"]
    config = json.loads((tmp_path / "metalr" / "lr_trajectory.json").read_text())["config"]
    assert (config["meta_objective"], config["meta_grad_average_epochs"]) == ("log", 0.1)  # the example's settings
    sizes = {r["trainable_parameters"] for r in runs.values()}
    assert len(sizes) == 1 and all(r["lora"] is lora for r in runs.values())
    full = 14 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 128 + 2 * 32) + 32  # embedding, 2 layers (attention, MLP, 2 norms), norm
    assert (sizes.pop() < full / 2) if lora else (sizes.pop() == full)


def test_sft_noisy_data_instance_level(tmp_path):
    """``--lr_level instance`` (no source table): the example takes no group column, reports each source's mean
    instance rate, and the effective rates are the instance rates."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(EXAMPLES / "sft_noisy_data.py"), "--quick", "--output_dir", str(tmp_path),
           "--disable_tqdm", "true", "--methods", "metalr", "--lr_level", "instance"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    (m,) = json.loads((tmp_path / "sft_noisy_data_results.json").read_text())["runs"]
    assert "source_rates" not in m and m["instance_rate_auroc"] == m["effective_rate_auroc"]
    rates = m["source_mean_instance_rate"]
    assert sorted(rates) == ["qa_site", "scraped", "textbook"] and len(set(rates.values())) == 3


def test_sft_noisy_data_library_defaults(tmp_path):
    """``--library_defaults``: MetaLR trains with MetaLRConfig's meta objective and average instead of the example's
    two settings, and a flag on the command line still wins over the example's settings."""
    sys.path.insert(0, str(EXAMPLES))
    import _common as common
    import sft_noisy_data as ex

    def options(*argv):
        _, config = common.parse_args(ex.SFTOptions, ex.presets, ["--output_dir", str(tmp_path), *argv])
        return config.meta_objective, config.meta_grad_average_epochs

    assert options() == ("log", 0.1)
    assert options("--library_defaults") == ("auto", None)
    assert options("--meta_objective", "bounded") == ("bounded", 0.1)


def test_push_to_hub_uploads_model_trajectory_and_card(hub_server, tmp_path):
    """``--push_to_hub`` (the Trainer's flag) through the loopback Hub: one repo per method, with the trajectory."""
    env = hub_server.client_env(tmp_path / "hf_home")
    run_example("noisy_cifar100.py", tmp_path / "out", "--methods", "metalr", "--max_train_samples", "150",
                "--max_test_samples", "50", "--push_to_hub", "--hub_model_id", "hubtest/noisy-example", env=env)
    _assert_pushed_with_trajectory(hub_server, "hubtest/noisy-example-metalr")
    # the card of a model built from a config, of a type hf_ddlr.models registers, says so (no link to nowhere)
    card = (tmp_path / "out" / "metalr" / "README.md").read_text()
    assert "`import hf_ddlr.models` before `AutoModel*.from_pretrained`" in card and "hf_ddlr_cnn" in card
    assert "[](https://huggingface.co/)" not in card and "None dataset" not in card
    assert "This model was trained from scratch on " in card


def test_cards_name_the_step_schedule_and_a_replay(tmp_path):
    """An example's step decay replaces the args' scheduler: its card says so (it said "linear"); a replayed run's
    card says its rates were replayed, not learned in it."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _common as common
    finally:
        sys.path.remove(str(EXAMPLES))
    from tiny import TinyConfig, TinyPreTrained, make_split

    from hf_ddlr import MetaLRConfig, MetaLRTrainer

    kw = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, max_steps=2,
              per_device_train_batch_size=8, optim="sgd", learning_rate=0.1)
    cls = common.trainer_class(MetaLRTrainer, (0.5, 0.75), 0.2)
    t = cls(model=TinyPreTrained(TinyConfig()), args=MetaLRConfig(output_dir=str(tmp_path / "learn"), **kw),
            train_dataset=make_split(32, seed=1), meta_dataset=make_split(8, seed=2))
    t.train()
    t.save_model()
    t.create_model_card(model_name="tiny")
    card = (tmp_path / "learn" / "README.md").read_text()
    assert "- lr_scheduler_type: step decay (x0.2 at 0.5, 0.75 of the run, after the warm-up)" in card
    assert "were\nlearned online by a one-step-lookahead meta-gradient" in card
    r = MetaLRTrainer(model=TinyPreTrained(TinyConfig()),
                      args=MetaLRConfig(output_dir=str(tmp_path / "replay"), replay_trajectory=str(tmp_path / "learn"),
                                        **kw),
                      train_dataset=make_split(32, seed=1))
    r.train()
    r.create_model_card(model_name="tiny-replay")
    card = (tmp_path / "replay" / "README.md").read_text()
    assert "replayed from a learned trajectory" in card and "learned online" in card
    assert "- lr_scheduler_type: linear" in card  # (the plain schedule, as run)


def _assert_pushed_with_trajectory(hub_server, repo_id: str) -> None:
    """The Hub repo holds the model, its learned-rate trajectory, the trajectory's plots and the card."""
    store = hub_server.store
    repo = store.require("model", repo_id)
    files = {e["path"] for e in store.entries(repo, store.resolve(repo, "main"), recursive=True)}
    assert {"model.safetensors", "config.json", "lr_trajectory.safetensors", "lr_trajectory.json",
            "README.md"} <= files, files
    assert any(f.endswith(".png") for f in files)


def test_reward_example_pushes_the_reward_model_with_its_trajectory(hub_server, tmp_path):
    """The reward example's ``--push_to_hub`` through the loopback Hub: MetaRewardTrainer's repo holds the reward
    model, the pairs' learned-rate trajectory, its plots and the card."""
    pytest.importorskip("trl")
    env = {**hub_server.client_env(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(EXAMPLES / "reward_noisy_preferences.py"), "--quick", "--output_dir", str(tmp_path),
           "--methods", "metalr", "--push_to_hub", "--hub_model_id", "hubtest/reward-example", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    _assert_pushed_with_trajectory(hub_server, "hubtest/reward-example-metalr")


def _local_policy_and_pairs(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama with its character tokenizer saved as a local model folder, and letter-answer preference pairs
    (tests/test_trl_dpo.py) saved as a local DatasetDict folder: the DPO example's --model and --dataset offline."""
    import datasets
    from test_trl_dpo import preference_pairs
    from test_trl_sft import char_tokenizer, tiny_llama

    model_dir, data_dir = tmp_path / "policy", tmp_path / "pairs"
    tiny_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    datasets.DatasetDict({"train": preference_pairs(96, 1)[0], "test": preference_pairs(32, 3)[0]}).save_to_disk(
        str(data_dir))
    return model_dir, data_dir


def test_dpo_noisy_preferences(tmp_path):
    """The DPO example on a local policy and local pairs: DPOTrainer vs MetaDPOTrainer with a share of the pairs
    swapped; every flag of MetaDPOConfig reaches the runs (here beta and the meta learning rate)."""
    pytest.importorskip("trl")
    model_dir, data_dir = _local_policy_and_pairs(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    cmd = [sys.executable, str(EXAMPLES / "dpo_noisy_preferences.py"), "--quick", "--output_dir", str(out),
           "--model", str(model_dir), "--dataset", str(data_dir), "--flip", "0.4", "--meta_lr", "0.2",
           "--beta", "0.3", "--learning_rate", "3e-3", "--optim", "adamw_torch", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    payload = json.loads((out / "dpo_noisy_preferences_results.json").read_text())
    runs = {r["method"]: r for r in payload["runs"]}
    assert list(runs) == ["plain", "metalr"] and 0.25 < payload["observed_flipped"] < 0.55
    assert payload["sizes"] == {"train": 64, "meta": 16, "test": 32}
    assert all(0.0 <= r["reward_accuracy"] <= 1.0 for r in runs.values())
    assert 0.0 <= runs["metalr"]["rate_auroc"] <= 1.0 and runs["metalr"]["rate_unflipped"] > 0
    saved = json.loads((out / "metalr" / "lr_trajectory.json").read_text())
    assert saved["config"]["meta_lr"] == 0.2 and saved["config"]["meta_set_size"] == 16
    assert (out / "plain" / "model.safetensors").is_file() and (out / "metalr" / "model.safetensors").is_file()


def test_flags_override_presets():
    """Presets fill in what the user did not give; every MetaLRConfig option is a flag."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import noisy_cifar100
    finally:
        sys.path.remove(str(EXAMPLES))
    common, opts, presets = noisy_cifar100.common, noisy_cifar100.NoisyOptions, noisy_cifar100.presets
    s, cfg = common.parse_args(opts, presets,
                               ["--dataset", "embedded", "--keep_history", "false", "--meta_lr", "0.3"])
    assert (cfg.learning_rate, cfg.per_device_train_batch_size, cfg.num_train_epochs) == (0.05, 64, 8)
    assert cfg.keep_history is False and cfg.meta_lr == 0.3
    s, cfg = common.parse_args(opts, presets, ["--learning_rate", "0.02", "--setting", "A"])
    assert s.dataset == "cifar100" and cfg.learning_rate == 0.02 and cfg.max_steps == 60_000
    assert cfg.per_device_train_batch_size == 100 and cfg.weight_decay == 5e-4
    with pytest.raises(SystemExit):
        common.parse_args(opts, presets, ["--lr_level", "bogus"])
    # the user's length replaces setting A's 60k steps (max_steps would silently win over num_train_epochs)
    s, cfg = common.parse_args(opts, presets, ["--setting", "A", "--num_train_epochs", "5"])
    assert (cfg.max_steps, cfg.num_train_epochs) == (-1, 5)
    # an explicit scheduler replaces the script's step decay instead of being ignored
    assert common.step_decay(s, (0.5, 0.8)) == (0.5, 0.8)
    s, _ = common.parse_args(opts, presets, ["--lr_scheduler_type", "cosine"])
    assert common.step_decay(s, (0.5, 0.8)) == ()


def test_quick_keeps_a_meta_size_given():
    """``--quick`` caps the meta set's default size, not one given with ``--meta_size`` (a flag given wins)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import noisy_cifar100
    finally:
        sys.path.remove(str(EXAMPLES))
    common = noisy_cifar100.common

    def meta_size(*argv: str) -> int:
        s, _ = common.parse_args(noisy_cifar100.NoisyOptions, noisy_cifar100.presets,
                                 ["--dataset", "embedded", "--quick", *argv])
        return common.plan_image_run(s, paper_model="wrn28_10", meta_size=(100, 1000), quick_meta_size=(50, 100),
                                     methods=list(noisy_cifar100.METHODS)).meta_size

    assert meta_size() == 50 and meta_size("--meta_size", "100") == 100


def test_a_probe_flag_for_the_instance_runs_does_not_stop_the_ablations(capsys):
    """``--probe_batches`` with ``--methods metalr,metalr_nohistory,metalr_class``: the ablations have no instance
    rates kept between visits (probes are refused there), so they run without probes and say so."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import noisy_cifar100
    finally:
        sys.path.remove(str(EXAMPLES))
    common = noisy_cifar100.common
    s, cfg = common.parse_args(noisy_cifar100.NoisyOptions, noisy_cifar100.presets,
                               ["--dataset", "embedded", "--probe_batches", "3", "--output_dir", "o"])
    metalr = common.run_config(cfg, s, "metalr", {}, noisy_cifar100.METHODS["metalr"][1])
    assert metalr.probe_batches == 3 and metalr.output_dir == os.path.join("o", "metalr")
    assert "probe" not in capsys.readouterr().out
    for method in ("metalr_nohistory", "metalr_class"):
        args = common.run_config(cfg, s, method, {}, noisy_cifar100.METHODS[method][1])
        assert args.probe_batches is None, method
        assert f"[{method}] --probe_batches 3 does not apply" in capsys.readouterr().out
    nohistory = common.run_config(cfg, s, "metalr_nohistory", {}, noisy_cifar100.METHODS["metalr_nohistory"][1])
    assert nohistory.keep_history is False  # the method's own setting is kept
    assert common.run_config(cfg, s, "metalr_class", {}, {"lr_level": "class"}).lr_level == "class"


def test_quick_subsample_keeps_every_cifar100_class(synthetic_cifar100):
    """--quick on CIFAR-100 (400 train images) must still allow the class-balanced meta split."""
    import numpy as np

    sys.path.insert(0, str(EXAMPLES))
    try:
        import _common
    finally:
        sys.path.remove(str(EXAMPLES))
    from hf_ddlr.data import make_variant

    sub = _common._subsample(synthetic_cifar100, 400, 200, seed=0)
    counts = np.bincount(sub["train"]["fine_label"], minlength=100)
    assert len(sub["train"]) == 400 and counts.min() == counts.max() == 4
    assert len(make_variant(sub, "noisy", noise_rate=0.4, meta_size=100, seed=0)["meta"]) == 100
    assert len(make_variant(sub, "superclass", superclass="vehicles_1", meta_size=10, seed=0)["meta"]) == 10


def test_offline_demo_runs_as_make_demo_starts_it(tmp_path):
    """`python -m hf_ddlr.demo` (what `make demo`, README's first set-up command, runs) on the digits for one epoch:
    the plain Trainer learns the task, MetaLR's rates already rank the 40 % changed labels above chance, and the
    table, JSON, plot and trajectory it writes agree with each other and with the noise it made."""
    from hf_ddlr import LRTrajectory

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hf_ddlr.demo", "--dataset", "digits", "--epochs", "1",
                           "--output_dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    plain, meta = res["plain"], res["metalr"]
    assert res["setup"]["dataset"] == "digits" and res["setup"]["epochs"] == 1
    assert plain["test_accuracy"] > 0.5 and 0.0 <= meta["test_accuracy"] <= 1.0  # ten classes: chance is 0.1
    assert 0.55 < meta["auroc"] <= 1.0 and meta["rate_noisy"] < meta["rate_clean"] <= 1.0
    traj = LRTrajectory.from_pretrained(tmp_path / "metalr")
    noisy = traj.noise_mask.bool()
    assert abs(float(noisy.float().mean()) - res["setup"]["noise_rate"]) < 0.01
    assert traj.instance_rates.shape == (2, noisy.numel())  # step 0 and the end of the one epoch
    md = (tmp_path / "results.md").read_text()
    assert f"| Trainer | {plain['test_accuracy']:.4f} |" in md and f"| {meta['auroc']:.3f} |" in md
    assert (tmp_path / "rates_clean_vs_noisy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
