"""``--help`` lists every flag a command takes (README: "``examples/*.py --help``", "``python -m hf_ddlr.demo --help``").

The example scripts parse their own options together with the whole config (``MetaLRConfig`` or a TRL config with
the meta options, so every ``TrainingArguments`` option too): their help shows all of them, with the defaults the
script's presets give. The offline demo takes four flags only: its help lists those and says that the MetaLR options
are not flags there, and a MetaLR flag is refused rather than silently accepted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_help(*cmd: str) -> str:
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def listed(text: str) -> set[str]:
    """The ``--flags`` the help's option list describes (lines that start with a flag)."""
    return set(re.findall(r"^\s{2}(--[a-z0-9_]+)", text, flags=re.M))


@pytest.mark.parametrize(("script", "own", "trl"), [
    ("noisy_cifar100.py", ["--setting", "--noise_rate", "--dataset", "--quick"], False),
    ("reward_noisy_preferences.py", ["--flip", "--meta_pairs", "--quick"], True),
])
def test_example_help_lists_script_options_and_every_config_flag(script, own, trl):
    if trl:
        pytest.importorskip("trl")
    flags = listed(run_help(str(EXAMPLES / script), "--help"))
    script_flags = {f for f in own if f in flags}
    assert script_flags == set(own), f"script options missing from --help: {set(own) - script_flags}"
    # MetaLR options and TrainingArguments options, not just the script's own
    for flag in ("--meta_lr", "--lr_level", "--max_instance_rate", "--learning_rate", "--num_train_epochs",
                 "--output_dir", "--push_to_hub"):
        assert flag in flags, f"{flag} missing from {script} --help"


def test_example_help_shows_the_preset_defaults():
    """The defaults shown are the ones the script would use with the other flags given (its presets)."""
    out = run_help(str(EXAMPLES / "noisy_cifar100.py"), "--dataset", "embedded", "-h")
    lr = re.search(r"^\s{2}--learning_rate .*?\(default:\s+([^)]+)\)", out, flags=re.M | re.S)
    assert lr is not None and lr.group(1).strip() == "0.05", out[-2000:]


def test_demo_help_lists_what_it_takes_and_no_more():
    out = run_help("-m", "hf_ddlr.demo", "--help")
    assert listed(out) == {"--output_dir", "--seed", "--epochs", "--dataset"}
    # it says where the MetaLR / TrainingArguments flags are (the demo keeps the MetaLRConfig defaults)
    assert "MetaLRConfig" in out and "examples/" in out and "--meta_lr" in out


def test_demo_refuses_a_metalr_flag():
    """The demo takes no MetaLRConfig flag: argparse stops before any data is loaded."""
    from hf_ddlr.demo import main

    with pytest.raises(SystemExit) as exc:
        main(["--meta_lr", "0.3"])
    assert exc.value.code == 2


def test_help_helpers(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import argparse

    import _common

    assert _common.wants_help(["--quick", "-h"]) and _common.wants_help(["--help"])
    assert not _common.wants_help(["--quick"]) and not _common.wants_help(["--", "--help"])
    p = argparse.ArgumentParser()
    p.add_argument("--a", default=1, help="95 % of 100%% (default: %(default)s)")
    _common.escape_help_percents(p)
    assert "95 % of 100% (default: 1)" in " ".join(p.format_help().split())


@pytest.mark.parametrize("name", ["MetaLRConfig", "MetaSFTConfig", "MetaRewardConfig", "MetaDPOConfig"])
def test_every_config_help_formats(name):
    """A user's own HfArgumentParser(<config>) --help (as examples/kfold_replay.py builds) formats every field's
    help: a lone '%' in one of them makes argparse raise instead."""
    from transformers import HfArgumentParser

    import hf_ddlr

    text = " ".join(HfArgumentParser(getattr(hf_ddlr, name)).format_help().split())
    assert "--meta_lr" in text and "--max_instance_rate" in text and "--learning_rate" in text


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_demo_refuses_a_run_of_no_epochs(epochs):
    from hf_ddlr.demo import main

    with pytest.raises(SystemExit) as exc:
        main(["--epochs", epochs])
    assert exc.value.code == 2
