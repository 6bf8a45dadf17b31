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
:meth:`class_rates_at` and :meth:`weight_decay_at`.

Step convention: ``step`` is the Trainer's ``state.global_step`` *after* the optimizer step whose
values are recorded (so the first optimizer step is step 1), and ``epoch`` is ``state.epoch`` at that
moment. Initial rates are recorded at step 0 / epoch 0.0.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # matplotlib is imported lazily: recording must not pay for it
    from matplotlib.figure import Figure

TRAJECTORY_TENSORS_NAME = "lr_trajectory.safetensors"
TRAJECTORY_CONFIG_NAME = "lr_trajectory.json"
TRAJECTORY_FILES = (TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME)
SCHEMA_VERSION = 1
FORMAT_NAME = "hf_ddlr.lr_trajectory"
NEAR_ZERO = 0.05
PLOT_KINDS = ("class", "instance", "weight_decay", "meta_loss")
PLOT_FILE_TEMPLATE = "lr_trajectory_{kind}.png"

# dtypes on disk: steps are exact integers; per-step scalars keep full precision; rate tables are float32
_STEP_FIELDS = ("steps", "epochs", "learning_rate", "weight_decay", "meta_loss")
_CLASS_FIELDS = ("class_rates", "class_steps", "class_epochs")
_INSTANCE_FIELDS = ("instance_rates", "instance_steps", "instance_epochs")


def dataset_signature(
    dataset: Any, split: str | None = None, *, revision: str | None = None, dataset_id: str | None = None
) -> dict[str, Any]:
    """Describe ``dataset`` well enough to refuse replaying a trajectory on different data.

    Works for a ``datasets.Dataset`` (id from ``info.dataset_name``/``builder_name``, revision from
    ``info.version``, split from ``dataset.split``, fingerprint from ``dataset._fingerprint``) and for
    any sized torch dataset (fingerprint ``None``: only the size can be checked then).
    """
    if dataset is None or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"dataset_signature needs a sized dataset (datasets.Dataset or a torch Dataset with __len__), "
            f"got {type(dataset).__name__}"
        )
    info = getattr(dataset, "info", None)
    fingerprint = getattr(dataset, "_fingerprint", None)
    if info is not None and fingerprint is not None:  # a datasets.Dataset
        version = getattr(info, "version", None)
        if split is None and getattr(dataset, "split", None) is not None:
            split = str(dataset.split)
        return {
            "id": dataset_id or getattr(info, "dataset_name", None) or getattr(info, "builder_name", None),
            "config": getattr(info, "config_name", None),
            "revision": revision if revision is not None else (str(version) if version is not None else None),
            "split": split,
            "fingerprint": str(fingerprint),
            "num_examples": len(dataset),
        }
    return {
        "id": dataset_id or type(dataset).__name__,
        "config": None,
        "revision": revision,
        "split": split,
        "fingerprint": None,
        "num_examples": len(dataset),
    }


def _label_names_of(dataset: Any, label_column: str | None) -> list[str] | None:
    """Class names from a ``ClassLabel`` feature (``label_column`` or the usual label column names)."""
    features = getattr(dataset, "features", None)
    if not features:
        return None
    candidates = [label_column] if label_column else ["label", "labels", "fine_label"]
    for name in candidates:
        feature = features.get(name)
        if feature is not None and getattr(feature, "names", None):
            return list(feature.names)
    return None


def _to_cpu_1d(rates: torch.Tensor | Sequence[float], what: str) -> torch.Tensor:
    t = torch.as_tensor(rates).detach()
    if t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D tensor, got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.float32).clone()


def _nan_equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Tensor equality where NaN == NaN (meta_loss uses NaN for 'no meta step')."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return bool(torch.equal(a, b))


def _interp_rows(xs: torch.Tensor, table: torch.Tensor, x: float, mode: str, what: str) -> torch.Tensor:
    """Row of ``table`` at coordinate ``x`` over sorted snapshot coordinates ``xs``.

    ``mode="linear"`` interpolates between the snapshots around ``x``; ``"previous"`` takes the last
    snapshot at or before ``x``; ``"next"`` the first at or after. Outside the recorded range the
    first/last snapshot is used. At a snapshot coordinate every mode returns that snapshot exactly.
    """
    if table.shape[0] == 0:
        raise ValueError(f"the trajectory has no {what} snapshots: it was recorded at another rate level")
    if mode not in ("linear", "previous", "next"):
        raise ValueError(f"mode must be 'linear', 'previous' or 'next', got {mode!r}")
    xs_np = xs.numpy()
    if x <= xs_np[0]:
        return table[0].clone()
    if x >= xs_np[-1]:
        return table[-1].clone()
    hi = int(np.searchsorted(xs_np, x, side="left"))  # xs[hi-1] < x <= xs[hi]
    lo = hi - 1
    if xs_np[hi] == x or mode == "next":
        return table[hi].clone()
    if mode == "previous":
        return table[lo].clone()
    frac = (x - float(xs_np[lo])) / (float(xs_np[hi]) - float(xs_np[lo]))
    return torch.lerp(table[lo], table[hi], float(frac))


