"""Evaluating and using image translators: translations, the error to the truth, FID/KID, sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from vitlab.config import FidConfig, TranslateConfig
from vitlab.data.augment import normalize
from vitlab.data.images import image_files, read_images
from vitlab.data.unpaired import UnpairedData, load_pair
from vitlab.errors import VitlabError
from vitlab.eval.fid import distances, resolve_features
from vitlab.eval.table2 import table2_features, table2_scores
from vitlab.figures import save_image_grid
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.stored import load_generators, load_run
from vitlab.runtime.context import local
from vitlab.runtime.precision import autocast

DIRECTIONS = ("AtoB", "BtoA")


def load_data(config: TranslateConfig, with_train: bool = True) -> UnpairedData:
    """The run's domain pair."""
    d = config.data
    builtin = dict(num_train=d.num_train, num_test=d.num_test, seed=d.seed, **d.builtin) if d.name == "builtin" else {}
    return load_pair(d.name, d.root, d.load_size, d.crop_size, with_train=with_train, **builtin)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] → uint8 images."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def translate_images(
    generator: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, precision: str
) -> torch.Tensor:
    """uint8 images → the generator's uint8 translations."""
    was_training = generator.training
    generator.eval()
    out = []
    for batch in images.split(batch_size):
        with autocast(device, precision):
            out.append(to_uint8(generator(normalize(batch.to(device)))).cpu())
    generator.train(was_training)
    return torch.cat(out)


def translate_test_sets(
    nets: nn.ModuleDict, data: UnpairedData, batch_size: int, device: torch.device, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """G_A(test A) and G_B(test B) as uint8 images."""
    fake_b = translate_images(nets["g_a"], data.test_a, batch_size, device, precision)
    fake_a = translate_images(nets["g_b"], data.test_b, batch_size, device, precision)
    return fake_b, fake_a


def error_to_truth(output: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Mean absolute error (0..1 scale) and mean per-image PSNR (dB, peak 1) of uint8 images against the truth."""
    diff = (output.float() - truth.float()) / 255
    mse = diff.square().flatten(1).mean(1).clamp_min(1e-10)
    return {"l1": diff.abs().mean().item(), "psnr": (-10 * mse.log10()).mean().item()}


def translation_metrics(
    data: UnpairedData, fake_b: torch.Tensor, fake_a: torch.Tensor, fid: FidConfig | None, device: torch.device
) -> dict[str, dict[str, float]]:
    """Per direction: L1/PSNR to the truth (built-in pair) and FID/KID against the real test images,
    each beside the same number for the identity mapping; then their average over both directions.
    With `eval.protocol: paper-table2`, the paper's Table 2 instead (vitlab.eval.table2)."""
    if fid is not None and fid.protocol == "paper-table2":
        features = table2_features(fid.inception_weights)
        names = tuple(fid.domain_names)
        return {"paper-table2": table2_scores(data.test_a, data.test_b, fake_a, fake_b, features, names, fid.batch_size, device)}
    features = resolve_features(fid.features, fid.inception_weights) if fid else []
    sides = {
        "AtoB": (data.test_a, fake_b, data.test_b, data.truth_ab),
        "BtoA": (data.test_b, fake_a, data.test_a, data.truth_ba),
    }
    results = {}
    for direction, (source, fake, real, truth) in sides.items():
        row = {}
        for prefix, images in (("", fake), ("identity_", source)):
            if truth is not None:
                row.update({prefix + k: v for k, v in error_to_truth(images, truth).items()})
            if features:
                found = distances(real, images, features, fid.batch_size, fid.kid_subset_size, device)
                row.update({f"{prefix}{k}_{name}": v for name, values in found.items() for k, v in values.items()})
        results[direction] = row
    results["average"] = {k: (results["AtoB"][k] + results["BtoA"][k]) / 2 for k in results["AtoB"]}
    return results


def metrics_lines(test: dict[str, dict]) -> list[str]:
    """`translation_metrics` in a few readable lines: one per direction, each number beside the identity mapping's."""
    if "paper-table2" in test:
        table = test["paper-table2"]
        scores = ", ".join(f"{k} {v:.2f}" for k, v in table.items() if k not in ("images", "features"))
        return [f"paper Table 2 FID ({table['features']}, {table['images']} images a set): {scores}"]
    lines = []
    for direction, row in test.items():
        shown = []
        for key in (k for k in row if not k.startswith(("identity_", "kid_std"))):
            metric, _, features = key.partition("_")
            shown.append(f"{metric.upper()}{' ' + features if features else ''} {row[key]:.4g} ({row['identity_' + key]:.4g})")
        lines.append(f"{direction:<8} {', '.join(shown)}")
    return lines


def sample_grid(path: Path, nets: nn.ModuleDict, data: UnpairedData, rows: int, device: torch.device, precision: str) -> Path:
    """Fig. 4's layout: A, A→B, B, B→A for the first `rows` test images of each domain."""
    rows = min(rows, len(data.test_a), len(data.test_b))
    a, b = data.test_a[:rows], data.test_b[:rows]
    columns = {
        "A": a,
        "A -> B": translate_images(nets["g_a"], a, rows, device, precision),
        "B": b,
        "B -> A": translate_images(nets["g_b"], b, rows, device, precision),
    }
    return save_image_grid(path, columns)


def evaluate_run(
    path: str | Path,
    features: str | None = None,
    inception_weights: str | None = None,
    batch_size: int = 50,
    device: str = "auto",
) -> dict:
    """Translate a run's test sets with its last checkpoint; L1/PSNR to the truth (built-in pair), FID and KID."""
    checkpoint, config, _ = load_run(path, TranslateConfig)
    fid = config.eval
    fid.features = features or fid.features
    fid.inception_weights = inception_weights or fid.inception_weights
    fid.batch_size = batch_size
    ctx = local(device, config.train.precision)
    torch_device, precision = ctx.device, ctx.precision
    data = load_data(config, with_train=False)
    nets = nn.ModuleDict(load_generators(checkpoint, config, torch_device))
    fakes = translate_test_sets(nets, data, batch_size, torch_device, precision)
    metrics = translation_metrics(data, *fakes, fid, torch_device)
    return {"checkpoint": str(checkpoint), "step": ckpt.read_meta(checkpoint)["step"], "test": metrics}


def translate_folder(
    path: str | Path,
    in_dir: str | Path,
    out_dir: str | Path,
    direction: str = "AtoB",
    batch_size: int = 8,
    device: str = "auto",
) -> list[Path]:
    """Translate every image of `in_dir` (resized to the model's size) into PNGs of the same names in `out_dir`."""
    if direction not in DIRECTIONS:
        raise VitlabError(f"direction={direction!r} is not supported; allowed: {', '.join(DIRECTIONS)}")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir() or not (files := image_files(in_dir)):
        raise VitlabError(f"{in_dir} is not a folder of .png/.jpg/.jpeg images")
    checkpoint, config, _ = load_run(path, TranslateConfig)
    ctx = local(device, config.train.precision)
    torch_device, precision = ctx.device, ctx.precision
    name = "g_a" if direction == "AtoB" else "g_b"
    generator = load_generators(checkpoint, config, torch_device, (name,))[name]
    outputs = translate_images(generator, read_images(files, config.data.crop_size), batch_size, torch_device, precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file, image in zip(files, outputs):
        written.append(out_dir / f"{file.stem}.png")
        Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(written[-1])
    return written
