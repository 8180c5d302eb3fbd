"""Image-folder loading: layout checks, decoding, resizing, skipping unusable files (unreadable, too big, links out)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import images
from vitlab.data.folders import folder_splits
from vitlab.data.images import read_images
from vitlab.data.unpaired import FOLDERS, folder_pair
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
    with pytest.warns(UserWarning, match=r"skipped 2 unusable image\(s\).*truncated.png.*corrupt.jpg") as record:
        splits = folder_splits(tmp_path, image_size=8)
    assert len(record) == 1
    assert len(splits.train) == 7 and len(splits.test) == 5


def test_class_with_only_unreadable_files_is_an_error(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    for path in (tmp_path / "test" / "red").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(VitlabError, match=r"every image in .*test/red.* is unusable"):
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


def _sixteen_bit_tree(root: Path) -> np.ndarray:
    """One class whose images are a 16-bit greyscale ramp over the whole 0..65535 range."""
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.fromarray(ramp).save(root / split / "a" / "ramp.png")
    assert Image.open(root / "train" / "a" / "ramp.png").mode in ("I;16", "I")
    return ramp


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = _sixteen_bit_tree(tmp_path)
    image = folder_splits(tmp_path, image_size=16).train.images[0]
    expected = torch.from_numpy((ramp >> 8).astype(np.uint8))
    assert all(torch.equal(channel, expected) for channel in image)
    assert (image == 255).float().mean() < 0.01


def test_links_leading_outside_the_root_are_skipped(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "secret"
    _make_tree(root)
    _save(outside / "private.png", (7, 7, 7))
    (root / "train" / "red" / "leak.png").symlink_to(outside / "private.png")
    (root / "train" / "red" / "inside.png").symlink_to(root / "train" / "red" / "0.png")
    with pytest.warns(UserWarning, match=r"skipped 1 unusable image\(s\).*leak.png \(a link to .*private.png, outside"):
        splits = folder_splits(root, image_size=8)
    assert len(splits.train) == 8, "the link inside the root is kept"


def test_a_class_folder_linked_outside_the_root_is_unusable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _make_tree(root)
    _save(tmp_path / "elsewhere" / "0.png", (0, 255, 0))
    for split in ("train", "test"):
        (root / split / "green").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(VitlabError, match=r"every image in .*green.* is unusable"):
        folder_splits(root, image_size=8)


def test_images_over_the_pixel_cap_are_skipped_without_decoding(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    _save(tmp_path / "train" / "red" / "wide.png", (255, 0, 0), size=(30, 10))
    with pytest.warns(UserWarning, match=r"skipped 1 unusable image\(s\).*wide.png \(30x10 pixels, over the cap of 200"):
        splits = folder_splits(tmp_path, image_size=8, max_pixels=200)
    assert len(splits.train) == 7


def test_default_pixel_cap_skips_a_67_megapixel_png(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    Image.new("1", (8200, 8200)).save(tmp_path / "train" / "red" / "huge.png")  # 8 kB on disk, 67 MP decoded
    with pytest.warns(UserWarning, match=r"huge.png \(8200x8200 pixels, over the cap of 64000000; downscale it\)"):
        splits = folder_splits(tmp_path, image_size=8)
    assert len(splits.train) == 7


def test_decoding_uses_torchs_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_tree(tmp_path)
    workers = []
    real = images.ThreadPoolExecutor

    def record(max_workers: int) -> object:
        workers.append(max_workers)
        return real(max_workers)

    monkeypatch.setattr(images, "ThreadPoolExecutor", record)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what train.threads=1 does before the data is loaded
        folder_splits(tmp_path, image_size=8)
    finally:
        torch.set_num_threads(threads)
    assert workers == [1, 1]


def test_unpaired_folders_refuse_links_outside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "pair"
    for name in FOLDERS:
        _save(root / name / "0.png", (1, 2, 3))
    _save(tmp_path / "secret.png", (9, 9, 9))
    (root / "testA" / "leak.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(VitlabError, match=r"cannot read 1 image\(s\): .*leak.png \(a link to .*secret.png, outside"):
        folder_pair(root, load_size=8, crop_size=8)


def test_inspect_reader_scales_sixteen_bit_and_names_an_oversized_file(tmp_path: Path) -> None:
    ramp = _sixteen_bit_tree(tmp_path)
    image = read_images([tmp_path / "train" / "a" / "ramp.png"], image_size=16)[0]
    assert torch.equal(image[0], torch.from_numpy((ramp >> 8).astype(np.uint8)))
    Image.new("1", (8200, 8200)).save(tmp_path / "huge.png")
    with pytest.raises(VitlabError, match=r"cannot read 1 image\(s\): .*huge.png \(8200x8200 pixels, over the cap"):
        read_images([tmp_path / "huge.png"], image_size=16)
