"""FID and KID through torchmetrics on a small fixed feature extractor; choosing the features."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitlab.data.unpaired import builtin_pair
from vitlab.errors import VitlabError
from vitlab.eval.fid import Features, RandomConvFeatures, distances, fid_kid, image_features, resolve_features
from vitlab.eval.table2 import table2_features, table2_scores


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return builtin_pair(num_train=1, num_test=64, seed=0, load_size=32, crop_size=32).test_a


def noisy(x: torch.Tensor, strength: float) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return (x.float() + 255 * strength * noise).clamp(0, 255).round().to(torch.uint8)


def blurred(x: torch.Tensor, strength: float) -> torch.Tensor:
    k = 1 + 2 * round(strength)
    return F.avg_pool2d(F.pad(x.float(), (k // 2,) * 4, mode="replicate"), k, stride=1).round().to(torch.uint8)


def test_fid_and_kid_of_a_set_with_itself_are_zero(images: torch.Tensor) -> None:
    found = distances(images, images, resolve_features("randconv"), kid_subset_size=32)["randconv"]
    assert abs(found["fid"]) < 1e-5
    assert abs(found["kid"]) < 2 * found["kid_std"] + 1e-3


@pytest.mark.parametrize("corrupt,strengths", [(noisy, [0.02, 0.05, 0.1, 0.2, 0.4]), (blurred, [1, 2, 3, 4])])
def test_fid_grows_with_the_strength_of_a_corruption(images, corrupt, strengths) -> None:
    features = resolve_features("randconv")
    fids = [distances(images, corrupt(images, s), features, kid_subset_size=32)["randconv"]["fid"] for s in strengths]
    assert fids[0] > 1e-4 and all(a < b for a, b in zip(fids, fids[1:])), fids


def test_random_features_are_fixed_by_the_seed() -> None:
    x = torch.rand(2, 3, 40, 40)
    assert torch.equal(RandomConvFeatures()(x), RandomConvFeatures()(x))
    assert not torch.equal(RandomConvFeatures(seed=1)(x), RandomConvFeatures()(x))
    assert RandomConvFeatures(num_features=16)(x).shape == (2, 16)


def test_auto_falls_back_to_random_features_without_inception_and_says_so_loudly() -> None:
    with pytest.warns(UserWarning, match="FID/KID WITHOUT INCEPTION.*NOT comparable with published FIDs"):
        assert [f.name for f in resolve_features("auto", inception_weights=None)] == ["randconv"]


def test_kid_subsets_hold_at_most_half_the_images_so_its_spread_is_not_zero(images: torch.Tensor) -> None:
    features = image_features(images[:16], resolve_features("randconv")[0])
    other = image_features(images[16:32], resolve_features("randconv")[0])
    assert fid_kid(features, other, kid_subset_size=1000)["kid_std"] > 0


def test_paper_table2_columns_compare_real_domain_images_with_translations_into_them(images: torch.Tensor) -> None:
    apples, oranges = images[:40], images[40:]  # 40 and 24 test images: both truncated to 24
    noise = torch.randint(0, 256, oranges.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    found = table2_scores(
        apples, oranges, fake_a=apples[:24], fake_b=noise, features=resolve_features("randconv")[0], names=("Apple", "Orange")
    )
    assert found["images"] == 24 and found["features"] == "randconv"
    assert abs(found["Apple"]) < 1e-3 < found["Orange"]  # "Apple": real apples vs oranges translated to apples
    assert found["Average"] == pytest.approx((found["Apple"] + found["Orange"]) / 2)


def test_paper_table2_refuses_anything_but_inception(tmp_path: Path) -> None:
    with pytest.raises(VitlabError, match="Inception weights file"):
        table2_features(str(tmp_path / "missing.pth"))


def test_inception_without_its_weights_file_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(VitlabError, match="need torch-fidelity importable and its Inception weights file.*randconv"):
        resolve_features("inception-64", str(tmp_path / "missing.pth"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RandomConvFeatures(8) saved as a torch.export program with a dynamic batch."""
    path = tmp_path_factory.mktemp("features") / "features.pt2"
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(RandomConvFeatures(num_features=8), (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def test_user_named_features_torch_export_file_and_module_callable(exported: Path, images: torch.Tensor) -> None:
    (program,) = resolve_features(str(exported))
    (imported,) = resolve_features("vitlab.eval.fid:RandomConvFeatures")
    assert program.name == "features.pt2" and imported.module.num_features == 64
    expected = image_features(images[:7], Features("direct", RandomConvFeatures(num_features=8)), batch_size=4)
    assert torch.allclose(image_features(images[:7], program, batch_size=4), expected, atol=1e-6)  # batches of 4 and 3
    assert distances(images, images[:40], [program], kid_subset_size=20)["features.pt2"]["fid"] > 0


def test_torchscript_and_pickled_feature_files_are_refused(tmp_path: Path) -> None:
    saved = tmp_path / "features.pt"  # where TorchScript files and torch.save pickles go
    torch.save(RandomConvFeatures(num_features=8), saved)
    with pytest.raises(VitlabError, match="not a torch.export program.*torch.export.save"):
        resolve_features(str(saved))
    pickled = tmp_path / "features.pt2"
    pickled.write_bytes(b"\x80\x04K\x01.")  # a pickle named .pt2: not an archive
    with pytest.raises(VitlabError, match="not a torch.export archive"):
        resolve_features(str(pickled))


def rewrite_member(source: Path, target: Path, suffix: str, change) -> None:
    """Copy a zip archive, passing the bytes of the member whose name ends with `suffix` through `change`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            new.writestr(item, change(data) if item.filename.endswith(suffix) else data)


def test_an_export_archive_with_pickled_weights_or_sample_inputs_is_refused_before_loading(
    exported: Path, tmp_path: Path
) -> None:
    pickled_weights = tmp_path / "weights.pt2"
    rewrite_member(
        exported, pickled_weights, "model_weights_config.json", lambda b: b.replace(b'"use_pickle": false', b'"use_pickle": true')
    )
    with pytest.raises(VitlabError, match="stores pickled tensors or objects.*model_weights_config.json"):
        resolve_features(str(pickled_weights))
    planted = tmp_path / "inputs.pt2"
    rewrite_member(
        exported, planted, "sample_inputs/model.pt", lambda b: pickle.dumps(print, protocol=2)
    )  # a global: could be os.system
    with pytest.raises(VitlabError, match="holds a pickle of more than tensors"):
        resolve_features(str(planted))


def test_unknown_features_list_the_choices() -> None:
    with pytest.raises(VitlabError, match="unknown features 'vgg'.*randconv"):
        resolve_features("vgg")


def test_too_few_images_is_an_error() -> None:
    with pytest.raises(VitlabError, match="at least 2 images"):
        fid_kid(torch.randn(1, 4), torch.randn(5, 4))
