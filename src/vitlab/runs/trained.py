"""A trained classification run in Python (`vitlab.load_run`): its model, preprocessing, class names and config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitlab.config import RunConfig
from vitlab.data.augment import normalize
from vitlab.data.classes import class_names
from vitlab.data.images import to_rgb
from vitlab.data.sources import streams
from vitlab.data.stream.crops import centre_box
from vitlab.errors import VitlabError
from vitlab.models.export import Preprocessing, run_preprocessing
from vitlab.models.vit import VisionTransformer
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.stored import load_checkpoint_model

Images = Image.Image | Sequence[Image.Image] | torch.Tensor


@dataclass(frozen=True)
class TrainedRun:
    """A run's model (eval mode), the preprocessing of its inputs, its class names, its config and checkpoint folder."""

    model: VisionTransformer
    preprocessing: Preprocessing
    classes: list[str]
    config: RunConfig
    checkpoint: Path

    def preprocess(self, images: Images) -> torch.Tensor:
        """The model's input (N, C, S, S) for PIL images, or image tensors (C, H, W) or (N, C, H, W), uint8 or in [0, 1].

        As the run's evaluation: the centre crop of a streamed run, resized to the run's size by its interpolation
        (torch's antialiased kernels: PIL's bicubic within one level of 255), normalised by its mean and std.
        """
        if isinstance(images, torch.Tensor):
            channels = self.model.config["in_chans"]
            if images.dim() not in (3, 4) or images.shape[-3] != channels:
                raise VitlabError(f"images of shape {tuple(images.shape)}: give (N, {channels}, H, W) or ({channels}, H, W)")
            if images.dtype != torch.uint8 and not images.is_floating_point():
                raise VitlabError(f"images of dtype {images.dtype}: give uint8 pixels or floats in [0, 1]")
            images = list(images) if images.dim() == 4 else [images]
        else:
            images = [images] if isinstance(images, Image.Image) else images
            images = [torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1) for image in images]
        mean, std = self.preprocessing.mean, self.preprocessing.std
        return normalize(torch.stack([self._resized(image) for image in images]), mean, std)

    def _resized(self, image: torch.Tensor) -> torch.Tensor:
        """One (C, H, W) image cropped (streamed runs) and resized to the run's square."""
        size, crop = self.config.data.image_size, self.preprocessing.crop_fraction
        if crop is not None:
            left, top, right, bottom = centre_box(image.shape[-1], image.shape[-2], crop)
            image = image[:, top:bottom, left:right]
        if image.shape[-2:] == (size, size):
            return image
        return F.interpolate(image[None], size=(size, size), mode=self.preprocessing.interpolation, antialias=True)[0]

    @torch.no_grad()
    def probabilities(self, images: Images) -> torch.Tensor:
        """Class probabilities (N, classes) of the images, on the CPU."""
        device = next(self.model.parameters()).device
        return self.model(self.preprocess(images).to(device)).float().softmax(-1).cpu()

    def predict(self, images: Images, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The top-k (class name, probability) pairs of each image, most likely first."""
        if top_k < 1:
            raise VitlabError(f"top_k={top_k} must be at least 1")
        top = self.probabilities(images).topk(min(top_k, len(self.classes)), dim=-1)
        return [
            [(self.classes[i], p) for i, p in zip(indices, probs)]
            for indices, probs in zip(top.indices.tolist(), top.values.tolist())
        ]


def load_trained_run(path: str | Path, ema: bool = False, device: str | torch.device = "cpu") -> TrainedRun:
    """The classifier of a `vitlab train` or `vitlab finetune` run (its last checkpoint, or a checkpoint folder) on `device`."""
    checkpoint = ckpt.find_checkpoint(path)
    model, config = load_checkpoint_model(checkpoint, ema)
    classes = class_names(config.data, model.num_classes, ckpt.read_meta(checkpoint).get("classes"))
    preprocessing = run_preprocessing(config.data, streams(config.data))
    return TrainedRun(model.to(device).eval(), preprocessing, classes, config, checkpoint)
