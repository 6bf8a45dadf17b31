"""hf_ddlr: data dependent dynamic learning rates for the Hugging Face Trainer.

Learn a learning-rate multiplier per training example and/or per class, and the weight decay, by a
one-step-lookahead meta-gradient on a small clean held-out set (Saxena, Vyas & DeCoste).
"""

from .config import MetaLRConfig, MetaLROptions
from .trainer import MetaLRTrainer
from .trajectory import LRTrajectory

__version__ = "0.1.0"

__all__ = ["LRTrajectory", "MetaLRConfig", "MetaLROptions", "MetaLRTrainer", "__version__"]
