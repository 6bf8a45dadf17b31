"""Shared pytest fixtures: a loopback Hub server and a synthetic dataset in the exact CIFAR-100 schema."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from hub_server import HubServer

from hf_ddlr.data import CIFAR100_FINE_TO_COARSE, cifar100_features


@pytest.fixture
def offline_off(monkeypatch):
    """Let in-process huggingface_hub calls reach 127.0.0.1 even under `make test`'s HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return constants


@pytest.fixture
def hub_server(tmp_path):
    """A Hub stand-in on 127.0.0.1 (see tests/hub_server.py); point HF_ENDPOINT at ``hub_server.endpoint``."""
    with HubServer(tmp_path / "hub_server_root") as server:
        yield server


def make_synthetic_cifar100(
    per_class_train: int = 12, per_class_test: int = 2, seed: int = 0
) -> datasets.DatasetDict:
    """Random 32x32 RGB images with the exact ``uoft-cs/cifar100`` features and the true fine -> coarse map."""
    rng = np.random.default_rng(seed)

    def split(per_class: int) -> datasets.Dataset:
        fine = np.repeat(np.arange(100), per_class)
        rng.shuffle(fine)
        images = rng.integers(0, 256, size=(len(fine), 32, 32, 3), dtype=np.uint8)
        coarse = np.asarray(CIFAR100_FINE_TO_COARSE)[fine]
        return datasets.Dataset.from_dict(
            {"img": list(images), "fine_label": fine.tolist(), "coarse_label": coarse.tolist()},
            features=cifar100_features(),
        )

    return datasets.DatasetDict(train=split(per_class_train), test=split(per_class_test))


@pytest.fixture(scope="session")
def synthetic_cifar100() -> datasets.DatasetDict:
    """100 classes x 12 train / 2 test images, CIFAR-100 schema; shared, so tests must not mutate it."""
    return make_synthetic_cifar100()
