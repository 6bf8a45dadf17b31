"""A real, offline text-classification dataset: the human-rated VADER sentiment lexicon (words -> pos / neg).

The Hub is not always reachable, so text experiments that must run anywhere need a real labelled corpus
that ships in a PyPI package. ``vaderSentiment`` ships ``vader_lexicon.txt``: 7,500 English words, slang
and emoticons, each rated by ten human raters on a -4 (most negative) .. +4 (most positive) scale
(columns: token, mean rating, standard deviation, the ten ratings). Words whose mean rating is at least
``threshold`` away from neutral make a binary sentiment task (``|mean| >= 0.5``: 6,803 distinct entries,
2,990 positive), small enough for CPU fine-tuning and with a clean ground truth, so label noise can be
injected and measured exactly.

* :func:`load_vader_lexicon` — the lexicon as a ``datasets.Dataset`` (``text``, ``label``, ``score``, ``std``);
* :func:`make_lexicon_variant` — seeded ``train`` / ``meta`` / ``test`` splits with label noise on train
  only, in the same label columns as :func:`hf_ddlr.data.make_variant` (``label``, ``clean_label``,
  ``is_noisy``, ``sample_index``);
* :func:`load_rated_words` — (words, mean rating) of VADER or AFINN-165;
* :func:`make_preference_pairs` — preference pairs of rated words (the more positive one ``chosen``) on
  disjoint train / meta / test vocabularies, a share of the training pairs flipped: a reward-model task with
  known wrong pairs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import datasets
import numpy as np

from hf_ddlr.data.variants import _flat, apply_label_noise

SENTIMENT_NAMES: list[str] = ["negative", "positive"]


def vader_lexicon_path() -> Path:
    """Path of ``vader_lexicon.txt`` inside the installed ``vaderSentiment`` package."""
    try:
        root = resources.files("vaderSentiment")
    except ModuleNotFoundError as e:
        raise ImportError(
            "the VADER lexicon ships in the 'vaderSentiment' package: pip install vaderSentiment "
            "(or the hf_ddlr 'dev' extra)."
        ) from e
    return Path(str(root / "vader_lexicon.txt"))


@functools.cache
def _read_lexicon() -> tuple[tuple[str, float, float], ...]:
    """(token, mean rating, std) per distinct token, in file order; cached (the file is read once).

    14 tokens appear twice (an emoticon and a word, e.g. ``d:`` at -2.9 and 1.2); as in VADER's own
    analyzer, which reads the file into a dict, the later line wins, so no text has two labels and no
    text can land in both train and test.
    """
    rows: dict[str, tuple[str, float, float]] = {}
    for line in vader_lexicon_path().read_text(encoding="utf-8").splitlines():
        parts = line.strip("\r\n").split("\t")
        if len(parts) >= 3 and parts[0]:
            rows.pop(parts[0], None)  # the later line wins, at its own position
            rows[parts[0]] = (parts[0], float(parts[1]), float(parts[2]))
    return tuple(rows.values())


def load_vader_lexicon(threshold: float = 0.5) -> datasets.Dataset:
    """The VADER lexicon entries with ``|mean rating| >= threshold`` as a binary sentiment dataset.

    Columns: ``text`` (the word / emoticon), ``label`` (ClassLabel ``negative`` / ``positive``: the sign of
    the mean rating), ``score`` (the mean human rating, -4..4) and ``std`` (the raters' standard
    deviation: low = raters agree). ``threshold`` must be > 0 so every kept entry has a sign; larger
    values keep only clearly polarised words (an easier task).
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0 (entries rated 0 have no sentiment), got {threshold!r}.")
    kept = [r for r in _read_lexicon() if abs(r[1]) >= threshold]
    if not kept:
        raise ValueError(f"no lexicon entry has |mean rating| >= {threshold}; the ratings lie in [-4, 4].")
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=SENTIMENT_NAMES),
            "score": datasets.Value("float32"),
            "std": datasets.Value("float32"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "text": [r[0] for r in kept],
            "label": [int(r[1] > 0) for r in kept],
            "score": [r[1] for r in kept],
            "std": [r[2] for r in kept],
        },
        features=features,
        info=datasets.DatasetInfo(
            dataset_name="vader-lexicon",
            features=features,
            description=f"VADER lexicon, |mean rating| >= {threshold}",
        ),
    )


