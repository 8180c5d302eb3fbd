"""WebDataset shards: folder -> shards -> the same samples, rank split, exact restart, truncated shards, the CLI."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from vitlab.cli import main
from vitlab.data.crops import CropDecoder
from vitlab.data.shards import ShardStream, make_shard_loader, read_info, write_shards
from vitlab.data.streaming import scan_split
from vitlab.errors import VitlabError
from tests.data.test_streaming import CLASSES, _write_folder


def _shards(tmp_path: Path, per_class: int = 8, max_count: int = 6) -> tuple[Path, Path, dict]:
    folder = _write_folder(tmp_path / "images", per_class=per_class)
    out = tmp_path / "shards"
    return folder, out, write_shards(folder, out, max_count=max_count)


def test_folder_to_shards_keeps_the_bytes_labels_and_class_names(tmp_path: Path) -> None:
    folder, out, info = _shards(tmp_path)
    assert info["classes"] == list(CLASSES) and read_info(out / "info.json") == info
    train = info["splits"]["train"]
    assert train["samples"] == 24 and len(train["shards"]) == 4 and train["pattern"] == "train-{000000..000003}.tar"
    table = scan_split(folder / "train")
    seen = {}
    for shard in sorted(out.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                seen.setdefault(key, {})[field] = tar.extractfile(member).read()
    assert len(seen) == 24
    for key, fields in seen.items():
        i = int(key)
        image = fields.get("jpg", fields.get("png"))
        assert image == table.path(i).read_bytes()
        assert int(fields["cls"]) == table.labels[i] and fields["name"].decode() == table.files[i].decode()
    assert info["splits"]["val"]["samples"] == 24


def _stream(out: Path, info: dict, split: str = "train", **kwargs) -> ShardStream:
    decoder = CropDecoder(16, train=split == "train")
    return ShardStream(str(out / info["splits"][split]["pattern"]), decoder, 3, info=info, **kwargs)


def test_two_ranks_read_disjoint_shards_that_together_cover_the_epoch(tmp_path: Path) -> None:
    _, out, info = _shards(tmp_path)
    indices = []
    for rank in range(2):
        loader = make_shard_loader(_stream(out, info, rank=rank, world_size=2, seed=1), workers=2)
        batches = list(loader.epoch(0))
        assert len(batches) == len(loader) == 4 and all(len(b) == 3 for b in batches)
        indices.append(torch.cat([b.indices for b in batches]).tolist())
    assert not set(indices[0]) & set(indices[1])
    assert sorted(indices[0] + indices[1]) == list(range(24))


def test_a_restart_at_batch_k_with_the_same_workers_is_bit_exact(tmp_path: Path) -> None:
    _, out, info = _shards(tmp_path, per_class=10, max_count=5)  # 30 images, 6 shards
    loader = make_shard_loader(_stream(out, info, seed=2), workers=2)
    full = list(loader.epoch(3))
    assert len(full) == 10
    for start in (3, 4):
        tail = list(make_shard_loader(_stream(out, info, seed=2), workers=2).epoch(3, start))
        assert len(tail) == 10 - start
        for a, b in zip(full[start:], tail):
            assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
    assert not torch.equal(full[0].indices, list(loader.epoch(4))[0].indices)  # a new epoch, a new shuffle


def test_evaluation_reads_every_sample_once(tmp_path: Path) -> None:
    _, out, info = _shards(tmp_path)
    loader = make_shard_loader(_stream(out, info, "val"), workers=2)
    indices = torch.cat([b.indices for b in loader.epoch(0)]).tolist()
    assert sorted(indices) == list(range(24))


def test_a_truncated_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    _, out, info = _shards(tmp_path)
    shard = out / "train-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    for workers in (0, 2):
        with pytest.raises(VitlabError, match="train-000002.tar") as caught:
            list(make_shard_loader(_stream(out, info), workers=workers).epoch(0))
        assert "\n" not in str(caught.value)
    shard.write_bytes(data[:1024])  # cut at a member boundary: tar sees a short archive, the count does not
    with pytest.raises(VitlabError, match="train-000002.tar"):
        list(make_shard_loader(_stream(out, info), workers=0).epoch(0))


def test_a_corrupt_image_in_a_shard_is_skipped_and_named(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "images")
    (folder / "train" / "dog" / "002.JPEG").write_bytes(b"junk")
    info = write_shards(folder, tmp_path / "shards", max_count=6)
    loader = make_shard_loader(_stream(tmp_path / "shards", info), workers=0)
    batches = list(loader.epoch(0))
    assert sum(len(b) for b in batches) == 23
    assert [name.split(":")[1] for name, _ in loader.bad_files] == ["dog/002.JPEG"]


def test_the_shard_command_writes_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _write_folder(tmp_path / "images")
    assert main(["shard", str(folder), str(tmp_path / "out"), "--max-count", "10", "--val-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "train: 18 images in 2 shard(s)" in printed and "minival: 6 images" in printed
    assert main(["shard", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
