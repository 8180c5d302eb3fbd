"""The stability map's figures: (A) final loss against LR, (B) LR sensitivity against size, (C) a size × LR heat map of
the excess loss, (D) the peak attention logit against size with a fitted power law extrapolated to a threshold (the
"predict the instability before it happens" figure of Wortsman et al. 2023, arXiv 2309.14322)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
from matplotlib.patches import Rectangle

from vitlab.figures import new_figure, save_figure

EXTRAPOLATE = 100  # figure D draws each fitted trend up to this many times the largest size


def capped(cell: dict) -> float:
    """The loss a cell counts with: min(ℓ, ℓ₀), ℓ₀ when it diverged."""
    loss = cell["loss"]
    return cell["l0"] if cell["diverged"] or loss is None or not math.isfinite(loss) else min(loss, cell["l0"])


def plot_loss(path: Path, cells: list[dict], interventions: list[str]) -> Path:
    """(A) final test loss (a diverged cell at its ℓ₀) against LR, a panel per intervention, a line per size and block."""
    fig = new_figure(5 * len(interventions), 4)
    axes = fig.subplots(1, len(interventions), squeeze=False)[0]
    for ax, intervention in zip(axes, interventions):
        lines = {}
        for c in cells:
            if c["intervention"] == intervention:
                lines.setdefault(f"{c['size']} {c['block']}", {}).setdefault(c["lr"], []).append(capped(c))
        for label, points in lines.items():
            lrs = sorted(points)
            ax.plot(lrs, [statistics.fmean(points[lr]) for lr in lrs], marker="o", lw=0.9, label=label)
        ax.set(title=intervention, xlabel="peak learning rate", ylabel="final test loss, min(ℓ, ℓ₀)", xscale="log")
        if lines:
            ax.legend(fontsize=7)
    return save_figure(fig, path, axes)


def plot_sensitivity(path: Path, summaries: list[dict]) -> Path:
    """(B) LR sensitivity against parameter count, a line per intervention and block."""
    fig = new_figure(6, 4)
    ax = fig.subplots()
    lines = {}
    for s in summaries:
        if s["num_parameters"]:
            lines.setdefault(f"{s['intervention']} {s['block']}", []).append((s["num_parameters"], s["sensitivity"]))
    for label, points in lines.items():
        ax.plot(*zip(*sorted(points)), marker="o", lw=0.9, label=label)
    ax.set(xlabel="parameters", ylabel="LR sensitivity", xscale="log", title="LR sensitivity against size")
    if lines:
        ax.legend(fontsize=7)
    return save_figure(fig, path, [ax])


def plot_heatmap(path: Path, cells: list[dict], blocks: list[str], sizes: list[str], interventions: list[str]) -> Path:
    """(C) min(ℓ, ℓ₀) − ℓ* over size × LR (mean over seeds), a panel per block × intervention; diverged cells hatched."""
    lrs = sorted({c["lr"] for c in cells})
    fig = new_figure(max(3.0, 0.6 * len(lrs) + 1.5) * len(interventions), max(2.5, 0.5 * len(sizes) + 1.5) * len(blocks))
    axes = fig.subplots(len(blocks), len(interventions), squeeze=False)
    top = max((c["excess_loss"] for c in cells), default=1.0) or 1.0
    for (row, block), (col, intervention) in ((r, c) for r in enumerate(blocks) for c in enumerate(interventions)):
        ax = axes[row, col]
        grid = np.full((len(sizes), len(lrs)), np.nan)
        for i, size in enumerate(sizes):
            for j, lr in enumerate(lrs):
                mine = [
                    c for c in cells if (c["block"], c["intervention"], c["size"], c["lr"]) == (block, intervention, size, lr)
                ]
                if mine:
                    grid[i, j] = statistics.fmean(c["excess_loss"] for c in mine)
                if any(c["diverged"] for c in mine):
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="black", lw=0))
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=top, origin="lower", aspect="auto")
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], rotation=45, fontsize=7)
        ax.set_yticks(range(len(sizes)), sizes, fontsize=7)
        ax.set(title=f"{block}, {intervention}", xlabel="peak learning rate", ylabel="size")
    fig.colorbar(image, ax=axes, label="min(ℓ, ℓ₀) − ℓ*  (hatched: diverged)")
    return save_figure(fig, path)


def fit_logit_trend(cells: list[dict], threshold: float) -> list[dict]:
    """Per block × intervention, a least-squares line of log(peak attention logit) on log(parameters) over the sizes
    (mean over seeds) and the parameter count where it reaches `threshold` (None where the logit does not grow)."""
    groups = {}
    for c in cells:
        if c["num_parameters"] and c["max_attention_logit"] and c["max_attention_logit"] > 0:
            groups.setdefault((c["block"], c["intervention"]), {}).setdefault(c["num_parameters"], []).append(
                c["max_attention_logit"]
            )
    fits = []
    for (block, intervention), points in groups.items():
        if len(points) < 2:
            continue
        x = np.log([float(n) for n in sorted(points)])
        y = np.log([statistics.fmean(points[n]) for n in sorted(points)])
        slope, intercept = np.polyfit(x, y, 1)
        at = math.exp((math.log(threshold) - intercept) / slope) if slope > 0 else None
        fits.append(
            {
                "block": block,
                "intervention": intervention,
                "slope": float(slope),
                "intercept": float(intercept),
                "params_at_threshold": at,
            }
        )
    return fits


def plot_logit_trend(path: Path, cells: list[dict], fits: list[dict], lr: float, threshold: float) -> Path:
    """(D) peak attention logit against parameters of the `cells` of one LR, with each fitted power law extrapolated
    to `threshold` (drawn up to EXTRAPOLATE × the largest size; map.md gives where each fit reaches it)."""
    fig = new_figure(6, 4)
    ax = fig.subplots()
    for fit in fits:
        mine = [
            c
            for c in cells
            if (c["block"], c["intervention"]) == (fit["block"], fit["intervention"]) and c["max_attention_logit"]
        ]
        line = ax.plot(
            [c["num_parameters"] for c in mine],
            [c["max_attention_logit"] for c in mine],
            "o",
            label=f"{fit['intervention']} {fit['block']}",
        )[0]
        low, high = min(c["num_parameters"] for c in mine), max(c["num_parameters"] for c in mine)
        x = np.geomspace(low, min(fit["params_at_threshold"] or math.inf, EXTRAPOLATE * high), 50)
        ax.plot(x, np.exp(fit["intercept"]) * x ** fit["slope"], "--", lw=0.8, color=line.get_color())
    ax.axhline(threshold, color="red", lw=0.8, ls=":", label=f"threshold {threshold:g}")
    ax.set(
        xlabel="parameters",
        ylabel="peak attention logit",
        xscale="log",
        yscale="log",
        title=f"attention-logit growth at LR {lr:g}, extrapolated",
    )
    ax.legend(fontsize=7)
    return save_figure(fig, path, [ax])
