"""The learned values: per-instance and per-class (or per-group) learning-rate multipliers and the weight decay.

Tensor tables with their own small optimizer (:class:`RateSGD`, a sparse SGD: only rows seen in the batch
move) that also clamps, in the spirit of Data Parameters. An example's *effective* multiplier is
``e_i = w_inst[idx_i] · w_key[k_i]`` (a level that is off counts as 1), where the keyed table is either the
per-class table (``k_i`` = the label ``y_i``) or the per-group table (``k_i`` = the id of the example's group:
its data source, domain, task, language, ...). A class table is a group table grouped by label; the two are
kept apart only so that each is named (and checkpointed) as what it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal, get_args

import torch

__all__ = ["INSTANCE_AT_CAP", "INSTANCE_CENTERS", "INSTANCE_GRADIENTS", "INSTANCE_LEVELS", "INSTANCE_NORMALIZATIONS", "INSTANCE_SCALES",
           "LEVELS", "RateSGD", "RateTable"]

Level = Literal["instance", "class", "group", "both"]
LEVELS: tuple[str, ...] = ("instance", "class", "group", "both")
INSTANCE_LEVELS: tuple[str, ...] = ("instance", "both")  # the levels with a per-instance table
Scaling = Literal["normalized", "raw"]
InstanceGradient = Literal["effective", "chain_rule"]
INSTANCE_GRADIENTS: tuple[str, ...] = get_args(InstanceGradient)
InstanceScale = Literal["batch", "key"]
INSTANCE_SCALES: tuple[str, ...] = get_args(InstanceScale)
InstanceCenter = Literal["mean", "median"]
INSTANCE_CENTERS: tuple[str, ...] = get_args(InstanceCenter)
InstanceAtCap = Literal["clamp", "relative"]
INSTANCE_AT_CAP: tuple[str, ...] = get_args(InstanceAtCap)
InstanceNormalization = Literal["none", "median"]
INSTANCE_NORMALIZATIONS: tuple[str, ...] = get_args(InstanceNormalization)

# of RateTable.state_dict; v0 (before the table had an optimizer) is the same dict without "format_version"
FORMAT_VERSION = 1
WD_BETA = 0.99  # decay of the running mean of the squared weight-decay meta-gradient ("normalized")


class RateSGD(torch.optim.Optimizer):
    """The meta optimizer of a :class:`RateTable`: sparse SGD on the rate tables, and the weight decay's update.

    A rate table's gradient is a sparse COO tensor with one (uncoalesced) entry per lookup of the batch, the
    gradient ``nn.Embedding(sparse=True)`` gives: only the rows looked up move, duplicates accumulate. A step
    is ``w ← clamp(w − lr·g / s, 0, max_rate)`` on those rows, with ``s = 1`` for ``scaling="raw"`` (the
    paper's update) and, for ``"normalized"``, by the table's group ``norm``: ``"rows"`` divides by the mean
    |g| of the rows that move (instance rates: ``lr`` is the typical change of a rate per visit),
    ``"lookups"`` by the total |gradient| of the lookups (class rates: a class moves by ``lr`` times its
    share, so the table as a whole moves by at most ``lr`` per step; group rates alike). A step whose ``s`` is not finite or
    ≤ 0 is skipped. Every rate is clamped to ``[0, max_rate]``; the instance rates to the tighter of ``max_rate``
    and ``max_instance_rate``. A step that would take a row past its cap is replaced, when the table's state
    holds a ``cap_reference`` for the step (a sparse gradient like ``.grad``: :class:`RateTable`'s
    ``at_cap="relative"``), by the step on ``g`` minus that reference, scaled alike; the reference is used once.

    The weight decay (a float64 scalar, group ``norm="weight_decay"``) moves by ``wd ← max(0, wd − lr·g)``
    ("raw") or multiplicatively, ``wd ← wd · exp(−lr · clip(g / rms(g), ±3))``, with the bias-corrected
    running RMS of its gradients (state ``square_avg``). Its state ``step`` counts every step of this optimizer
    (the table's meta updates, which the bias correction counts), with or without a weight-decay gradient.
    The arithmetic of the weight decay is Python floats (doubles), as it always was.
    """

    def __init__(
        self,
        instance: torch.Tensor | None,
        per_class: torch.Tensor | None,
        weight_decay: torch.Tensor,
        *,
        per_group: torch.Tensor | None = None,
        lr: float,
        weight_decay_lr: float,
        scaling: Scaling = "normalized",
        max_rate: float | None = None,
        max_instance_rate: float | None = None,
    ) -> None:
        if scaling not in ("normalized", "raw"):
            raise ValueError(f"meta_lr_scaling must be 'normalized' or 'raw', got {scaling!r}.")
        tables = (("instance", instance, "rows", _tighter(max_rate, max_instance_rate)),
                  ("per_class", per_class, "lookups", max_rate), ("per_group", per_group, "lookups", max_rate))
        groups = [dict(params=[t], name=name, norm=norm, lr=lr, max_rate=bound)
                  for name, t, norm, bound in tables if t is not None]
        groups.append(
            dict(params=[weight_decay], name="weight_decay", norm="weight_decay", lr=weight_decay_lr)
        )
        super().__init__(groups, dict(scaling=scaling, max_rate=max_rate))
        self.state[weight_decay].update(
            step=torch.tensor(0, dtype=torch.int64), square_avg=torch.tensor(0.0, dtype=torch.float64)
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (p,) = group["params"]
            if group["norm"] == "weight_decay":
                self._weight_decay_step(p, group)
            elif p.grad is not None:
                self._table_step(p, group, self.state[p].pop("cap_reference", None))
        return loss

    @staticmethod
    def _table_step(table: torch.Tensor, group: dict, cap_reference: torch.Tensor | None = None) -> None:
        keys, values = table.grad._indices()[0], table.grad._values()
        rows = torch.unique(keys)
        g = torch.zeros_like(table).index_add_(0, keys, values)[rows]
        if group["scaling"] == "raw":
            scale = None
            step = group["lr"] * g
        else:
            scale = g.abs().mean() if group["norm"] == "rows" else values.abs().sum()
            if not torch.isfinite(scale) or scale <= 0:
                return
            step = group["lr"] * g / scale
        if cap_reference is not None and group["max_rate"] is not None:
            # (lr / s) · g, not lr · g / s: the rounding the recorded runs of this rule were made with
            factor = group["lr"] if scale is None else group["lr"] / scale
            step = factor * g
            ref = torch.zeros_like(table).index_add_(0, cap_reference._indices()[0], cap_reference._values())[rows]
            step = torch.where(table[rows] - step > group["max_rate"], step - factor * ref, step)
        table[rows] = (table[rows] - step).clamp_(min=0.0, max=group["max_rate"])

    def _weight_decay_step(self, wd: torch.Tensor, group: dict) -> None:
        state = self.state[wd]
        state["step"] += 1
        if wd.grad is None:
            return
        g, value = float(wd.grad), float(wd)
        if group["scaling"] == "raw":
            wd.fill_(max(0.0, value - group["lr"] * g))
            return
        square_avg = WD_BETA * float(state["square_avg"]) + (1 - WD_BETA) * g * g
        state["square_avg"].fill_(square_avg)
        rms = math.sqrt(square_avg / (1 - WD_BETA ** int(state["step"])))
        if rms > 0:
            wd.fill_(value * math.exp(-group["lr"] * max(-3.0, min(3.0, g / rms))))


def _tighter(a: float | None, b: float | None) -> float | None:
    """The smaller of two optional upper bounds (None: no bound)."""
    return b if a is None else a if b is None else min(a, b)


def _mean_per_key(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """For every entry, the mean of the batch's ``values`` that share its key (its class or group)."""
    num_keys = int(keys.max()) + 1
    sums = values.new_zeros(num_keys).index_add_(0, keys, values)
    counts = values.new_zeros(num_keys).index_add_(0, keys, torch.ones_like(values))
    return (sums / counts.clamp(min=1))[keys]


def _median_per_key(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """For every entry, the (lower) median of the batch's ``values`` that share its key (its class or group)."""
    out = torch.empty_like(values)
    for key in torch.unique(keys):
        rows = keys == key
        out[rows] = values[rows].median()
    return out


def _centered_per_key(values: torch.Tensor, keys: torch.Tensor, statistic: str = "mean") -> torch.Tensor:
    """``values`` minus the mean (or the median) of the values of the batch that share its key (its class or
    group)."""
    return values - (_median_per_key if statistic == "median" else _mean_per_key)(values, keys)


def _scaled_per_key(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``values`` divided by the mean |value| of the batch's values that share its key (a key whose values are all
    0 keeps them)."""
    mean = _mean_per_key(values.abs(), keys)
    return torch.where(mean > 0, values / mean.clamp(min=torch.finfo(values.dtype).tiny), values)


def _lookup_grad(table: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The gradient of ``Σ_i values_i · table[keys_i]``: one sparse entry per lookup (not coalesced)."""
    return torch.sparse_coo_tensor(keys[None], values, table.shape, check_invariants=False)


class RateTable:
    """Per-instance / per-class (or per-group) rate multipliers and the (optionally learned) weight decay.

    ``level``: ``"instance"``, ``"class"``, ``"group"`` (one rate per group of ``num_groups``: a data
    source, domain, task or language; the rates are the run's data-mixture weights) or ``"both"`` (instance
    × class, or instance × group when ``num_groups`` is given). The keyed table is :attr:`per_class` or
    :attr:`per_group` (the other is None); :attr:`keyed` is whichever is on. Every method that takes
    ``labels`` reads them as that table's keys: class ids, or group ids with a group table.

    ``meta_lr_scaling="raw"`` is the paper's update ``w ← max(0, w − meta_lr · ∂L_meta/∂w)``.
    ``"normalized"`` (the default) makes the step scale-free, whatever the learning rate, batch size or
    gradient scale: an instance rate's gradient is divided by the batch's mean absolute value, so
    ``meta_lr`` is the typical change of a rate per visit; a class (or group) rate moves by ``meta_lr`` times
    its share of the batch's total absolute meta-gradient (a class is visited every step, so the class table
    as a whole moves by at most ``meta_lr`` per step); the weight decay moves multiplicatively,
    ``wd ← wd · exp(−meta_wd_lr · g / rms(g))`` with a running RMS of its meta-gradient.
    The updates are :class:`RateSGD`'s (``self.optimizer``).

    With ``"both"`` the keyed rates follow the chain rule through ``e_i = w_i · w_key``; the instance rates step
    on ``∂L_meta/∂e_i`` itself with ``instance_gradient="effective"`` (the default: the chain rule's gradient
    divided by the keyed rate, a descent direction wherever it is > 0, so an example whose class or group
    rate reached 0 still learns its own rate) or on the chain rule's ``w_key · ∂L_meta/∂e_i`` with
    ``"chain_rule"``.

    ``center_instance=True`` steps each instance rate on that gradient minus its mean over the batch's examples
    of the same key (class or group), so the instance rates carry only preferences within a class or group;
    ``center="median"`` subtracts the (lower) median instead, the typical example's gradient, which the few
    large gradients of mislabelled examples do not pull.
    ``at_cap="relative"``: an instance rate whose step would take it past its cap steps instead on its gradient
    minus the (lower) median of the batch's gradients of its key, scaled as the step: relative to its typical
    classmate. The cap otherwise discards an up-step whole, tying at the cap every example that wanted to go
    up, however much less it helped than its classmates; an example below the cap keeps its own step, so the
    clean examples' pull back up is kept. ``"clamp"`` (the default) clamps.
    ``instance_scale="key"`` divides each instance rate's gradient by the mean |gradient| of the batch's examples
    of its key before the normalized step, so ``meta_lr`` is the typical step within every class or group.

    Rates are clamped to ``[0, max_rate]``; the instance rates to the tighter of ``max_rate`` and
    ``max_instance_rate`` (the trainer's default caps them at 1: an example's own rate can slow it down, and
    speed-ups are left to the class and group rates).

    ``instance_normalization="median"`` applies the instance rates divided by ``max(1, median of the table)``
    (:meth:`instance_divisor`): with a cap above 1 the rates keep their room relative to each other while the
    typical example trains at the optimizer's own learning rate. ``"none"`` (the default) applies the table.
    """

    def __init__(
        self,
        num_examples: int,
        num_classes: int,
        level: Level = "instance",
        *,
        num_groups: int | None = None,
        weight_decay: float = 0.0,
        learn_weight_decay: bool = False,
        meta_lr: float = 0.1,
        meta_wd_lr: float = 0.01,
        scaling: Scaling = "normalized",
        max_rate: float | None = None,
        max_instance_rate: float | None = None,
        instance_gradient: InstanceGradient = "effective",
        center_instance: bool = False,
        center: InstanceCenter = "mean",
        at_cap: InstanceAtCap = "clamp",
        instance_scale: InstanceScale = "batch",
        instance_normalization: InstanceNormalization = "none",
        device: torch.device | str = "cpu",
    ) -> None:
        _check_level(level, num_groups)
        if instance_gradient not in INSTANCE_GRADIENTS:
            raise ValueError(f"instance_gradient must be one of {INSTANCE_GRADIENTS}, got {instance_gradient!r}.")
        self.instance_gradient = instance_gradient
        self.center_instance = bool(center_instance)
        if center not in INSTANCE_CENTERS:
            raise ValueError(f"center must be one of {INSTANCE_CENTERS}, got {center!r}.")
        self.center = center
        if at_cap not in INSTANCE_AT_CAP:
            raise ValueError(f"at_cap must be one of {INSTANCE_AT_CAP}, got {at_cap!r}.")
        self.at_cap = at_cap
        if instance_scale not in INSTANCE_SCALES:
            raise ValueError(f"instance_scale must be one of {INSTANCE_SCALES}, got {instance_scale!r}.")
        self.instance_scale = instance_scale
        if instance_normalization not in INSTANCE_NORMALIZATIONS:
            raise ValueError(f"instance_normalization must be one of {INSTANCE_NORMALIZATIONS}, got "
                             f"{instance_normalization!r}.")
        self.instance_normalization = instance_normalization
        self.level = level
        self.meta_lr, self.meta_wd_lr = float(meta_lr), float(meta_wd_lr)
        self.scaling = scaling
        self.max_rate, self.max_instance_rate = max_rate, max_instance_rate
        self.learn_weight_decay = learn_weight_decay
        self.initial_weight_decay = float(weight_decay)
        keyed = level in ("class", "group", "both")
        self.instance = torch.ones(num_examples, device=device) if level in INSTANCE_LEVELS else None
        self.per_class = torch.ones(num_classes, device=device) if keyed and num_groups is None else None
        self.per_group = torch.ones(num_groups, device=device) if keyed and num_groups is not None else None
        # a float64 scalar on the CPU (read as a float; the weight decay's arithmetic is in doubles)
        self._weight_decay = torch.tensor(float(weight_decay), dtype=torch.float64)
        self.optimizer = RateSGD(
            self.instance,
            self.per_class,
            self._weight_decay,
            per_group=self.per_group,
            lr=self.meta_lr,
            weight_decay_lr=self.meta_wd_lr,
            scaling=scaling,
            max_rate=max_rate,
            max_instance_rate=max_instance_rate,
        )

    @property
    def keyed(self) -> torch.Tensor | None:
        """The table keyed per example by a class or group id (:attr:`per_class` or :attr:`per_group`)."""
        return self.per_class if self.per_class is not None else self.per_group

    # ------------------------------------------------------------------ reading
    @property
    def weight_decay(self) -> float:
        return float(self._weight_decay)

    @weight_decay.setter
    def weight_decay(self, value: float) -> None:
        self._weight_decay.fill_(float(value))

    @property
    def wd_sq_avg(self) -> float:
        """Running mean of the squared weight-decay meta-gradient ("normalized")."""
        return float(self.optimizer.state[self._weight_decay]["square_avg"])

    @property
    def num_updates(self) -> int:
        """Meta updates applied so far."""
        return int(self.optimizer.state[self._weight_decay]["step"])

    def _lookups(self, indices: torch.Tensor | None, labels: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """(table, keys on its device) of every level that is on: e_i is the product of ``table[keys_i]``
        (``labels``: the keys of the class or group table)."""
        out = []
        if self.instance is not None:
            if indices is None:
                raise ValueError("Per-instance rates need the dataset index of every training example.")
            out.append((self.instance, indices.to(self.instance.device)))
        if self.keyed is not None:
            out.append((self.keyed, labels.to(self.keyed.device)))
        return out

    def instance_divisor(self) -> float:
        """What the instance rates are divided by where they are applied: ``max(1, median)`` of the table with
        ``instance_normalization="median"``, else 1. The median is that of a clean majority, so the typical
        example trains at the optimizer's learning rate whatever room the cap leaves above 1."""
        if self.instance is None or self.instance_normalization == "none":
            return 1.0
        return max(1.0, float(self.instance.median()))

    def effective(self, indices: torch.Tensor | None, labels: torch.Tensor, divisor: float = 1.0) -> torch.Tensor:
        """e_i for a batch (on the labels' device; ``labels``: class ids, or group ids with a group table), the
        instance factor divided by ``divisor`` (:meth:`instance_divisor`, computed once per step by the caller)."""
        e = torch.ones(labels.shape[0], device=labels.device)
        for table, keys in self._lookups(indices, labels):
            e = e * table[keys].to(labels.device)
        return e if divisor == 1.0 else e / divisor

    def reset(self) -> None:
        """Back to 1 (the no-history ablation calls this before every meta step)."""
        if self.instance is not None:
            self.instance.fill_(1.0)
        if self.keyed is not None:
            self.keyed.fill_(1.0)

    # ------------------------------------------------------------------ updating
    def update(
        self,
        indices: torch.Tensor | None,
        labels: torch.Tensor,
        example_grad: torch.Tensor,
        weight_decay_grad: float | None = None,
        keyed_grad: torch.Tensor | None = None,
        probes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> bool:
        """Apply ``∂L_meta/∂e_i`` of a (global) batch to the tables (see the class docstring); True if applied.

        ``keyed_grad``: another ``∂L_meta/∂e_i`` for the class or group table to step on instead of
        ``example_grad`` (the one along the step's own meta gradient, when the instance rates step on the running
        average's). ``probes``: ``(indices, keys, ∂L_meta/∂e_j)`` of examples scored outside the step (the
        trainer's ``probe_batches``); they move the instance table only, in the same normalized step as the
        batch's examples. Returns False without touching anything if any gradient is not finite. The gradients
        stay in the tables' ``.grad`` until the next update (a rate table's is sparse: one entry per lookup).
        """
        example_grad = example_grad.detach().float()
        keyed_grad = example_grad if keyed_grad is None else keyed_grad.detach().float()
        probe_grad = None if probes is None or self.instance is None else probes[2].detach().float()
        finite = all(bool(torch.isfinite(g).all()) for g in (example_grad, keyed_grad, probe_grad)
                     if g is not None) and (weight_decay_grad is None or math.isfinite(weight_decay_grad))
        if not finite:
            return False
        self.optimizer.zero_grad(set_to_none=True)
        lookups = self._lookups(indices, labels)
        probe_lookups = self._lookups(probes[0], probes[1]) if probe_grad is not None else None

        divisor = self.instance_divisor()  # e_i = w_inst·w_key / divisor (instance_normalization="median")

        def chain(table: torch.Tensor, g: torch.Tensor, lookups: list) -> torch.Tensor:
            """∂e_i/∂table[keys_i] is the product of the other levels' rates (taken before any of them moves) over
            the instance divisor; the instance table of "both" steps on ∂L/∂e_i itself unless
            instance_gradient="chain_rule"."""
            if not (table is self.instance and self.instance_gradient == "effective"):
                for other, other_keys in lookups:
                    if other is not table:
                        g = g * other[other_keys].to(g.device)
                if divisor != 1.0:
                    g = g / divisor
            return g

        for i, (table, keys) in enumerate(lookups):
            g = chain(table, (example_grad if table is self.instance else keyed_grad).to(table.device), lookups)
            table_labels = labels
            if table is self.instance and probe_lookups is not None:  # the probes move the instance table only
                p_keys = probe_lookups[i][1]
                keys = torch.cat([keys, p_keys])
                g = torch.cat([g, chain(table, probe_grad.to(table.device), probe_lookups)])
                table_labels = torch.cat([labels, probes[1].to(labels.device)])
            if table is self.instance and self.center_instance:
                g = _centered_per_key(g, table_labels.to(g.device), self.center)
            if table is self.instance and self.instance_scale == "key":
                g = _scaled_per_key(g, table_labels.to(g.device))
            table.grad = _lookup_grad(table, keys, g)
            if table is self.instance and self.at_cap == "relative":
                self.optimizer.state[table]["cap_reference"] = _lookup_grad(
                    table, keys, _median_per_key(g, table_labels.to(g.device)))
        if self.learn_weight_decay and weight_decay_grad is not None:
            self._weight_decay.grad = torch.tensor(weight_decay_grad, dtype=torch.float64)
        self.optimizer.step()
        return True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that make a resumed run continue exactly: the tables (``instance``, ``per_class`` or
        ``per_group``: a group table has its own key, so that a class checkpoint is never loaded as group rates
        or the reverse), the weight decay, its optimizer state
        (``wd_sq_avg``: the running mean of its squared meta-gradient; ``num_updates``: the step count of
        the bias correction) and ``format_version``."""
        wd_state = self.optimizer.state[self._weight_decay]
        sd = {
            "format_version": torch.tensor(FORMAT_VERSION, dtype=torch.int64),
            "weight_decay": self._weight_decay.detach().clone(),
            "wd_sq_avg": wd_state["square_avg"].detach().clone(),
            "num_updates": wd_state["step"].detach().clone(),
        }
        if self.instance is not None:
            sd["instance"] = self.instance.detach().cpu().clone()
        if self.per_class is not None:
            sd["per_class"] = self.per_class.detach().cpu().clone()
        if self.per_group is not None:
            sd["per_group"] = self.per_group.detach().cpu().clone()
        return sd

    def load_state_dict(self, sd: Mapping[str, torch.Tensor], *, allow_resize: bool = False) -> None:
        """Restore :meth:`state_dict`, of this format or v0 (checkpoints written before the table had an
        optimizer: the same entries, without ``format_version``). A table of another size is an error
        unless ``allow_resize``, which keeps the overlapping rows (the first ``min(old, new)`` indices) and
        leaves the rest at 1."""
        version = int(sd["format_version"]) if "format_version" in sd else 0
        if version > FORMAT_VERSION:
            raise ValueError(
                f"The checkpoint's rate table has format version {version}; this hf_ddlr reads versions 0 to "
                f"{FORMAT_VERSION}. Resume with the hf_ddlr that wrote it."
            )
        for name in ("instance", "per_class", "per_group"):
            self._load_table(name, sd, allow_resize)
        self._weight_decay.fill_(float(sd["weight_decay"]))
        wd_state = self.optimizer.state[self._weight_decay]
        wd_state["square_avg"] = sd["wd_sq_avg"].detach().to(torch.float64, copy=True).cpu()
        wd_state["step"] = sd["num_updates"].detach().to(torch.int64, copy=True).cpu()

    def _load_table(self, name: str, sd: Mapping[str, torch.Tensor], allow_resize: bool) -> None:
        mine = getattr(self, name)
        if (mine is None) != (name not in sd):
            raise ValueError(
                f"Checkpoint rate table {name!r} is {'missing' if mine is not None else 'present'} but "
                f"lr_level={self.level!r} {'needs' if mine is not None else 'does not use'} it. Resume "
                "with the lr_level (and group_column) the checkpoint was trained with."
            )
        if mine is None:
            return
        src = sd[name].to(mine.device, mine.dtype)
        if src.shape == mine.shape:
            mine.copy_(src)
            return
        if not allow_resize:
            what = {"instance": "train set", "per_class": "label set", "per_group": "group column"}[name]
            raise ValueError(
                f"The checkpoint's {name} rate table has {src.numel()} entries but this {what} has "
                f"{mine.numel()}. Resume on the same data, or set resize_rates_on_resume=True to keep "
                "the overlapping rows."
            )
        n = min(src.numel(), mine.numel())
        mine.fill_(1.0)
        mine[:n] = src[:n]


def _check_level(level: str, num_groups: int | None) -> None:
    """Refuse a level that is not one of :data:`LEVELS`, and a number of groups that the level does not use."""
    if level not in LEVELS:
        raise ValueError(f"lr_level must be one of {', '.join(map(repr, LEVELS))}, got {level!r}.")
    if level == "group" and num_groups is None:
        raise ValueError("lr_level='group' needs num_groups (the number of distinct values of the group column).")
    if num_groups is not None and level not in ("group", "both"):
        raise ValueError(f"num_groups is given but lr_level={level!r} has no group table; use 'group' or 'both'.")
    if num_groups is not None and num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}.")
