"""`data.name: hf`: Hugging Face datasets saved on disk (save_to_disk, Parquet/Arrow files), read with pyarrow."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_safe_pickle import planted
from vitlab.cli import main
from vitlab.config import DataConfig
from vitlab.data import load_splits
from vitlab.data.classes import dataset_class_names
from vitlab.data.sources import run_data
from vitlab.errors import VitlabError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (50, 60, 210)}
NAMES = list(COLOURS)
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the Image feature's storage


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def colour_images(per_class: int, seed: int, size: int = 16) -> tuple[list[np.ndarray], list[int]]:
    """16-px images whose class is their dominant colour (noisy), class after class."""
    rng = np.random.default_rng(seed)
    images = [
        np.clip(np.array(colour) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        for colour in COLOURS.values()
        for _ in range(per_class)
    ]
    return images, [label for label in range(len(COLOURS)) for _ in range(per_class)]


def hf_table(
    images: list, labels: list, names: list[str] | None = NAMES, image: str = "image", label: str = "label", paths=None
) -> pa.Table:
    """A table as `datasets` stores it: the Image struct {bytes, path}, int64 ClassLabel, features in the schema metadata."""
    features = {image: {"_type": "Image"}, label: {"dtype": "int64", "_type": "Value"}}
    if names is not None:
        features[label] = {"names": names, "_type": "ClassLabel"}
    label_type = pa.int64() if all(isinstance(x, int) for x in labels) else pa.string()
    schema = pa.schema(
        [(image, IMAGE_TYPE), (label, label_type)], metadata={"huggingface": json.dumps({"info": {"features": features}})}
    )
    rows = [
        {"bytes": None if array is None else png(array), "path": path}
        for array, path in zip(images, paths or [None] * len(images))
    ]
    return pa.table({image: rows, label: labels}, schema=schema)


def write_stream(path: Path, table: pa.Table) -> None:
    """An Arrow IPC stream file, as save_to_disk writes its data-0000k-of-0000N.arrow."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=5)  # several record batches, as datasets writes them


