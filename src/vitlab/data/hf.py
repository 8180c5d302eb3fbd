"""Hugging Face datasets on disk, read with pyarrow (the `datasets` library is not needed): `data.name: hf`.

`data.root` holds, in the first of these layouts that matches:
- a DatasetDict written by `save_to_disk`: `dataset_dict.json` names the splits, and each `<split>/state.json`
  lists its `data-0000k-of-0000N.arrow` files (Arrow IPC streams);
- one folder per split holding `*.arrow` or `*.parquet` files;
- files named by their split: `train.parquet`, `train-00000-of-00004.parquet` (the Hub's names), `.arrow` alike.
Training reads `train`; evaluation the first of test, validation, val, valid. Opening a dataset reads only
schemas and the label column. The image column (`data.image_column`, else `image` or `img`) holds the Image
feature, a struct {bytes, path}, or plain encoded bytes; Arrow files are memory-mapped, Parquet files read
whole (still encoded). Bytes decode through vitlab.data.images, with the folders' pixel cap and checks; a
path-only image is read from `data.root`, and one leading outside it is unusable, skipped as a folder's link
out of its root is. The label column (`data.label_column`, else `label`, `labels` or `fine_label`) holds
integers: a ClassLabel's names come from the schema's `huggingface` metadata or the split's dataset_info.json,
plain integers are named `0`, `1`, …. Nothing is unpickled: Arrow IPC and Parquet are plain columnar data, and
pyarrow below 14.0.1, which unpickled `arrow.py_extension_type` columns (CVE-2023-47248), is refused.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vitlab.data.dataset import DataSplits, ImageDataset
from vitlab.data.folders import decoded_dataset
from vitlab.data.images import MAX_PIXELS, UnusableImage, decode_images, named, outside_note
from vitlab.errors import VitlabError, brief

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    raise VitlabError(
        "data.name=hf reads datasets with pyarrow, which is not installed: pip install 'vitlab[hf-datasets]'"
    ) from None
if tuple(int(part) for part in re.findall(r"\d+", pa.__version__)[:3]) < (14, 0, 1):
    raise VitlabError(f"pyarrow {pa.__version__} unpickles data files (CVE-2023-47248); upgrade: pip install 'pyarrow>=14.0.1'")

EVAL_SPLITS = ("test", "validation", "val", "valid")
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")
SUFFIXES = (".arrow", ".parquet")
_SPLIT_FILE = re.compile(r"(?P<split>[A-Za-z]+)(?:[-_.][\w.-]*)?\.(?:arrow|parquet)")
_SAVE = "e.g. DatasetDict(train=..., test=...).save_to_disk(DIR), or ds.train_test_split(test_size=0.1).save_to_disk(DIR)"
_LAYOUT = (
    f"expected a `save_to_disk` DatasetDict, split folders train/ and test/ of .arrow/.parquet files, "
    f"or train-*.parquet and test-*.parquet files ({_SAVE})"
)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VitlabError(f"cannot read {path} ({exc}); save the dataset again with save_to_disk") from None
    if not isinstance(value, dict):
        raise VitlabError(f"{path} is not a JSON object as save_to_disk writes; save the dataset again")
    return value


def _plain(name: object, listed_in: Path) -> str:
    """`name` when it is one plain file or folder name (no /, not ..); the lists of save_to_disk hold nothing else."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise VitlabError(f"{listed_in} lists {brief(name)}, not a plain name inside its folder; save the dataset again")
    return name


def _data_files(folder: Path, root: Path) -> list[Path]:
    """The data files of one split folder: those its state.json lists (save_to_disk), else its .arrow/.parquet files, sorted."""
    state = folder / "state.json"
    if state.is_file():
        entries = _json(state).get("_data_files")
        if not isinstance(entries, list):
            raise VitlabError(f"{state} has no _data_files list as save_to_disk writes; save the dataset again")
        files = [folder / _plain(entry.get("filename") if isinstance(entry, dict) else None, state) for entry in entries]
    else:
        files = sorted(path for path in folder.iterdir() if path.suffix in SUFFIXES and path.is_file())
    for path in files:
        note = outside_note(path, root)
        if note or not path.is_file():
            raise VitlabError(f"data file {note or f'{path} is missing'}; save the dataset again under {root}")
    return files


