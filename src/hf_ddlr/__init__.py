"""hf_ddlr: data dependent dynamic learning rates for the Hugging Face Trainer.

Learn a learning-rate multiplier per training example and/or per class, and the weight decay, by a
one-step-lookahead meta-gradient on a small clean held-out set (Saxena, Vyas & DeCoste).

``MetaSFTTrainer`` / ``MetaSFTConfig`` (TRL's ``SFTTrainer`` with the rates, :mod:`hf_ddlr.trl`) and
``MetaRewardTrainer`` / ``MetaRewardConfig`` (TRL's ``RewardTrainer`` with a rate per preference pair,
:mod:`hf_ddlr.reward`) and ``MetaDPOTrainer`` / ``MetaDPOConfig`` (TRL's ``DPOTrainer`` with a rate per preference
pair, :mod:`hf_ddlr.dpo`) are loaded on first use, so that hf_ddlr does not require TRL.
"""

from typing import TYPE_CHECKING, Any

from .config import MetaLRConfig, MetaLROptions
from .trainer import MetaLRTrainer
from .trajectory import LRTrajectory

if TYPE_CHECKING:  # what type checkers see of the names __getattr__ loads on first use (re-exported: `X as X`)
    from .dpo import MetaDPOConfig as MetaDPOConfig
    from .dpo import MetaDPOTrainer as MetaDPOTrainer
    from .reward import MetaRewardConfig as MetaRewardConfig
    from .reward import MetaRewardTrainer as MetaRewardTrainer
    from .trl import MetaSFTConfig as MetaSFTConfig
    from .trl import MetaSFTTrainer as MetaSFTTrainer

__version__ = "0.1.0"

# The TRL trainers and configs are not listed: `from hf_ddlr import *` must work without TRL.
__all__ = ["LRTrajectory", "MetaLRConfig", "MetaLROptions", "MetaLRTrainer", "__version__"]

_TRL_NAMES = ("MetaSFTConfig", "MetaSFTTrainer")
_REWARD_NAMES = ("MetaRewardConfig", "MetaRewardTrainer")
_DPO_NAMES = ("MetaDPOConfig", "MetaDPOTrainer")


def __getattr__(name: str) -> Any:
    """The TRL integration's names, imported when first asked for (ImportError naming ``pip install trl``
    without TRL)."""
    if name in _TRL_NAMES:
        from . import trl

        return getattr(trl, name)
    if name in _REWARD_NAMES:
        from . import reward

        return getattr(reward, name)
    if name in _DPO_NAMES:
        from . import dpo

        return getattr(dpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