def save_to_disk(root: Path, splits: dict[str, pa.Table], files_per_split: int = 2) -> Path:
    """The folder `DatasetDict.save_to_disk` writes (datasets 2.x to 5.x), written with pyarrow."""
    for split, table in splits.items():
        folder = root / split
        folder.mkdir(parents=True)
        bounds = np.linspace(0, len(table), files_per_split + 1).astype(int)
        names = [f"data-{k:05d}-of-{files_per_split:05d}.arrow" for k in range(files_per_split)]
        for name, start, stop in zip(names, bounds, bounds[1:]):
            write_stream(folder / name, table.slice(start, stop - start))
        features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features}))
        state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_format_columns": None}
        (folder / "state.json").write_text(json.dumps({**state, "_format_kwargs": {}, "_format_type": None, "_split": None}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return root


def colour_dataset(root: Path, train: int = 8, test: int = 4, **columns) -> Path:
    """3 classes × `train` training and × `test` test images of 16 px, saved as a DatasetDict."""
    return save_to_disk(
        root, {"train": hf_table(*colour_images(train, 0), **columns), "test": hf_table(*colour_images(test, 1), **columns)}
    )


def data_config(root: Path, **fields) -> DataConfig:
    # crop_fraction 1 and images at image_size: the streamed centre crop is the whole image, as in memory
    config = DataConfig(name="hf", root=str(root), image_size=16, crop_fraction=1.0, workers=0, **fields)
    config.validate()
    return config


def eval_batches(split) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(split.batches(5, 0, 1))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_a_dataset_dict_reads_its_images_labels_and_class_names(tmp_path: Path) -> None:
    splits = load_splits("hf", colour_dataset(tmp_path / "ds"), image_size=16)
    images, labels = colour_images(4, 1)
    assert splits.train.classes == NAMES and len(splits.train) == 24
    assert torch.equal(splits.test.images, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    assert splits.test.labels.tolist() == labels
    assert dataset_class_names(data_config(tmp_path / "ds")) == NAMES


def test_in_memory_and_streamed_give_the_same_samples_minival_included(tmp_path: Path) -> None:
    root = colour_dataset(tmp_path / "ds")
    memory, streamed = (run_data(data_config(root, stream=s, val_fraction=0.25), 4, seed=3) for s in (False, True))
    assert streamed.streamed and not memory.streamed and memory.classes == streamed.classes == NAMES
    for split in ("test", "minival"):
        (a, la), (b, lb) = eval_batches(getattr(memory, split)), eval_batches(getattr(streamed, split))
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert memory.train_size == streamed.train_size == 18  # 2 of each class's 8 held out
    seen = [torch.cat([y for _, y in source.epoch(0)]) for source in (memory.train, streamed.train)]
    assert seen[0].tolist() == seen[1].tolist()  # one order of samples from (seed, epoch), whichever source


def test_a_streamed_epoch_resumed_mid_way_repeats_its_batches(tmp_path: Path) -> None:
    train = run_data(data_config(colour_dataset(tmp_path / "ds"), stream=True), 4, seed=5).train
    whole, resumed = list(train.epoch(2)), list(train.epoch(2, start=3))
    assert len(whole) == 6 and len(resumed) == 3
    for (x, y), (rx, ry) in zip(whole[3:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_a_genuine_save_to_disk_folder_reads_as_the_one_written_with_pyarrow(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=NAMES)})

    def split(per_class: int, seed: int):
        images, labels = colour_images(per_class, seed)
        return datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in images], "fine_label": labels}, features=features)

    datasets.DatasetDict(train=split(8, 0), test=split(4, 1)).save_to_disk(str(tmp_path / "genuine"))
    genuine = load_splits("hf", tmp_path / "genuine", image_size=16)
    ours = load_splits("hf", colour_dataset(tmp_path / "ours"), image_size=16)
    assert genuine.train.classes == NAMES
    for a, b in ((genuine.train, ours.train), (genuine.test, ours.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("layout", ["flat", "folders"])
def test_parquet_files_by_split_with_other_column_names(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "pq"
    for split, name, (images, labels) in (
        ("train", "train-00000-of-00001", colour_images(8, 0)),
        ("test", "test", colour_images(4, 1)),
    ):
        path = root / f"{name}.parquet" if layout == "flat" else root / split / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(hf_table(images, labels, image="img", label="fine_label"), path)
    splits = load_splits("hf", root, image_size=8)
    assert splits.train.images.shape == (24, 3, 8, 8) and splits.test.labels.tolist() == colour_images(4, 1)[1]
    assert splits.train.classes == NAMES


def test_configured_columns_and_plain_integer_labels(tmp_path: Path) -> None:
    root = colour_dataset(tmp_path / "ds", image="pixels", label="kind", names=None)
    with pytest.raises(
        VitlabError, match=r"data-00000-of-00002.arrow has no image column one of image, img .*pixels, kind.*data.image_column"
    ):
        load_splits("hf", root, image_size=16)
    splits = load_splits("hf", root, image_size=16, image_column="pixels", label_column="kind")
    assert splits.train.classes == ["0", "1", "2"] and splits.test.labels.tolist() == colour_images(4, 1)[1]


def test_a_path_only_image_is_read_inside_the_root_and_skipped_outside_it(tmp_path: Path) -> None:
    images, labels = colour_images(8, 0)
    (tmp_path / "ds" / "files").mkdir(parents=True)
    Image.fromarray(images[0]).save(tmp_path / "ds" / "files" / "0.png")
    Image.fromarray(images[1]).save(tmp_path / "outside.png")
    paths = ["files/0.png", str(tmp_path / "outside.png")] + [None] * 22
    train = hf_table([None, None, *images[2:]], labels, paths=paths)
    save_to_disk(tmp_path / "ds", {"train": train, "test": hf_table(*colour_images(4, 1))})
    with pytest.warns(UserWarning, match=r"skipped 1 unusable image\(s\).*row 1 \(its path .*outside.png leads outside"):
        splits = load_splits("hf", tmp_path / "ds", image_size=16)
    assert len(splits.train) == 23 and torch.equal(splits.train.images[0], torch.from_numpy(images[0]).permute(2, 0, 1))


def test_a_planted_pickle_in_a_data_file_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    root = colour_dataset(tmp_path / "ds")
    path = root / "train" / "data-00000-of-00002.arrow"
    table = pa.ipc.open_stream(path.read_bytes()).read_all()  # a copy: the file is rewritten below
    # the extension-type metadata pyarrow < 14.0.1 unpickled when it read a column (CVE-2023-47248)
    evil = {b"ARROW:extension:name": b"arrow.py_extension_type", b"ARROW:extension:metadata": planted(marker)}
    schema = table.schema.set(1, table.schema.field(1).with_metadata(evil))
    write_stream(path, table.cast(schema))
    assert len(load_splits("hf", root, image_size=16).train) == 24
    assert not marker.exists()
    assert pickle.loads(planted(tmp_path / "control")) and (tmp_path / "control").exists()  # the payload does run when unpickled


BROKEN = {  # what is wrong with the dataset: what the error says
    "no test split": r"ds has split\(s\) train, but needs train and one of test, validation, val, valid",
    "one Dataset": r"ds/train holds one saved Dataset, not a train and a test split; save a DatasetDict",
    "string labels": r"test/data-00000-of-00002.arrow: label column 'label' holds string, not integer.*class_encode_column",
    "label 3": r"test/data-00001-of-00002.arrow: 1 label\(s\) of column 'label' such as 3 are not class indices in \[0, 3\)",
    "label -1": r"test/data-00000-of-00002.arrow: 6 label\(s\).* -1 .*unlabelled example.*drop those rows",
    "no label column": r"test/data-00000-of-00002.arrow has no label column one of label, labels, fine_label",
    "other classes": r"test/data-00000-of-00002.arrow: the test split's class names differ from train's",
}


@pytest.mark.parametrize("problem", BROKEN)
def test_a_broken_dataset_is_one_line_naming_the_file_and_the_fix(tmp_path: Path, capsys, problem: str) -> None:
    images, labels = colour_images(4, 1)
    test = {
        "string labels": hf_table(images, [NAMES[y] for y in labels]),
        "label 3": hf_table(images, labels[:-1] + [3]),
        "label -1": hf_table(images, [-1] * 12),
        "no label column": hf_table(images, labels, label="target"),
        "other classes": hf_table(images, labels, names=["a", "b", "c"]),
    }.get(problem, hf_table(images, labels))
    splits = {"train": hf_table(*colour_images(8, 0)), "test": test}
    root = save_to_disk(tmp_path / "ds", {"train": splits["train"]} if problem == "no test split" else splits)
    if problem == "one Dataset":
        root = root / "train"
    with pytest.raises(VitlabError, match=BROKEN[problem]):
        load_splits("hf", root, image_size=16)
    assert main(["train", "--set", "data.name=hf", "--set", f"data.root={root}", "--set", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitlab train: error: ") and str(root) in err


@pytest.mark.parametrize("stream", ["false", "true"])
def test_vitlab_train_on_a_dataset_dict_learns_above_chance_in_memory_and_streamed(tmp_path: Path, stream: str) -> None:
    root = colour_dataset(tmp_path / "ds")
    settings = [
        f"data.stream={stream}",
        "data.workers=0",
        "model.name=vit-ti/16",
        "model.options={depth: 1, embed_dim: 32, num_heads: 2, mlp_dim: 64, patch_size: 4}",
        "data.name=hf",
        f"data.root={root}",
        "data.image_size=16",
        "augment.vflip=false",
        "train.epochs=5",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.threads=1",
        "optim.lr=0.003",
        "optim.warmup_epochs=0",
        f"out_dir={tmp_path / 'runs'}",
        "name=hf",
    ]
    assert main(["train", "--no-progress", *[a for s in settings for a in ("--set", s)]]) == 0
    results = json.loads((tmp_path / "runs" / "hf" / "results.json").read_text())
    assert results["test"]["acc1"] >= 0.75  # 3 classes: chance is 1/3; at least 9 of the 12 test images
