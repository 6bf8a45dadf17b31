"""Learned learning-rate trajectories: record, save/load, average, replay, plot, summarise.

An :class:`LRTrajectory` is what a meta-learning run learned over time (DESIGN.md §3):

* per optimizer step: the model's learning rate, the learned weight decay and the meta loss;
* per-class rate multipliers ``[C]`` at every logging step;
* per-instance rate multipliers ``[N]`` at step 0 (the initial values) and at every epoch end;
* metadata: the dataset signature (id, revision, split, fingerprint, size), label names, a noise
  mask when the dataset is a noisy variant, the meta settings and the model name.

It is stored as two files, ``lr_trajectory.safetensors`` (all tensors) and ``lr_trajectory.json``
(schema version + metadata), loaded from a local folder or the Hub with
:meth:`LRTrajectory.from_pretrained`, and replayed with :meth:`instance_rates_at`,
:meth:`class_rates_at` and :meth:`weight_decay_at` (a training run replays it with a
:class:`TrajectoryReplayer`).

Step convention: ``step`` is the Trainer's ``state.global_step`` *after* the optimizer step whose
values are recorded (so the first optimizer step is step 1), and ``epoch`` is ``state.epoch`` at that
moment. Initial rates are recorded at step 0 / epoch 0.0.

Modules, lowest first (none imports :mod:`hf_ddlr.hub` or the trainer; ``tests/test_import_graph.py``
checks that): ``io`` (file names, format version, reading/writing the files), ``signature`` (the dataset
a trajectory belongs to), ``lookup`` (values at any step/epoch, cached), ``kfold`` (averaging folds),
``report`` (summary, plots), ``card`` (model card, Hub folder), ``record`` (:class:`LRTrajectory`, whose
methods call the modules above), ``replay`` (:class:`TrajectoryReplayer`, used by the trainer).
"""

from .io import FORMAT_NAME, SCHEMA_VERSION, TRAJECTORY_CONFIG_NAME, TRAJECTORY_FILES, TRAJECTORY_TENSORS_NAME
from .record import LRTrajectory
from .replay import TrajectoryReplayer
from .report import NEAR_ZERO, PLOT_FILE_TEMPLATE, PLOT_KINDS
from .signature import dataset_signature

__all__ = [
    "FORMAT_NAME",
    "NEAR_ZERO",
    "PLOT_FILE_TEMPLATE",
    "PLOT_KINDS",
    "SCHEMA_VERSION",
    "TRAJECTORY_CONFIG_NAME",
    "TRAJECTORY_FILES",
    "TRAJECTORY_TENSORS_NAME",
    "LRTrajectory",
    "TrajectoryReplayer",
    "dataset_signature",
]
