"""Data variants on a dataset with the exact uoft-cs/cifar100 features, embedded datasets, transforms."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import default_data_collator

import hf_ddlr.data as D


def arr(ds: datasets.Dataset, col: str) -> np.ndarray:
    return np.asarray(ds[col])


@pytest.fixture(scope="module")
def mnist() -> datasets.DatasetDict:
    return D.load_embedded("mnist")


# ----------------------------------------------------------------------------------------- schema
def test_every_split_has_output_schema(synthetic_cifar100):
    out = D.make_variant(synthetic_cifar100, "noisy", noise_rate=0.2, meta_size=100)
    assert set(out) == {"train", "meta", "test"}
    for split in out.values():
        assert split.column_names == list(D.OUTPUT_COLUMNS)
        for col in ("label", "clean_label"):
            assert split.features[col].names == D.CIFAR100_FINE_NAMES
        assert split.features["coarse_label"].names == D.CIFAR100_COARSE_NAMES
        assert split.features["sample_index"] == datasets.Value("int64")
        np.testing.assert_array_equal(arr(split, "sample_index"), np.arange(len(split)))
    assert (len(out["train"]), len(out["meta"]), len(out["test"])) == (1100, 100, 200)


def test_clean_label_is_the_source_label(synthetic_cifar100):
    out = D.make_variant(synthetic_cifar100, "noisy", noise_rate=0.3, meta_size=200, seed=3)
    src_train = arr(synthetic_cifar100["train"], "fine_label")
    for name in ("train", "meta"):
        split = out[name]
        np.testing.assert_array_equal(arr(split, "clean_label"), src_train[arr(split, "source_index")])
    np.testing.assert_array_equal(arr(out["test"], "label"), arr(synthetic_cifar100["test"], "fine_label"))


# ----------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize(
    "mode, rate, expected",
    [("flip", 0.4, 0.4), ("flip", 0.8, 0.8), ("uniform", 0.4, 0.4 * 0.99), ("uniform", 0.6, 0.6 * 0.99)],
)
def test_realised_noise_rate(synthetic_cifar100, mode, rate, expected):
    out = D.make_variant(synthetic_cifar100, "noisy", noise_rate=rate, noise_mode=mode, meta_size=100, seed=1)
    train = out["train"]
    label, clean, is_noisy = arr(train, "label"), arr(train, "clean_label"), arr(train, "is_noisy")
    realised = float(np.mean(label != clean))
    print(
        f"{mode} noise requested {rate:.2f}: realised wrong-label rate {realised:.4f} over {len(train)} rows"
    )
    assert abs(realised - expected) < 0.01
    np.testing.assert_array_equal(is_noisy, label != clean)
    assert label.min() >= 0 and label.max() < 100


def test_uniform_noise_can_keep_the_true_label():
    labels = np.zeros(20000, dtype=np.int64)
    noisy = D.apply_label_noise(labels, 0.5, num_classes=4, mode="uniform", seed=0)
    # half of the rows are resampled from 4 classes: 3/8 end up wrong, 1/8 resampled to the true one
    assert abs(np.mean(noisy != labels) - 0.375) < 0.01
    flipped = D.apply_label_noise(labels, 0.5, num_classes=4, mode="flip", seed=0)
    assert np.mean(flipped != labels) == 0.5


def test_pair_noise_flips_to_the_next_class_exactly():
    labels = np.repeat(np.arange(10), 100)
    noisy = D.apply_label_noise(labels, 0.3, num_classes=10, mode="pair", seed=0)
    wrong = noisy != labels
    assert wrong.sum() == 300
    np.testing.assert_array_equal(noisy[wrong], (labels[wrong] + 1) % 10)  # 9 -> 0 wraps around
    assert (noisy[wrong & (labels == 9)] == 0).all() and (wrong & (labels == 9)).any()
    # seeded: the same rows as flip noise at the same seed and rate, only the new label differs
    flipped = D.apply_label_noise(labels, 0.3, num_classes=10, mode="flip", seed=0)
    np.testing.assert_array_equal(flipped != labels, wrong)
    np.testing.assert_array_equal(
        D.apply_label_noise(labels, 0.3, num_classes=10, mode="pair", seed=0), noisy
    )
    assert not np.array_equal(D.apply_label_noise(labels, 0.3, num_classes=10, mode="pair", seed=1), noisy)


@pytest.mark.parametrize("mode", ["flip", "pair"])
def test_class_dependent_noise_exact_count_per_class(mode):
    counts = [40, 60, 80, 100, 120, 37, 50, 70, 90, 11]  # unequal classes, counts that need rounding
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    rates = [0.1] * 5 + [0.5] * 5
    noisy = D.apply_label_noise(labels, rates, num_classes=10, mode=mode, seed=3)
    for c, (n, r) in enumerate(zip(counts, rates)):
        assert (noisy[labels == c] != c).sum() == int(round(r * n)), c
    wrong = noisy != labels
    if mode == "pair":
        np.testing.assert_array_equal(noisy[wrong], (labels[wrong] + 1) % 10)
    assert noisy.min() >= 0 and noisy.max() < 10
    np.testing.assert_array_equal(
        D.apply_label_noise(labels, rates, num_classes=10, mode=mode, seed=3), noisy
    )
    assert not np.array_equal(D.apply_label_noise(labels, rates, num_classes=10, mode=mode, seed=4), noisy)
    # a class at rate 0 is untouched; numpy arrays are accepted as rates
    zero_first = D.apply_label_noise(labels, np.array([0.0] + [0.5] * 9), num_classes=10, mode=mode, seed=3)
    assert (zero_first[labels == 0] == 0).all()


def test_class_dependent_noise_through_make_variant(synthetic_cifar100):
    rates = [0.0] * 50 + [0.6] * 50
    out = D.make_variant(
        synthetic_cifar100, "noisy", noise_rate=rates, noise_mode="flip", meta_size=100, seed=2
    )
    train = out["train"]
    clean, is_noisy = arr(train, "clean_label"), arr(train, "is_noisy")
    for c in range(100):
        assert is_noisy[clean == c].sum() == int(round(rates[c] * (clean == c).sum()))
    assert not arr(out["meta"], "is_noisy").any()


@pytest.mark.parametrize(
    "rate, match",
    [
        ([0.1, 0.2], "one rate per class: got 2 rates for 4 classes"),
        ([0.1, 1.0, 0.1, 0.1], r"must be in \[0, 1\)"),
        ([[0.1, 0.1], [0.1, 0.1]], "1-D per-class sequence"),
        ([], "1-D per-class sequence"),
    ],
)
def test_bad_per_class_noise_rate(rate, match):
    with pytest.raises(ValueError, match=match):
        D.apply_label_noise(np.zeros(10, dtype=np.int64), rate, num_classes=4, mode="flip")


def test_meta_split_is_clean_balanced_and_disjoint(synthetic_cifar100):
    out = D.make_variant(synthetic_cifar100, "noisy", noise_rate=0.5, meta_size=300, seed=2)
    meta, train = out["meta"], out["train"]
    assert not arr(meta, "is_noisy").any()
    np.testing.assert_array_equal(arr(meta, "label"), arr(meta, "clean_label"))
    counts = np.bincount(arr(meta, "label"), minlength=100)
    assert (counts == 3).all()
    meta_src, train_src = set(arr(meta, "source_index")), set(arr(train, "source_index"))
    assert not meta_src & train_src
    assert meta_src | train_src == set(range(len(synthetic_cifar100["train"])))
    assert not arr(out["test"], "is_noisy").any()


def test_same_seed_same_splits_different_seed_different_noise(synthetic_cifar100):
    kw = dict(noise_rate=0.4, meta_size=100)
    a = D.make_variant(synthetic_cifar100, "noisy", seed=7, **kw)
    b = D.make_variant(synthetic_cifar100, "noisy", seed=7, **kw)
    c = D.make_variant(synthetic_cifar100, "noisy", seed=8, **kw)
    for name in ("train", "meta"):
        for col in ("source_index", "label"):
            np.testing.assert_array_equal(arr(a[name], col), arr(b[name], col))
    assert not np.array_equal(arr(a["meta"], "source_index"), arr(c["meta"], "source_index"))
    assert not np.array_equal(arr(a["train"], "is_noisy"), arr(c["train"], "is_noisy"))


def test_meta_split_does_not_depend_on_noise(synthetic_cifar100):
    clean = D.make_variant(synthetic_cifar100, "clean", meta_size=100, seed=4)
    noisy = D.make_variant(
        synthetic_cifar100, "noisy", noise_rate=0.6, noise_mode="flip", meta_size=100, seed=4
    )
    np.testing.assert_array_equal(arr(clean["meta"], "source_index"), arr(noisy["meta"], "source_index"))
    assert not arr(clean["train"], "is_noisy").any()


# ----------------------------------------------------------------------------------------- superclass
def test_superclass_restricts_meta_and_test(synthetic_cifar100):
    out = D.make_variant(synthetic_cifar100, "superclass", superclass="people", meta_size=50, seed=0)
    people = D.CIFAR100_COARSE_NAMES.index("people")
    people_fine = sorted(D.CIFAR100_FINE_NAMES.index(n) for n in D.CIFAR100_SUPERCLASSES["people"])
    for name in ("meta", "test"):
        assert set(arr(out[name], "coarse_label")) == {people}
        assert set(arr(out[name], "label")) == set(people_fine)
    assert (np.bincount(arr(out["meta"], "label"), minlength=100)[people_fine] == 10).all()
    assert len(out["test"]) == 5 * 2
    assert set(arr(out["train"], "label")) == set(range(100))  # train keeps all classes
    by_id = D.make_variant(synthetic_cifar100, "superclass", superclass=people, meta_size=50, seed=0)
    np.testing.assert_array_equal(arr(by_id["meta"], "source_index"), arr(out["meta"], "source_index"))


def test_superclass_on_embedded_digits(mnist):
    out = D.make_variant(mnist, "superclass", superclass="straight", meta_size=30)
    assert set(arr(out["meta"], "label")) == {1, 4, 7}
    assert set(arr(out["test"], "label")) == {1, 4, 7}
    assert len(out["test"]) == 300


# ----------------------------------------------------------------------------------------- k-fold
def test_kfold_meta_splits_partition_train(synthetic_cifar100):
    base = D.make_variant(synthetic_cifar100, "noisy", noise_rate=0.3, meta_size=100)
    folds = D.kfold_splits(base, 4, seed=0)
    n = len(base["train"])
    seen = []
    for fold in folds:
        tr, me = set(arr(fold["train"], "source_index")), set(arr(fold["meta"], "source_index"))
        assert not tr & me
        assert len(tr) + len(me) == n
        seen.extend(arr(fold["meta"], "source_index"))
        # stratified: every class spread evenly (11 per class -> 2 or 3 per fold)
        counts = np.bincount(arr(fold["meta"], "clean_label"), minlength=100)
        assert counts.min() >= 2 and counts.max() <= 3
        np.testing.assert_array_equal(arr(fold["meta"], "sample_index"), np.arange(len(fold["meta"])))
        assert len(fold["test"]) == 200
    assert sorted(seen) == sorted(arr(base["train"], "source_index").tolist())
    # noisy labels travel with their rows
    lookup = dict(zip(arr(base["train"], "source_index"), arr(base["train"], "label")))
    assert all(
        lookup[s] == lbl
        for s, lbl in zip(arr(folds[1]["meta"], "source_index"), arr(folds[1]["meta"], "label"))
    )
    one = D.make_kfold(base, 4, 2, seed=0)
    np.testing.assert_array_equal(arr(one["meta"], "source_index"), arr(folds[2]["meta"], "source_index"))


def test_kfold_accepts_raw_schema(synthetic_cifar100):
    fold = D.make_kfold(synthetic_cifar100["train"], 3, 0, seed=1)
    assert set(fold) == {"train", "meta"}
    assert len(fold["train"]) + len(fold["meta"]) == 1200
    assert not arr(fold["meta"], "is_noisy").any()


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_noise_rate(synthetic_cifar100, rate):
    with pytest.raises(ValueError, match=r"noise_rate must be in \[0, 1\)"):
        D.make_variant(synthetic_cifar100, "noisy", noise_rate=rate, meta_size=100)


def test_unknown_superclass_lists_valid_names(synthetic_cifar100):
    with pytest.raises(ValueError, match="unknown superclass 'peeple'.*aquatic_mammals.*vehicles_2"):
        D.make_variant(synthetic_cifar100, "superclass", superclass="peeple", meta_size=50)
    with pytest.raises(ValueError, match="unknown superclass 20"):
        D.make_variant(synthetic_cifar100, "superclass", superclass=20, meta_size=50)


def test_meta_size_errors(synthetic_cifar100):
    with pytest.raises(ValueError, match="positive multiple of the 100 classes.*meta_size=100 or 200"):
        D.make_variant(synthetic_cifar100, "clean", meta_size=150)
    with pytest.raises(ValueError, match="needs 12 images of class 'apple' but train has only 12"):
        D.make_variant(synthetic_cifar100, "clean", meta_size=1200)
    with pytest.raises(ValueError, match="positive multiple of the 5 classes"):
        D.make_variant(synthetic_cifar100, "superclass", superclass="people", meta_size=12)


def test_superclass_needs_coarse_label(synthetic_cifar100):
    no_coarse = datasets.DatasetDict(
        {k: v.remove_columns("coarse_label") for k, v in synthetic_cifar100.items()}
    )
    with pytest.raises(ValueError, match="needs a 'coarse_label' ClassLabel column"):
        D.make_variant(no_coarse, "superclass", superclass="people", meta_size=50)
    assert "coarse_label" not in D.make_variant(no_coarse, "clean", meta_size=100)["train"].column_names


def test_other_bad_arguments(synthetic_cifar100):
    with pytest.raises(ValueError, match="unknown variant 'nosy'"):
        D.make_variant(synthetic_cifar100, "nosy")
    with pytest.raises(ValueError, match="unknown noise_mode 'pairs'.*'uniform', 'flip', 'pair'"):
        D.make_variant(synthetic_cifar100, "noisy", noise_rate=0.2, noise_mode="pairs", meta_size=100)
    with pytest.raises(ValueError, match="use variant='noisy'"):
        D.make_variant(synthetic_cifar100, "clean", noise_rate=0.2, meta_size=100)
    with pytest.raises(ValueError, match="needs superclass="):
        D.make_variant(synthetic_cifar100, "superclass", meta_size=100)
    with pytest.raises(ValueError, match="'train' and 'test' splits"):
        D.make_variant(datasets.DatasetDict(train=synthetic_cifar100["train"]), "clean")
    with pytest.raises(ValueError, match="not a ClassLabel"):
        bad = synthetic_cifar100.cast_column("fine_label", datasets.Value("int64"))
        D.make_variant(bad, "clean", meta_size=100)
    with pytest.raises(ValueError, match=r"k must be an integer in \[2, 1200\]"):
        D.kfold_splits(synthetic_cifar100, 1)
    with pytest.raises(ValueError, match=r"fold must be an integer in \[0, k=3\)"):
        D.make_kfold(synthetic_cifar100, 3, 3)
    with pytest.raises(ValueError, match=r"unknown embedded dataset 'cifar'.*\['digits', 'mnist'\]"):
        D.load_embedded("cifar")


# ----------------------------------------------------------------------------------------- embedded
def test_embedded_mnist(mnist):
    assert (len(mnist["train"]), len(mnist["test"])) == (4000, 1000)
    assert mnist["train"].features == D.embedded_features()
    # named, so a trajectory learned on it records which data it was (dataset_signature)
    assert (mnist["train"].info.dataset_name, mnist["train"].split, mnist["test"].split) == (
        "embedded-mnist",
        "train",
        "test",
    )
    noisy = D.make_variant(mnist, "noisy", noise_rate=0.4, meta_size=100)
    assert (noisy["train"].info.dataset_name, str(noisy["train"].split)) == ("embedded-mnist", "train")
    assert (np.bincount(arr(mnist["train"], "fine_label")) == 400).all()
    assert (np.bincount(arr(mnist["test"], "fine_label")) == 100).all()
    img = mnist["train"][0]["img"]
    assert img.size == (28, 28) and img.mode == "L"
    fine, coarse = arr(mnist["test"], "fine_label"), arr(mnist["test"], "coarse_label")
    for c, digits in enumerate(D.DIGIT_SUPERCLASSES.values()):
        assert set(fine[coarse == c]) == set(digits)
    # real digits, not noise: the mean "one" has far less ink than the mean "zero"
    ink = {
        d: np.mean([np.asarray(mnist["test"][int(i)]["img"]).mean() for i in np.flatnonzero(fine == d)[:20]])
        for d in (0, 1)
    }
    assert ink[1] < 0.7 * ink[0]


def test_embedded_digits():
    digits = D.load_embedded("digits")
    assert (len(digits["train"]), len(digits["test"])) == (1437, 360)
    assert digits["train"][0]["img"].size == (8, 8)
    assert np.asarray(digits["train"][0]["img"]).max() > 100  # rescaled from 0..16 to 0..255
    again = D.load_embedded("digits")
    assert arr(digits["test"], "fine_label").tolist() == arr(again["test"], "fine_label").tolist()


# ----------------------------------------------------------------------------------------- transforms
def test_random_crop_is_a_shifted_window():
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 6, 6) + 1
    torch.manual_seed(0)
    for _ in range(10):
        y = D.random_crop(x, 2)
        assert y.shape == x.shape
        padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
        assert any(torch.equal(y, padded[:, t : t + 6, s : s + 6]) for t in range(5) for s in range(5))
    assert torch.equal(D.random_crop(x, 0), x)
    flips = {torch.equal(D.random_hflip(x), x.flip(-1)) for _ in range(20)}
    assert flips == {True, False}


def test_with_transforms_train_augmented_meta_test_not(mnist):
    out = D.make_variant(mnist, "clean", meta_size=100)
    tf = D.with_transforms(out, crop_padding=2)
    row = tf["train"][0]
    assert set(row) == {"pixel_values", "label", "sample_index"}
    assert row["pixel_values"].shape == (1, 28, 28) and row["pixel_values"].dtype == torch.float32
    torch.manual_seed(0)
    train_views = [tf["train"][5]["pixel_values"] for _ in range(6)]
    assert any(not torch.equal(train_views[0], v) for v in train_views[1:])
    for name in ("meta", "test"):
        assert torch.equal(tf[name][3]["pixel_values"], tf[name][3]["pixel_values"])
    # normalised with train statistics: the test set is roughly zero-mean, unit-std
    test_pixels = torch.stack(tf["test"][:200]["pixel_values"])
    assert abs(float(test_pixels.mean())) < 0.1 and abs(float(test_pixels.std()) - 1) < 0.1
    # grayscale: no flip by default -> with zero padding the augmented view equals the plain one
    no_crop = D.with_transforms(out, crop_padding=0)
    plain = D.with_transforms(out, augment=False)
    for i in range(20):
        assert torch.equal(no_crop["train"][i]["pixel_values"], plain["train"][i]["pixel_values"])
    # the input dataset is not modified
    assert "img" in out["train"][0]


def test_rgb_flip_and_collation(synthetic_cifar100):
    out = D.make_variant(synthetic_cifar100, "clean", meta_size=100)
    tf = D.with_transforms(out, crop_padding=0, mean=D.CIFAR100_MEAN, std=D.CIFAR100_STD)
    plain = D.with_transforms(out, augment=False, mean=D.CIFAR100_MEAN, std=D.CIFAR100_STD)
    torch.manual_seed(1)
    base = plain["train"][0]["pixel_values"]
    assert base.shape == (3, 32, 32)
    seen = {torch.equal(tf["train"][0]["pixel_values"], base.flip(-1)) for _ in range(20)}
    assert seen == {True, False}  # colour images are flipped half of the time
    batch = default_data_collator([tf["train"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["labels"].tolist() == out["train"][:4]["label"]
    assert batch["sample_index"].tolist() == [0, 1, 2, 3]


def test_transform_bad_input(synthetic_cifar100):
    with pytest.raises(ValueError, match="lacks columns.*make_variant"):
        D.with_transforms(synthetic_cifar100)
    out = D.make_variant(synthetic_cifar100, "clean", meta_size=100)
    with pytest.raises(ValueError, match="image has 3 channel"):
        D.with_transforms(out, mean=[0.5], std=[0.2])["test"][0]
    with pytest.raises(ValueError, match="pass both mean and std"):
        D.with_transforms(out, mean=[0.5, 0.5, 0.5])
