"""What a learned trajectory says, for people: key numbers (dict / Markdown table) and the paper's plots.

scikit-learn (AUROC) and matplotlib are imported inside the functions that use them: recording and
replaying a trajectory must not pay for them. Everything here reads the trajectory through its public
views only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .record import LRTrajectory

NEAR_ZERO = 0.05
PLOT_KINDS = ("class", "group", "instance", "weight_decay", "meta_loss")
MAX_GROUP_ROWS = 20  # groups listed one by one in the Markdown summary (else the 10 lowest and 10 highest rates)
PLOT_FILE_TEMPLATE = "lr_trajectory_{kind}.png"

_SUMMARY_LABELS = {
    "num_steps": "optimizer steps",
    "num_epochs": "epochs",
    "num_meta_steps": "meta steps",
    "final_learning_rate": "final model learning rate",
    "final_weight_decay": "final learned weight decay",
    "final_meta_loss": "final meta loss",
    "class_rate_mean": "final class rate: mean",
    "class_rate_min": "final class rate: min",
    "class_rate_max": "final class rate: max",
    "class_rate_near_zero_fraction": f"fraction of classes with rate < {NEAR_ZERO}",
    "group_rate_mean": "final group rate: mean",
    "group_rate_min": "final group rate: min",
    "group_rate_max": "final group rate: max",
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


def summary(trajectory: LRTrajectory) -> dict[str, Any]:
    """Key numbers of the learned schedule (all floats/ints/lists, JSON-serialisable)."""
    t = trajectory
    if t.num_steps:
        num_epochs = float(t.epochs.max())
    else:
        num_epochs = float(t.instance_epochs[-1]) if t.num_instance_snapshots else None
    s: dict[str, Any] = {
        "num_steps": t.num_steps,
        "num_epochs": num_epochs,
        "num_class_snapshots": t.num_class_snapshots,
        "num_instance_snapshots": t.num_instance_snapshots,
    }
    if t.num_steps:
        s["final_weight_decay"] = float(t.weight_decay[-1])
        s["final_learning_rate"] = float(t.learning_rate[-1])
        losses = [v for v in t.meta_loss.tolist() if not math.isnan(v)]
        s["num_meta_steps"] = len(losses)
        s["final_meta_loss"] = losses[-1] if losses else None
    s.update(_class_summary(t))
    s.update(_group_summary(t))
    s.update(_instance_summary(t))
    return s


def _class_summary(t: LRTrajectory) -> dict[str, Any]:
    rates = t.final_class_rates
    if rates is None:
        return {}
    order = torch.argsort(rates, stable=True).tolist()
    return {
        "class_rate_mean": float(rates.mean()),
        "class_rate_min": float(rates.min()),
        "class_rate_max": float(rates.max()),
        "class_rate_near_zero_fraction": float((rates < NEAR_ZERO).float().mean()),
        "lowest_classes": [[t.class_name(c), float(rates[c])] for c in order[:5]],
        "highest_classes": [[t.class_name(c), float(rates[c])] for c in reversed(order[-5:])],
    }


def _group_summary(t: LRTrajectory) -> dict[str, Any]:
    """The final group rates and the data mixture they make: a group's share of the weighted examples,
    ``n_g · r_g / Σ_h n_h · r_h`` (``n_g``: its training examples), next to its share of the examples."""
    rates = t.final_group_rates
    if rates is None:
        return {}
    sizes = torch.tensor((t.groups or {}).get("sizes") or [1] * rates.numel(), dtype=torch.float64)
    mass = sizes * rates.double()
    mixture = mass / mass.sum() if float(mass.sum()) > 0 else torch.zeros_like(mass)
    share = sizes / sizes.sum()
    return {
        "group_rate_mean": float(rates.mean()),
        "group_rate_min": float(rates.min()),
        "group_rate_max": float(rates.max()),
        "groups": [[t.group_name(g), int(sizes[g]), float(rates[g]), float(share[g]), float(mixture[g])]
                   for g in range(rates.numel())],
    }


def _group_table(trajectory: LRTrajectory, groups: list[list[Any]]) -> str:
    """The Markdown table of the final group rates and mixture weights (the 10 lowest and 10 highest rates
    when there are more than :data:`MAX_GROUP_ROWS` groups)."""
    rows = groups
    if len(rows) > MAX_GROUP_ROWS:
        by_rate = sorted(rows, key=lambda r: r[2])
        rows = by_rate[:10] + by_rate[-10:]
    column = (trajectory.groups or {}).get("column")
    title = f"**Learned group rates (data-mixture weights) by `{column}`:**" if column else "**Learned group rates:**"
    lines = [f"\n{title}\n", "| group | examples | rate | share of examples | mixture weight |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {n} | {rate:.4g} | {share:.3g} | {mix:.3g} |" for name, n, rate, share, mix in rows]
    return "\n".join(lines)


def _instance_summary(t: LRTrajectory) -> dict[str, Any]:
    inst = t.final_instance_rates
    if inst is None or not bool((~torch.isnan(inst)).any()):
        return {}
    known = ~torch.isnan(inst)
    vals = inst[known]
    s = {
        "instance_rate_mean": float(vals.mean()),
        "instance_rate_std": float(vals.std()) if vals.numel() > 1 else 0.0,
        "instance_rate_min": float(vals.min()),
        "instance_rate_max": float(vals.max()),
        "instance_rate_near_zero_fraction": float((vals < NEAR_ZERO).float().mean()),
    }
    if t.noise_mask is not None and t.noise_mask.numel() == inst.numel():
        from sklearn.metrics import roc_auc_score

        noisy = t.noise_mask[known]
        s["noise_fraction"] = float(noisy.float().mean())
        if bool(noisy.any()) and bool((~noisy).any()):
            s["instance_rate_mean_clean"] = float(vals[~noisy].mean())
            s["instance_rate_mean_noisy"] = float(vals[noisy].mean())
            # clean examples are the positives: a good schedule gives them the higher rates
            s["auroc_clean_vs_noisy"] = float(roc_auc_score((~noisy).numpy(), vals.numpy()))
    return s


def summary_markdown(trajectory: LRTrajectory) -> str:
    """:func:`summary` as a Markdown table, plus the lowest/highest classes."""
    s = summary(trajectory)
    labels = dict(_SUMMARY_LABELS)
    if not trajectory.config.get("learn_weight_decay", True):
        labels["final_weight_decay"] = "weight decay (fixed, not learned)"
    lines = ["| quantity | value |", "|---|---|"]
    for key, label in labels.items():
        if key in s and s[key] is not None:
            v = s[key]
            lines.append(f"| {label} | {v:.4g} |" if isinstance(v, float) else f"| {label} | {v} |")
    for key, title in (("lowest_classes", "Lowest"), ("highest_classes", "Highest")):
        if key in s:
            items = ", ".join(f"{name} ({rate:.3g})" for name, rate in s[key])
            lines.append(f"\n**{title} final class rates:** {items}")
    if "groups" in s:
        lines.append(_group_table(trajectory, s["groups"]))
    return "\n".join(lines) + "\n"


def available_plots(trajectory: LRTrajectory) -> list[str]:
    """The plot kinds ``trajectory`` has data for."""
    t = trajectory
    kinds = []
    if t.num_class_snapshots:
        kinds.append("class")
    if t.num_group_snapshots:
        kinds.append("group")
    if t.num_instance_snapshots:
        kinds.append("instance")
    if t.num_steps:
        kinds.append("weight_decay")
        if any(not math.isnan(v) for v in t.meta_loss.tolist()):
            kinds.append("meta_loss")
    return kinds


def plot(trajectory: LRTrajectory, kind: str = "all", *, figsize: tuple[float, float] = (6.4, 4.0)) -> dict[str, Figure]:
    """The figures of :meth:`LRTrajectory.plot`, on Agg canvases not registered with pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    available = available_plots(trajectory)
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
        _PLOTTERS[k](trajectory, ax)
        fig.tight_layout()
        figures[k] = fig
    return figures


