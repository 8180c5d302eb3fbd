"""`load_splits` by dataset name, and the package's import boundaries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitlab.data
from vitlab.data import DATASETS, load_splits
from vitlab.errors import VitlabError


def test_names_cover_the_six_sources() -> None:
    assert set(DATASETS) == {"builtin", "cifar10", "cifar100", "folder", "wds", "hf"}


def test_shards_are_never_held_in_memory() -> None:
    with pytest.raises(VitlabError, match="wds"):
        load_splits("wds", root="shards")


def test_builtin_needs_no_root_and_takes_generator_options() -> None:
    splits = load_splits("builtin", image_size=16, num_train=30, num_test=10, seed=4, noise_std=0.0)
    assert splits.train.images.shape == (30, 3, 16, 16) and len(splits.test) == 10


def test_unknown_name_lists_the_allowed_ones() -> None:
    with pytest.raises(VitlabError, match="unknown dataset 'mnist'.*builtin, cifar10, cifar100, folder"):
        load_splits("mnist")


def test_file_datasets_need_a_root() -> None:
    for name in ("cifar10", "cifar100", "folder", "hf"):
        with pytest.raises(VitlabError, match="needs a root"):
            load_splits(name)


def test_cifar_and_folder_are_dispatched_by_name(tmp_path: Path) -> None:
    with pytest.raises(VitlabError, match="no CIFAR-100 data.*cifar-100-python.tar.gz"):
        load_splits("cifar100", str(tmp_path))
    for split in ("train", "test"):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.new("RGB", (5, 5), (1, 2, 3)).save(tmp_path / split / "only" / "a.png")
    splits = load_splits("folder", str(tmp_path), image_size=8, num_train=5)  # builtin options are ignored
    assert splits.test.images.shape == (1, 3, 8, 8) and torch.all(splits.test.images[0, 2] == 3)


def test_cifar_at_another_size_is_resized_once_at_load(tmp_path: Path) -> None:
    from tests.data.test_cifar import write_cifar_folder

    write_cifar_folder(tmp_path, "cifar10")
    small, large = load_splits("cifar10", str(tmp_path)), load_splits("cifar10", str(tmp_path), image_size=64)
    assert large.train.images.shape[1:] == (3, 64, 64) and large.test.images.dtype == torch.uint8
    assert torch.equal(large.train.labels, small.train.labels)
    # bilinear upsampling keeps each image's mean brightness (to rounding and the edges)
    mean = lambda images: images.float().mean(dim=(1, 2, 3))  # noqa: E731
    assert (mean(large.test.images) - mean(small.test.images)).abs().max() < 3


def test_data_imports_nothing_from_models_train_or_cli() -> None:
    package = Path(vitlab.data.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.startswith(("vitlab.models", "vitlab.train", "vitlab.cli"))]
            assert not bad, f"{source.name} imports {bad}"
