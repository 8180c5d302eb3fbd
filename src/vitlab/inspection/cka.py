"""Representation similarity of two models, layer by layer: linear CKA (Raghu et al. 2021, "Do Vision Transformers
See Like Convolutional Neural Networks?"), in the minibatch form of Nguyen et al. 2021 with the unbiased HSIC.

For minibatches i of n images, with Gram matrices K_i = X_i X_iᵀ and L_i = Y_i Y_iᵀ of two layers' flattened
features, CKA = Σ HSIC₁(K_i, L_i) / √(Σ HSIC₁(K_i, K_i) · Σ HSIC₁(L_i, L_i)) (Nguyen et al. 2021, Eq. 3); HSIC₁
is the unbiased estimator of Song et al. 2012 (Eq. 4 of Nguyen et al.):
HSIC₁(K, L) = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)), K̃, L̃ with zero diagonals.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from vitlab.data.augment import normalize
from vitlab.errors import VitlabError
from vitlab.figures import new_figure, save_figure

MIN_BATCH = 4  # the unbiased HSIC divides by n − 3
# The units compared: a ViT's blocks, a ResNet's (or a hybrid's stem's) residual units, in forward order.
_LAYER = re.compile(r"^(?:(?:.*\.)?stages\.(?P<stage>\d+)\.blocks\.(?P<unit>\d+)|blocks\.(?P<block>\d+))$")


def gram(features: torch.Tensor) -> torch.Tensor:
    """The linear kernel X Xᵀ (n, n), in float64, of features (n, …) flattened per example."""
    x = features.detach().flatten(1).double()
    return x @ x.T


def hsic1(grams_a: torch.Tensor, grams_b: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of every pair of Gram matrices (A, n, n) × (B, n, n): (A, B)."""
    n = grams_a.shape[-1]
    if n < MIN_BATCH:
        raise VitlabError(f"the unbiased HSIC needs at least {MIN_BATCH} examples per minibatch, got {n}")
    k = grams_a * (1 - torch.eye(n, dtype=grams_a.dtype, device=grams_a.device))
    l = grams_b * (1 - torch.eye(n, dtype=grams_b.dtype, device=grams_b.device))  # noqa: E741 (the papers' L)
    trace = k.flatten(1) @ l.flatten(1).T  # tr(K̃ L̃) = Σ K̃ ⊙ L̃, both symmetric
    sums = k.sum(dim=(1, 2))[:, None] * l.sum(dim=(1, 2))[None, :] / ((n - 1) * (n - 2))
    rows = k.sum(dim=2) @ l.sum(dim=2).T * 2 / (n - 2)  # 1ᵀK̃L̃1 = (K̃1)ᵀ(L̃1)
    return (trace + sums - rows) / (n * (n - 3))


def cka_from_hsic(cross: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor) -> torch.Tensor:
    """CKA (A, B) from summed HSICs: cross (A, B) and each side's self-HSICs (A,), (B,)."""
    return cross / (self_a[:, None] * self_b[None, :]).clamp_min(torch.finfo(cross.dtype).tiny).sqrt()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature sets (n, …), (n, …) of the same n examples, as one minibatch."""
    k, l = gram(x)[None], gram(y)[None]  # noqa: E741
    return cka_from_hsic(hsic1(k, l), hsic1(k, k)[0], hsic1(l, l)[0]).item()


def representation_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers compared, in forward order, with short names: `block3` (a ViT block), `s2.u1` (a ResNet unit)."""
    found = []
    for name, module in model.named_modules():
        match = _LAYER.match(name)
        if match:
            short = (
                f"block{int(match['block']) + 1}" if match["block"] else f"s{int(match['stage']) + 1}.u{int(match['unit']) + 1}"
            )
            found.append((short, module))
    if not found:
        raise VitlabError(f"{type(model).__name__} has no ViT blocks or ResNet units to compare; give a vitlab classifier")
    return found


