"""A failed push says only what is true: the trainer's output folder really holds what the message claims (the
retry it suggests uploads the model), and ``hf-ddlr push`` prints its failure once."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from test_trajectory import make_trajectory
from tiny import TinyConfig, TinyPreTrained, make_split

from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.hub import HubUploadError
from hf_ddlr.trajectory import TRAJECTORY_CONFIG_NAME, TRAJECTORY_TENSORS_NAME, LRTrajectory

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, optim="sgd",
              learning_rate=0.1, per_device_train_batch_size=8, logging_steps=2)
PLOTS = ("lr_trajectory_instance.png", "lr_trajectory_meta_loss.png")  # the default lr_level="instance"


def _dead_endpoint() -> str:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _claimed_files(message: str) -> list[str]:
    """The files a failure message says the folder holds, from its ``complete locally (a, b, ...)`` list."""
    found = re.search(r"complete locally \(([^)]*)\)", message)
    if found is None:
        return []
    files = []
    for item in (s.strip() for s in found.group(1).split(",")):
        files += {"model": ["model.safetensors", "config.json"], "plots": list(PLOTS)}.get(item, [item])
    return files


@pytest.mark.parametrize("failure", ["offline", "unreachable"])
def test_push_failing_at_repo_creation_leaves_what_the_message_claims(tmp_path, hub_server, monkeypatch, failure):
    """Without ``args.push_to_hub`` the repo is created inside ``trainer.push_to_hub()``, which transformers does
    before it saves the model: that failure must still leave the model, trajectory, plots and card in the folder."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr("transformers.utils.hub._hf_api", None)  # the Trainer caches one HfApi per process
    if failure == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", _dead_endpoint())
    out = tmp_path / "out"
    args = MetaLRConfig(output_dir=str(out), hub_model_id="me/demo", hub_token="hf_test_token", max_steps=3,
                        **COMMON)
    torch.manual_seed(0)
    t = MetaLRTrainer(model=TinyPreTrained(TinyConfig()), args=args, train_dataset=make_split(24, seed=1),
                      meta_dataset=make_split(8, seed=2))
    t.train()
    assert not (out / "model.safetensors").exists()  # nothing saved yet: the push must write it

    with pytest.raises(HubUploadError) as info:
        t.push_to_hub()
    msg = str(info.value)
    assert f"retry with `hf upload me/demo {out} .`" in msg
    for f in ("model.safetensors", "config.json", TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME, "README.md",
              *PLOTS):
        assert (out / f).is_file(), f"{f} missing after the failed push; message: {msg}"
    claimed = _claimed_files(msg)
    assert "model.safetensors" in claimed and TRAJECTORY_TENSORS_NAME in claimed and "README.md" in claimed
    assert [f for f in claimed if not (out / f).is_file()] == []

    # what the folder holds is the trained model and its trajectory, with the card describing both
    saved = TinyPreTrained.from_pretrained(out).state_dict()
    for name, value in t.model.state_dict().items():
        torch.testing.assert_close(saved[name], value.cpu(), msg=name)
    assert LRTrajectory.from_pretrained(out) == t.lr_trajectory
    card = (out / "README.md").read_text()
    assert "generated_from_trainer" in card and f"`{TRAJECTORY_TENSORS_NAME}`" in card

    # the retry the message suggests (`hf upload me/demo <out> .`) uploads the model
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.endpoint)
    api = HfApi(endpoint=hub_server.endpoint, token="hf_test_token")
    api.create_repo("me/demo", exist_ok=True)
    api.upload_folder(repo_id="me/demo", folder_path=str(out), ignore_patterns=["_*", "checkpoint-*"])
    files = api.list_repo_files("me/demo")
    for f in ("model.safetensors", TRAJECTORY_TENSORS_NAME, "README.md", *PLOTS):
        assert f in files, f


def test_cli_push_failure_is_printed_once(tmp_path):
    """``hf-ddlr push`` to an unreachable Hub: the error (with its retry command) is printed once, not once
    logged and once printed."""
    make_trajectory().save_pretrained(tmp_path / "run")
    (tmp_path / "tmp").mkdir()  # the CLI's temporary folder lands here, not in the machine's /tmp
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": _dead_endpoint(), "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "hf_test_token", "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.run([sys.executable, "-m", "hf_ddlr.cli", "push", str(tmp_path / "run"), "me/x"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert both.count("retry with `hf upload me/x ") == 1, both
    assert both.count("Upload of ") == 1, both
    assert proc.stderr.startswith("hf-ddlr push: error: Upload of "), proc.stderr
    (kept,) = (tmp_path / "tmp").iterdir()  # kept for the retry the message names
    assert f"Upload of {kept} to me/x failed" in proc.stderr and (kept / "lr_trajectory.safetensors").is_file()
