"""WebDataset shards: folder -> shards -> the same samples, rank split, exact restart, truncated shards, the CLI."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.data.stream.test_files import CLASSES, _write_folder
from vitlab.cli import main
from vitlab.config import load_config
from vitlab.data.sources import run_data
from vitlab.data.stream.crops import CropDecoder
from vitlab.data.stream.files import scan_split
from vitlab.data.stream.shards import ShardStream, make_shard_loader, read_info, shard_paths, write_shards
from vitlab.errors import VitlabError


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


def test_every_shard_of_a_many_class_folder_mixes_its_classes(tmp_path: Path) -> None:
    # in folder order, 12 consecutive images of 10 classes x 6 span at most 3 classes
    for c in range(10):
        (tmp_path / "images" / "train" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (25 * c, 10 * i, 0)).save(tmp_path / "images" / "train" / f"class{c}" / f"{i}.png")
    info = write_shards(tmp_path / "images", tmp_path / "shards", max_count=12, seed=3)
    assert len(info["splits"]["train"]["shards"]) == 5
    for shard in sorted((tmp_path / "shards").glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            labels = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")]
        assert len(labels) == 12 and len(set(labels)) >= 4, (shard.name, sorted(labels))


def _stream(out: Path, info: dict, split: str = "train", **kwargs) -> ShardStream:
    decoder = CropDecoder(16, train=split == "train")
    return ShardStream(shard_paths(out, info, split), decoder, 3, info=info, **kwargs)


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
        assert str(caught.value).startswith(f"shard {out}") and "\n" not in str(caught.value)  # a sentence, not a tuple
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


def _plant_pipe(out: Path, info: dict) -> Path:
    """Rewrite info.json so that webdataset's `::` list and `pipe:` opener would run `touch MARKER` (in `out`)."""
    pipe = "pipe:touch MARKER; cat train-000000.tar"
    train = info["splits"]["train"]["shards"]
    count = train.pop("train-000000.tar")
    train[f"train-000000.tar::{pipe}"] = count
    info["splits"]["extra"] = {"samples": 2 * count, "shards": {"train-000000.tar": count, pipe: count}}
    (out / "info.json").write_text(json.dumps(info))
    return out / "MARKER"


def test_a_manifest_naming_a_shell_command_is_refused_and_runs_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    _, out, info = _shards(tmp_path)
    marker = _plant_pipe(out, info)
    monkeypatch.chdir(out)
    data = [
        "data.name=wds",
        f"data.root={out}",
        "data.image_size=16",
        "data.workers=0",
        "augment.vflip=false",
        "augment.crop_padding=0",
        "train.batch_size=4",
        "train.epochs=1",
        f"out_dir={tmp_path / 'runs'}",
    ]
    assert main(["train", *(arg for item in data for arg in ("--set", item))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a plain *.tar file name" in err
    with pytest.raises(VitlabError, match="not a plain"):  # what `vitlab eval RUN --data wds --data-root DIR` reads
        run_data(load_config(None, data).data, 4, seed=0, train=False)
    # a path handed to ShardStream is opened as a file, never as a webdataset URL
    stream = ShardStream([f"pipe:touch MARKER; cat {out / 'train-000001.tar'}"], CropDecoder(16, train=False), 3, info=info)
    with pytest.raises(VitlabError, match="cannot open shard"):
        list(make_shard_loader(stream, workers=0).epoch(0))
    assert not marker.exists()


def test_listed_shards_must_be_files_inside_the_folder(tmp_path: Path) -> None:
    _, out, info = _shards(tmp_path)
    (tmp_path / "elsewhere.tar").write_bytes((out / "train-000001.tar").read_bytes())
    (out / "train-000001.tar").unlink()
    with pytest.raises(VitlabError, match=r"train-000001.tar, listed in .*info.json, is not a file"):
        shard_paths(out, info, "train")
    (out / "train-000001.tar").symlink_to(tmp_path / "elsewhere.tar")
    with pytest.raises(VitlabError, match=r"train-000001.tar \(a link to .*elsewhere.tar, outside"):
        shard_paths(out, info, "train")


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda i: i.update(classes=[]), "'classes' must be a non-empty list"),
        (lambda i: i.update(classes=["cat", "cat", "fox"]), "distinct names"),
        (lambda i: i.pop("splits"), "'splits' map"),
        (lambda i: i["splits"]["train"].update(samples="24"), "split 'train' needs 'samples'"),
        (lambda i: i["splits"]["train"].update(samples=-1), "split 'train' needs 'samples'"),
        (lambda i: i["splits"]["train"]["shards"].update({"train-000000.tar": True}), "shard train-000000.tar has True samples"),
        (lambda i: i["splits"]["train"]["shards"].update({"../train-000000.tar": 0}), "not a plain"),
        (lambda i: i["splits"]["val"]["shards"].update({"train-000000.tar": 6}), "listed twice"),
        (lambda i: i["splits"]["train"].update(samples=30), "has 30 samples but its shards hold 24"),
    ],
)
def test_a_malformed_info_is_one_line_naming_the_problem(tmp_path: Path, change, words: str) -> None:
    _, out, info = _shards(tmp_path)
    change(info)
    (out / "info.json").write_text(json.dumps(info))
    with pytest.raises(VitlabError) as caught:
        read_info(out / "info.json")
    assert words in str(caught.value) and "rewrite it with `vitlab shard" in str(caught.value)


