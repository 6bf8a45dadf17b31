"""CIFAR models: standard parameter counts, shapes, loss, Auto-class round trip, functional_call + forward AD."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call
from transformers import AutoConfig, AutoModelForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput

import hf_ddlr.models as M


def n_params(config) -> int:
    with torch.device("meta"):  # counting needs no memory or init time
        model = AutoModelForImageClassification.from_config(config)
    return sum(p.numel() for p in model.parameters())


# published counts of the standard CIFAR variants (kuangliu/pytorch-cifar ResNet18 / VGG('VGG16'),
# xternalz/WideResNet-pytorch WRN-28-10): 10 classes, and the same with a 100-way classifier
@pytest.mark.parametrize(
    "config, expected",
    [
        (M.CifarResNetConfig(num_labels=10), 11_173_962),
        (M.CifarResNetConfig(num_labels=100), 11_220_132),
        (M.CifarVGGConfig(num_labels=10), 14_728_266),
        (M.CifarVGGConfig(num_labels=100), 14_774_436),
        (M.WideResNetConfig(num_labels=10), 36_479_194),
        (M.WideResNetConfig(num_labels=100), 36_536_884),
    ],
    ids=["resnet18-10", "resnet18-100", "vgg16bn-10", "vgg16bn-100", "wrn28-10-10", "wrn28-10-100"],
)
def test_parameter_counts_match_standard_variants(config, expected):
    count = n_params(config)
    print(f"{config.model_type} ({config.num_labels} classes): {count:,} parameters")
    assert count == expected


SMALL = {
    "resnet": (M.CifarResNetConfig(num_labels=7, base_width=8), 32),
    "vgg": (M.CifarVGGConfig(num_labels=7, stage_channels=[8, 16, 16], stage_depths=[1, 2, 1]), 32),
    "wrn": (M.WideResNetConfig(num_labels=7, depth=10, widen_factor=1, dropout_rate=0.3), 32),
    "cnn": (M.SmallCNNConfig(num_labels=7, num_channels=1, image_size=28, dropout_rate=0.2), 28),
    "cnn8": (M.SmallCNNConfig(num_labels=7, num_channels=1, image_size=8, channels=[8, 16]), 8),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_shapes_and_loss(name):
    config, size = SMALL[name]
    model = AutoModelForImageClassification.from_config(config).eval()
    x = torch.randn(3, config.num_channels, size, size)
    labels = torch.tensor([0, 6, 2])
    out = model(x, labels=labels, output_hidden_states=True)
    assert isinstance(out, ImageClassifierOutput)
    assert out.logits.shape == (3, 7)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert len(out.hidden_states) >= 2 and all(h.shape[0] == 3 for h in out.hidden_states)
    assert model(x).loss is None
    as_tuple = model(x, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)


def test_full_size_resnet18_forward():
    model = M.CifarResNetForImageClassification(M.CifarResNetConfig(num_labels=100)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 100)


@pytest.mark.parametrize("name", ["resnet", "vgg", "wrn", "cnn"])
def test_save_and_load_through_auto_classes(name, tmp_path):
    config, size = SMALL[name]
    config.id2label = {i: f"class_{i}" for i in range(7)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = AutoModelForImageClassification.from_config(config)
    model.train()
    x = torch.randn(4, config.num_channels, size, size)
    model(x)  # update BN running statistics, which must survive the round trip
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == config.model_type
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config.id2label[3] == "class_3"
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    bn = next(m for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


@pytest.mark.parametrize("name", ["resnet", "vgg", "wrn", "cnn"])
def test_functional_call_forward_ad_matches_reverse_mode(name):
    """The meta-gradient engine differentiates through training steps with forward-mode AD."""
    config, size = SMALL[name]
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(config).train()
    x, y = torch.randn(4, config.num_channels, size, size), torch.tensor([0, 1, 2, 3])
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def buffers():
        return {k: v.clone() for k, v in model.named_buffers()}

    with fwAD.dual_level():
        dual = {k: fwAD.make_dual(v, tangents[k]) for k, v in params.items()}
        torch.manual_seed(1)
        loss = functional_call(model, {**dual, **buffers()}, (x,), {"labels": y}).loss
        jvp = fwAD.unpack_dual(loss).tangent
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch.manual_seed(1)  # same dropout mask
    loss = functional_call(model, {**leaves, **buffers()}, (x,), {"labels": y}).loss
    grads = torch.autograd.grad(loss, list(leaves.values()))
    expected = sum((g * tangents[k]).sum() for g, k in zip(grads, leaves))
    torch.testing.assert_close(jvp, expected, rtol=1e-4, atol=1e-5)
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_bad_configs_and_inputs():
    with pytest.raises(Exception, match=r"depth must be 6n \+ 4"):
        M.WideResNetConfig(depth=27)
    with pytest.raises(Exception, match="image_size=4 is too small for 3 pooling stages"):
        M.SmallCNNConfig(image_size=4, channels=[8, 8, 8])
    with pytest.raises(Exception, match=r"dropout_rate must be in \[0, 1\)"):
        M.CifarResNetConfig(dropout_rate=1.0)
    with pytest.raises(Exception, match="one entry per stage"):
        M.CifarVGGConfig(stage_channels=[8, 16], stage_depths=[1])
    for depths in ("2222", [2, 2.5], [2, True]):  # a string has a length and int-able characters
        with pytest.raises(Exception, match="depths must be a list of at least 1 positive integers"):
            M.CifarResNetConfig(depths=depths)
    assert M.CifarResNetConfig(depths=[1, 1]).depths in ([1, 1], (1, 1))
    model = M.SmallCNNForImageClassification(M.SmallCNNConfig(num_labels=3, image_size=8, channels=[4]))
    with pytest.raises(ValueError, match=r"expects pixel_values of shape \(batch, 1, H, W\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="configured for 8x8 images"):
        model(torch.randn(2, 1, 28, 28))