def save_plots(trajectory: LRTrajectory, directory: str | os.PathLike, kind: str = "all", *, dpi: int = 100) -> list[str]:
    """Write the plots as ``lr_trajectory_{kind}.png`` into ``directory``; return the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, fig in plot(trajectory, kind).items():
        path = directory / PLOT_FILE_TEMPLATE.format(kind=k)
        fig.savefig(path, dpi=dpi, format="png")
        paths.append(str(path))
    return paths


def _plot_keyed(ax: Any, x: np.ndarray, table: np.ndarray, name_of: Any, what: str, title: str) -> None:
    """Rates of a keyed table (classes or groups) over epochs: one labelled line per key when there are at most
    10, else all in grey with the 3 lowest and 3 highest final rates labelled; the mean in bold."""
    C = table.shape[1]
    if C <= 10:
        for c in range(C):
            ax.plot(x, table[:, c], linewidth=1.2, alpha=0.8, label=name_of(c))
    else:
        ax.plot(x, table, color="tab:gray", linewidth=0.5, alpha=0.35)
        order = np.argsort(table[-1], kind="stable")
        for c in [*order[:3], *order[::-1][:3]]:
            ax.plot(x, table[:, c], linewidth=1.2, label=name_of(int(c)))
    ax.plot(x, table.mean(1), color="black", linewidth=2.5, label=f"mean over {what}es" if what == "class"
            else f"mean over {what}s")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{what} learning-rate multiplier")
    ax.set_title(title + ("" if C <= 10 else "; lowest and highest 3 labelled"))
    ax.legend(loc="best", fontsize="small", ncol=2 if C > 5 else 1)


def _plot_class(t: LRTrajectory, ax: Any) -> None:
    table = t.class_rates.numpy()
    _plot_keyed(ax, t.class_epochs.numpy(), table, t.class_name, "class", f"Per-class rates ({table.shape[1]} classes)")


def _plot_group(t: LRTrajectory, ax: Any) -> None:
    table = t.group_rates.numpy()
    column = (t.groups or {}).get("column")
    title = f"Group rates (data-mixture weights) by {column}" if column else f"Group rates ({table.shape[1]} groups)"
    _plot_keyed(ax, t.group_epochs.numpy(), table, t.group_name, "group", title)


def _band(vals: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mean ± std per row, kept within the row's range (rates are >= 0, and capped rates <= their cap)."""
    return np.maximum(mean - std, np.nanmin(vals, 1)), np.minimum(mean + std, np.nanmax(vals, 1))


