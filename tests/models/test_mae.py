"""Masked image modelling: exact masking, an MAE encoder on visible tokens only, a loss on masked patches only,
MPP's corruption split and colour targets, for both block families."""

import pytest
import torch

from vitlab import VitlabError, create_model
from vitlab.models.masked import (
    MaskedAutoencoder,
    MaskedPatchPrediction,
    colour_classes,
    patchify,
    random_masking,
    unpatchify,
)

SMALL = dict(img_size=16, num_classes=0, depth=2, embed_dim=32, num_heads=2, mlp_dim=64)
FAMILIES = ["vit-ti/4", "vit22b-ti/4"]


def encoder(name: str = "vit22b-ti/4", **overrides):
    torch.manual_seed(0)
    return create_model(name, **{**SMALL, **overrides})


def mae(name: str = "vit22b-ti/4", **overrides) -> MaskedAutoencoder:
    return MaskedAutoencoder(encoder(name, **overrides), decoder_dim=16, decoder_depth=1, decoder_heads=2)


@pytest.mark.parametrize("n, ratio", [(16, 0.75), (64, 0.75), (49, 0.5), (10, 0.3)])
def test_random_masking_removes_exactly_the_ratio_and_restores_the_order(n: int, ratio: float) -> None:
    torch.manual_seed(1)
    tokens = torch.arange(3 * n, dtype=torch.float32).view(3, n, 1).expand(-1, -1, 4)
    kept, mask, ids_restore = random_masking(tokens, ratio)
    removed = round(n * ratio)
    assert kept.shape == (3, n - removed, 4)
    assert (mask.sum(1) == removed).all()
    for row in range(3):  # the kept tokens are exactly the unmasked ones
        assert sorted(kept[row, :, 0].tolist()) == tokens[row, mask[row] == 0, 0].tolist()
    rest = torch.stack([tokens[r, mask[r] == 1] for r in range(3)])  # any order: put back by ids_restore
    shuffled = torch.cat([kept, rest], dim=1)
    restored = shuffled.gather(1, ids_restore[..., None].expand(-1, -1, 4))
    assert torch.equal(restored[mask == 0], tokens[mask == 0])


def test_patchify_and_unpatchify_are_inverse() -> None:
    images = torch.randn(2, 3, 16, 16)
    patches = patchify(images, 4)
    assert patches.shape == (2, 16, 48)
    assert torch.equal(patches[0, 1], images[0, :, 0:4, 4:8].permute(1, 2, 0).flatten())
    assert torch.equal(unpatchify(patches, 4), images)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_mae_encoder_sees_only_the_visible_tokens(name: str, pool: str) -> None:
    model = mae(name, pool=pool)
    seen = []
    for block in model.encoder.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    decoder_seen = []
    model.decoder_blocks[0].register_forward_hook(lambda module, args, out: decoder_seen.append(tuple(args[0].shape)))
    loss = model(torch.randn(5, 3, 16, 16))
    prefix = 1 if pool == "cls" else 0
    assert seen == [(5, prefix + 16 - 12, 32)] * 2  # 16 patches, 75 % masked: 4 visible
    assert decoder_seen == [(5, prefix + 16, 16)]  # the decoder sees every position, mask tokens included
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_covers_the_masked_patches_only(norm_pix_loss: bool) -> None:
    model = mae()
    model.norm_pix_loss = norm_pix_loss
    x = torch.randn(2, 3, 16, 16)
    pred, mask = model.predict(x)
    loss = model.loss(x, pred, mask)
    visible, masked = (int(mask[0].nonzero()[0]) if m else int((mask[0] == 0).nonzero()[0]) for m in (False, True))
    for patch, changes in ((visible, False), (masked, True)):
        target = patchify(x, 4)
        target[0, patch] = torch.randn(48) * 3
        changed = model.loss(unpatchify(target, 4), pred, mask)
        assert (changed != loss) == changes, patch
    by_hand = (pred - model.targets(x)[0]).square().mean(-1)[mask == 1].mean()
    torch.testing.assert_close(loss, by_hand)


def test_mpp_corrupts_half_the_patches_80_10_10() -> None:
    model = MaskedPatchPrediction(encoder(img_size=32), (0.5,), (0.5,))  # 64 patches: 32 corrupted = 26 mask, 3 other, 3 kept
    torch.manual_seed(2)
    tokens = torch.randn(4, 64, 32)
    corrupted_tokens, corrupted, masked = model.corrupt(tokens)
    is_mask_token = (corrupted_tokens == model.mask_token).all(-1)
    changed = (corrupted_tokens != tokens).any(-1)
    assert (corrupted.sum(1) == 32).all()
    assert torch.equal(is_mask_token, masked.bool()) and (masked.sum(1) == 26).all()
    assert ((changed & ~is_mask_token).sum(1) == 3).all()  # another patch's embedding
    assert not (changed & ~corrupted.bool()).any()  # uncorrupted patches are untouched
    others = corrupted_tokens[changed & ~is_mask_token]
    assert all((tokens.flatten(0, 1) == row).all(-1).any() for row in others)  # each is some patch's embedding


def test_mpp_targets_are_the_3_bit_mean_colours() -> None:
    pixels = torch.zeros(1, 3, 4, 8)  # two 4x4 patches
    pixels[0, :, :, :4] = torch.tensor([0.3, 0.9, 0.0]).view(3, 1, 1)
    pixels[0, 0, :, 4:] = 1.0  # red saturated: bin 7
    pixels[0, 1, :2, 4:] = 0.5  # green 0.25 on average: bin 2
    # bins (floor(8·mean)): (2, 7, 0) → 2·64 + 7·8 + 0 = 184; (7, 2, 0) → 7·64 + 2·8 = 464
    assert colour_classes(pixels, 4).tolist() == [[184, 464]]
    model = MaskedPatchPrediction(encoder(img_size=8, depth=1), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    square = pixels[..., :4].repeat(1, 1, 2, 2)
    assert model.targets((square - 0.5) / 0.25).tolist() == [[184] * 4]


@pytest.mark.parametrize("name", FAMILIES)
def test_mpp_learns_and_reconstructs_both_families(name: str) -> None:
    model = MaskedPatchPrediction(encoder(name), (0.5,), (0.5,))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    loss = model(x)
    assert 5.0 < loss.item() < 8.0  # about log(512) at initialisation
    loss.backward()
    masked, painted = model.reconstruct(x)
    assert masked.shape == painted.shape == x.shape


def test_mae_reconstruction_keeps_the_visible_patches() -> None:
    model = mae()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(3)
    masked, reconstruction = model.reconstruct(x)
    torch.manual_seed(3)
    _, mask = model.predict(x)
    keep = mask == 0
    assert torch.equal(patchify(reconstruction, 4)[keep], patchify(x, 4)[keep])
    assert not patchify(masked, 4)[~keep].any()


def test_pretraining_needs_a_headless_encoder() -> None:
    with pytest.raises(VitlabError, match="num_classes=0"):
        MaskedAutoencoder(create_model("vit-ti/4", **{**SMALL, "num_classes": 10}))
    with pytest.raises(VitlabError, match="fc_norm: true in the fine-tuning"):
        MaskedAutoencoder(create_model("vit-ti/4", **{**SMALL, "num_classes": 0, "pool": "gap", "fc_norm": True}))
    with pytest.raises(VitlabError, match="mask_ratio"):
        MaskedPatchPrediction(encoder(), (0.5,), (0.5,), mask_ratio=1.0)
