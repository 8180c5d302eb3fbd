"""PNG figures of a classifier's results: the confusion matrix of a test set, and images labelled with predictions."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from vitlab.errors import VitlabError
from vitlab.figures import image_array, new_figure, save_figure

_NAMED_TICKS = 30  # more classes than this: tick labels would overlap, so indices only
_COUNTS_SHOWN = 12  # more classes than this: cells too small to print their counts in


def output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Create the folder that results go to; a one-line error naming `flag` when it is a file or cannot be made or written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        file = next(p for p in (path, *path.parents) if os.path.lexists(p) and not p.is_dir())
        raise VitlabError(f"{flag} {path}: {file} is a file, not a folder; give another {flag} (or move the file away)") from None
    except OSError as exc:
        raise VitlabError(f"{flag} {path} cannot be created ({exc.filename}: {exc.strerror}); give another {flag}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise VitlabError(f"{flag} {path} is not writable; fix its permissions or give another {flag}")
    return path


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Counts (true class × predicted class) of the top-1 predictions."""
    return multiclass_confusion_matrix(logits.float().cpu().argmax(-1), labels.cpu(), num_classes=logits.shape[1])


def save_confusion_matrix(path: str | Path, logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> Path:
    """Draw the confusion matrix as a PNG: each row (true class) as fractions of that class, counts in the cells."""
    counts = confusion_matrix(logits, labels)
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(classes)
    side = min(4 + 0.35 * n, 24)
    fig = new_figure(side, side)
    ax = fig.add_subplot()
    shown = ax.imshow(fractions.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="fraction of the true class")
    accuracy = counts.diag().sum().item() / max(counts.sum().item(), 1)
    ax.set_title(f"confusion matrix, {counts.sum().item()} images, acc@1 {100 * accuracy:.2f} %")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= _NAMED_TICKS:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
    if n <= _COUNTS_SHOWN:
        for (row, col), count in zip(((r, c) for r in range(n) for c in range(n)), counts.flatten().tolist()):
            colour = "white" if fractions[row, col] > 0.5 else "black"
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8, color=colour)
    return save_figure(fig, path)


def save_prediction_grid(path: str | Path, images: torch.Tensor, titles: list[str], columns: int = 8) -> Path:
    """uint8 images (N, C, H, W) in a grid, each under its title (e.g. the top prediction), as a PNG."""
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    fig = new_figure(2.2 * columns, 2.5 * rows)
    for i, (image, title) in enumerate(zip(images, titles)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(image_array(image), cmap="gray")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    return save_figure(fig, path)