@torch.no_grad()
def layer_grams(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Gram matrices (layers + 2, n, n) of normalised `images`: the input, every representation layer, the logits."""
    grams = []
    hooks = [
        module.register_forward_hook(lambda m, i, out: grams.append(gram(out))) for _, module in representation_layers(model)
    ]
    try:
        logits = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([gram(images), *grams, gram(logits)])


@dataclass
class Similarity:
    """Layer × layer CKA of two models, and each model's per-layer CKA to its input and to its output (logits)."""

    names: tuple[str, str]
    layers_a: list[str]
    layers_b: list[str]
    cka: list[list[float]]  # [layer of A][layer of B]
    to_input_a: list[float]
    to_output_a: list[float]
    to_input_b: list[float]
    to_output_b: list[float]
    images: int


def compare_models(
    model_a: nn.Module,
    model_b: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    norms: Sequence[tuple[Sequence[float], Sequence[float]]] = (((0.5,), (0.5,)), ((0.5,), (0.5,))),
    names: tuple[str, str] = ("A", "B"),
) -> Similarity:
    """Minibatch linear CKA between every layer of two models on the same uint8 `images` (N, C, H, W).

    `norms` is each model's (mean, std); a last minibatch of fewer than 4 images is left out.
    """
    if batch_size < MIN_BATCH:
        raise VitlabError(f"--batch-size {batch_size}: the unbiased HSIC needs at least {MIN_BATCH} images per minibatch")
    models = (model_a, model_b)
    was_training = [m.training for m in models]
    sums: dict[str, torch.Tensor] = {}
    used = 0
    try:
        for m in models:
            m.eval()
        for batch in images.split(batch_size):
            if len(batch) < MIN_BATCH:
                break
            grams = [
                layer_grams(m, normalize(batch.to(next(m.parameters()).device), *norm)).cpu() for m, norm in zip(models, norms)
            ]
            for key, (i, j) in {"aa": (0, 0), "bb": (1, 1), "ab": (0, 1)}.items():
                sums[key] = sums.get(key, 0) + hsic1(grams[i], grams[j])
            used += len(batch)
    finally:
        for m, training in zip(models, was_training):
            m.train(training)
    if not used:
        raise VitlabError(f"{len(images)} image(s) make no minibatch of {MIN_BATCH}; use at least {MIN_BATCH} images")
    aa, bb = (cka_from_hsic(sums[k], sums[k].diag(), sums[k].diag()) for k in ("aa", "bb"))
    cross = cka_from_hsic(sums["ab"], sums["aa"].diag(), sums["bb"].diag())[1:-1, 1:-1]
    return Similarity(
        names=names,
        layers_a=[name for name, _ in representation_layers(model_a)],
        layers_b=[name for name, _ in representation_layers(model_b)],
        cka=cross.tolist(),
        to_input_a=aa[1:-1, 0].tolist(),
        to_output_a=aa[1:-1, -1].tolist(),
        to_input_b=bb[1:-1, 0].tolist(),
        to_output_b=bb[1:-1, -1].tolist(),
        images=used,
    )


def _ticks(ax_set, names: list[str]) -> None:
    """At most 12 labelled ticks along one axis."""
    step = max(1, len(names) // 12)
    ax_set(range(0, len(names), step), names[::step], fontsize=7)


def plot_similarity(result: Similarity, path: str | Path) -> Path:
    """PNG: the CKA heat map (Raghu et al. 2021, Fig. 1), then each model's per-layer CKA to its input and output."""
    fig = new_figure(13.0, 4.2)
    heat, *lines = fig.subplots(1, 3, width_ratios=[1.2, 1, 1])
    shown = heat.imshow(torch.tensor(result.cka).numpy(), origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto")
    _ticks(heat.set_yticks, result.layers_a)
    _ticks(heat.set_xticks, result.layers_b)
    heat.set_ylabel(f"{result.names[0]} layer")
    heat.set_xlabel(f"{result.names[1]} layer")
    heat.tick_params(axis="x", labelrotation=90)
    fig.colorbar(shown, ax=heat, label="linear CKA")
    heat.set_title(f"CKA on {result.images} images", fontsize=10)
    for ax, name, layers, to_input, to_output in zip(
        lines,
        result.names,
        (result.layers_a, result.layers_b),
        (result.to_input_a, result.to_input_b),
        (result.to_output_a, result.to_output_b),
    ):
        ax.plot(to_input, marker=".", label="to the input")
        ax.plot(to_output, marker=".", label="to the output (logits)")
        _ticks(ax.set_xticks, layers)
        ax.tick_params(axis="x", labelrotation=90)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("linear CKA")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    return save_figure(fig, path, lines)


def compare_runs(
    run_a: str | Path, run_b: str | Path, out: str | Path, num_images: int = 512, batch_size: int = 64, ema: bool = False
) -> tuple[Similarity, dict[str, Path]]:
    """CKA of two classification runs on the first test images of RUN_A's data: cka.json and cka.png in `out`."""
    from vitlab.inspection.images import dataset_images
    from vitlab.runs.checkpoint import write_text_atomic
    from vitlab.runs.stored import load_checkpoint_model

    (model_a, config_a), (model_b, config_b) = (load_checkpoint_model(run, ema) for run in (run_a, run_b))
    if config_a.data.image_size != config_b.data.image_size:
        raise VitlabError(
            f"{run_a} sees {config_a.data.image_size}-pixel images, {run_b} {config_b.data.image_size}-pixel ones; "
            "compare runs trained at the same data.image_size"
        )
    images = dataset_images(config_a.data, num_images)
    names = (Path(run_a).name, Path(run_b).name)
    if names[0] == names[1]:
        names = (str(run_a), str(run_b))
    norms = [(c.data.mean, c.data.std) for c in (config_a, config_b)]
    result = compare_models(model_a, model_b, images, batch_size, norms, names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "cka.json", json.dumps(asdict(result), indent=1))
    return result, {"json": out / "cka.json", "png": plot_similarity(result, out / "cka.png")}


def plot_heat_maps(results: Sequence[Similarity], path: str | Path, columns: int = 4) -> Path:
    """PNG: several CKA heat maps side by side (Raghu et al. 2021, Fig. 1 and 2), each titled `A × B`."""
    rows = -(-len(results) // columns)
    fig = new_figure(3.4 * min(columns, len(results)), 3.2 * rows)
    axes = fig.subplots(rows, min(columns, len(results)), squeeze=False)
    for ax in axes.flat[len(results) :]:
        ax.axis("off")
    for ax, result in zip(axes.flat, results):
        shown = ax.imshow(torch.tensor(result.cka).numpy(), origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto")
        ax.set_title(f"{result.names[0]} × {result.names[1]}", fontsize=9)
        ax.set_ylabel(f"{result.names[0]} layer", fontsize=8)
        ax.set_xlabel(f"{result.names[1]} layer", fontsize=8)
        _ticks(ax.set_yticks, result.layers_a)
        _ticks(ax.set_xticks, result.layers_b)
        ax.tick_params(axis="x", labelrotation=90)
    fig.colorbar(shown, ax=axes, label="linear CKA", shrink=0.8)
    return save_figure(fig, path)