def make_lexicon_variant(
    lexicon: datasets.Dataset,
    *,
    train_size: int = 2000,
    meta_per_class: int = 10,
    test_size: int | None = 1000,
    noise_rate: float | Sequence[float] = 0.0,
    noise_mode: str = "flip",
    seed: int = 0,
) -> datasets.DatasetDict:
    """Seeded ``train`` / ``meta`` / ``test`` splits of a labelled text dataset, label noise on train only.

    ``meta`` holds ``meta_per_class`` clean rows of every class (the small trusted set MetaLR needs);
    the other rows are shuffled (seeded), the first ``train_size`` become ``train`` and the next
    ``test_size`` (``None``: all the rest) ``test``. ``noise_rate`` / ``noise_mode`` corrupt the train
    labels with :func:`hf_ddlr.data.apply_label_noise` (a float or one rate per class; "uniform",
    "flip" or "pair"). Every split keeps the input columns and gets ``clean_label`` (the true label),
    ``is_noisy`` and ``sample_index`` (row position in its split, what MetaLRTrainer indexes rates by).
    """
    feature = lexicon.features.get("label") if hasattr(lexicon, "features") else None
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"make_lexicon_variant needs a datasets.Dataset with a ClassLabel 'label' column (got "
            f"{type(feature).__name__ if feature is not None else 'no label column'}): e.g. "
            f"dataset.cast_column('label', datasets.ClassLabel(names=[...])), or load_vader_lexicon() / "
            f"load_afinn_lexicon()."
        )
    names = feature.names
    y = np.asarray(lexicon["label"], dtype=np.int64)
    counts = np.bincount(y, minlength=len(names))
    if meta_per_class < 1 or meta_per_class > counts.min():
        raise ValueError(
            f"meta_per_class={meta_per_class} must be at least 1 and at most the smallest class's {counts.min()} "
            f"rows (class counts {dict(zip(names, counts.tolist()))})."
        )
    rng = np.random.default_rng([seed, 0])
    meta_rows = np.sort(
        np.concatenate(
            [rng.choice(np.flatnonzero(y == c), meta_per_class, replace=False) for c in range(len(names))]
        )
    )
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), meta_rows))
    test_size = len(rest) - train_size if test_size is None else test_size
    if train_size <= 0 or test_size <= 0 or train_size + test_size > len(rest):
        raise ValueError(
            f"train_size={train_size} + test_size={test_size} must be positive and fit in the {len(rest)} rows "
            "left after the meta split."
        )
    train_rows, test_rows = rest[:train_size], rest[train_size : train_size + test_size]
    noisy = apply_label_noise(y[train_rows], noise_rate, len(names), mode=noise_mode, seed=seed)

    def split(rows: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
        ds = _flat(lexicon.select(rows.tolist())).remove_columns("label")
        ds = ds.add_column("label", labels.tolist(), feature=lexicon.features["label"])
        ds = ds.add_column("clean_label", y[rows].tolist(), feature=lexicon.features["label"])
        ds = ds.add_column("is_noisy", (labels != y[rows]).tolist())
        return ds.add_column("sample_index", np.arange(len(rows)).tolist())

    return datasets.DatasetDict(
        train=split(train_rows, noisy),
        meta=split(meta_rows, y[meta_rows]),
        test=split(test_rows, y[test_rows]),
    )


__all__ = ["SENTIMENT_NAMES", "load_vader_lexicon", "make_lexicon_variant", "vader_lexicon_path"]


def load_rated_words(name: str = "vader") -> tuple[list[str], list[float]]:
    """(words, mean human rating) of a rated lexicon: ``"vader"`` (the entries of :func:`load_vader_lexicon`, rated
    -4..4 and at least 0.5 from neutral) or ``"afinn"`` (AFINN-165 from the ``afinn`` package: 3,380 English
    words rated -5..5 by Finn Arup Nielsen, the two rated 0 dropped)."""
    if name == "vader":
        lex = load_vader_lexicon(0.5)
        return list(lex["text"]), [float(v) for v in lex["score"]]
    if name != "afinn":
        raise ValueError(f"unknown lexicon {name!r}: 'vader' or 'afinn'.")
    try:
        path = resources.files("afinn") / "data" / "AFINN-en-165.txt"
    except ModuleNotFoundError as e:
        raise ImportError("the AFINN lexicon ships in the 'afinn' package: pip install afinn.") from e
    rows = [line.rsplit("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [(w, float(v)) for w, v in rows if int(v) != 0]
    return [w for w, _ in rows], [v for _, v in rows]


def make_preference_pairs(
    words: Sequence[str],
    ratings: Sequence[float],
    *,
    sizes: tuple[int, int, int] = (2000, 40, 1000),
    flip: float = 0.3,
    min_gap: float = 1.0,
    seed: int = 0,
) -> datasets.DatasetDict:
    """``train`` / ``meta`` / ``test`` preference pairs of rated words: of two words whose ratings differ by at
    least ``min_gap``, the higher-rated one is ``chosen``. The words are split 60 / 10 / 30 % (seeded) into three
    disjoint vocabularies and each split's pairs drawn within its own (``sizes`` pairs each), so the test pairs
    are words the model never scored; the order of a share ``flip`` of the training pairs is swapped
    (``is_flipped``; never in meta / test). Columns: ``chosen``, ``rejected``, ``is_flipped``."""
    if not 0.0 <= flip < 1.0:
        raise ValueError(f"flip must be in [0, 1), got {flip!r}.")
    if len(words) != len(ratings):
        raise ValueError(f"words and ratings must pair up: got {len(words)} words and {len(ratings)} ratings.")
    words, ratings = np.asarray(words, dtype=object), np.asarray(ratings, dtype=np.float64)
    rng = np.random.default_rng([seed, 11])
    order = rng.permutation(len(words))
    vocab = np.split(order, [int(0.6 * len(words)), int(0.7 * len(words))])
    pairs = {}
    for name, ids, n in zip(("train", "meta", "test"), vocab, sizes):
        if len(ids) < 2 or np.ptp(ratings[ids]) < min_gap:
            raise ValueError(f"the {name} vocabulary ({len(ids)} words) has no two words rated {min_gap} apart.")
        rows: list[tuple[str, str]] = []
        while len(rows) < n:
            a, b = rng.choice(ids, 2, replace=False)
            if abs(ratings[a] - ratings[b]) >= min_gap:
                rows.append((str(words[a]), str(words[b])) if ratings[a] > ratings[b] else (str(words[b]), str(words[a])))
        pairs[name] = rows
    flips = {"train": rng.random(sizes[0]) < flip, "meta": np.zeros(sizes[1], bool), "test": np.zeros(sizes[2], bool)}
    out = {}
    for name, rows in pairs.items():
        rows = [(r, c) if f else (c, r) for (c, r), f in zip(rows, flips[name])]
        out[name] = datasets.Dataset.from_dict({"chosen": [c for c, _ in rows], "rejected": [r for _, r in rows],
                                                "is_flipped": flips[name].tolist()})
    return datasets.DatasetDict(out)
