"""The VADER sentiment lexicon as an offline text dataset: loading, thresholds, seeded noisy splits."""

from __future__ import annotations

import numpy as np
import pytest

import hf_ddlr.data as D


@pytest.fixture(scope="module")
def lexicon():
    return D.load_vader_lexicon(0.5)


def test_load_vader_lexicon_labels_are_the_sign_of_the_human_rating(lexicon):
    assert lexicon.column_names == ["text", "label", "score", "std"]
    assert lexicon.features["label"].names == ["negative", "positive"]
    score, label = np.asarray(lexicon["score"]), np.asarray(lexicon["label"])
    assert len(lexicon) == 6803 and label.sum() == 2990  # vaderSentiment 3.3.2: 6817 lines, 14 tokens twice
    assert (np.abs(score) >= 0.5 - 1e-6).all() and (score >= -4).all() and (score <= 4).all()
    np.testing.assert_array_equal(label, (score > 0).astype(int))
    row = lexicon[lexicon["text"].index("good")]
    assert row["label"] == 1 and row["score"] == pytest.approx(1.9) and row["std"] > 0
    assert lexicon[lexicon["text"].index("horrible")]["label"] == 0
    assert len(set(lexicon["text"])) == len(lexicon)


def test_threshold_keeps_only_polarised_words(lexicon):
    strong = D.load_vader_lexicon(2.0)
    assert 0 < len(strong) < len(lexicon)
    assert (np.abs(np.asarray(strong["score"])) >= 2.0 - 1e-6).all()
    assert set(strong["text"]) <= set(lexicon["text"])
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="threshold must be > 0"):
            D.load_vader_lexicon(bad)
    with pytest.raises(ValueError, match="no lexicon entry"):
        D.load_vader_lexicon(5.0)


def test_make_lexicon_variant_splits_noise_and_seed(lexicon):
    out = D.make_lexicon_variant(
        lexicon, train_size=2000, meta_per_class=10, test_size=1000, noise_rate=0.3, seed=0
    )
    train, meta, test = out["train"], out["meta"], out["test"]
    assert (len(train), len(meta), len(test)) == (2000, 20, 1000)
    assert not set(train["text"]) & set(meta["text"]) and not set(train["text"]) & set(test["text"])
    assert not set(meta["text"]) & set(test["text"])
    np.testing.assert_array_equal(np.bincount(meta["label"]), [10, 10])
    for split in (meta, test):
        assert not any(split["is_noisy"])
        np.testing.assert_array_equal(split["sample_index"], np.arange(len(split)))
    label, clean = np.asarray(train["label"]), np.asarray(train["clean_label"])
    np.testing.assert_array_equal(np.asarray(train["is_noisy"]), label != clean)
    assert (label != clean).sum() == 600  # exactly 30 %, binary flip
    np.testing.assert_array_equal(clean, (np.asarray(train["score"]) > 0).astype(int))
    again = D.make_lexicon_variant(lexicon, noise_rate=0.3, seed=0)
    assert again["train"]["text"] == train["text"] and again["train"]["label"] == train["label"]
    assert D.make_lexicon_variant(lexicon, noise_rate=0.3, seed=1)["train"]["text"] != train["text"]
    rest = D.make_lexicon_variant(lexicon, train_size=100, test_size=None)
    assert len(rest["test"]) == len(lexicon) - 20 - 100
    with pytest.raises(ValueError, match="must be positive and fit"):
        D.make_lexicon_variant(lexicon, train_size=7000)


def test_preference_pairs_are_ordered_by_rating_on_disjoint_vocabularies():
    """make_preference_pairs: the chosen word is the higher-rated one, except in the flipped training pairs (about
    the share asked for; never in meta / test); the three splits' words are disjoint; seeded."""
    from hf_ddlr.data import load_vader_lexicon, make_preference_pairs

    lex = load_vader_lexicon(0.5)
    rating = dict(zip(lex["text"], lex["score"]))
    ds = make_preference_pairs(lex["text"], lex["score"], sizes=(400, 20, 100), flip=0.3, min_gap=1.0, seed=3)
    assert [len(ds[s]) for s in ("train", "meta", "test")] == [400, 20, 100]
    for split in ds:
        up = np.array([rating[c] - rating[r] for c, r in zip(ds[split]["chosen"], ds[split]["rejected"])])
        flipped = np.asarray(ds[split]["is_flipped"])
        assert (np.abs(up) >= 1.0).all() and ((up > 0) == ~flipped).all()
        assert flipped.any() == (split == "train")
    assert 0.22 < np.mean(ds["train"]["is_flipped"]) < 0.38
    vocab = {s: set(ds[s]["chosen"]) | set(ds[s]["rejected"]) for s in ds}
    assert not (vocab["train"] & vocab["test"]) and not (vocab["meta"] & vocab["test"]) and not (vocab["train"] & vocab["meta"])
    again = make_preference_pairs(lex["text"], lex["score"], sizes=(400, 20, 100), flip=0.3, min_gap=1.0, seed=3)
    assert again["train"]["chosen"] == ds["train"]["chosen"]
    with pytest.raises(ValueError, match="flip must be in"):
        make_preference_pairs(lex["text"], lex["score"], flip=1.0)


def test_lexicon_helpers_refuse_what_they_cannot_split_by_name(lexicon):
    """More meta rows than a class has, a label that is not a ClassLabel, or words and ratings that do not pair up:
    refused with what to change, not a numpy sampling error, a KeyError or an IndexError."""
    import datasets

    with pytest.raises(ValueError, match=r"meta_per_class=5000 must be at least 1 and at most the smallest class's"):
        D.make_lexicon_variant(lexicon, meta_per_class=5000)
    with pytest.raises(ValueError, match="needs a datasets.Dataset with a ClassLabel 'label' column .* no label column"):
        D.make_lexicon_variant(lexicon.rename_column("label", "y"))
    as_int = lexicon.cast_column("label", datasets.Value("int64"))
    with pytest.raises(ValueError, match=r"ClassLabel 'label' column \(got Value\)"):
        D.make_lexicon_variant(as_int)
    with pytest.raises(ValueError, match="got 20 words and 10 ratings"):
        D.make_preference_pairs([f"w{i}" for i in range(20)], list(range(10)))
