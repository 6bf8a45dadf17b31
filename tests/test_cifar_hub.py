"""load_cifar100 through the real datasets.load_dataset("uoft-cs/cifar100") path, against a loopback Hub.

The load runs in a subprocess with HF_ENDPOINT pointing at the test server (huggingface_hub reads
it at import time) and fresh HF_HOME / HF_DATASETS_CACHE, so nothing in this process's caches or
offline settings can stand in for the download.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hf_ddlr.data import CIFAR100_COARSE_NAMES, CIFAR100_FINE_NAMES

# the layout of the real uoft-cs/cifar100 repo: one config, parquet shards under cifar100/
README = """---
configs:
- config_name: cifar100
  data_files:
  - split: train
    path: cifar100/train-*
  - split: test
    path: cifar100/test-*
  default: true
---
# CIFAR-100 (synthetic copy for tests)
"""

CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import hf_ddlr.data as D
    out = D.load_cifar100("noisy", noise_rate=0.5, noise_mode="flip", meta_size=200, seed=0)
    report = {}
    for name, split in out.items():
        report[name] = {
            "rows": len(split),
            "columns": split.column_names,
            "label_names": split.features["label"].names,
            "coarse_names": split.features["coarse_label"].names,
            "noisy": float(np.mean(split["is_noisy"])),
            "label_counts": np.bincount(split["label"], minlength=100).tolist(),
            "source_index": [int(i) for i in split["source_index"]],
            "shape": list(np.asarray(split[0]["img"]).shape),
        }
    json.dump(report, sys.stdout)
    """
)


@pytest.fixture
def cifar_repo(hub_server, synthetic_cifar100, tmp_path):
    for split in ("train", "test"):
        synthetic_cifar100[split].to_parquet(str(tmp_path / f"{split}.parquet"))
    hub_server.commit_files(
        "dataset",
        "uoft-cs/cifar100",
        {
            "README.md": README,
            "cifar100/train-00000-of-00001.parquet": tmp_path / "train.parquet",
            "cifar100/test-00000-of-00001.parquet": tmp_path / "test.parquet",
        },
    )
    return hub_server


def test_load_cifar100_from_hub_protocol_server(cifar_repo, synthetic_cifar100, tmp_path):
    env = cifar_repo.client_env(tmp_path / "hf_home")
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert {k: v["rows"] for k, v in report.items()} == {"train": 1000, "meta": 200, "test": 200}
    for split in report.values():
        # the documented schema, written out here (not read from hf_ddlr.data.variants, which it checks)
        assert split["columns"] == ["img", "label", "coarse_label", "clean_label", "is_noisy", "sample_index",
                                    "source_index"]
        assert split["label_names"] == CIFAR100_FINE_NAMES
        assert split["coarse_names"] == CIFAR100_COARSE_NAMES
        assert split["shape"] == [32, 32, 3]
    assert report["train"]["noisy"] == 0.5
    assert report["meta"]["noisy"] == 0.0 and report["test"]["noisy"] == 0.0
    assert set(report["meta"]["label_counts"]) == {2}
    assert not set(report["meta"]["source_index"]) & set(report["train"]["source_index"])
    # the parquet shards really came over HTTP from the test server
    fetched = [path for method, path in cifar_repo.requests if method == "GET" and path.endswith(".parquet")]
    assert len(fetched) == 2 and all("/datasets/uoft-cs/cifar100/resolve/" in p for p in fetched)


def test_hub_server_model_upload_and_download(hub_server, tmp_path, monkeypatch):
    """The helper server also takes create_repo / upload_folder, for push_to_hub tests of models."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants, snapshot_download
    from transformers import AutoModelForImageClassification

    import hf_ddlr.models as M

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    model = M.SmallCNNForImageClassification(M.SmallCNNConfig(num_labels=4, image_size=8, channels=[4]))
    model.save_pretrained(tmp_path / "local")
    api = HfApi(endpoint=hub_server.endpoint, token="hf_test_token")
    url = api.create_repo("tester/tiny-cnn")
    assert str(url).endswith("/tester/tiny-cnn")
    api.create_repo("tester/tiny-cnn", exist_ok=True)
    info = api.upload_folder(
        repo_id="tester/tiny-cnn", folder_path=tmp_path / "local", commit_message="add model"
    )
    assert len(info.oid) == 40
    files = set(api.list_repo_files("tester/tiny-cnn"))
    assert {"config.json", "model.safetensors"} <= files
    path = snapshot_download("tester/tiny-cnn", endpoint=hub_server.endpoint, cache_dir=tmp_path / "cache")
    loaded = AutoModelForImageClassification.from_pretrained(path)
    assert type(loaded) is M.SmallCNNForImageClassification
    assert huggingface_hub.hf_hub_download(
        "tester/tiny-cnn",
        "config.json",
        revision=info.oid,
        endpoint=hub_server.endpoint,
        cache_dir=tmp_path / "c2",
    )
    with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
        api.model_info("tester/missing")


def test_load_cifar100_offline_says_what_to_do(tmp_path):
    """Offline with nothing cached: the error names the offline alternative (the embedded digits), not only the
    datasets library's connection error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    code = ("from hf_ddlr.data import load_cifar100\n"
            "try:\n    load_cifar100()\nexcept ConnectionError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Could not load uoft-cs/cifar100" in proc.stdout and "load_embedded('mnist')" in proc.stdout
