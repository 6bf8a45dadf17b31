"""meta_strategy='finite_difference' falls back to 'jvp' where its perturbation drowns in rounding: half
precision, and on a GPU TF32 matmuls or TF32 convolutions (measured on an H200: ResNet-18's finite difference
against the double backward, cosine 0.42-0.67 with cuDNN's default TF32 convolutions, 0.99996 without)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from tiny import TinyMLP, make_split
from torch import nn

import hf_ddlr.schedules as schedules
from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.schedules import finite_difference_blocker

NEW_API = isinstance(getattr(torch.backends.cuda.matmul, "fp32_precision", None), str)


@contextlib.contextmanager
def precision(matmul: str, conv: str):
    """Set the fp32 precision of CUDA matmuls and cuDNN convolutions ('ieee' or 'tf32'), then restore."""
    if NEW_API:
        saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
    else:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul == "tf32", conv == "tf32"
    try:
        yield
    finally:
        if NEW_API:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
        else:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))


def test_half_precision_blocks_everywhere():
    for on_cuda in (False, True):
        assert "half precision" in finite_difference_blocker(TinyMLP(), True, on_cuda)


def test_the_cpu_never_blocks_whatever_the_tf32_flags():
    with precision("tf32", "tf32"):
        assert finite_difference_blocker(conv_net(), False, on_cuda=False) is None


def test_tf32_convolutions_block_a_model_with_convolutions_only():
    with precision("ieee", "tf32"):  # the GPU default: convolutions in TF32, matmuls in fp32
        reason = finite_difference_blocker(conv_net(), False, on_cuda=True)
        assert reason is not None and "cuDNN" in reason and "tf32=False" in reason
        assert finite_difference_blocker(TinyMLP(), False, on_cuda=True) is None  # no convolution to round
    with precision("ieee", "ieee"):
        assert finite_difference_blocker(conv_net(), False, on_cuda=True) is None


def test_torch_defaults_keep_the_finite_difference_on_a_model_without_convolutions():
    """torch's own defaults: matmul precision unset ('none': fp32), convolutions in TF32."""
    with precision("none" if NEW_API else "ieee", "tf32"):
        assert finite_difference_blocker(TinyMLP(), False, on_cuda=True) is None
        assert finite_difference_blocker(conv_net(), False, on_cuda=True) is not None


def test_tf32_matmuls_block_every_model():
    with precision("tf32", "ieee"):
        reason = finite_difference_blocker(TinyMLP(), False, on_cuda=True)
        assert reason is not None and "matmul" in reason


def test_set_float32_matmul_precision_high_counts_as_tf32():
    saved = torch.get_float32_matmul_precision()
    try:
        with precision("ieee", "ieee"):
            torch.set_float32_matmul_precision("high")
            assert "matmul" in finite_difference_blocker(TinyMLP(), False, on_cuda=True)
    finally:
        torch.set_float32_matmul_precision(saved)


def _trained(tmp_path, **kw) -> MetaLRTrainer:
    """One step of a finite-difference run (the schedule, and with it the strategy, is set in train())."""
    args = MetaLRConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                        max_steps=1, per_device_train_batch_size=8, meta_strategy="finite_difference", **kw)
    tr = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(16, seed=1),
                       meta_dataset=make_split(8, seed=2))
    tr.train()
    return tr


@pytest.mark.parametrize("blocked", [False, True])
def test_the_trainer_follows_the_blocker(tmp_path, monkeypatch, blocked):
    """What the schedule does with the rule's answer: warn and compute by 'jvp', or keep the finite difference."""
    monkeypatch.setattr(schedules, "finite_difference_blocker", lambda *a: "is unreliable here" if blocked else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = _trained(tmp_path)
    messages = [str(w.message) for w in caught if "finite_difference" in str(w.message)]
    assert tr._schedule.strategy == ("jvp" if blocked else "finite_difference")
    assert bool(messages) == blocked


def test_bf16_on_cpu_falls_back_to_jvp(tmp_path):
    with pytest.warns(UserWarning, match="half precision"):
        tr = _trained(tmp_path, bf16=True)
    assert tr._schedule.strategy == "jvp"