def split_files(root: str | Path) -> dict[str, list[Path]]:
    """Each split's data files under `root`, in order (the layouts of this module's docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise VitlabError(f"data.root {root} is not a folder; {_LAYOUT}")
    if (root / "state.json").is_file():
        raise VitlabError(f"{root} holds one saved Dataset, not a train and a test split; save a DatasetDict, {_SAVE}")
    listing = root / "dataset_dict.json"
    if listing.is_file():
        names = _json(listing).get("splits")
        folders = [root / _plain(name, listing) for name in names] if isinstance(names, list) else []
        missing = [str(folder) for folder in folders if not folder.is_dir()]
        if not folders or missing:
            raise VitlabError(f"{listing} lists split folder(s) that are not there: {missing or names}; save the dataset again")
    else:
        folders = sorted(path for path in root.iterdir() if path.is_dir())
    splits = {folder.name: files for folder in folders if (files := _data_files(folder, root))}
    if not splits:
        for path in sorted(root.iterdir()):
            match = _SPLIT_FILE.fullmatch(path.name)
            if match and path.is_file() and not outside_note(path, root):
                splits.setdefault(match["split"].lower(), []).append(path)
    return splits


def _arrow_reader(path: Path):
    """A reader of an Arrow IPC file or stream (save_to_disk writes streams), memory-mapped."""
    source = pa.memory_map(str(path))
    is_file = source.read(6) == b"ARROW1"  # the IPC file format's magic; a stream starts with a message
    source.seek(0)
    return pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)


def _read(path: Path, columns: list[str] | None = None) -> pa.Table | pa.Schema:
    """The `columns` of a data file (Arrow memory-mapped, Parquet read), or its schema when `columns` is None."""
    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path) if columns is None else pq.read_table(path, columns=columns)
        reader = _arrow_reader(path)
        return reader.schema if columns is None else reader.read_all().select(columns)
    except (pa.ArrowException, OSError) as exc:
        kind = path.suffix[1:].capitalize()
        raise VitlabError(f"cannot read {path} as {kind} ({exc}); save the dataset again") from None


def _column(path: Path, schema: pa.Schema, chosen: str | None, defaults: tuple[str, ...], role: str) -> str:
    """The image or label column's name: `chosen`, else the first of `defaults` in the schema."""
    name = chosen or next((n for n in defaults if n in schema.names), None)
    if name not in schema.names:
        wanted = repr(chosen) if chosen else f"one of {', '.join(defaults)}"
        raise VitlabError(
            f"{path} has no {role} column {wanted} (its columns: {', '.join(schema.names)}); "
            f"name it with --set data.{role}_column=NAME"
        )
    return name


def _class_names(path: Path, schema: pa.Schema, label: str) -> list[str] | None:
    """The ClassLabel names of the label column: from the schema's `huggingface` metadata, else dataset_info.json."""
    features = None
    if schema.metadata and b"huggingface" in schema.metadata:
        try:
            features = json.loads(schema.metadata[b"huggingface"]).get("info", {}).get("features")
        except (ValueError, AttributeError):
            raise VitlabError(f"{path}: its huggingface schema metadata is not JSON; save the dataset again") from None
    if features is None and (path.parent / "dataset_info.json").is_file():
        features = _json(path.parent / "dataset_info.json").get("features")
    feature = features.get(label) if isinstance(features, dict) else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(name) for name in feature["names"]]
    return None


@dataclass
class _Split:
    """One split as scanned: its files, image and label columns, labels per file, ClassLabel names (None: plain integers)."""

    files: list[Path]
    image: str
    label: str
    labels: list[np.ndarray] = field(default_factory=list)
    names: list[str] | None = None