class LRTrajectory:
    """What a data-dependent learning-rate run learned, over time.

    Create one empty (the trainer fills it with the ``record_*`` methods), with
    :meth:`for_dataset` (fills the dataset metadata), or load one with :meth:`from_pretrained`.
    Recording keeps Python lists of scalars and CPU copies of the rate tensors, so it costs one
    device-to-host copy per call and nothing else.
    """

    schema_version: int = SCHEMA_VERSION

    def __init__(
        self,
        *,
        dataset: dict[str, Any] | None = None,
        label_names: Sequence[str] | None = None,
        noise_mask: torch.Tensor | Sequence[bool] | None = None,
        config: dict[str, Any] | None = None,
        model_name: str | None = None,
    ) -> None:
        self.dataset: dict[str, Any] = dict(dataset or {})
        self.label_names: list[str] | None = list(label_names) if label_names is not None else None
        self.noise_mask: torch.Tensor | None = (
            torch.as_tensor(noise_mask).to(torch.bool).cpu().clone() if noise_mask is not None else None
        )
        self.config: dict[str, Any] = dict(config or {})
        self.model_name: str | None = model_name
        # how many averaged runs contributed to each instance rate (only set by `average`)
        self.instance_coverage: torch.Tensor | None = None
        self._steps: list[int] = []
        self._epochs: list[float] = []
        self._lr: list[float] = []
        self._wd: list[float] = []
        self._meta_loss: list[float] = []
        self._class: list[tuple[int, float, torch.Tensor]] = []
        self._instance: list[tuple[int, float, torch.Tensor]] = []
        # stacked tensors for the replay queries (every optimizer step); cleared whenever a record changes
        self._cache: dict[str, torch.Tensor] = {}

    def _cached(self, key: str, build: Any) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @classmethod
    def for_dataset(
        cls,
        dataset: Any,
        *,
        split: str | None = None,
        label_column: str | None = None,
        noise_column: str | None = "is_noisy",
        config: dict[str, Any] | None = None,
        model_name: str | None = None,
    ) -> LRTrajectory:
        """An empty trajectory whose metadata describes ``dataset`` (the *train* set, as the trainer sees it).

        Label names come from a ``ClassLabel`` feature, the noise mask from ``noise_column`` when the
        dataset has it (the noisy CIFAR variants keep an ``is_noisy`` column). Format transforms set
        with ``set_transform`` are bypassed when reading that column.
        """
        noise_mask = None
        columns = getattr(dataset, "column_names", None) or []
        if noise_column and noise_column in columns:
            raw = dataset.with_format(None)[noise_column]
            noise_mask = torch.tensor([bool(v) for v in raw], dtype=torch.bool)
        return cls(
            dataset=dataset_signature(dataset, split),
            label_names=_label_names_of(dataset, label_column),
            noise_mask=noise_mask,
            config=config,
            model_name=model_name,
        )

    # ------------------------------------------------------------------ recording
    def record_step(
        self, step: int, epoch: float, learning_rate: float, weight_decay: float, meta_loss: float | None
    ) -> None:
        """Record one optimizer step's model LR, learned weight decay and meta loss (None/NaN: no meta step).

        Recording the step that was recorded last again replaces it (idempotent); an earlier step
        raises, because a trajectory must be monotonic (use :meth:`truncate` when resuming).
        """
        step = int(step)
        self._cache.clear()
        if self._steps and step <= self._steps[-1]:
            if step < self._steps[-1]:
                raise ValueError(
                    f"record_step got step {step} after step {self._steps[-1]}; steps must increase. "
                    f"When resuming from a checkpoint, call trajectory.truncate({step - 1}) first."
                )
            for lst in (self._steps, self._epochs, self._lr, self._wd, self._meta_loss):
                lst.pop()
        self._steps.append(step)
        self._epochs.append(float(epoch))
        self._lr.append(float(learning_rate))
        self._wd.append(float(weight_decay))
        self._meta_loss.append(float("nan") if meta_loss is None else float(meta_loss))

    def _record_rates(
        self, store: list, step: int, epoch: float, rates: torch.Tensor, what: str, size: int | None
    ) -> None:
        row = _to_cpu_1d(rates, what)
        self._cache.clear()
        if store and row.shape != store[-1][2].shape:
            raise ValueError(f"{what} changed size from {store[-1][2].numel()} to {row.numel()} within one run")
        if size is not None and row.numel() != size:
            raise ValueError(f"{what} has {row.numel()} entries but the trajectory's dataset/labels have {size}")
        step = int(step)
        if store and step <= store[-1][0]:
            if step < store[-1][0]:
                raise ValueError(
                    f"{what} recorded at step {step} after step {store[-1][0]}; steps must increase. "
                    f"When resuming from a checkpoint, call trajectory.truncate({step - 1}) first."
                )
            store.pop()
        store.append((step, float(epoch), row))

    def record_class_rates(self, step: int, epoch: float, rates: torch.Tensor) -> None:
        """Record the per-class rates ``[C]`` (every logging step, plus step 0 for the initial values)."""
        size = len(self.label_names) if self.label_names else None
        self._record_rates(self._class, step, epoch, rates, "class rates", size)

    def record_instance_rates(self, step: int, epoch: float, rates: torch.Tensor) -> None:
        """Record the per-instance rates ``[N]`` (at step 0 = initial values, then at every epoch end)."""
        size = self.dataset.get("num_examples") if self.dataset else None
        self._record_rates(self._instance, step, epoch, rates, "instance rates", size)

    def truncate(self, max_step: int, *, drop_partial_epoch: bool = False) -> None:
        """Drop everything recorded after ``max_step`` (resume from a checkpoint taken at ``max_step``).

        ``drop_partial_epoch=True`` also drops an instance snapshot taken at ``max_step`` in the middle of
        an epoch (a run stopped by ``max_steps`` records its table at ``on_epoch_end``): the resumed run
        finishes that epoch and records the real epoch end, as an uninterrupted run would.
        """
        self._cache.clear()
        keep = [i for i, s in enumerate(self._steps) if s <= max_step]
        for name in ("_steps", "_epochs", "_lr", "_wd", "_meta_loss"):
            lst = getattr(self, name)
            setattr(self, name, [lst[i] for i in keep])
        self._class = [r for r in self._class if r[0] <= max_step]
        self._instance = [
            r for r in self._instance
            if r[0] < max_step or (r[0] == max_step and not (drop_partial_epoch and abs(r[1] - round(r[1])) > 1e-6))
        ]

    # ------------------------------------------------------------------ tensor views
    @property
    def steps(self) -> torch.Tensor:
        return torch.tensor(self._steps, dtype=torch.int64)

    @property
    def epochs(self) -> torch.Tensor:
        return torch.tensor(self._epochs, dtype=torch.float64)

    @property
    def learning_rate(self) -> torch.Tensor:
        return torch.tensor(self._lr, dtype=torch.float64)

    @property
    def weight_decay(self) -> torch.Tensor:
        return torch.tensor(self._wd, dtype=torch.float64)

    @property
    def meta_loss(self) -> torch.Tensor:
        return torch.tensor(self._meta_loss, dtype=torch.float64)

    @property
    def class_rates(self) -> torch.Tensor:
        """``[S_c, C]`` per-class rates, one row per recorded logging step (``[0, 0]`` when not recorded)."""
        return torch.stack([r[2] for r in self._class]) if self._class else torch.zeros(0, 0)

    @property
    def class_steps(self) -> torch.Tensor:
        return torch.tensor([r[0] for r in self._class], dtype=torch.int64)

    @property
    def class_epochs(self) -> torch.Tensor:
        return torch.tensor([r[1] for r in self._class], dtype=torch.float64)

    @property
    def instance_rates(self) -> torch.Tensor:
        """``[E, N]`` per-instance rates, one row per snapshot (step 0, then each epoch end)."""
        return torch.stack([r[2] for r in self._instance]) if self._instance else torch.zeros(0, 0)

    @property
    def instance_steps(self) -> torch.Tensor:
        return torch.tensor([r[0] for r in self._instance], dtype=torch.int64)

    @property
    def instance_epochs(self) -> torch.Tensor:
        return torch.tensor([r[1] for r in self._instance], dtype=torch.float64)

    @property
    def has_class_rates(self) -> bool:
        return bool(self._class)

    @property
    def has_instance_rates(self) -> bool:
        return bool(self._instance)

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that is stored in ``lr_trajectory.safetensors`` (absent parts are left out)."""
        out: dict[str, torch.Tensor] = {}
        if self._steps:
            out.update(
                steps=self.steps,
                epochs=self.epochs,
                learning_rate=self.learning_rate,
                weight_decay=self.weight_decay,
                meta_loss=self.meta_loss,
            )
        if self._class:
            out.update(class_rates=self.class_rates, class_steps=self.class_steps, class_epochs=self.class_epochs)
        if self._instance:
            out.update(
                instance_rates=self.instance_rates,
                instance_steps=self.instance_steps,
                instance_epochs=self.instance_epochs,
            )
        if self.noise_mask is not None:
            out["noise_mask"] = self.noise_mask
        if self.instance_coverage is not None:
            out["instance_coverage"] = self.instance_coverage
        return out

    def metadata(self) -> dict[str, Any]:
        """The JSON side of the trajectory (schema version, dataset, labels, meta config, tensor shapes)."""
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "model_name": self.model_name,
            "dataset": self.dataset,
            "label_names": self.label_names,
            "config": self.config,
            "tensors": {k: list(v.shape) for k, v in self.tensors().items()},
        }

    # ------------------------------------------------------------------ equality
    def equals(self, other: object) -> bool:
        """True when every tensor (NaN == NaN) and every metadata field are equal."""
        if not isinstance(other, LRTrajectory):
            return False
        if self.metadata() != other.metadata():
            return False
        mine, theirs = self.tensors(), other.tensors()
        return mine.keys() == theirs.keys() and all(_nan_equal(mine[k], theirs[k]) for k in mine)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LRTrajectory):
            return NotImplemented
        return self.equals(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return (
            f"LRTrajectory(steps={self.num_steps}, class_snapshots={len(self._class)}, "
            f"instance_snapshots={len(self._instance)}, dataset={self.dataset.get('id')!r}, "
            f"num_examples={self.dataset.get('num_examples')})"
        )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write ``lr_trajectory.safetensors`` and ``lr_trajectory.json`` into ``save_directory``; return their paths."""
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors_path = directory / TRAJECTORY_TENSORS_NAME
        config_path = directory / TRAJECTORY_CONFIG_NAME
        tensors = {k: v.contiguous() for k, v in self.tensors().items()}
        save_file(tensors, str(tensors_path), metadata={"format": FORMAT_NAME, "schema_version": str(SCHEMA_VERSION)})
        config_path.write_text(json.dumps(self.metadata(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [str(tensors_path), str(config_path)]

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        revision: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        subfolder: str | None = None,
    ) -> LRTrajectory:
        """Load a trajectory from a local folder or a Hub model repo (both files, via ``hf_hub_download``).

        Downloads honour ``HF_ENDPOINT``, ``HF_HOME`` and offline mode like every ``huggingface_hub`` call.
        """
        local = Path(repo_id_or_path)
        if subfolder:
            local = local / subfolder
        if local.is_dir():
            missing = [n for n in TRAJECTORY_FILES if not (local / n).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{local} is missing {', '.join(missing)}: it is not a saved LRTrajectory. "
                    f"Save one with trajectory.save_pretrained({str(local)!r})."
                )
            return cls._load_files(local / TRAJECTORY_TENSORS_NAME, local / TRAJECTORY_CONFIG_NAME)
        if os.path.exists(local):
            raise ValueError(
                f"{local} is a file; pass the folder that holds {TRAJECTORY_TENSORS_NAME} and {TRAJECTORY_CONFIG_NAME}"
            )
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(str(repo_id_or_path))
        except HFValidationError as err:
            raise FileNotFoundError(
                f"{str(repo_id_or_path)!r} is neither an existing local folder nor a Hub repo id ({err}). "
                f"Check the path, or pass a repo id such as 'user/repo'."
            ) from err
        paths = []
        for name in TRAJECTORY_FILES:
            try:
                paths.append(
                    hf_hub_download(
                        str(repo_id_or_path),
                        name,
                        subfolder=subfolder,
                        revision=revision,
                        cache_dir=cache_dir,
                        token=token,
                    )
                )
            except LocalEntryNotFoundError as err:
                raise FileNotFoundError(
                    f"{str(repo_id_or_path)!r} is not a local folder, and {name} of the Hub repo of that name is not "
                    f"in the local cache while the Hub cannot be reached (offline mode, HF_HUB_OFFLINE=1, or no "
                    f"network). Check the path, or download the trajectory once online."
                ) from err
            except EntryNotFoundError as err:
                raise FileNotFoundError(
                    f"Hub repo {repo_id_or_path!r} (revision {revision or 'main'}) has no {name}: it holds no "
                    f"learned LR trajectory. Push one with trajectory.push_to_hub({str(repo_id_or_path)!r})."
                ) from err
        return cls._load_files(Path(paths[0]), Path(paths[1]))

    @classmethod
    def _load_files(cls, tensors_path: Path, config_path: Path) -> LRTrajectory:
        from safetensors.torch import load_file

        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON ({err}); the trajectory file is corrupt") from err
        version = meta.get("schema_version")
        if not isinstance(version, int):
            raise ValueError(f"{config_path} has no integer schema_version; it is not an hf_ddlr trajectory")
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{config_path} uses trajectory schema version {version}, but this hf_ddlr reads up to "
                f"version {SCHEMA_VERSION}. Upgrade hf_ddlr (pip install -U hf_ddlr) to load it."
            )
        try:
            t = load_file(str(tensors_path))
        except Exception as err:  # safetensors raises its own SafetensorError for a truncated/corrupt file
            raise ValueError(
                f"{tensors_path} is corrupt or truncated ({err}); re-save the trajectory or download it again."
            ) from err
        declared = set(meta.get("tensors", {}))
        if declared != set(t):
            raise ValueError(
                f"{tensors_path} holds tensors {sorted(t)} but {config_path} declares {sorted(declared)}; "
                f"the two files come from different saves. Re-save or re-download both."
            )
        traj = cls(
            dataset=meta.get("dataset"),
            label_names=meta.get("label_names"),
            noise_mask=t.get("noise_mask"),
            config=meta.get("config"),
            model_name=meta.get("model_name"),
        )
        traj.instance_coverage = t.get("instance_coverage")
        if "steps" in t:
            traj._steps = t["steps"].tolist()
            traj._epochs = t["epochs"].tolist()
            traj._lr = t["learning_rate"].tolist()
            traj._wd = t["weight_decay"].tolist()
            traj._meta_loss = t["meta_loss"].tolist()
        if "class_rates" in t:
            traj._class = list(zip(t["class_steps"].tolist(), t["class_epochs"].tolist(), t["class_rates"].unbind(0)))
        if "instance_rates" in t:
            traj._instance = list(
                zip(t["instance_steps"].tolist(), t["instance_epochs"].tolist(), t["instance_rates"].unbind(0))
            )
        return traj

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str = "Upload learned LR trajectory",
        revision: str | None = None,
        local_dir: str | os.PathLike | None = None,
    ) -> Any:
        """Upload the trajectory files, PNG plots and a README card to the Hub model repo ``repo_id``.

        Everything is first written to ``local_dir`` (a temporary folder when None). When the upload
        fails that folder is kept and the raised :class:`hf_ddlr.hub.HubUploadError` says how to retry.
        Returns the ``CommitInfo`` of the upload.
        """
        from . import hub

        return hub.push_trajectory(
            self,
            repo_id,
            token=token,
            private=private,
            commit_message=commit_message,
            revision=revision,
            local_dir=local_dir,
        )

    # ------------------------------------------------------------------ averaging (k-fold protocol)
    @classmethod
    def average(
        cls,
        trajectories: Sequence[LRTrajectory],
        *,
        instance_indices: Sequence[torch.Tensor | Sequence[int]] | None = None,
        dataset: dict[str, Any] | None = None,
        epoch_atol: float = 0.01,
    ) -> LRTrajectory:
        """Average the trajectories of the k folds (paper §3.1) into one trajectory to replay.

        Instance rates: each fold only learns rates for the examples in its train part. Either every
        fold's instance table is indexed by the *full* train position, with NaN for examples the fold
        did not train on, or ``instance_indices[k]`` gives the full-train position of each row of fold
        k's table (then ``dataset`` — the full train set's signature — is required for the size). The
        result is, per example, the mean over the folds that trained on it; ``instance_coverage``
        records that count. Examples no fold trained on get the neutral rate 1.0 (with a warning).

        Alignment: the i-th records of every fold are averaged together. Step numbers (and logging
        steps of class snapshots) must be equal and epochs equal within ``epoch_atol`` (fold train sets
        may differ by an example); otherwise a ValueError names the first mismatch. Runs of different
        length are truncated to the shortest with a warning. Steps and epochs of the result are those
        of the first trajectory; per-step LR, weight decay and meta loss (NaN-aware) are averaged.
        """
        trajs = list(trajectories)
        if not trajs:
            raise ValueError("LRTrajectory.average needs at least one trajectory")
        if instance_indices is not None and len(instance_indices) != len(trajs):
            raise ValueError(
                f"got {len(instance_indices)} instance_indices for {len(trajs)} trajectories; pass one per fold"
            )
        if instance_indices is not None and dataset is None:
            raise ValueError(
                "average(..., instance_indices=...) needs dataset=<full train set signature> "
                "(e.g. dataset_signature(full_train)): the folds' own signatures describe their subsets"
            )
        first = trajs[0]
        out = cls(
            dataset=dataset if dataset is not None else first.dataset,
            label_names=first.label_names,
            config={**first.config, "averaged_over_runs": len(trajs)},
            model_name=first.model_name,
        )
        for i, t in enumerate(trajs[1:], start=1):
            if t.label_names != first.label_names:
                raise ValueError(f"trajectory {i} has label names {t.label_names}, trajectory 0 has {first.label_names}")

        # per-step records
        n = min(t.num_steps for t in trajs)
        if any(t.num_steps != n for t in trajs):
            warnings.warn(
                f"averaging runs of {[t.num_steps for t in trajs]} steps: truncated to the shortest ({n})",
                stacklevel=2,
            )
        if n:
            steps = [t.steps[:n] for t in trajs]
            cls._check_aligned("step", [s.to(torch.float64) for s in steps], 0.0)
            cls._check_aligned("epoch (per step)", [t.epochs[:n] for t in trajs], epoch_atol)
            out._steps = steps[0].tolist()
            out._epochs = trajs[0].epochs[:n].tolist()
            out._lr = torch.stack([t.learning_rate[:n] for t in trajs]).mean(0).tolist()
            out._wd = torch.stack([t.weight_decay[:n] for t in trajs]).mean(0).tolist()
            out._meta_loss = torch.stack([t.meta_loss[:n] for t in trajs]).nanmean(0).tolist()

        # class snapshots
        if any(t.has_class_rates for t in trajs):
            if not all(t.has_class_rates for t in trajs):
                raise ValueError("some trajectories have class rates and some do not; average runs of one rate level")
            m = cls._common_length([len(t._class) for t in trajs], "class snapshots")
            cls._check_aligned("class snapshot step", [t.class_steps[:m].to(torch.float64) for t in trajs], 0.0)
            cls._check_aligned("class snapshot epoch", [t.class_epochs[:m] for t in trajs], epoch_atol)
            mean = torch.stack([t.class_rates[:m] for t in trajs]).mean(0)
            out._class = list(zip(first.class_steps[:m].tolist(), first.class_epochs[:m].tolist(), mean.unbind(0)))

        # instance snapshots
        if any(t.has_instance_rates for t in trajs):
            if not all(t.has_instance_rates for t in trajs):
                raise ValueError(
                    "some trajectories have instance rates and some do not; average runs of one rate level"
                )
            e = cls._common_length([len(t._instance) for t in trajs], "instance snapshots")
            cls._check_aligned("instance snapshot epoch", [t.instance_epochs[:e] for t in trajs], epoch_atol)
            tables, noise = cls._full_tables(trajs, e, instance_indices, out.dataset)
            # running sums over the folds ([E, N] each, NaN where a fold did not train): memory of two tables,
            # not of all K folds stacked
            summed = count = None
            for table in tables:
                valid = ~torch.isnan(table)
                if summed is None:
                    summed, count = torch.zeros_like(table), torch.zeros(table.shape, dtype=torch.int32)
                summed += torch.where(valid, table, torch.zeros((), dtype=table.dtype))
                count += valid
            coverage = count[0].clone()  # coverage does not change over epochs
            mean = summed / count.clamp(min=1)
            del summed, count
            uncovered = int((coverage == 0).sum())
            if uncovered:
                warnings.warn(
                    f"{uncovered} examples were trained on by no fold; their averaged rate is the neutral 1.0",
                    stacklevel=2,
                )
                mean[:, coverage == 0] = 1.0
            out._instance = list(
                zip(first.instance_steps[:e].tolist(), first.instance_epochs[:e].tolist(), mean.float().unbind(0))
            )
            out.instance_coverage = coverage
            out.noise_mask = noise
        elif all(t.noise_mask is not None for t in trajs) and instance_indices is None:
            out.noise_mask = first.noise_mask.clone()
        if out.dataset.get("num_examples") is None and out._instance:
            out.dataset["num_examples"] = out._instance[0][2].numel()
        return out

    @staticmethod
    def _common_length(lengths: list[int], what: str) -> int:
        m = min(lengths)
        if any(x != m for x in lengths):
            warnings.warn(f"averaging runs with {lengths} {what}: truncated to the shortest ({m})", stacklevel=3)
        return m

    @staticmethod
    def _check_aligned(what: str, columns: list[torch.Tensor], atol: float) -> None:
        ref = columns[0]
        for i, col in enumerate(columns[1:], start=1):
            bad = (col - ref).abs() > atol
            if bool(bad.any()):
                j = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"cannot average: record {j} is at {what} {ref[j].item():g} in trajectory 0 but "
                    f"{col[j].item():g} in trajectory {i}. Fold runs must use the same schedule "
                    f"(batch size, logging steps, epochs) to be averaged."
                )

    @staticmethod
    def _full_tables(
        trajs: list[LRTrajectory],
        e: int,
        instance_indices: Sequence[torch.Tensor | Sequence[int]] | None,
        dataset: dict[str, Any],
    ) -> tuple[Iterator[torch.Tensor], torch.Tensor | None]:
        """Every fold's ``[E, N_full]`` instance table (NaN where it did not train), built one at a time so
        that averaging holds two tables, not K, and the full noise mask."""
        if instance_indices is None:
            prints = [t.dataset.get("fingerprint") for t in trajs]
            for k, fp in enumerate(prints[1:], start=1):
                if prints[0] and fp and fp != prints[0]:
                    raise ValueError(
                        f"trajectory {k} was learned on another train set than trajectory 0 (fingerprint {fp!r} vs "
                        f"{prints[0]!r}), so row i of their instance tables is not the same example. Pass "
                        f"instance_indices=[each fold's full-train positions, ...] and dataset=<full train "
                        f"signature> (as examples/kfold_replay.py does), or average runs on the same train set."
                    )
            sizes = {t._instance[0][2].numel() for t in trajs}
            if len(sizes) != 1:
                raise ValueError(
                    f"instance tables have sizes {sorted(sizes)}: index them by full train position "
                    f"(NaN where a fold did not train) or pass instance_indices=[fold positions, ...]"
                )
            masks = [t.noise_mask for t in trajs]
            noise = masks[0].clone() if all(m is not None for m in masks) else None
            return (t.instance_rates[:e].to(torch.float64) for t in trajs), noise
        n_full = dataset.get("num_examples") if dataset else None
        if n_full is None:
            raise ValueError("average(..., instance_indices=...) needs dataset=<full train set signature> for N")
        positions = []
        noise = torch.zeros(n_full, dtype=torch.bool)
        noise_known = torch.zeros(n_full, dtype=torch.bool)
        for k, (t, idx) in enumerate(zip(trajs, instance_indices)):
            idx = torch.as_tensor(idx, dtype=torch.int64)
            width = t._instance[0][2].numel()
            if idx.numel() != width:
                raise ValueError(
                    f"instance_indices[{k}] has {idx.numel()} positions but trajectory {k} has {width} instance rates"
                )
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_full):
                raise ValueError(f"instance_indices[{k}] has positions outside the full train set of {n_full}")
            positions.append(idx)
            if t.noise_mask is not None:
                noise[idx] = t.noise_mask
                noise_known[idx] = True

        def tables() -> Iterator[torch.Tensor]:
            for t, idx in zip(trajs, positions):
                full = torch.full((e, n_full), float("nan"), dtype=torch.float64)
                full[:, idx] = torch.stack([r[2] for r in t._instance[:e]]).to(torch.float64)
                yield full

        return tables(), (noise if bool(noise_known.all()) else None)

    # ------------------------------------------------------------------ replay queries
    def instance_rates_at(self, epoch: float, mode: str = "linear") -> torch.Tensor:
        """Per-instance rates ``[N]`` to apply at (fractional) ``epoch`` when replaying.

        Snapshot k is taken at epoch k (k = 0 is the start, k = e + 1 the end of 0-based epoch e).
        During epoch e the original run moved each rate from snapshot e to snapshot e + 1, so with
        ``mode="linear"`` (default) the rate at epoch ``e + p`` (progress p in [0, 1)) is
        ``(1 - p) * snapshot[e] + p * snapshot[e + 1]``. ``mode="next"`` applies snapshot e + 1 during
        the whole of epoch e — what a same-step meta update applied when the example is visited once
        per epoch; ``mode="previous"`` applies snapshot e (the "delayed" strategy's applied value).
        At a snapshot epoch every mode returns the snapshot itself; outside the recorded range the
        first/last snapshot is used. Interpolation runs over the recorded epochs, so snapshots need not
        be exactly at integers. Result dtype float32.
        """
        xs = self._cached("instance_epochs", lambda: self.instance_epochs)
        table = self._cached("instance_rates", lambda: self.instance_rates)
        return _interp_rows(xs, table, float(epoch), mode, "instance").float()

    def _step_or_epoch(self, step: int | None, epoch: float | None, xs_steps: torch.Tensor, xs_epochs: torch.Tensor):
        if (step is None) == (epoch is None):
            raise ValueError("pass exactly one of step= or epoch=")
        return (xs_steps, float(step)) if step is not None else (xs_epochs, float(epoch))

    def class_rates_at(
        self, step: int | None = None, *, epoch: float | None = None, mode: str = "linear"
    ) -> torch.Tensor:
        """Per-class rates ``[C]`` at optimizer ``step`` (or at ``epoch``, to replay on a train set of another size).

        Class rates are recorded every logging step while they change every step, so ``mode="linear"``
        (default) interpolates between the recorded steps around ``step``; ``mode="previous"`` takes the
        last snapshot at or before it. At a recorded step both return that snapshot exactly; before the
        first / after the last recorded step the first / last snapshot is used.
        """
        xs, x = self._step_or_epoch(
            step, epoch,
            self._cached("class_steps", lambda: self.class_steps.to(torch.float64)),
            self._cached("class_epochs", lambda: self.class_epochs),
        )
        return _interp_rows(xs, self._cached("class_rates", lambda: self.class_rates), x, mode, "class").float()

    def _scalar_at(self, values: list[float], step: int | None, epoch: float | None, what: str) -> float:
        if not self._steps:
            raise ValueError(f"the trajectory has no per-step records, so no {what} to replay")
        xs, x = self._step_or_epoch(
            step, epoch,
            self._cached("steps", lambda: self.steps.to(torch.float64)),
            self._cached("epochs", lambda: self.epochs),
        )
        table = self._cached(what, lambda: torch.tensor(values, dtype=torch.float64).unsqueeze(1))
        return float(_interp_rows(xs, table, x, "linear", what)[0])

    def weight_decay_at(self, step: int | None = None, *, epoch: float | None = None) -> float:
        """Learned weight decay used at optimizer ``step`` (exact at a recorded step, linear in between,
        first/last value outside the recorded range); or at ``epoch``."""
        return self._scalar_at(self._wd, step, epoch, "weight decay")

    def learning_rate_at(self, step: int | None = None, *, epoch: float | None = None) -> float:
        """The original run's model learning rate at ``step`` (or ``epoch``), same rules as :meth:`weight_decay_at`."""
        return self._scalar_at(self._lr, step, epoch, "learning rate")

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, signature: dict[str, Any], *, check_fingerprint: bool = True) -> None:
        """Raise ValueError when the dataset described by ``signature`` is not the one this trajectory was learned on.

        The size must match (instance rates are indexed by position). Fingerprints are compared when
        both are known (``datasets.Dataset``); a torch dataset has none, so only its size is checked.
        A trajectory without instance rates (class level) is indexed by label, not by row, and replays on
        any train set with the same labels (e.g. the average of k folds on the full train set).
        """
        if self.has_class_rates and not self.has_instance_rates:
            return
        mine = self.dataset or {}
        n_mine, n_theirs = mine.get("num_examples"), signature.get("num_examples")
        if n_mine is not None and n_theirs is not None and int(n_mine) != int(n_theirs):
            raise ValueError(
                f"dataset size mismatch: the trajectory was learned on {n_mine} examples "
                f"({mine.get('id')!r}, split {mine.get('split')!r}) but the dataset to replay on has {n_theirs} "
                f"({signature.get('id')!r}, split {signature.get('split')!r}). Replay on the same train set, "
                f"in the same order."
            )
        f_mine, f_theirs = mine.get("fingerprint"), signature.get("fingerprint")
        if check_fingerprint and f_mine and f_theirs and f_mine != f_theirs:
            raise ValueError(
                f"dataset fingerprint mismatch: the trajectory was learned on fingerprint {f_mine!r} but the "
                f"dataset to replay on has fingerprint {f_theirs!r} (same size {n_theirs}: a different variant, "
                f"noise seed, order or preprocessing). Build the train set exactly as in the original run, or "
                f"set check_fingerprint=False if you know the rows are the same (MetaLRConfig(check_fingerprint=False), "
                f"--check_fingerprint false, or LRTrajectory.check_dataset(..., check_fingerprint=False))."
            )

    def check_dataset(self, dataset: Any, split: str | None = None, *, check_fingerprint: bool = True) -> None:
        """:meth:`check_compatible` against :func:`dataset_signature` of ``dataset``."""
        self.check_compatible(dataset_signature(dataset, split), check_fingerprint=check_fingerprint)

    # ------------------------------------------------------------------ summary
    def _final_instance(self) -> torch.Tensor | None:
        return self._instance[-1][2] if self._instance else None

    def _final_class(self) -> torch.Tensor | None:
        return self._class[-1][2] if self._class else None

    def _class_name(self, c: int) -> str:
        if self.label_names and c < len(self.label_names):
            return self.label_names[c]
        return str(c)

    def summary(self) -> dict[str, Any]:
        """Key numbers of the learned schedule (all floats/ints/lists, JSON-serialisable)."""
        from sklearn.metrics import roc_auc_score

        s: dict[str, Any] = {
            "num_steps": self.num_steps,
            "num_epochs": (max(self._epochs) if self._epochs else
                           (self._instance[-1][1] if self._instance else None)),
            "num_class_snapshots": len(self._class),
            "num_instance_snapshots": len(self._instance),
        }
        if self._wd:
            s["final_weight_decay"] = self._wd[-1]
            s["final_learning_rate"] = self._lr[-1]
            losses = [v for v in self._meta_loss if not math.isnan(v)]
            s["num_meta_steps"] = len(losses)
            s["final_meta_loss"] = losses[-1] if losses else None
        cls_rates = self._final_class()
        if cls_rates is not None:
            order = torch.argsort(cls_rates, stable=True).tolist()
            s["class_rate_mean"] = float(cls_rates.mean())
            s["class_rate_min"] = float(cls_rates.min())
            s["class_rate_max"] = float(cls_rates.max())
            s["class_rate_near_zero_fraction"] = float((cls_rates < NEAR_ZERO).float().mean())
            s["lowest_classes"] = [[self._class_name(c), float(cls_rates[c])] for c in order[:5]]
            s["highest_classes"] = [[self._class_name(c), float(cls_rates[c])] for c in reversed(order[-5:])]
        inst = self._final_instance()
        if inst is not None and bool((~torch.isnan(inst)).any()):
            known = ~torch.isnan(inst)
            vals = inst[known]
            s["instance_rate_mean"] = float(vals.mean())
            s["instance_rate_std"] = float(vals.std()) if vals.numel() > 1 else 0.0
            s["instance_rate_min"] = float(vals.min())
            s["instance_rate_max"] = float(vals.max())
            s["instance_rate_near_zero_fraction"] = float((vals < NEAR_ZERO).float().mean())
            if self.noise_mask is not None and self.noise_mask.numel() == inst.numel():
                noisy = self.noise_mask[known]
                s["noise_fraction"] = float(noisy.float().mean())
                if bool(noisy.any()) and bool((~noisy).any()):
                    s["instance_rate_mean_clean"] = float(vals[~noisy].mean())
                    s["instance_rate_mean_noisy"] = float(vals[noisy].mean())
                    # clean examples are the positives: a good schedule gives them the higher rates
                    s["auroc_clean_vs_noisy"] = float(roc_auc_score((~noisy).numpy(), vals.numpy()))
        return s

    def summary_markdown(self) -> str:
        """:meth:`summary` as a Markdown table, plus the lowest/highest classes."""
        s = self.summary()
        labels = {
            "num_steps": "optimizer steps",
            "num_epochs": "epochs",
            "num_meta_steps": "meta steps",
            "final_learning_rate": "final model learning rate",
            "final_weight_decay": ("final learned weight decay" if self.config.get("learn_weight_decay", True)
                                   else "weight decay (fixed, not learned)"),
            "final_meta_loss": "final meta loss",
            "class_rate_mean": "final class rate: mean",
            "class_rate_min": "final class rate: min",
            "class_rate_max": "final class rate: max",
            "class_rate_near_zero_fraction": f"fraction of classes with rate < {NEAR_ZERO}",
            "instance_rate_mean": "final instance rate: mean",
            "instance_rate_std": "final instance rate: std",
            "instance_rate_min": "final instance rate: min",
            "instance_rate_max": "final instance rate: max",
            "instance_rate_near_zero_fraction": f"fraction of instances with rate < {NEAR_ZERO}",
            "noise_fraction": "noisy-label fraction",
            "instance_rate_mean_clean": "final instance rate: mean over clean",
            "instance_rate_mean_noisy": "final instance rate: mean over noisy",
            "auroc_clean_vs_noisy": "AUROC of final instance rate, clean vs noisy",
        }
        lines = ["| quantity | value |", "|---|---|"]
        for key, label in labels.items():
            if key in s and s[key] is not None:
                v = s[key]
                lines.append(f"| {label} | {v:.4g} |" if isinstance(v, float) else f"| {label} | {v} |")
        for key, title in (("lowest_classes", "Lowest"), ("highest_classes", "Highest")):
            if key in s:
                items = ", ".join(f"{name} ({rate:.3g})" for name, rate in s[key])
                lines.append(f"\n**{title} final class rates:** {items}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ plots
    def available_plots(self) -> list[str]:
        """The plot kinds this trajectory has data for."""
        kinds = []
        if self._class:
            kinds.append("class")
        if self._instance:
            kinds.append("instance")
        if self._steps:
            kinds.append("weight_decay")
            if any(not math.isnan(v) for v in self._meta_loss):
                kinds.append("meta_loss")
        return kinds

    def plot(self, kind: str = "all", *, figsize: tuple[float, float] = (6.4, 4.0)) -> dict[str, Figure]:
        """Figures like the paper's: ``class`` rates over epochs (thin lines, bold mean), ``instance`` rates
        (clean vs noisy mean ± std when the noise mask is known, else mean ± std and 10/90 % quantiles),
        ``weight_decay`` (with the model LR on a second axis) and ``meta_loss`` over steps.

        ``kind="all"`` returns every kind the trajectory has data for. Uses matplotlib's Agg backend;
        close the figures (``plt.close(fig)``) when done, or use :meth:`save_plots`.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        available = self.available_plots()
        if kind == "all":
            kinds = available
        elif kind in PLOT_KINDS:
            if kind not in available:
                raise ValueError(f"cannot plot {kind!r}: the trajectory has no such records (it has {available})")
            kinds = [kind]
        else:
            raise ValueError(f"unknown plot kind {kind!r}; choose 'all' or one of {PLOT_KINDS}")
        figures: dict[str, Figure] = {}
        for k in kinds:
            # an Agg canvas, not registered with pyplot: no screen needed, no global state, no leaked figures
            fig = Figure(figsize=figsize, dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot(1, 1, 1)
            getattr(self, f"_plot_{k}")(ax)
            fig.tight_layout()
            figures[k] = fig
        return figures

    def _plot_class(self, ax: Any) -> None:
        x = self.class_epochs.numpy()
        table = self.class_rates.numpy()
        C = table.shape[1]
        if C <= 10:  # few classes: one labelled line each
            for c in range(C):
                ax.plot(x, table[:, c], linewidth=1.2, alpha=0.8, label=self._class_name(c))
        else:  # many: all in grey, the 3 lowest and 3 highest final rates labelled
            ax.plot(x, table, color="tab:gray", linewidth=0.5, alpha=0.35)
            order = np.argsort(table[-1], kind="stable")
            for c in [*order[:3], *order[::-1][:3]]:
                ax.plot(x, table[:, c], linewidth=1.2, label=self._class_name(int(c)))
        ax.plot(x, table.mean(1), color="black", linewidth=2.5, label="mean over classes")
        ax.set_xlabel("epoch")
        ax.set_ylabel("class learning-rate multiplier")
        ax.set_title(f"Per-class rates ({C} classes)" + ("" if C <= 10 else "; lowest and highest 3 labelled"))
        ax.legend(loc="best", fontsize="small", ncol=2 if C > 5 else 1)

    def _plot_instance(self, ax: Any) -> None:
        x = self.instance_epochs.numpy()
        table = self.instance_rates.numpy()
        if self.noise_mask is not None and self.noise_mask.numel() == table.shape[1] and bool(self.noise_mask.any()):
            groups = [("clean", ~self.noise_mask.numpy(), "tab:blue"), ("noisy", self.noise_mask.numpy(), "tab:red")]
            for name, mask, color in groups:
                if mask.any():
                    vals = table[:, mask]
                    mean, std = np.nanmean(vals, 1), np.nanstd(vals, 1)
                    ax.plot(x, mean, color=color, linewidth=2, label=f"{name} ({int(mask.sum())})")
                    ax.fill_between(x, np.maximum(mean - std, 0.0), mean + std, color=color, alpha=0.2)
            ax.set_title("Per-instance rates: clean vs noisy labels (mean ± std)")
        else:
            mean, std = np.nanmean(table, 1), np.nanstd(table, 1)
            q10, q90 = np.nanquantile(table, 0.1, axis=1), np.nanquantile(table, 0.9, axis=1)
            ax.plot(x, mean, color="tab:blue", linewidth=2, label="mean")
            ax.fill_between(x, np.maximum(mean - std, 0.0), mean + std, color="tab:blue", alpha=0.2, label="± std")
            ax.plot(x, q10, color="tab:blue", linestyle="--", linewidth=1, label="10 % / 90 % quantiles")
            ax.plot(x, q90, color="tab:blue", linestyle="--", linewidth=1)
            ax.set_title(f"Per-instance rates ({table.shape[1]} examples)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("instance learning-rate multiplier")
        ax.legend(loc="best")

    def _plot_weight_decay(self, ax: Any) -> None:
        x = self.steps.numpy()
        learned = bool(self.config.get("learn_weight_decay", True))
        wd_label = "learned weight decay" if learned else "weight decay (fixed)"
        h1 = ax.plot(x, self.weight_decay.numpy(), color="tab:green", linewidth=1.5, label=wd_label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("weight decay", color="tab:green")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax2 = ax.twinx()
        h2 = ax2.plot(x, self.learning_rate.numpy(), color="tab:gray", linewidth=1, linestyle="--", label="model LR")
        ax2.set_ylabel("model learning rate", color="tab:gray")
        ax.legend(h1 + h2, [h.get_label() for h in h1 + h2], loc="best")
        ax.set_title(("Learned weight decay" if learned else "Model learning rate (weight decay fixed)")
                     + " over training")

    def _plot_meta_loss(self, ax: Any) -> None:
        x = self.steps.numpy()
        y = self.meta_loss.numpy()
        keep = ~np.isnan(y)
        ax.plot(x[keep], y[keep], color="tab:purple", linewidth=0.8, alpha=0.6, label="meta loss")
        if keep.sum() >= 10:
            w = max(2, int(keep.sum()) // 20)
            smooth = np.convolve(y[keep], np.ones(w) / w, mode="valid")
            ax.plot(x[keep][w - 1:], smooth, color="black", linewidth=2, label=f"moving mean ({w})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("meta loss")
        ax.set_title("Meta loss on the held-out meta batch")
        ax.legend(loc="best")

    def save_plots(self, directory: str | os.PathLike, kind: str = "all", *, dpi: int = 100) -> list[str]:
        """Write the plots as ``lr_trajectory_{kind}.png`` into ``directory``; return the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, fig in self.plot(kind).items():
            path = directory / PLOT_FILE_TEMPLATE.format(kind=k)
            fig.savefig(path, dpi=dpi, format="png")
            paths.append(str(path))
        return paths
