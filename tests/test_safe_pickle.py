"""Restricted unpicklers: planted pickles are refused before they run, the allowed globals still load."""

from __future__ import annotations

import builtins
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlab import safe_pickle
from vitlab.errors import VitlabError


class Planted:
    """A pickle payload: unpickling it creates `marker` (the stand-in for running any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return builtins.open, (str(self.marker), "w")


class PlantedShell(Planted):
    """The same payload through os.system."""

    def __reduce__(self) -> tuple:
        return os.system, (f"touch '{self.marker}'",)


def planted(marker: Path, protocol: int = pickle.DEFAULT_PROTOCOL, shell: bool = False) -> bytes:
    """A pickle of a harmless-looking dict holding a payload that would create `marker`."""
    payload = PlantedShell(marker) if shell else Planted(marker)
    return pickle.dumps({"names": ["cat"], "extra": payload}, protocol=protocol)


@pytest.mark.parametrize("allowed", [safe_pickle.DCP_METADATA, safe_pickle.CIFAR_BATCH])
@pytest.mark.parametrize("shell", [False, True])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_planted_payload_is_refused_and_never_runs(tmp_path: Path, allowed: frozenset, shell: bool, protocol: int) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(VitlabError, match=r"evil\.pkl refers to (io\.open|posix\.system).*refusing.*delete it"):
        safe_pickle.load(io.BytesIO(planted(marker, protocol, shell)), allowed, "evil.pkl", "delete it", encoding="bytes")
    assert not marker.exists()


def test_cifar_allow_list_reads_numpy_arrays_and_plain_data() -> None:
    batch = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2], b"name": b"x", b"n": 3}
    got = safe_pickle.load(io.BytesIO(pickle.dumps(batch, protocol=2)), safe_pickle.CIFAR_BATCH, "b", "", encoding="bytes")
    assert got[b"labels"] == [1, 2] and got[b"name"] == b"x" and got[b"n"] == 3
    assert np.array_equal(got[b"data"], batch[b"data"]) and got[b"data"].dtype == np.uint8


def test_cifar_allow_list_admits_both_numpy_module_names() -> None:
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        assert (module, "_reconstruct") in safe_pickle.CIFAR_BATCH
    unpickler = safe_pickle.RestrictedUnpickler(io.BytesIO(b""), safe_pickle.CIFAR_BATCH)
    assert unpickler.find_class("numpy.core.multiarray", "_reconstruct") is np.ndarray.__reduce__(np.zeros(1))[0]


def test_dcp_allow_list_refuses_other_torch_globals() -> None:
    unpickler = safe_pickle.RestrictedUnpickler(io.BytesIO(b""), safe_pickle.DCP_METADATA)
    assert unpickler.find_class("torch", "bfloat16") is torch.bfloat16
    for module, name in [("torch", "load"), ("torch.serialization", "load"), ("pathlib", "Path")]:
        with pytest.raises(safe_pickle.RefusedGlobal):
            unpickler.find_class(module, name)
