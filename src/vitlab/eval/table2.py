"""The paper's Table 2 protocol, as its code measured it (HongSungRae/ai602 @ 63e7ad0, trainer/cyclegan.py).

features   torchmetrics' FrechetInceptionDistance(feature=64): the 64-d Inception features, never a
           substitute (the table's numbers are Inception FIDs; without the weights this protocol refuses);
images     both test sets truncated to min(|testA|, |testB|) images (the code's dataset length);
columns    one FID per domain, real images against translated ones: the paper's "Apple" column (domain A
           of apple2orange) compares real apples with oranges translated into apples, "Orange" the
           reverse; then their average. Names come from `eval.domain_names`.
"""

from __future__ import annotations

import torch

from vitlab.eval.fid import Features, fid_kid, image_features, inception_features

FEATURES = "inception-64"


def table2_features(inception_weights: str | None) -> Features:
    """The 64-d Inception features; an error that says what is missing when they cannot be had."""
    return inception_features(FEATURES, inception_weights)


def table2_scores(
    test_a: torch.Tensor,
    test_b: torch.Tensor,
    fake_a: torch.Tensor,
    fake_b: torch.Tensor,
    features: Features,
    names: tuple[str, str] = ("A", "B"),
    batch_size: int = 50,
    device: str | torch.device = "cpu",
) -> dict[str, float | int | str]:
    """FID per domain column (real A vs G_B(test B), real B vs G_A(test A)) on min-truncated sets, and the average.

    `fake_a` translates `test_b` image by image and `fake_b` translates `test_a`.
    """
    n = min(len(test_a), len(test_b))
    scores: dict[str, float | int | str] = {}
    for name, real, fake in ((names[0], test_a[:n], fake_a[:n]), (names[1], test_b[:n], fake_b[:n])):
        real_f, fake_f = (image_features(x, features, batch_size, device) for x in (real, fake))
        scores[name] = fid_kid(real_f, fake_f)["fid"]
    scores["Average"] = (scores[names[0]] + scores[names[1]]) / 2
    return {**scores, "images": n, "features": features.name}
