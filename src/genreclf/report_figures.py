"""The report's PNG figures, drawn with matplotlib's Agg canvas (no pyplot, no global state)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from genreclf.metrics import SUMMARY, average_precision

if TYPE_CHECKING:
    from genreclf.report import Run

DPI = 120


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def pr_curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (recall, precision) at every distinct threshold, from (0, 1); AP is its steps-pre area."""
    order = np.argsort(-np.asarray(y_score, dtype=np.float64), kind="stable")
    y, s = np.asarray(y_true, dtype=bool)[order], np.asarray(y_score)[order]
    last = np.r_[s[1:] != s[:-1], True]  # one point per tie group, as sklearn
    tp = np.cumsum(y)[last]
    predicted = np.arange(1, len(y) + 1)[last]
    return np.r_[0.0, tp / max(int(y.sum()), 1)], np.r_[1.0, tp / predicted]


def metrics_figure(summaries: list[dict], path: Path) -> Path:
    """Draw each summary metric per run with its 95% interval and chance level; return the path."""
    fig = Figure(figsize=(3.2 * len(SUMMARY), 0.6 * len(summaries) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(SUMMARY), sharey=True)
    labels = [f"{s['name']} ({s['evaluated_split']})" for s in summaries]
    y = np.arange(len(summaries))
    for ax, metric in zip(axes, SUMMARY):
        for i, s in enumerate(summaries):
            m = s["metrics"][metric]
            value, low, high = (np.nan if v is None else v for v in (m["value"], m["low"], m["high"]))
            ax.errorbar([value], [i], xerr=[[value - low], [high - value]], fmt="o", color=f"C{i}", capsize=4)
            if m["chance"] is not None:
                ax.plot([m["chance"]], [i], marker="|", markersize=14, color="0.4", label="chance" if i == 0 else None)
        ax.set_title(metric)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels)
    axes[0].set_ylim(len(summaries) - 0.5, -0.5)
    axes[0].legend(loc="lower right", fontsize="small")
    fig.suptitle("Test metrics with 95% BCa bootstrap intervals (grey: prior-only chance)")
    return _save(fig, path)


def per_genre_figure(rows: list[dict], run_names: list[str], path: Path) -> Path:
    """Draw per-genre AP bars (genres by support, runs side by side) with each genre's chance; return the path."""
    n = max(len(rows), 1)
    fig = Figure(figsize=(8, 0.32 * n * max(1, len(run_names)) ** 0.5 + 1.5), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    height = 0.8 / max(len(run_names), 1)
    for k, name in enumerate(run_names):
        ap = [np.nan if r["ap"][name] is None else r["ap"][name] for r in rows]
        ax.barh(y - 0.4 + height * (k + 0.5), ap, height=height, color=f"C{k}", label=name)
    ax.plot([r["prevalence"] for r in rows], y, "|", color="k", markersize=10, label="chance (prevalence)")
    ax.set_yticks(y, [f"{r['genre']} ({r['support']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(f"Per-genre AP, {len(rows)} most frequent genres (test support in brackets)")
    return _save(fig, path)


def pr_figure(group: list[Run], genres: list[str], path: Path) -> Path:
    """Draw precision-recall curves, one subplot per genre, every run of the group on each; return the path."""
    cols = min(len(genres), 2)
    rows = -(-len(genres) // cols)
    fig = Figure(figsize=(4.6 * cols, 4.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    names = group[0].predictions["genres"]
    y_true = group[0].predictions["y_true"]
    for ax, genre in zip(axes, genres):
        g = names.index(genre)
        y = y_true[:, g]
        for k, run in enumerate(group):
            s = run.predictions["scores"][:, g]
            recall, precision = pr_curve(y, s)
            ax.plot(
                recall,
                precision,
                drawstyle="steps-pre",
                color=f"C{k}",
                label=f"{run.name} (AP {average_precision(y, s):.3f})",
            )
        ax.axhline(y.mean(), color="0.5", linestyle=":", label=f"chance ({y.mean():.3f})")
        ax.set(
            title=f"{genre} ({int(y.sum())} of {len(y)} tracks)",
            xlabel="recall",
            ylabel="precision",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        ax.legend(loc="upper right", fontsize="small")
    for ax in axes[len(genres) :]:
        ax.set_visible(False)
    fig.suptitle(f"Precision-recall on the {group[0].split} test split")
    return _save(fig, path)


def learning_curves_figure(curves: dict[str, pd.DataFrame], path: Path) -> Path:
    """Draw training (solid) and validation (dashed) loss per epoch of every run; return the path."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for k, (name, curve) in enumerate(curves.items()):
        epochs = curve["epoch"] + 1
        ax.plot(epochs, curve["train_loss"], "-o", color=f"C{k}", markersize=3, label=f"{name} train")
        ax.plot(epochs, curve["val_loss"], "--s", color=f"C{k}", markersize=3, label=f"{name} validation")
    ax.set(xlabel="epoch", ylabel="loss", title="Learning curves")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