def _holding(out: Path, key: str) -> Path:
    """The train shard that holds sample `key` (shards are written in a shuffled order)."""
    for shard in sorted(out.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            if f"{key}.cls" in tar.getnames():
                return shard
    raise AssertionError(f"no shard holds {key}")


def _edit(shard: Path, edit: Callable[[str, bytes], tuple[str, bytes] | None]) -> None:
    """Rewrite a shard, each member (name, data) replaced by edit(name, data), or dropped where that is None."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, data in filter(None, (edit(name, data) for name, data in members)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda n, d: (n, b"-100" if n == "000000001.cls" else d), r"label '-100' is not a class index in \[0, 3\)"),
        (lambda n, d: (n, b"3" if n == "000000001.cls" else d), "label '3' is not a class index"),
        (lambda n, d: (n, b"dog" if n == "000000001.cls" else d), "label 'dog' is not a class index"),
        (lambda n, d: None if n == "000000001.cls" else (n, d), "'000000001' of shard .* has no .cls label"),
        (lambda n, d: (n.replace("000000001", "n01440764_1"), d), "'n01440764_1' of shard .*: its key is not a sample number"),
        (
            lambda n, d: (n.replace("000000001", "000000099"), d),
            "'000000099' of shard .*: its key is not a sample number below 24",
        ),
    ],
)
def test_a_bad_label_or_key_is_an_error_naming_the_shard_and_sample(tmp_path: Path, edit, words: str) -> None:
    _, out, info = _shards(tmp_path)
    shard = _holding(out, "000000001")
    _edit(shard, edit)
    with pytest.raises(VitlabError, match=words) as caught:
        list(make_shard_loader(_stream(out, info, "train"), workers=0).epoch(0))
    assert shard.name in str(caught.value) and "rewrite the shards with `vitlab shard`" in str(caught.value)


def test_a_shard_holding_more_samples_than_listed_says_so(tmp_path: Path) -> None:
    _, out, info = _shards(tmp_path)
    info["splits"]["train"]["shards"]["train-000000.tar"] = 5
    info["splits"]["train"]["samples"] = 23
    (out / "info.json").write_text(json.dumps(info))
    with pytest.raises(VitlabError, match=r"train-000000.tar holds more than the 5 samples info.json lists; rewrite"):
        list(make_shard_loader(_stream(out, read_info(out / "info.json")), workers=0).epoch(0))


def test_a_name_that_is_not_utf8_is_shown_with_its_shard(tmp_path: Path) -> None:
    _, out, info = _shards(tmp_path)
    junk = {"000000002.jpg": b"junk", "000000002.name": b"dog/\xff.JPEG"}
    shard = _holding(out, "000000002")
    _edit(shard, lambda n, d: (n, junk.get(n, d)))
    loader = make_shard_loader(_stream(out, info), workers=0)
    list(loader.epoch(0))
    assert [name for name, _ in loader.bad_files] == [f"{shard.name}:dog/\\xff.JPEG"]


def test_the_shard_command_skips_links_out_of_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _write_folder(tmp_path / "images")
    secret = b"\x89PNG not really, but private"
    (tmp_path / "secret.png").write_bytes(secret)
    (folder / "train" / "dog" / "leak.png").symlink_to(tmp_path / "secret.png")
    (folder / "train" / "dog" / "inside.png").symlink_to(folder / "train" / "cat" / "005.png")
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) under .*train: .*leak.png \(a link to .*secret.png, outside"):
        assert main(["shard", str(folder), str(tmp_path / "out")]) == 0
    assert "train: 25 images" in capsys.readouterr().out  # 24 and the link inside the folder
    assert not any(secret in shard.read_bytes() for shard in (tmp_path / "out").glob("*.tar"))


def test_the_shard_command_names_an_output_path_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _write_folder(tmp_path / "images", per_class=1)
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["shard", str(folder), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(out) in err
