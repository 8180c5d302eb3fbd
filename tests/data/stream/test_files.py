"""Streaming folders: crops, the epoch sampler, exact mid-epoch resume with workers, bad files, worker crashes."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data.images import UnusableImage, decode_image
from vitlab.data.stream.crops import CropDecoder, centre_box, inception_box
from vitlab.data.stream.files import FolderStream, holdout, scan_split, stream_splits
from vitlab.data.stream.order import EpochBatchSampler, SampleKey
from vitlab.data.stream.samples import Sample
from vitlab.data.stream.workers import DataWait, make_loader
from vitlab.errors import VitlabError

CLASSES = ("cat", "dog", "fox")


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    low = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)


def _write_folder(root: Path, per_class: int = 8, splits: tuple[str, ...] = ("train", "val")) -> Path:
    for split in splits:
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                size = (120 + 7 * i, 90 + 5 * c) if i % 3 else (90 + 5 * c, 120 + 7 * i)
                suffix = ".png" if i == 5 else ".JPEG"
                _photo(100 * c + i, size).save(root / split / name / f"{i:03d}{suffix}")
    return root


def test_inception_box_stays_inside_and_falls_back_to_the_centre() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = inception_box(500, 375, rng)
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        assert 0.08 * 0.9 <= (right - left) * (bottom - top) / (500 * 375) <= 1.0
        assert 3 / 4 * 0.9 <= (right - left) / (bottom - top) <= 4 / 3 * 1.1
    # a 1000x10 strip never admits a 3/4..4/3 box of >= 8 % of its area: the centre crop clipped to 4/3
    assert inception_box(1000, 10, rng) == (493, 0, 506, 10)
    assert centre_box(500, 375, 0.875) == (86, 23, 414, 351)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_eval_crop_matches_a_full_decode_resize_and_centre_crop() -> None:
    photo = _photo(1, (500, 375))
    reference = np.asarray(photo.resize((64, 64), Image.Resampling.BILINEAR, box=centre_box(500, 375, 0.875)))
    png = io.BytesIO()
    photo.save(png, "PNG")
    for data, tolerance in ((png.getvalue(), 0.1), (_jpeg(photo), 4.0)):  # JPEG: a 1/4-size DCT decode
        out = CropDecoder(64, train=False)(io.BytesIO(data))
        assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
        assert np.abs(out.permute(1, 2, 0).numpy().astype(int) - reference).mean() < tolerance


def test_draft_decodes_a_large_jpeg_at_reduced_size_only_when_the_crop_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []
    original = Image.Image.crop
    monkeypatch.setattr(Image.Image, "crop", lambda self, *a, **k: sizes.append(self.size) or original(self, *a, **k))
    data = _jpeg(_photo(2, (1600, 1200)))
    CropDecoder(224, train=False)(io.BytesIO(data))  # centre box 1050 px: >= 4 x 224, so a 1/4-size decode
    CropDecoder(600, train=False)(io.BytesIO(data))  # 1050 < 2 x 600: full size
    assert sizes == [(400, 300), (1600, 1200)]


def test_train_crop_is_a_function_of_the_rng_only() -> None:
    data = _jpeg(_photo(3, (300, 200)))
    decoder = CropDecoder(32)
    first, again = (decoder(io.BytesIO(data), np.random.default_rng([0, 1, 2])) for _ in range(2))
    other = decoder(io.BytesIO(data), np.random.default_rng([0, 1, 3]))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_train_crop_flips_with_the_configured_chance() -> None:
    data = _jpeg(_photo(3, (300, 200)))
    full = dict(scale=(1.0, 1.0), ratio=(1.5, 1.5))  # the whole image: only the flip differs between draws
    never, always = CropDecoder(32, flip_prob=0.0, **full), CropDecoder(32, flip_prob=1.0, **full)
    rngs = lambda: (np.random.default_rng(i) for i in range(8))  # noqa: E731
    plain = never(io.BytesIO(data), np.random.default_rng(0))
    assert all(torch.equal(never(io.BytesIO(data), rng), plain) for rng in rngs())
    assert all(torch.equal(always(io.BytesIO(data), rng), plain.flip(-1)) for rng in rngs())


def test_streamed_training_data_gets_the_runs_flip_setting(tmp_path) -> None:
    from vitlab.config import DataConfig
    from vitlab.data.sources import run_data

    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "test" / name).mkdir(parents=True)
        for i in range(2):
            for split in ("train", "test"):
                (tmp_path / split / name / f"{i}.jpg").write_bytes(_jpeg(_photo(i, (40, 40))))
    data = DataConfig(name="folder", root=str(tmp_path), stream=True, image_size=16, workers=0)
    plain, flipped = (next(run_data(data, 4, seed=0, flip_prob=p).train.epoch(0))[0] for p in (0.0, 1.0))
    assert torch.equal(flipped, plain.flip(-1))  # the same crops, each mirrored: augment.hflip reaches the workers


def test_sampler_ranks_are_disjoint_cover_the_epoch_and_restart_at_a_batch() -> None:
    samplers = [EpochBatchSampler(50, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    epochs = [[k.index for batch in s for k in batch] for s in samplers]
    assert not set(epochs[0]) & set(epochs[1]) and len(epochs[0]) == len(epochs[1]) == 24  # 25 per rank, 6 batches
    samplers[0].set_epoch(0, start_batch=4)
    assert [k.index for batch in samplers[0] for k in batch] == epochs[0][16:]
    samplers[0].set_epoch(1)
    assert [k.index for batch in samplers[0] for k in batch] != epochs[0]
    evaluation = [EpochBatchSampler(5, 2, rank=r, world_size=2, train=False) for r in range(2)]
    keys = [[k for batch in s for k in batch] for s in evaluation]
    assert [k.index for k in keys[0]] == [0, 2, 4] and [(k.index, k.real) for k in keys[1]] == [(1, True), (3, True), (4, False)]


def test_holdout_is_stratified_disjoint_and_fixed_by_the_seed() -> None:
    labels = np.repeat(np.arange(4), 50)
    kept, held = holdout(labels, 0.1, seed=5)
    assert np.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    assert not set(kept) & set(held) and len(kept) + len(held) == 200
    assert np.array_equal(held, holdout(labels, 0.1, seed=5)[1]) and not np.array_equal(held, holdout(labels, 0.1, seed=6)[1])


def test_stream_splits_reads_val_as_the_evaluation_split_and_holds_out_a_minival(tmp_path: Path) -> None:
    splits = stream_splits(_write_folder(tmp_path), image_size=32, val_fraction=0.25, seed=1)
    assert splits.train.classes == CLASSES and len(splits.train) == 18 and len(splits.minival) == 6
    assert len(splits.test) == 24 and not splits.test.train and not splits.minival.train
    with pytest.raises(VitlabError, match="train"):
        stream_splits(tmp_path / "val")


def _epoch(loader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b.images, b.labels) for b in loader.epoch(epoch, start)]


def test_a_mid_epoch_restart_with_workers_repeats_the_epoch_tail_bit_for_bit(tmp_path: Path) -> None:
    train = stream_splits(_write_folder(tmp_path), image_size=32, seed=4).train
    with_workers = make_loader(train, 4, seed=4, workers=2)
    full = _epoch(with_workers, 1)
    assert len(full) == len(with_workers) == 6 and full[0][0].shape == (4, 3, 32, 32)
    tail = _epoch(make_loader(train, 4, seed=4, workers=2), 1, start=4)
    in_process = _epoch(make_loader(train, 4, seed=4, workers=0), 1)
    assert len(tail) == 2
    for (images, labels), (images2, labels2) in zip(full[4:], tail):
        assert torch.equal(images, images2) and torch.equal(labels, labels2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, in_process))  # workers or not: the same batches
    assert not torch.equal(full[0][0], _epoch(with_workers, 2)[0][0])


def test_corrupt_and_truncated_files_are_skipped_counted_and_named(tmp_path: Path) -> None:
    root = _write_folder(tmp_path)
    (root / "train" / "dog" / "000.JPEG").write_bytes(b"not an image")
    good = (root / "train" / "fox" / "001.JPEG").read_bytes()
    (root / "train" / "fox" / "001.JPEG").write_bytes(good[: len(good) // 2])
    train = stream_splits(root, image_size=32).train
    loader = make_loader(train, 4, workers=2)
    batches = list(loader.epoch(0))
    assert sum(len(b) for b in batches) == 22 and len(batches) == 6
    assert sorted(name for name, _ in loader.bad_files) == ["dog/000.JPEG", "fox/001.JPEG"]
    assert all(reason for _, reason in loader.bad_files)
    list(loader.epoch(1))
    assert len(loader.bad_files) == 2  # counted per epoch


class _Crashing(FolderStream):
    def __getitem__(self, key: SampleKey) -> Sample:
        if key.index == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(key)


def test_a_worker_that_dies_is_one_clear_error(tmp_path: Path) -> None:
    train = stream_splits(_write_folder(tmp_path), image_size=16).train
    loader = make_loader(_Crashing(train.table, train.decoder), 4, workers=2)
    with pytest.raises(VitlabError, match="data loading failed in epoch 0"):
        list(loader.epoch(0))


def test_a_batch_with_no_readable_file_is_an_error(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, per_class=2)
    for path in (root / "train").rglob("*.*"):
        path.write_bytes(b"junk")
    loader = make_loader(FolderStream(scan_split(root / "train"), CropDecoder(16), 0), 2, workers=0)
    with pytest.raises(VitlabError, match="no image of batch 0"):
        list(loader.epoch(0))


def test_evaluation_batches_mark_the_padding(tmp_path: Path) -> None:
    test = stream_splits(_write_folder(tmp_path, per_class=3), image_size=16).test  # 9 images
    batches = [list(make_loader(test, 4, rank=r, world_size=2, workers=0).epoch(0)) for r in range(2)]
    real = [torch.cat([b.indices[b.real] for b in rank]) for rank in batches]
    assert sorted(torch.cat(real).tolist()) == list(range(9))
    assert [len(b) for b in batches[1]] == [4, 1]  # 5 per rank: the last one padding


def test_data_wait_measures_the_time_spent_in_next() -> None:
    import time

    def slow():
        for _ in range(3):
            time.sleep(0.02)
            yield 1

    wait = DataWait()
    for _ in wait.wrap(slow()):
        time.sleep(0.02)
    assert 0.06 <= wait.waited < wait.elapsed and 0.3 < wait.fraction < 0.7


def test_streamed_folders_skip_links_out_of_the_root_as_the_in_memory_reader_does(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "root", per_class=2)
    _photo(0, (40, 30)).save(tmp_path / "private.png")
    (root / "train" / "dog" / "leak.png").symlink_to(tmp_path / "private.png")
    (root / "train" / "dog" / "inside.png").symlink_to(root / "train" / "cat" / "000.JPEG")
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) under .*train: .*leak.png \(a link to .*private.png, outside"):
        train = stream_splits(root, image_size=16).train
    assert sorted(os.fsdecode(f) for f in train.table.files if b"dog" in f) == ["dog/000.JPEG", "dog/001.JPEG", "dog/inside.png"]
    (tmp_path / "elsewhere").mkdir()
    _photo(1, (40, 30)).save(tmp_path / "elsewhere" / "0.png")
    (root / "train" / "emu").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(VitlabError, match=r"class folder .*emu holds only links outside .*root; copy the files in"):
        scan_split(root / "train")


def test_the_crop_decoder_scales_sixteen_bit_and_caps_pixels_as_the_in_memory_reader(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    out = CropDecoder(16, train=False, crop_fraction=1.0)(str(tmp_path / "ramp.png"))
    assert all(torch.equal(channel, torch.from_numpy((ramp >> 8).astype(np.uint8))) for channel in out)  # 40000 -> 156, not 255
    assert torch.equal(out, torch.from_numpy(decode_image(tmp_path / "ramp.png", 16).copy()).permute(2, 0, 1))
    Image.new("1", (8200, 8200)).save(tmp_path / "huge.png")  # 67 MP: over the 64 MP cap, refused before decoding
    with pytest.raises(UnusableImage, match=r"^8200x8200 pixels, over the cap of 64000000; downscale it$"):
        CropDecoder(16, train=False)(str(tmp_path / "huge.png"))
    with pytest.raises(UnusableImage, match="30x10 pixels, over the cap of 200"):
        CropDecoder(8, train=False, max_pixels=200)(io.BytesIO(_jpeg(_photo(0, (30, 10)))))


def test_an_image_over_pillows_own_limit_is_over_the_cap_in_both_decoders(tmp_path: Path) -> None:
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 400 MP: Pillow refuses it at open, before our check
    with pytest.raises(UnusableImage, match=r"bomb.png \(more than \d+ pixels, over the cap of 64000000; downscale it\)"):
        decode_image(tmp_path / "bomb.png", 16)
    with pytest.raises(UnusableImage, match=r"^more than \d+ pixels, over the cap of 64000000; downscale it$"):
        CropDecoder(16, train=False)(str(tmp_path / "bomb.png"))
