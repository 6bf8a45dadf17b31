"""The meta-gradient math as pure torch (no transformers import): rate tables, lookahead, strategies."""

from .engine import STRATEGIES, MetaBatch, MetaGradients, MicroBatch, find_output_layer, meta_gradients
from .lookahead import ParamSpec, lookahead, param_specs, tangent, weight_decay_grad
from .losses import TASKS, TaskLoss, task_loss
from .passes import frozen_batchnorm, per_example_loss, replay_rng
from .rates import RateSGD, RateTable

__all__ = [
    "STRATEGIES",
    "TASKS",
    "MetaBatch",
    "MetaGradients",
    "MicroBatch",
    "ParamSpec",
    "RateSGD",
    "RateTable",
    "TaskLoss",
    "find_output_layer",
    "frozen_batchnorm",
    "lookahead",
    "meta_gradients",
    "param_specs",
    "per_example_loss",
    "replay_rng",
    "task_loss",
    "tangent",
    "weight_decay_grad",
]