def _scan(files: list[Path], image_column: str | None, label_column: str | None) -> _Split:
    """Schemas and labels of a split's files, checked: the columns there, images encoded, labels integers."""
    split = None
    for path in files:
        schema = _read(path)
        image = _column(path, schema, image_column, IMAGE_COLUMNS, "image")
        label = _column(path, schema, label_column, LABEL_COLUMNS, "label")
        kind = schema.field(image).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or _is_image_struct(kind)):
            raise VitlabError(
                f"{path}: column {image!r} holds {kind}, not images (the Image feature's {{bytes, path}} or encoded bytes); "
                "cast it with ds.cast_column(NAME, datasets.Image()) and save again, or set data.image_column"
            )
        kind = schema.field(label).type
        if not pa.types.is_integer(kind):
            raise VitlabError(
                f"{path}: label column {label!r} holds {kind}, not integer class indices; encode it "
                f"(ds = ds.class_encode_column({label!r})) and save again, or set data.label_column"
            )
        labels = _read(path, [label]).column(label)
        if labels.null_count:
            raise VitlabError(f"{path}: {labels.null_count} row(s) have no {label!r}; drop them (ds.filter) and save again")
        names = _class_names(path, schema, label)
        split = split or _Split(files, image, label, names=names)
        if names != split.names:
            raise VitlabError(f"{path}: its class names differ from those of {files[0]}; save the split again in one go")
        split.labels.append(labels.to_numpy().astype(np.int64))
    return split


def _is_image_struct(kind: pa.DataType) -> bool:
    names = [kind.field(i).name for i in range(kind.num_fields)] if pa.types.is_struct(kind) else []
    return "bytes" in names and set(names) <= {"bytes", "path"}


def _classes(train: _Split, test: _Split, test_name: str) -> tuple[str, ...]:
    """The class names both splits share: the ClassLabel's, else `0`…`K-1` for the largest label K-1 seen."""
    if test.names is not None and train.names is not None and test.names != train.names:
        raise VitlabError(
            f"{test.files[0]}: the {test_name} split's class names differ from train's ({brief(test.names)} vs "
            f"{brief(train.names)}); save both splits from one DatasetDict"
        )
    names = train.names or test.names
    if names is None:
        top = max(int(labels.max(initial=0)) for split in (train, test) for labels in split.labels)
        names = [str(k) for k in range(top + 1)]
    for split in (train, test):
        for path, labels in zip(split.files, split.labels):
            bad = labels[(labels < 0) | (labels >= len(names))]
            if bad.size:
                unlabelled = " (-1 marks an unlabelled example, as in ImageNet's test split)" if (bad == -1).any() else ""
                raise VitlabError(
                    f"{path}: {bad.size} label(s) of column {split.label!r} such as {int(bad[0])} are not class indices "
                    f"in [0, {len(names)}){unlabelled}; drop those rows (ds.filter) or fix the ClassLabel names, and save again"
                )
    return tuple(names)


class ImageColumn:
    """The image column of a split's data files, row by row: (encoded bytes or None, path or None)."""

    def __init__(self, files: list[Path], column: str):
        self.files, self.column = files, column
        self._open()

    def _open(self) -> None:
        chunks = [chunk for path in self.files for chunk in _read(path, [self.column]).column(self.column).chunks]
        self.starts = np.cumsum([0] + [len(chunk) for chunk in chunks])
        self.chunks = [_fields(chunk) for chunk in chunks]

    def __getstate__(self) -> dict:  # a spawned DataLoader worker maps the files again rather than receive their bytes
        return {"files": self.files, "column": self.column}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __getitem__(self, row: int) -> tuple[bytes | None, str | None]:
        chunk = int(np.searchsorted(self.starts, row, side="right")) - 1
        (data, paths), offset = self.chunks[chunk], row - int(self.starts[chunk])
        return data[offset].as_py(), None if paths is None else paths[offset].as_py()


