"""Image-folder loading: layout checks, decoding, resizing and the unreadable-file policy."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data.folders import folder_splits
from vitlab.errors import VitlabError


def _save(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 10), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path)


def _make_tree(root: Path) -> None:
    """Two classes per split: 'blue' as PNG and JPEG (one greyscale), 'red' as PNG with alpha."""
    for split, count in (("train", 3), ("test", 2)):
        for i in range(count):
            _save(root / split / "red" / f"{i}.png", (255, 0, 0), mode="RGBA")
            _save(root / split / "blue" / f"{i}.jpg", (0, 0, 255))
        _save(root / split / "blue" / "grey.PNG", (90, 90, 90), mode="L")
        (root / split / "blue" / "notes.txt").write_text("not an image, not listed")


def test_reads_resizes_and_labels_both_splits(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    splits = folder_splits(tmp_path, image_size=8)
    assert splits.train.classes == ["blue", "red"]
    assert splits.train.images.shape == (7, 3, 8, 8)
    assert splits.test.images.shape == (5, 3, 8, 8)
    assert splits.train.images.dtype == torch.uint8
    assert splits.train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    red = splits.train.images[splits.train.labels == 1].float()
    assert torch.allclose(red.mean((0, 2, 3)), torch.tensor([255.0, 0, 0]), atol=1)
    blue_jpeg = splits.train.images[0].float()  # 0.jpg sorts first; JPEG shifts colours a little
    assert blue_jpeg[2].mean() > 240 and blue_jpeg[0].mean() < 15
    assert (splits.train.images[3] == 90).all(), "greyscale converted to three equal channels"


def test_resize_is_bicubic_to_a_square(tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (20, 1))
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(np.stack([gradient] * 3, -1)).save(tmp_path / split / "a" / "g.png")
    image = folder_splits(tmp_path, image_size=16).train.images[0]
    expected = Image.fromarray(np.stack([gradient] * 3, -1)).resize((16, 16), Image.Resampling.BICUBIC)
    assert torch.equal(image, torch.from_numpy(np.array(expected)).permute(2, 0, 1))


def test_truncated_and_corrupt_files_are_skipped_with_one_warning(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    (tmp_path / "train" / "red" / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "test" / "blue" / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\).*truncated.png.*corrupt.jpg") as record:
        splits = folder_splits(tmp_path, image_size=8)
    assert len(record) == 1
    assert len(splits.train) == 7 and len(splits.test) == 5


def test_class_with_only_unreadable_files_is_an_error(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    for path in (tmp_path / "test" / "red").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(VitlabError, match=r"every image in .*test/red.* is unreadable"):
        folder_splits(tmp_path, image_size=8)


def test_missing_root_or_split_shows_layout(tmp_path: Path) -> None:
    with pytest.raises(VitlabError, match=r"missing folder.*train/<class>/\*\.png"):
        folder_splits(tmp_path / "absent", image_size=8)
    _save(tmp_path / "train" / "a" / "0.png", (1, 2, 3))
    with pytest.raises(VitlabError, match=r"missing folder.*'[^']*test'\]"):
        folder_splits(tmp_path, image_size=8)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    (tmp_path / "train" / "green").mkdir()
    (tmp_path / "test" / "green").mkdir()
    (tmp_path / "train" / "green" / "readme.md").write_text("no images here")
    with pytest.raises(VitlabError, match=r"train/green holds no \.png/\.jpg/\.jpeg images"):
        folder_splits(tmp_path, image_size=8)


def test_different_train_and_test_classes_are_an_error(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    _save(tmp_path / "train" / "green" / "0.png", (0, 255, 0))
    with pytest.raises(VitlabError, match=r"only in train \['green'\], only in test \[\]"):
        folder_splits(tmp_path, image_size=8)
