"""`vitlab stability`: the same data, seed and schedule for several variants, drawn like Fig. 1 of the paper.

The input-gradient penalty (`train.grad_penalty`) is vitlab's reading of a term the paper names but never
defines: its Fig. 1b credits "the LayerNorm and gradient penalty", its text describes no penalty, and its
code has none. vitlab reads it as double backpropagation (Drucker & LeCun 1992), λ·mean over images of the
squared norm of the loss's gradient with respect to the image (`vitlab.train.classify.penalties`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vitlab.config import StabilityConfig
from vitlab.errors import VitlabError
from vitlab.figures import log_y, new_figure, plot_curve, save_figure
from vitlab.train.classify import train
from vitlab.train.run_log import read_csv
from vitlab.train.scaffold import TrainingDiverged


def first_step(steps: list[float], flags: list[bool]) -> int | None:
    """The step of the first True flag, or None."""
    return next((int(s) for s, f in zip(steps, flags) if f), None)


def summarise(curves: dict[str, list[float]], threshold: float) -> dict:
    """Divergence facts of one variant from its per-step log."""
    steps = curves["step"]
    blown = [not math.isfinite(v) or v > threshold for v in curves["max_logit"]]
    nonfinite = [s > 0 for s in curves["skipped"]]
    finite = lambda key: [v for v in curves.get(key, []) if math.isfinite(v)]  # noqa: E731
    attention_keys = [key for key in curves if key.startswith("attn_logit_max/")]
    attention = [v for key in attention_keys for v in finite(key)]
    attention_blown = [any(curves[k][i] > threshold for k in attention_keys) for i in range(len(steps))]
    return {
        "first_step_over_threshold": first_step(steps, blown),
        "first_step_nonfinite": first_step(steps, nonfinite),
        "first_step_attention_logit_over_threshold": first_step(steps, attention_blown),
        "max_logit": max(finite("max_logit"), default=None),
        "max_abs_grad": max(finite("max_abs_grad"), default=None),
        "max_grad_norm": max(finite("grad_norm"), default=None),
        "max_attention_logit": max(attention, default=None),
    }


def run_study(config: StabilityConfig, progress: bool = True) -> dict:
    """Train every variant, write stability.json and stability.png, return the per-variant summary."""
    root = Path(config.out_dir) / config.name
    summary = {}
    for variant in config.variants:
        run_config = config.variant_config(variant)
        run_dir = Path(run_config.out_dir) / run_config.name
        if run_dir.exists():
            raise VitlabError(f"{run_dir} exists already; remove it or give the study another name (--set name=…)")
        stopped = None
        try:
            results = train(run_config, progress=progress)
            accuracy = results["test"]["acc1"]
        except TrainingDiverged as exc:
            stopped, accuracy = str(exc), None
        facts = summarise(read_csv(run_dir / "steps.csv"), config.threshold)
        diverged = stopped is not None or facts["first_step_over_threshold"] is not None
        summary[variant] = {"diverged": diverged, "stopped": stopped, "final_acc1": accuracy, **facts}
    (root / "stability.json").write_text(json.dumps(summary, indent=2))
    plot_study(root, list(config.variants), config.threshold)
    return summary


def plot_study(root: Path, variants: list[str], threshold: float) -> Path:
    """Fig. 1: max logit and max |gradient| per iteration (clipped at the threshold), attention entropy."""
    fig = new_figure(20, 4)
    axes = fig.subplots(1, 4)
    clip = lambda values: [threshold if not math.isfinite(v) or v > threshold else v for v in values]  # noqa: E731
    for variant in variants:
        curves = read_csv(root / variant / "steps.csv")
        steps = curves["step"]
        per_layer = lambda prefix, reduce: [  # noqa: E731
            reduce(curves[k][i] for k in curves if k.startswith(prefix)) for i in range(len(steps))
        ]
        plot_curve(axes[0], steps, clip(curves["max_logit"]), lw=0.9, label=variant)
        plot_curve(axes[1], steps, clip(curves["max_abs_grad"]), lw=0.9, label=variant)
        if any(k.startswith("attn_logit_max/") for k in curves):
            plot_curve(axes[2], steps, clip(per_layer("attn_logit_max/", max)), lw=0.9, label=variant)
            plot_curve(axes[3], steps, per_layer("attn_entropy/", min), lw=0.9, label=variant)
    titles = (
        f"max logit (values > {threshold:g} drawn at {threshold:g})",
        "max |gradient|",
        "max attention logit over layers",
        "lowest attention entropy over layers (nats)",
    )
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="iteration")
    for ax in axes[:3]:
        log_y(ax)
    axes[0].legend(fontsize=8)
    return save_figure(fig, root / "stability.png", axes)
