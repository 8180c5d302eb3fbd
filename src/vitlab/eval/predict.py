"""`vitlab predict`: the top-k classes of image files under a run's model, as a CSV and a labelled image grid."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import torch

from vitlab.data.augment import normalize
from vitlab.data.images import IMAGE_SUFFIXES, image_files, read_images
from vitlab.errors import VitlabError
from vitlab.eval.figures import save_prediction_grid
from vitlab.train.precision import autocast

GRID_IMAGES = 64  # images drawn in the grid at most; the CSV lists all


@dataclass
class Predictions:
    """Image files, their top-k class indices and probabilities (N, k), and the class names."""

    files: list[Path]
    indices: torch.Tensor
    probabilities: torch.Tensor
    classes: list[str]


@torch.no_grad()
def predict_images(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, precision: str, batch_size: int = 64,
    mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
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
    """One row per image: the file, then class and probability for each of the top k."""
    k = predictions.indices.shape[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file"] + [f"{field}_{rank}" for rank in range(1, k + 1) for field in ("class", "probability")])
        for file, indices, probs in zip(predictions.files, predictions.indices.tolist(), predictions.probabilities.tolist()):
            cells = [value for i, p in zip(indices, probs) for value in (predictions.classes[i], f"{p:.6f}")]
            writer.writerow([str(file), *cells])
    return path


def predict_run(
    run: str | Path, inputs: list[str | Path], top_k: int = 5, out: str | Path | None = None, ema: bool = False,
    batch_size: int = 64,
) -> tuple[Predictions, list[Path]]:
    """Predict the images under a run's model with its preprocessing; write predictions.csv and predictions.png."""
    from vitlab.data.classes import class_names
    from vitlab.eval.runs import load_checkpoint_model
    from vitlab.train import checkpoint as ckpt
    from vitlab.train.distributed import pick_device
    from vitlab.train.precision import resolve_precision

    if top_k < 1:
        raise VitlabError(f"--top-k {top_k} must be at least 1")
    if batch_size < 1:
        raise VitlabError(f"--batch-size {batch_size} must be at least 1")
    files = image_files(inputs)
    if not files:
        raise VitlabError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {', '.join(map(str, inputs))}")
    model, config = load_checkpoint_model(run, ema)
    classes = class_names(config.data, model.num_classes, ckpt.read_meta(ckpt.find_checkpoint(run)).get("classes"))
    device = pick_device(config.train.device)
    images = read_images(files, config.data.image_size)
    precision = resolve_precision(config.train.precision, device)
    probabilities = predict_images(model, images, device, precision, batch_size, config.data.mean, config.data.std)
    top = probabilities.topk(min(top_k, len(classes)), dim=-1)
    predictions = Predictions(files, top.indices, top.values, classes)
    out = Path(out) if out else Path(run) / "predictions"
    titles = [f"{f.name[:24]}\n{classes[i[0]]} ({100 * p[0]:.1f} %)" for f, i, p in
              zip(files, top.indices.tolist(), top.values.tolist())][:GRID_IMAGES]  # fmt: skip
    written = [write_csv(out / "predictions.csv", predictions), save_prediction_grid(out / "predictions.png", images[:GRID_IMAGES], titles)]
    return predictions, written
