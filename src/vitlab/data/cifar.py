"""CIFAR-10 and CIFAR-100 read from the official python-version archives.

`root` may be the `.tar.gz` itself, the extracted folder (`cifar-10-batches-py` or
`cifar-100-python`), or a directory holding either. An archive is extracted next to itself,
through a temporary folder that is renamed into place only when extraction has finished, with
tarfile's "data" filter (no absolute paths, no `..`, no links leaving the folder), and only when its
MD5 is the official one. The batch files are pickles: they are read with an unpickler that admits
only dicts, lists, bytes, strings, numbers and numpy arrays (vitlab.safe_pickle), never running code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitlab import safe_pickle
from vitlab.data.dataset import DataSplits, ImageDataset
from vitlab.errors import VitlabError


@dataclass(frozen=True)
class CifarFormat:
    """Where the official python-version archive of one CIFAR dataset keeps what."""

    title: str
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    url: str
    md5: str

    @property
    def files(self) -> tuple[str, ...]:
        """Names of every file the extracted folder must hold."""
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR_FORMATS: dict[str, CifarFormat] = {
    "cifar10": CifarFormat(
        title="CIFAR-10",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": CifarFormat(
        title="CIFAR-100",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def _format(name: str) -> CifarFormat:
    if name not in CIFAR_FORMATS:
        raise VitlabError(f"unknown CIFAR dataset {name!r}; allowed: {sorted(CIFAR_FORMATS)}")
    return CIFAR_FORMATS[name]


def _layout(fmt: CifarFormat, root: Path) -> str:
    return (
        f"expected one of: {root / fmt.archive} (the official archive), or {root / fmt.folder}/ holding "
        f"{', '.join(fmt.files)}; pass download=True to fetch the archive from {fmt.url}"
    )


def _hint(fmt: CifarFormat, names: set[str]) -> str:
    """A note naming the other CIFAR dataset when its folder or archive is among names."""
    for name, other in CIFAR_FORMATS.items():
        if other is not fmt and {other.folder, other.archive} & names:
            return f" (this is {other.title} data: use name={name!r})"
    return ""


def _find(fmt: CifarFormat, root: Path) -> Path | None:
    """The extracted folder or the archive that root points at, the folder preferred; None if neither."""
    if root.is_file():
        sibling = root.parent / fmt.folder
        return sibling if root.name == fmt.archive and sibling.is_dir() else root
    for folder in (root, root / fmt.folder):
        if folder.name == fmt.folder and folder.is_dir():
            return folder
    archive = root / fmt.archive
    return archive if archive.is_file() else None


def _extract(archive: Path, fmt: CifarFormat) -> Path:
    """Extract a CIFAR python archive next to itself, all-or-nothing, and return the folder."""
    target = archive.parent / fmt.folder
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = tar.getnames()
            if not {f"{fmt.folder}/{f}" for f in fmt.files} <= set(names):
                raise VitlabError(
                    f"{archive} is not the {fmt.title} python archive: it should hold {fmt.folder}/ with "
                    f"{', '.join(fmt.files)}, but holds {sorted(names)[:5]}"
                    f"{_hint(fmt, {n.split('/')[0] for n in names} | {archive.name})}"
                )
            md5 = _md5(archive)
            if md5 != fmt.md5:
                raise VitlabError(
                    f"{archive} has MD5 {md5}, but the official {fmt.title} archive has {fmt.md5}; it is damaged or "
                    f"not the official archive: delete it and download it again (download=True, or from {fmt.url})"
                )
            staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=archive.parent))
            try:
                tar.extractall(staging, filter="data")
                if not target.exists():  # another process may have finished first
                    os.replace(staging / fmt.folder, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except tarfile.FilterError as err:
        raise VitlabError(f"refusing to extract {archive}: unsafe member ({err}); use the official archive") from err
    except (tarfile.TarError, EOFError, OSError) as err:
        raise VitlabError(f"cannot read {archive} as a .tar.gz archive ({err}); delete it and download it again") from err
    return target


def _unpickle(path: Path) -> dict:
    """One CIFAR batch file, unpickled admitting only what the official files hold."""
    fix = "delete the folder and extract the official archive again"
    try:
        with path.open("rb") as f:
            batch = safe_pickle.load(f, safe_pickle.CIFAR_BATCH, path, fix, encoding="bytes")
    except VitlabError:
        raise
    except Exception as err:  # unpickling a damaged file can fail in almost any way
        raise VitlabError(f"{path} is not a readable CIFAR pickle ({err}); {fix}") from err
    if not isinstance(batch, dict):
        raise VitlabError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict; {fix}")
    return batch


def _field(batch: dict, key: bytes, path: Path, fmt: CifarFormat) -> object:
    if key not in batch:
        raise VitlabError(f"{path} has no {key!r} entry, so it is not a {fmt.title} file; extract the archive again")
    return batch[key]


def _read_split(folder: Path, files: tuple[str, ...], fmt: CifarFormat, classes: list[str]) -> ImageDataset:
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path)
        data = np.asarray(_field(batch, b"data", path, fmt), dtype=np.uint8)
        batch_labels = np.asarray(_field(batch, fmt.label_key, path, fmt), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise VitlabError(
                f"{path}: data of shape {data.shape} with {len(batch_labels)} labels; expected (N, 3072) "
                "uint8 rows with one label each; extract the archive again"
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))  # each row is R, G, B planes of 32x32
        labels.append(torch.from_numpy(batch_labels))
    return ImageDataset(images=torch.cat(images), labels=torch.cat(labels), classes=classes)


def _read_folder(folder: Path, fmt: CifarFormat) -> DataSplits:
    missing = [f for f in fmt.files if not (folder / f).is_file()]
    if missing:
        raise VitlabError(f"{folder} lacks {missing}; {_layout(fmt, folder.parent)}")
    meta_path = folder / fmt.meta_file
    classes = [n.decode() for n in _field(_unpickle(meta_path), fmt.names_key, meta_path, fmt)]
    return DataSplits(
        train=_read_split(folder, fmt.train_files, fmt, classes),
        test=_read_split(folder, fmt.test_files, fmt, classes),
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_cifar(name: str, root: str | Path, url: str | None = None, md5: str | None = None) -> Path:
    """Download the official archive of `name` into root, verify its MD5, and return its path."""
    fmt = _format(name)
    url, md5 = url or fmt.url, md5 or fmt.md5
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / fmt.archive
    if target.is_file() and _md5(target) == md5:
        return target
    fd, partial = tempfile.mkstemp(prefix=f".{fmt.archive}.", suffix=".part", dir=root)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != md5:
            raise VitlabError(
                f"checksum mismatch for {url}: expected MD5 {md5}, got {digest.hexdigest()}; the download is "
                f"corrupt or not the official archive; try again or place the archive at {target} by hand"
            )
        os.replace(partial, target)
    except (urllib.error.URLError, OSError) as err:
        raise VitlabError(f"could not download {url} ({err}); place the archive at {target} by hand") from err
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def cifar_splits(name: str, root: str | Path, download: bool = False) -> DataSplits:
    """Train and test splits of CIFAR-10 ("cifar10") or CIFAR-100 ("cifar100") as uint8 tensors."""
    fmt = _format(name)
    root = Path(root)
    found = _find(fmt, root)
    if found is None and download:
        found = download_cifar(name, root)
    if found is None:
        names = {root.name} | ({p.name for p in root.iterdir()} if root.is_dir() else set())
        raise VitlabError(f"no {fmt.title} data at {root}{_hint(fmt, names)}; {_layout(fmt, root)}")
    folder = found if found.is_dir() else _extract(found, fmt)
    return _read_folder(folder, fmt)
