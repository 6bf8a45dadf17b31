"""The :class:`LRTrajectory` record: what a data-dependent learning-rate run learned, step by step.

The record keeps the per-step values, the rate snapshots and the dataset metadata, checks that they
are recorded in order, and cuts them back when a run resumes. Everything else is done by the modules
next to it, which its thin public methods call: :mod:`.io` (the files, local or on the Hub),
:mod:`.lookup` (values at any step or epoch), :mod:`.kfold` (averaging folds), :mod:`.report` (summary and
plots), :mod:`.card` and :mod:`hf_ddlr.upload` (pushing to the Hub), :mod:`.signature` (dataset checks).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..upload import HubUploadError, upload_folder_with_retry_message
from . import kfold, report
from .card import write_artifacts
from .io import FORMAT_NAME, SCHEMA_VERSION, hub_card_text, locate_files, read_files, write_files
from .lookup import SnapshotLookup
from .signature import check_same_dataset, dataset_signature, label_names_of

if TYPE_CHECKING:  # matplotlib is imported lazily: recording must not pay for it
    from matplotlib.figure import Figure


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


def _step_column(name: str, dtype: torch.dtype, doc: str) -> property:
    """A read-only tensor view of the per-step list ``name`` (one entry per recorded optimizer step)."""
    return property(lambda self: torch.tensor(getattr(self, name), dtype=dtype), doc=doc)


def _snapshot_column(store: str, field: int, dtype: torch.dtype, doc: str) -> property:
    """A read-only tensor view of the step (``field=0``) or epoch (``field=1``) of each snapshot in ``store``."""
    return property(lambda self: torch.tensor([r[field] for r in getattr(self, store)], dtype=dtype), doc=doc)


def _snapshot_table(store: str, doc: str) -> property:
    """A read-only ``[S, width]`` tensor of the snapshots in ``store`` (``[0, 0]`` when none were recorded)."""
    return property(lambda self: torch.stack([r[2] for r in getattr(self, store)]) if getattr(self, store)
                    else torch.zeros(0, 0), doc=doc)


def _count_records(store: str, doc: str) -> property:
    """A read-only ``int``: how many records ``store`` holds."""
    return property(lambda self: len(getattr(self, store)), doc=doc)


def _any_records(store: str, doc: str) -> property:
    """A read-only ``bool``: whether ``store`` holds any record."""
    return property(lambda self: bool(getattr(self, store)), doc=doc)


def _snapshots(tensors: Mapping[str, torch.Tensor], prefix: str) -> list[tuple[int, float, torch.Tensor]]:
    """The ``(step, epoch, rates)`` records of stored ``{prefix}_steps/_epochs/_rates`` tensors."""
    steps, epochs = tensors[f"{prefix}_steps"].tolist(), tensors[f"{prefix}_epochs"].tolist()
    return list(zip(steps, epochs, tensors[f"{prefix}_rates"].unbind(0)))


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
        groups: Mapping[str, Any] | None = None,
    ) -> None:
        self.dataset: dict[str, Any] = dict(dataset or {})
        # group-level rates: {"column": the group column, "names": [G] names in id order, "sizes": [G] examples}
        self.groups: dict[str, Any] | None = dict(groups) if groups is not None else None
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
        self._group: list[tuple[int, float, torch.Tensor]] = []
        self._instance: list[tuple[int, float, torch.Tensor]] = []
        # cached lookups for the replay queries (every optimizer step); dropped whenever a record changes
        self._lookup: SnapshotLookup | None = None

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
            label_names=label_names_of(dataset, label_column),
            noise_mask=noise_mask,
            config=config,
            model_name=model_name,
        )

    @classmethod
    def from_stored(cls, metadata: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> LRTrajectory:
        """The trajectory whose :meth:`metadata` and :meth:`tensors` are these (what the two saved files hold)."""
        traj = cls(
            dataset=metadata.get("dataset"),
            label_names=metadata.get("label_names"),
            noise_mask=tensors.get("noise_mask"),
            config=metadata.get("config"),
            model_name=metadata.get("model_name"),
            groups=metadata.get("groups"),
        )
        traj.instance_coverage = tensors.get("instance_coverage")
        if "steps" in tensors:
            traj._steps = tensors["steps"].tolist()
            traj._epochs = tensors["epochs"].tolist()
            traj._lr = tensors["learning_rate"].tolist()
            traj._wd = tensors["weight_decay"].tolist()
            traj._meta_loss = tensors["meta_loss"].tolist()
        if "class_rates" in tensors:
            traj._class = _snapshots(tensors, "class")
        if "group_rates" in tensors:
            traj._group = _snapshots(tensors, "group")
        if "instance_rates" in tensors:
            traj._instance = _snapshots(tensors, "instance")
        return traj

    # ------------------------------------------------------------------ recording
    def _changed(self) -> None:
        """Drop what was derived from the records (the cached lookups): a record changed."""
        self._lookup = None

    def record_step(
        self, step: int, epoch: float, learning_rate: float, weight_decay: float, meta_loss: float | None
    ) -> None:
        """Record one optimizer step's model LR, learned weight decay and meta loss (None/NaN: no meta step).

        Recording the step that was recorded last again replaces it (idempotent); an earlier step
        raises, because a trajectory must be monotonic (use :meth:`truncate` when resuming).
        """
        step = int(step)
        self._changed()
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
        self._changed()
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

    def record_group_rates(self, step: int, epoch: float, rates: torch.Tensor) -> None:
        """Record the per-group rates ``[G]`` (like class rates: every step, plus step 0 for the initial values)."""
        size = len(self.groups["names"]) if self.groups else None
        self._record_rates(self._group, step, epoch, rates, "group rates", size)

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
        self._changed()
        keep = [i for i, s in enumerate(self._steps) if s <= max_step]
        for name in ("_steps", "_epochs", "_lr", "_wd", "_meta_loss"):
            lst = getattr(self, name)
            setattr(self, name, [lst[i] for i in keep])
        self._class = [r for r in self._class if r[0] <= max_step]
        self._group = [r for r in self._group if r[0] <= max_step]
        self._instance = [
            r for r in self._instance
            if r[0] < max_step or (r[0] == max_step and not (drop_partial_epoch and abs(r[1] - round(r[1])) > 1e-6))
        ]

    def resume_from(self, checkpoint: str | os.PathLike, step: int, *, config: dict[str, Any]) -> LRTrajectory:
        """The trajectory saved in ``checkpoint``, cut back to ``step``, for this (resumed) run to record on.

        ``self`` is the fresh trajectory of the resumed run: its metadata describes the train set now used.
        The result takes ``config`` (this run's settings; its schedule may be longer than the checkpointed
        one's). When the train set changed size (only reachable with ``resize_rates_on_resume=True``) the
        result keeps the per-step history and class rates but drops the old instance-rate snapshots (they
        are indexed by rows of the old set) and describes the new train set, with a warning.
        """
        loaded = type(self).from_pretrained(checkpoint)
        loaded.truncate(step, drop_partial_epoch=True)
        loaded.config = {**loaded.config, **config}
        n_old, n_new = loaded.dataset.get("num_examples"), self.dataset.get("num_examples")
        if n_old != n_new:
            warnings.warn(
                f"Resuming onto a train set of {n_new} examples from a checkpoint trained on {n_old}: the "
                "trajectory keeps its per-step history and class rates but drops the old instance-rate "
                "snapshots and now describes the new train set.",
                stacklevel=3,
            )
            loaded.dataset, loaded.noise_mask = self.dataset, self.noise_mask
            loaded._instance = []
            loaded._changed()
        return loaded

    # ------------------------------------------------------------------ tensor views
    steps = _step_column("_steps", torch.int64, "Optimizer step of each per-step record (``[S]``, int64).")
    epochs = _step_column("_epochs", torch.float64, "``state.epoch`` of each per-step record (``[S]``).")
    learning_rate = _step_column("_lr", torch.float64, "The model's learning rate at each recorded step.")
    weight_decay = _step_column("_wd", torch.float64, "The (learned) weight decay at each recorded step.")
    meta_loss = _step_column("_meta_loss", torch.float64, "The meta loss at each recorded step (NaN: none).")
    class_rates = _snapshot_table(
        "_class", "``[S_c, C]`` per-class rates, one row per recorded logging step (``[0, 0]`` when not recorded)."
    )
    class_steps = _snapshot_column("_class", 0, torch.int64, "Optimizer step of each class-rate snapshot.")
    class_epochs = _snapshot_column("_class", 1, torch.float64, "Epoch of each class-rate snapshot.")
    group_rates = _snapshot_table(
        "_group", "``[S_g, G]`` per-group rates (the data-mixture weights), one row per snapshot (``[0, 0]`` when none)."
    )
    group_steps = _snapshot_column("_group", 0, torch.int64, "Optimizer step of each group-rate snapshot.")
    group_epochs = _snapshot_column("_group", 1, torch.float64, "Epoch of each group-rate snapshot.")
    instance_rates = _snapshot_table(
        "_instance", "``[E, N]`` per-instance rates, one row per snapshot (step 0, then each epoch end)."
    )
    instance_steps = _snapshot_column("_instance", 0, torch.int64, "Optimizer step of each instance snapshot.")
    instance_epochs = _snapshot_column("_instance", 1, torch.float64, "Epoch of each instance-rate snapshot.")

    has_class_rates = _any_records("_class", "Whether class-rate snapshots were recorded (``lr_level`` class/both).")
    has_group_rates = _any_records("_group", "Whether group-rate snapshots were recorded (``group_column``).")
    has_instance_rates = _any_records("_instance", "Whether instance-rate snapshots were recorded (instance/both).")
    num_steps = _count_records("_steps", "How many optimizer steps were recorded.")
    num_class_snapshots = _count_records("_class", "How many class-rate snapshots were recorded.")
    num_instance_snapshots = _count_records("_instance", "How many instance-rate snapshots were recorded.")
    num_group_snapshots = _count_records("_group", "How many group-rate snapshots were recorded.")

    @property
    def final_class_rates(self) -> torch.Tensor | None:
        """The last class-rate snapshot ``[C]`` (None when none was recorded)."""
        return self._class[-1][2] if self._class else None

    @property
    def final_group_rates(self) -> torch.Tensor | None:
        """The last group-rate snapshot ``[G]`` (None when none was recorded)."""
        return self._group[-1][2] if self._group else None

    @property
    def final_instance_rates(self) -> torch.Tensor | None:
        """The last instance-rate snapshot ``[N]`` (None when none was recorded)."""
        return self._instance[-1][2] if self._instance else None

    def class_name(self, c: int) -> str:
        """The label name of class ``c`` (its number when the labels have no names)."""
        if self.label_names and c < len(self.label_names):
            return self.label_names[c]
        return str(c)

    def group_name(self, g: int) -> str:
        """The name of group ``g`` (the group column's value; its number when the groups have no names)."""
        names = (self.groups or {}).get("names") or []
        return str(names[g]) if g < len(names) else str(g)

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
        if self._group:
            out.update(group_rates=self.group_rates, group_steps=self.group_steps, group_epochs=self.group_epochs)
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
        """The JSON side of the trajectory (schema version, dataset, labels, meta config, tensor shapes; the
        groups of group-level rates when there are any)."""
        out = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "model_name": self.model_name,
            "dataset": self.dataset,
            "label_names": self.label_names,
            "config": self.config,
            "tensors": {k: list(v.shape) for k, v in self.tensors().items()},
        }
        if self.groups is not None:  # only then: the metadata of every other trajectory stays as it was
            out["groups"] = self.groups
        return out

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

    # ------------------------------------------------------------------ persistence (.io) and the Hub
    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write ``lr_trajectory.safetensors`` and ``lr_trajectory.json`` into ``save_directory``; return their paths."""
        return write_files(self.tensors(), self.metadata(), save_directory)

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
        Files of an older schema version load; a newer one raises and says to upgrade hf_ddlr.
        """
        paths = locate_files(repo_id_or_path, revision, cache_dir=cache_dir, token=token, subfolder=subfolder)
        return cls.from_stored(*read_files(*paths))

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

        Everything is first written to ``local_dir`` (a temporary folder when None). A repo that already has a
        card (a model pushed before) keeps it: the trajectory's section is added to it, or replaces the section
        an earlier push added, unless ``local_dir`` holds a card of its own. When the upload fails that folder
        is kept and the raised :class:`hf_ddlr.hub.HubUploadError` says how to retry (a temporary folder is
        removed after a successful upload). Returns the ``CommitInfo`` of the upload.
        """
        from huggingface_hub.utils import validate_repo_id

        try:  # before anything is written
            validate_repo_id(repo_id)
        except ValueError as err:
            raise ValueError(f"{repo_id!r} is not a Hub repo id ({err}); give one such as 'user/my-model'.") from err
        temporary = local_dir is None
        own_card = not temporary and os.path.isfile(os.path.join(str(local_dir), "README.md"))
        folder = tempfile.mkdtemp(prefix="hf_ddlr_trajectory_") if temporary else str(local_dir)
        name = self.model_name or repo_id
        write_artifacts(self, folder, model_name=name, repo_id=repo_id)

        def keep_the_repos_card() -> None:  # (once the repo exists: the Hub answers)
            base = None if own_card else hub_card_text(repo_id, revision=revision, token=token)
            if base is not None:
                write_artifacts(self, folder, model_card_base=base, model_name=name, repo_id=repo_id)

        retry_from_folder = False  # a failed upload keeps the folder: its message names it and the retry command
        try:
            return upload_folder_with_retry_message(
                folder, repo_id, token=token, private=private, revision=revision, commit_message=commit_message,
                retry_hint="`trajectory.push_to_hub(...)`", before_upload=keep_the_repos_card,
            )
        except HubUploadError:
            retry_from_folder = True
            raise
        finally:  # after an upload, or a refusal (e.g. private=True into a public repo) that names no folder
            if temporary and not retry_from_folder:
                shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ averaging (k-fold protocol, .kfold)
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
        metadata, tensors = kfold.average_records(
            trajectories, instance_indices=instance_indices, dataset=dataset, epoch_atol=epoch_atol
        )
        return cls.from_stored(metadata, tensors)

    # ------------------------------------------------------------------ replay queries (.lookup)
    def _queries(self) -> SnapshotLookup:
        if self._lookup is None:
            self._lookup = SnapshotLookup(self)
        return self._lookup

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
        return self._queries().instance_rates_at(epoch, mode)

    def class_rates_at(
        self, step: int | None = None, *, epoch: float | None = None, mode: str = "linear"
    ) -> torch.Tensor:
        """Per-class rates ``[C]`` at optimizer ``step`` (or at ``epoch``, to replay on a train set of another size).

        Class rates are recorded every logging step while they change every step, so ``mode="linear"``
        (default) interpolates between the recorded steps around ``step``; ``mode="previous"`` takes the
        last snapshot at or before it. At a recorded step both return that snapshot exactly; before the
        first / after the last recorded step the first / last snapshot is used.
        """
        return self._queries().class_rates_at(step, epoch, mode)

    def group_rates_at(
        self, step: int | None = None, *, epoch: float | None = None, mode: str = "linear"
    ) -> torch.Tensor:
        """Per-group rates ``[G]`` at optimizer ``step`` (or ``epoch``), by the rules of :meth:`class_rates_at`."""
        return self._queries().class_rates_at(step, epoch, mode, kind="group")

    def weight_decay_at(self, step: int | None = None, *, epoch: float | None = None) -> float:
        """Learned weight decay used at optimizer ``step`` (exact at a recorded step, linear in between,
        first/last value outside the recorded range); or at ``epoch``."""
        return self._queries().scalar_at("weight_decay", step, epoch, "weight decay")

    def learning_rate_at(self, step: int | None = None, *, epoch: float | None = None) -> float:
        """The original run's model learning rate at ``step`` (or ``epoch``), same rules as :meth:`weight_decay_at`."""
        return self._queries().scalar_at("learning_rate", step, epoch, "learning rate")

    # ------------------------------------------------------------------ compatibility (.signature)
    def check_compatible(self, signature: dict[str, Any], *, check_fingerprint: bool = True) -> None:
        """Raise ValueError when the dataset described by ``signature`` is not the one this trajectory was learned on.

        The size must match (instance rates are indexed by position). Fingerprints are compared when
        both are known (``datasets.Dataset``); a torch dataset has none, so only its size is checked.
        A trajectory without instance rates (class level) is indexed by label, not by row, and replays on
        any train set with the same labels (e.g. the average of k folds on the full train set).
        """
        if self.has_class_rates and not self.has_instance_rates:
            return
        check_same_dataset(self.dataset or {}, signature, check_fingerprint=check_fingerprint)

    def check_dataset(self, dataset: Any, split: str | None = None, *, check_fingerprint: bool = True) -> None:
        """:meth:`check_compatible` against :func:`dataset_signature` of ``dataset``."""
        self.check_compatible(dataset_signature(dataset, split), check_fingerprint=check_fingerprint)

    # ------------------------------------------------------------------ summary and plots (.report)
    def summary(self) -> dict[str, Any]:
        """Key numbers of the learned schedule (all floats/ints/lists, JSON-serialisable)."""
        return report.summary(self)

    def summary_markdown(self) -> str:
        """:meth:`summary` as a Markdown table, plus the lowest/highest classes."""
        return report.summary_markdown(self)

    def available_plots(self) -> list[str]:
        """The plot kinds this trajectory has data for."""
        return report.available_plots(self)

    def plot(self, kind: str = "all", *, figsize: tuple[float, float] = (6.4, 4.0)) -> dict[str, Figure]:
        """Figures like the paper's: ``class`` rates over epochs (thin lines, bold mean), ``instance`` rates
        (clean vs noisy mean ± std when the noise mask is known, else mean ± std and 10/90 % quantiles),
        ``weight_decay`` (with the model LR on a second axis) and ``meta_loss`` over steps.

        ``kind="all"`` returns every kind the trajectory has data for. Uses matplotlib's Agg backend;
        close the figures (``plt.close(fig)``) when done, or use :meth:`save_plots`.
        """
        return report.plot(self, kind, figsize=figsize)

    def save_plots(self, directory: str | os.PathLike, kind: str = "all", *, dpi: int = 100) -> list[str]:
        """Write the plots as ``lr_trajectory_{kind}.png`` into ``directory``; return the paths."""
        return report.save_plots(self, directory, kind, dpi=dpi)