def _plot_instance(t: LRTrajectory, ax: Any) -> None:
    x = t.instance_epochs.numpy()
    table = t.instance_rates.numpy()
    if t.noise_mask is not None and t.noise_mask.numel() == table.shape[1] and bool(t.noise_mask.any()):
        groups = [("clean", ~t.noise_mask.numpy(), "tab:blue"), ("noisy", t.noise_mask.numpy(), "tab:red")]
        for name, mask, color in groups:
            if mask.any():
                vals = table[:, mask]
                mean, std = np.nanmean(vals, 1), np.nanstd(vals, 1)
                ax.plot(x, mean, color=color, linewidth=2, label=f"{name} ({int(mask.sum())})")
                ax.fill_between(x, *_band(vals, mean, std), color=color, alpha=0.2)
        ax.set_title("Per-instance rates: clean vs noisy labels (mean ± std)")
    else:
        mean, std = np.nanmean(table, 1), np.nanstd(table, 1)
        q10, q90 = np.nanquantile(table, 0.1, axis=1), np.nanquantile(table, 0.9, axis=1)
        ax.plot(x, mean, color="tab:blue", linewidth=2, label="mean")
        ax.fill_between(x, *_band(table, mean, std), color="tab:blue", alpha=0.2, label="± std")
        ax.plot(x, q10, color="tab:blue", linestyle="--", linewidth=1, label="10 % / 90 % quantiles")
        ax.plot(x, q90, color="tab:blue", linestyle="--", linewidth=1)
        ax.set_title(f"Per-instance rates ({table.shape[1]} examples)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("instance learning-rate multiplier")
    ax.legend(loc="best")


def _plot_weight_decay(t: LRTrajectory, ax: Any) -> None:
    x = t.steps.numpy()
    learned = bool(t.config.get("learn_weight_decay", True))
    wd_label = "learned weight decay" if learned else "weight decay (fixed)"
    h1 = ax.plot(x, t.weight_decay.numpy(), color="tab:green", linewidth=1.5, label=wd_label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("weight decay", color="tab:green")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax2 = ax.twinx()
    h2 = ax2.plot(x, t.learning_rate.numpy(), color="tab:gray", linewidth=1, linestyle="--", label="model LR")
    ax2.set_ylabel("model learning rate", color="tab:gray")
    ax.legend(h1 + h2, [h.get_label() for h in h1 + h2], loc="best")
    ax.set_title(("Learned weight decay" if learned else "Model learning rate (weight decay fixed)")
                 + " over training")


def _plot_meta_loss(t: LRTrajectory, ax: Any) -> None:
    x = t.steps.numpy()
    y = t.meta_loss.numpy()
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


_PLOTTERS = {"class": _plot_class, "group": _plot_group, "instance": _plot_instance, "weight_decay": _plot_weight_decay,
             "meta_loss": _plot_meta_loss}
