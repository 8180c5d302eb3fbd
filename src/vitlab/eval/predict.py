"""`vitlab predict`: the top-k classes of image files under a run's model, as a CSV and a labelled image grid."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitlab.data.augment import normalize
from vitlab.data.images import IMAGE_SUFFIXES, UnusableImage, decode_images, image_files
from vitlab.errors import VitlabError
from vitlab.eval.figures import output_folder, save_prediction_grid
from vitlab.runs.checkpoint import write_text_atomic
from vitlab.runtime.precision import autocast

GRID_IMAGES = 64  # images drawn in the grid at most; the CSV lists all
SHOWN = 5  # unreadable files named at most


@dataclass
class Predictions:
    """Image files, their top-k class indices and probabilities (N, k), the class names, and the files skipped as unreadable."""

    files: list[Path]
    indices: torch.Tensor
    probabilities: torch.Tensor
    classes: list[str]
    skipped: list[str] = field(default_factory=list)


def skipped_note(skipped: list[str]) -> str:
    """`skipped N unreadable image(s): ` and the first few, each with why."""
    shown = ", ".join(skipped[:SHOWN]) + (", ..." if len(skipped) > SHOWN else "")
    return f"skipped {len(skipped)} unreadable image(s): {shown}"


@torch.no_grad()
def predict_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    device: torch.device,
    precision: str,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Class probabilities (N, classes) of uint8 images, normalised by the run's `mean` and `std`."""
    model.eval().to(device)
    probabilities = []
    for batch in images.split(batch_size):
        with autocast(device, precision):
            logits = model(normalize(batch.to(device), mean, std))
        probabilities.append(logits.float().softmax(-1).cpu())
    return torch.cat(probabilities)


def write_csv(path: Path, predictions: Predictions) -> Path:
    """One row per image: the file, then class and probability for each of the top k (written atomically, folder made)."""
    k = predictions.indices.shape[1]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["file"] + [f"{name}_{rank}" for rank in range(1, k + 1) for name in ("class", "probability")])
    for file, indices, probs in zip(predictions.files, predictions.indices.tolist(), predictions.probabilities.tolist()):
        cells = [value for i, p in zip(indices, probs) for value in (predictions.classes[i], f"{p:.6f}")]
        writer.writerow([str(file), *cells])
    write_text_atomic(output_folder(path.parent) / path.name, text.getvalue())
    return path


def predict_run(
    run: str | Path,
    inputs: list[str | Path],
    top_k: int = 5,
    out: str | Path | None = None,
    ema: bool = False,
    batch_size: int = 64,
) -> tuple[Predictions, list[Path]]:
    """Predict the images under a run's model with its preprocessing; write predictions.csv and predictions.png."""
    from vitlab.runs.trained import load_trained_run
    from vitlab.runtime.context import local

    if top_k < 1:
        raise VitlabError(f"--top-k {top_k} must be at least 1")
    if batch_size < 1:
        raise VitlabError(f"--batch-size {batch_size} must be at least 1")
    files = image_files(inputs)
    if not files:
        raise VitlabError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {', '.join(map(str, inputs))}")
    trained = load_trained_run(run, ema)
    model, config, classes = trained.model, trained.config, trained.classes
    ctx = local(config.train.device, config.train.precision)
    decoded = decode_images(files, config.data.image_size)  # an unreadable file is skipped and named, as in training
    skipped = [str(image) for image in decoded if isinstance(image, UnusableImage)]
    kept = [(file, image) for file, image in zip(files, decoded) if isinstance(image, np.ndarray)]
    if not kept:
        raise VitlabError(f"{skipped_note(skipped)}, and no image is left to predict; give PNG or JPEG files Pillow can open")
    out = output_folder(out or Path(run) / "predictions")
    files = [file for file, _ in kept]
    images = torch.from_numpy(np.stack([image for _, image in kept])).permute(0, 3, 1, 2).contiguous()
    probabilities = predict_images(model, images, ctx.device, ctx.precision, batch_size, config.data.mean, config.data.std)
    top = probabilities.topk(min(top_k, len(classes)), dim=-1)
    predictions = Predictions(files, top.indices, top.values, classes, skipped)
    titles = [
        f"{f.name[:24]}\n{classes[i[0]]} ({100 * p[0]:.1f} %)"
        for f, i, p in zip(files, top.indices.tolist(), top.values.tolist())
    ][:GRID_IMAGES]
    written = [
        write_csv(out / "predictions.csv", predictions),
        save_prediction_grid(out / "predictions.png", images[:GRID_IMAGES], titles),
    ]
    return predictions, written
