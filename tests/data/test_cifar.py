"""CIFAR loaders, on tiny archives written in the official python-version format."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_safe_pickle import planted
from vitlab.data.cifar import CIFAR_FORMATS, cifar_splits, download_cifar
from vitlab.errors import VitlabError

PER_FILE = 3  # images in every batch file


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are protocol-2 pickles


def _rows(n: int, offset: int) -> np.ndarray:
    """n distinct (n, 3072) uint8 rows: row-major R plane, then G, then B."""
    return ((np.arange(n * 3072).reshape(n, 3072) + offset) % 251).astype(np.uint8)


def write_cifar_folder(parent: Path, name: str) -> Path:
    """Write an extracted CIFAR folder with PER_FILE images per batch file; returns it."""
    fmt = CIFAR_FORMATS[name]
    folder = parent / fmt.folder
    folder.mkdir(parents=True)
    num_classes = 10 if name == "cifar10" else 100
    for i, file in enumerate((*fmt.train_files, *fmt.test_files)):
        labels = [(i * PER_FILE + j) % num_classes for j in range(PER_FILE)]
        batch = {b"data": _rows(PER_FILE, i), b"filenames": [b"img_%d.png" % j for j in range(PER_FILE)]}
        if name == "cifar10":
            batch |= {b"labels": labels, b"batch_label": b"batch %d" % i}
        else:
            batch |= {b"fine_labels": labels, b"coarse_labels": [k // 5 for k in labels], b"batch_label": b"x"}
        _dump(folder / file, batch)
    names = [b"class_%d" % k for k in range(num_classes)]
    meta = {b"label_names": names, b"num_cases_per_batch": PER_FILE, b"num_vis": 3072}
    if name == "cifar100":
        meta = {b"fine_label_names": names, b"coarse_label_names": [b"super_%d" % k for k in range(20)]}
    _dump(folder / fmt.meta_file, meta)
    return folder


def write_cifar_archive(parent: Path, name: str, extra: dict[str, bytes] | None = None) -> Path:
    """Write the official-style .tar.gz of `name` into parent, plus raw extra members; returns it."""
    fmt = CIFAR_FORMATS[name]
    folder = write_cifar_folder(parent / "src", name)
    archive = parent / fmt.archive
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=fmt.folder)
        for member, data in (extra or {}).items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_loads_extracted_folder_with_shapes_labels_and_names(tmp_path: Path, name: str) -> None:
    fmt = CIFAR_FORMATS[name]
    folder = write_cifar_folder(tmp_path, name)
    for root in (folder, tmp_path):
        splits = cifar_splits(name, root)
        assert splits.train.images.shape == (PER_FILE * len(fmt.train_files), 3, 32, 32)
        assert splits.test.images.shape == (PER_FILE, 3, 32, 32)
        assert splits.train.images.dtype == torch.uint8
        assert splits.train.labels.tolist() == [k % splits.train.num_classes for k in range(len(splits.train))]
        assert splits.train.classes[:2] == ["class_0", "class_1"]
        assert splits.train.num_classes == (10 if name == "cifar10" else 100)


def test_pixel_layout_is_chw_from_row_major_planes(tmp_path: Path) -> None:
    splits = cifar_splits("cifar10", write_cifar_folder(tmp_path, "cifar10"))
    row = torch.from_numpy(_rows(PER_FILE, 0)[1])
    image = splits.train.images[1]
    assert torch.equal(image[0], row[:1024].view(32, 32))  # first 1024 values: red plane
    assert torch.equal(image[1], row[1024:2048].view(32, 32))
    assert torch.equal(image[2, 5, 7], row[2048 + 5 * 32 + 7])  # row-major inside a plane


def register_md5(monkeypatch: pytest.MonkeyPatch, name: str, archive: Path) -> None:
    """Make `archive` the one whose MD5 counts as official for `name` (the real MD5 is of the real archive)."""
    fmt = dataclasses.replace(CIFAR_FORMATS[name], md5=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(CIFAR_FORMATS, name, fmt)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_loads_from_archive_and_from_its_directory(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = write_cifar_archive(tmp_path / "a", name)
    register_md5(monkeypatch, name, archive)
    from_archive = cifar_splits(name, archive)
    assert (archive.parent / CIFAR_FORMATS[name].folder).is_dir()
    assert not list(archive.parent.glob(".extract-*")), "the staging folder must be removed"
    expected = cifar_splits(name, tmp_path / "a" / "src")
    assert torch.equal(from_archive.train.images, expected.train.images)

    other = tmp_path / "b"
    other.mkdir()
    copy = other / archive.name
    copy.write_bytes(archive.read_bytes())
    assert torch.equal(cifar_splits(name, other).test.images, expected.test.images)


def test_missing_path_shows_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(VitlabError, match="cifar-10-python.tar.gz.*cifar-10-batches-py.*data_batch_1"):
        cifar_splits("cifar10", tmp_path / "nowhere")


def test_unknown_name_lists_allowed(tmp_path: Path) -> None:
    with pytest.raises(VitlabError, match="cifar10.*cifar100"):
        cifar_splits("cifar1000", tmp_path)


def test_cifar100_archive_given_for_cifar10_is_named(tmp_path: Path) -> None:
    archive = write_cifar_archive(tmp_path, "cifar100")
    with pytest.raises(VitlabError, match="not the CIFAR-10 python archive.*use name='cifar100'"):
        cifar_splits("cifar10", archive)
    with pytest.raises(VitlabError, match="use name='cifar100'"):
        cifar_splits("cifar10", tmp_path / "src" / "cifar-100-python")


def test_random_tar_and_non_tar_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("notes.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(VitlabError, match="not the CIFAR-10 python archive"):
        cifar_splits("cifar10", archive)
    archive.write_bytes(b"this is not a tar file")
    with pytest.raises(VitlabError, match="cannot read"):
        cifar_splits("cifar10", archive)


def test_path_traversal_member_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = write_cifar_archive(tmp_path / "in", "cifar10", extra={"../evil": b"owned"})
    register_md5(monkeypatch, "cifar10", archive)
    with pytest.raises(VitlabError, match="unsafe member"):
        cifar_splits("cifar10", archive)
    assert not (tmp_path / "evil").exists()
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name, "src"], "nothing half-written"


def test_damaged_batch_file_is_reported(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path, "cifar10")
    (folder / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(VitlabError, match="data_batch_3"):
        cifar_splits("cifar10", folder)


@pytest.mark.parametrize("name,file", [("cifar10", "batches.meta"), ("cifar10", "data_batch_1"), ("cifar100", "meta")])
def test_planted_pickle_in_extracted_folder_is_refused_and_never_runs(tmp_path: Path, name: str, file: str) -> None:
    folder = write_cifar_folder(tmp_path, name)
    marker = tmp_path / "ran"
    (folder / file).write_bytes(planted(marker, protocol=2))
    for _ in range(2):  # and again on the next run
        with pytest.raises(VitlabError, match=f"{file} refers to io.open.*refusing to unpickle.*extract the official archive"):
            cifar_splits(name, tmp_path)
    assert not marker.exists()


def test_planted_os_system_batch_is_refused_and_never_runs(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path, "cifar10")
    marker = tmp_path / "ran"
    (folder / "test_batch").write_bytes(planted(marker, protocol=2, shell=True))
    with pytest.raises(VitlabError, match="test_batch refers to posix.system"):
        cifar_splits("cifar10", folder)
    assert not marker.exists()


@pytest.mark.parametrize("file", ["batches.meta", "data_batch_1"])
def test_local_archive_with_planted_pickle_is_refused_by_its_md5(tmp_path: Path, file: str) -> None:
    marker = tmp_path / "ran"
    archive = write_cifar_archive(tmp_path, "cifar10", extra={f"cifar-10-batches-py/{file}": planted(marker, 2)})
    found = hashlib.md5(archive.read_bytes()).hexdigest()
    expected = CIFAR_FORMATS["cifar10"].md5
    with pytest.raises(VitlabError, match=f"{archive} has MD5 {found}, but .* has {expected}.*delete it and download it again"):
        cifar_splits("cifar10", archive)
    assert not marker.exists()
    assert not (tmp_path / "cifar-10-batches-py").exists(), "nothing extracted"


def test_planted_pickle_in_archive_with_trusted_md5_is_still_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "ran"
    archive = write_cifar_archive(tmp_path, "cifar10", extra={"cifar-10-batches-py/batches.meta": planted(marker, 2)})
    register_md5(monkeypatch, "cifar10", archive)
    with pytest.raises(VitlabError, match="batches.meta refers to io.open"):
        cifar_splits("cifar10", archive)
    assert not marker.exists()


def test_local_archive_with_wrong_md5_is_refused_naming_both(tmp_path: Path) -> None:
    archive = write_cifar_archive(tmp_path, "cifar100")
    found = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(
        VitlabError, match=f"has MD5 {found}, but the official CIFAR-100 archive has eb9058c3a382ffc7106e4002c42a8d85"
    ):
        cifar_splits("cifar100", tmp_path)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An HTTP server on 127.0.0.1 (free port) serving a temporary folder: (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_verifies_checksum_then_loads(
    loopback: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served, base = loopback
    archive = write_cifar_archive(served, "cifar10")
    register_md5(monkeypatch, "cifar10", archive)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "downloads"
    got = download_cifar("cifar10", dest, url=f"{base}/{archive.name}", md5=md5)
    assert got == dest / "cifar-10-python.tar.gz"
    assert got.read_bytes() == archive.read_bytes()
    assert len(cifar_splits("cifar10", dest).train) == 5 * PER_FILE


def test_cifar_splits_download_uses_the_registered_url(
    loopback: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served, base = loopback
    archive = write_cifar_archive(served, "cifar100")
    fmt = dataclasses.replace(
        CIFAR_FORMATS["cifar100"], url=f"{base}/{archive.name}", md5=hashlib.md5(archive.read_bytes()).hexdigest()
    )
    monkeypatch.setitem(CIFAR_FORMATS, "cifar100", fmt)
    splits = cifar_splits("cifar100", tmp_path / "fresh", download=True)
    assert len(splits.test) == PER_FILE


def test_checksum_mismatch_raises_and_leaves_nothing(loopback: tuple[Path, str], tmp_path: Path) -> None:
    served, base = loopback
    archive = write_cifar_archive(served, "cifar10")
    actual = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "downloads"
    with pytest.raises(VitlabError, match=f"expected MD5 {'0' * 32}, got {actual}"):
        download_cifar("cifar10", dest, url=f"{base}/{archive.name}", md5="0" * 32)
    assert list(dest.iterdir()) == []


def test_unreachable_url_is_a_clear_error(loopback: tuple[Path, str], tmp_path: Path) -> None:
    _, base = loopback
    with pytest.raises(VitlabError, match="could not download.*by hand"):
        download_cifar("cifar10", tmp_path, url=f"{base}/missing.tar.gz", md5="0" * 32)
    assert list(tmp_path.glob("*.part")) == []
