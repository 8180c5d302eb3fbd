"""FID and KID through torchmetrics, on Inception features where they can be had, else on named ones.

Features, by name (`resolve_features`):
  inception-2048, inception-64  torch-fidelity's Inception v3 (the standard 2048-d pool features, and the
                                64-d ones the paper reported); need torch-fidelity importable and its
                                weights file (`pt_inception-2015-12-05-6726825d.pth`) on disk;
  inception                     both of the above;
  randconv                      `RandomConvFeatures`: a fixed, seeded random CNN that needs no file. Its
                                FIDs rank models against each other but are not comparable with
                                published (Inception) FIDs;
  FILE.pt2                      a `torch.export` program (torch.export.save, with a dynamic batch dimension):
                                float images (N, 3, H, W) in [0, 1] → (N, d); TorchScript (torch.jit is
                                deprecated) and pickles are refused;
  package.module:name           an importable nn.Module, or a callable returning one, with the same contract;
  auto                          inception when torch-fidelity and a weights file are there, else randconv,
                                with a warning: every reported key then carries the name `randconv`.
Features are computed once per image set and shared by FID and KID. KID's subsets hold at most half
of the smaller set: subsets as large as the set would all be the same images, and KID's spread over
them would be zero whatever the images.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from vitlab import safe_pickle
from vitlab.errors import VitlabError

INCEPTION_DIMS = {"inception-2048": 2048, "inception-64": 64}


class RandomConvFeatures(nn.Module):
    """A fixed random CNN (He-initialised from `seed`, never trained): images → `num_features` mean activations.

    Images are resized to `size` first, so every resolution is compared on the same footing.
    """

    def __init__(self, num_features: int = 64, seed: int = 0, size: int = 64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        widths = [3, 32, 64, 128, num_features]
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            self.register_buffer(f"w{i}", torch.randn(cout, cin, 3, 3, generator=gen) * (2 / (9 * cin)) ** 0.5)
        self.num_layers, self.num_features, self.size = len(widths) - 1, num_features, size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float() * 2 - 1, size=(self.size, self.size), mode="bilinear", antialias=True)
        for i in range(self.num_layers):
            x = F.conv2d(x, getattr(self, f"w{i}"), stride=2, padding=1)
            x = F.relu(x) if i < self.num_layers - 1 else x
        return x.mean(dim=(2, 3))


@dataclass
class Features:
    """A feature extractor and the input it takes: uint8 in [0, 255] (Inception) or float in [0, 1]."""

    name: str
    module: nn.Module
    takes_uint8: bool = False


def inception_available(weights: str | None) -> bool:
    """Whether torch-fidelity is importable and an Inception weights file exists."""
    return importlib.util.find_spec("torch_fidelity") is not None and bool(weights) and Path(weights).is_file()


def inception_features(name: str, weights: str | None) -> Features:
    """torch-fidelity's Inception v3 (through torchmetrics) with 2048 or 64 features."""
    if not inception_available(weights):
        raise VitlabError(
            f"features {name!r} need torch-fidelity importable and its Inception weights file "
            f"(eval.inception_weights / --inception-weights, got {weights!r}); or use features 'randconv', "
            "a torch.export file (.pt2) or a module:callable"
        )
    metric = FrechetInceptionDistance(feature=INCEPTION_DIMS[name], feature_extractor_weights_path=weights)
    return Features(name, metric.inception, takes_uint8=True)


def user_features(spec: str) -> Features:
    """A `torch.export` program (`.pt2`), or an importable `module:name` (a Module, or a callable that returns one)."""
    if Path(spec).is_file():
        fix = (
            "save the extractor with torch.export.save(torch.export.export(module, (images,), dynamic_shapes=...), "
            "'FILE.pt2') or name it as package.module:name"
        )
        if Path(spec).suffix != ".pt2":
            raise VitlabError(
                f"features file {spec} is not a torch.export program (.pt2); TorchScript and pickles are not read: {fix}"
            )
        return Features(Path(spec).name, safe_pickle.load_exported_program(spec, fix).module())
    module_name, _, attr = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise VitlabError(
            f"unknown features {spec!r} ({exc}); use auto, inception, inception-2048, inception-64, randconv, "
            "a torch.export file (.pt2), or package.module:name of an nn.Module"
        ) from exc
    module = found if isinstance(found, nn.Module) else found()
    if not isinstance(module, nn.Module):
        raise VitlabError(f"features {spec!r} gave a {type(module).__name__}, not an nn.Module")
    return Features(spec, module.eval())


def resolve_features(spec: str = "auto", inception_weights: str | None = None) -> list[Features]:
    """The feature extractors a features name stands for (two for `inception`)."""
    if spec == "auto":
        spec = "inception" if inception_available(inception_weights) else "randconv"
        if spec == "randconv":
            warnings.warn(
                "FID/KID WITHOUT INCEPTION: no Inception weights (eval.inception_weights) or no torch-fidelity, so "
                "features 'auto' fell back to a random CNN ('randconv'); these numbers rank models against each "
                "other but are NOT comparable with published FIDs (their keys say 'randconv')",
                stacklevel=2,
            )
    if spec == "inception":
        return [inception_features(name, inception_weights) for name in INCEPTION_DIMS]
    if spec in INCEPTION_DIMS:
        return [inception_features(spec, inception_weights)]
    if spec == "randconv":
        return [Features("randconv", RandomConvFeatures().eval())]
    return [user_features(spec)]


@torch.no_grad()
def image_features(
    images: torch.Tensor, features: Features, batch_size: int = 50, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(N, d) float64 features of uint8 images (N, 3, H, W)."""
    module = features.module.to(device)  # in eval mode already (an exported program cannot switch)
    out = []
    for batch in images.split(batch_size):
        batch = batch.to(device)
        out.append(module(batch if features.takes_uint8 else batch.float() / 255).double().cpu())
    return torch.cat(out)


class _Given(nn.Module):
    """Passes precomputed features through, so that torchmetrics' FID and KID share one extraction."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_kid(real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """FID, KID (mean and std over subsets) between two feature sets (N, d), by torchmetrics."""
    if min(len(real), len(fake)) < 2:
        raise VitlabError("FID and KID need at least 2 images in each set")
    given = _Given(real.shape[1])
    subset = max(2, min(kid_subset_size, len(real) // 2, len(fake) // 2))  # see the module docstring
    fid = FrechetInceptionDistance(feature=given, normalize=True)
    with warnings.catch_warnings():  # "KID will save all extracted features": they are held already
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=given, subset_size=subset, normalize=True)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item()}


def distances(
    real: torch.Tensor,
    fake: torch.Tensor,
    features: list[Features],
    batch_size: int = 50,
    kid_subset_size: int = 1000,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """FID and KID of uint8 image sets `fake` against `real`, by feature name."""
    found = {}
    for f in features:
        real_features, fake_features = (image_features(x, f, batch_size, device) for x in (real, fake))
        found[f.name] = fid_kid(real_features, fake_features, kid_subset_size)
    return found
