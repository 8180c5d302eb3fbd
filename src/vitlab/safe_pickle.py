"""Unpicklers that admit only named classes: a DCP checkpoint's metadata, or the official CIFAR batches;
and `torch.export` archives, read only when they hold no pickle beyond tensors and plain data.

Unpickling calls whatever the file names (`os.system` included), so a pickle vitlab reads from disk
goes through `load` with an allow-list of (module, name) pairs; any other global is refused before
anything is imported or called.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import IO

import torch

from vitlab.errors import VitlabError

# Every global the `.metadata` of a torch.distributed.checkpoint save refers to (torch 2.13, FSDP2
# model and AdamW state; found by unpickling a real one with a recording `find_class`).
DCP_METADATA: frozenset[tuple[str, str]] = frozenset(
    {
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorStorageMetadata",
                "TensorProperties",
                "ChunkStorageMetadata",
                "BytesStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        *(("torch", name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)),
        ("pathlib", "PosixPath"),
        ("pathlib._local", "PosixPath"),  # where Python 3.13 (only) pickles it from
    }
)

# The official CIFAR batches are protocol-2 pickles of dicts, lists, bytes, ints and numpy arrays;
# `_codecs.encode` is how Python 3 writes bytes at protocol 2; numpy 2 renamed numpy.core to numpy._core.
CIFAR_BATCH: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }
)


class RefusedGlobal(VitlabError):
    """A pickle referred to a class or function outside the allow-list it was read with."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the (module, name) pairs in `allowed`."""

    def __init__(self, file: IO[bytes], allowed: frozenset[tuple[str, str]], encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> object:
        """The global `module.name` if it is allowed; RefusedGlobal otherwise."""
        if (module, name) not in self.allowed:
            raise RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def load(file: IO[bytes], allowed: frozenset[tuple[str, str]], source: str | Path, fix: str, encoding: str = "ASCII") -> object:
    """Unpickle `file` admitting only `allowed`; a RefusedGlobal names `source`, the refused global and `fix`."""
    try:
        return RestrictedUnpickler(file, allowed, encoding).load()
    except RefusedGlobal as err:
        raise RefusedGlobal(
            f"{source} refers to {err}, which this kind of file never holds; refusing to unpickle it (it could run code); {fix}"
        ) from None


def load_exported_program(path: str | Path, fix: str) -> torch.export.ExportedProgram:
    """`torch.export.load` of a `.pt2` archive after checking that it holds no pickle that could run code.

    torch.export.load unpickles tensor subclasses, custom and opaque objects, and sample inputs that fail
    weights_only, with weights_only=False; so every weight and constant must be stored as raw bytes and every
    `.pt` member (sample inputs) must load with weights_only=True.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("_config.json"):  # data/weights/…, data/constants/…: how each tensor is stored
                    entries = json.loads(archive.read(name))["config"].values()
                    raw = all(e.get("use_pickle") is False and e["path_name"].startswith(("weight_", "tensor_")) for e in entries)
                    if not raw:
                        raise VitlabError(
                            f"{path} stores pickled tensors or objects ({name}); refusing to load it (it could run code); {fix}"
                        )
                elif name.endswith(".pt"):
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
    except pickle.UnpicklingError:
        raise VitlabError(f"{path} holds a pickle of more than tensors and plain data; refusing to load it; {fix}") from None
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, AttributeError, TypeError) as err:
        raise VitlabError(f"{path} is not a torch.export archive ({type(err).__name__}: {err}); {fix}") from None
    return torch.export.load(path)
