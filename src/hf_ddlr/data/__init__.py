"""Data: CIFAR-100 variants (clean / noisy / superclass / k-fold), embedded offline datasets, transforms.

Also a real offline text dataset: the VADER sentiment lexicon (:mod:`hf_ddlr.data.lexicon`).

See :mod:`hf_ddlr.data.variants` for the column layout of the returned splits.
"""

from hf_ddlr.data.cifar import (
    CIFAR100_COARSE_NAMES,
    CIFAR100_FINE_NAMES,
    CIFAR100_FINE_TO_COARSE,
    CIFAR100_MEAN,
    CIFAR100_REPO_ID,
    CIFAR100_STD,
    CIFAR100_SUPERCLASSES,
    cifar100_features,
    load_cifar100,
)
from hf_ddlr.data.embedded import (
    DIGIT_NAMES,
    DIGIT_SUPERCLASSES,
    EMBEDDED_DATASETS,
    embedded_features,
    load_embedded,
)
from hf_ddlr.data.lexicon import (
    SENTIMENT_NAMES,
    load_rated_words,
    load_vader_lexicon,
    make_lexicon_variant,
    make_preference_pairs,
    vader_lexicon_path,
)
from hf_ddlr.data.transforms import (
    compute_mean_std,
    image_to_tensor,
    make_transform,
    random_crop,
    random_hflip,
    with_transforms,
)
from hf_ddlr.data.variants import (
    NOISE_MODES,
    OUTPUT_COLUMNS,
    VARIANTS,
    apply_label_noise,
    kfold_splits,
    make_kfold,
    make_variant,
    resolve_superclass,
)

__all__ = [
    "CIFAR100_COARSE_NAMES",
    "CIFAR100_FINE_NAMES",
    "CIFAR100_FINE_TO_COARSE",
    "CIFAR100_MEAN",
    "CIFAR100_REPO_ID",
    "CIFAR100_STD",
    "CIFAR100_SUPERCLASSES",
    "DIGIT_NAMES",
    "DIGIT_SUPERCLASSES",
    "EMBEDDED_DATASETS",
    "NOISE_MODES",
    "OUTPUT_COLUMNS",
    "SENTIMENT_NAMES",
    "VARIANTS",
    "apply_label_noise",
    "cifar100_features",
    "compute_mean_std",
    "embedded_features",
    "image_to_tensor",
    "kfold_splits",
    "load_cifar100",
    "load_embedded",
    "load_vader_lexicon",
    "load_rated_words",
    "make_lexicon_variant",
    "make_preference_pairs",
    "make_kfold",
    "make_transform",
    "make_variant",
    "random_crop",
    "random_hflip",
    "resolve_superclass",
    "vader_lexicon_path",
    "with_transforms",
]