def _fields(chunk: pa.Array) -> tuple[pa.Array, pa.Array | None]:
    """The bytes and (for the Image struct) paths of a chunk of the image column."""
    if not pa.types.is_struct(chunk.type):
        return chunk, None
    fields = dict(zip((f.name for f in chunk.type), chunk.flatten()))  # flatten applies the struct's own nulls and offset
    return fields["bytes"], fields.get("path")


@dataclass(frozen=True, eq=False)
class ArrowTable:
    """One split of a Hugging Face dataset, as vitlab.data.stream.files.SampleTable: rows of its image column, labels, classes."""

    root: Path
    images: ImageColumn
    file_starts: np.ndarray  # the first row of each data file
    rows: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: np.ndarray) -> ArrowTable:
        """The table restricted to `indices`, in that order."""
        return replace(self, rows=self.rows[indices], labels=self.labels[indices])

    def name(self, index: int) -> str:
        """Sample `index` in messages: its data file and row there."""
        row = int(self.rows[index])
        file = int(np.searchsorted(self.file_starts, row, side="right")) - 1
        return f"{self.images.files[file]} row {row - int(self.file_starts[file])}"

    def source(self, index: int) -> Path | BinaryIO:
        """What the decoder opens: the encoded bytes, or the file a path-only image names inside the root."""
        data, path = self.images[int(self.rows[index])]
        if data is not None:
            return io.BytesIO(data)
        if not path:
            raise UnusableImage(f"{self.name(index)} (no image: neither bytes nor a path)")
        file = self.root / path
        if not file.resolve().is_relative_to(self.root.resolve()):
            raise UnusableImage(
                f"{self.name(index)} (its path {path} leads outside {self.root}; store the bytes in the dataset or copy it in)"
            )
        return file


def _scanned(root: Path, image_column: str | None, label_column: str | None) -> tuple[_Split, _Split, tuple[str, ...]]:
    splits = split_files(root)
    test = next((name for name in EVAL_SPLITS if name in splits), None)
    if "train" not in splits or test is None:
        found = ", ".join(sorted(splits)) or "none"
        raise VitlabError(f"{root} has split(s) {found}, but needs train and one of {', '.join(EVAL_SPLITS)}; {_LAYOUT}")
    train, evaluation = (_scan(splits[name], image_column, label_column) for name in ("train", test))
    return train, evaluation, _classes(train, evaluation, test)


def hf_classes(root: str | Path, image_column: str | None = None, label_column: str | None = None) -> list[str]:
    """The class names of the dataset at `root`, read without touching an image."""
    return list(_scanned(Path(root), image_column, label_column)[2])


def hf_tables(
    root: str | Path, image_column: str | None = None, label_column: str | None = None
) -> tuple[ArrowTable, ArrowTable]:
    """The train and evaluation splits of the dataset at `root`, their image columns open."""
    root = Path(root)
    *splits, classes = _scanned(root, image_column, label_column)
    tables = []
    for split in splits:
        labels = np.concatenate(split.labels)
        starts = np.cumsum([0] + [len(part) for part in split.labels[:-1]])
        tables.append(ArrowTable(root, ImageColumn(split.files, split.image), starts, np.arange(len(labels)), labels, classes))
    return tables[0], tables[1]


def hf_splits(
    root: str | Path,
    image_size: int,
    image_column: str | None = None,
    label_column: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> DataSplits:
    """Train and evaluation splits decoded into memory, each image resized to `image_size` as image folders are."""
    skipped: list[str] = []

    def decode(table: ArrowTable) -> ImageDataset:
        opener = lambda i: (table.source(i), table.name(i))  # noqa: E731
        decoded = decode_images(range(len(table)), image_size, max_pixels, opener)
        dataset = decoded_dataset(decoded, table.labels.tolist(), list(table.classes), skipped)
        if not len(dataset):
            raise VitlabError(
                f"every image of {named([str(f) for f in table.images.files])} is unusable, e.g. {skipped[-1]}; save them again"
            )
        return dataset

    splits = DataSplits(*map(decode, hf_tables(root, image_column, label_column)))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unusable image(s) under {root}: {named(skipped)}", stacklevel=2)
    return splits
