"""Checkpoints: safetensors weights + optimizer state + JSON metadata, written atomically.

A checkpoint is a folder `RUN_DIR/checkpoints/step-NNNNNNNN/` holding
  model.safetensors   the model's weights (and ema.safetensors when an EMA is kept); a run of
                      several networks (CycleGAN's two generators and two discriminators) saves
                      one NAME.safetensors per network instead,
  optimizer.pt        the optimizer's state dict, or a dict of them by name (read back with weights_only=True),
  meta.json           step, epoch, config and metrics.
A run trained with FSDP holds `sharded/` instead of the first two: every rank's shards of the model and
optimizer, written by torch.distributed.checkpoint (see vitlab.train.sharding). `sharded/` is read only
when meta.json's config says `train.strategy: fsdp`, and its pickles only through allow-lists
(vitlab.safe_pickle for `.metadata`, weights_only=True for the rest).
It is written under a temporary name and renamed into place, then `checkpoints/latest` is
replaced atomically, so a run killed at any moment leaves the previous checkpoint intact. A step that
is already saved is never deleted to be saved again (its tensors are a function of the step; only its
meta.json is replaced, atomically), and `find_checkpoint` falls back to the newest complete checkpoint
when `latest` names none.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from vitlab import safe_pickle
from vitlab.errors import VitlabError

LATEST = "latest"
LOCK_FILE = ".lock"  # in a run directory: held by the process training it
SHARDED = "sharded"


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file, flushed to disk, and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


Weights = torch.nn.Module | Mapping[str, torch.Tensor]


def weights(module: Weights) -> dict[str, torch.Tensor]:
    """A module's state dict (or a dict of tensors) as contiguous CPU tensors, ready for safetensors."""
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module | Mapping[str, Weights],
    optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
    meta: dict,
    ema: torch.nn.Module | None = None,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `step` atomically, point `latest` at it, keep the newest `keep`.

    `model` is one module (saved as `model`) or modules and tensor dicts by name; `optimizer` one
    optimizer or several by name.
    """
    tmp = staging_folder(run_dir, step)
    named = dict(model) if isinstance(model, Mapping) else {"model": model}
    if ema is not None:
        named["ema"] = ema
    for name, module in named.items():
        save_file(weights(module), tmp / f"{name}.safetensors")
    if isinstance(optimizer, Mapping):
        torch.save({name: opt.state_dict() for name, opt in optimizer.items()}, tmp / "optimizer.pt")
    else:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    return publish(tmp, step, meta, keep)


def staging_folder(run_dir: Path, step: int) -> Path:
    """An empty temporary folder for the checkpoint of `step`, renamed into place by `publish`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, step: int, meta: dict, keep: int) -> Path:
    """Write meta.json into the staged folder, rename it into place, point `latest` at it, keep the newest `keep`."""
    root = tmp.parent
    final = root / f"step-{step:08d}"
    text = json.dumps({**meta, "step": step}, indent=2)
    if (final / "meta.json").is_file():  # saved before (the same tensors): refresh the metadata, no gap
        write_text_atomic(final / "meta.json", text)
        shutil.rmtree(tmp)
    else:
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover, never named by `latest`
        (tmp / "meta.json").write_text(text)
        os.replace(tmp, final)
    write_text_atomic(root / LATEST, final.name)
    for old in complete_checkpoints(root)[: -max(keep, 1)]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under `root` whose meta.json reads, oldest first."""
    found = []
    for folder in sorted(p for p in root.glob("step-*") if p.is_dir()):
        try:
            json.loads((folder / "meta.json").read_text())
            found.append(folder)
        except (OSError, ValueError):
            continue
    return found


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, its run directory, or the run's `checkpoints/` folder."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        if (root / LATEST).is_file():
            candidate = root / (root / LATEST).read_text().strip()
            if (candidate / "meta.json").is_file():
                return candidate
        complete = complete_checkpoints(root) if root.is_dir() else []
        if complete:  # `latest` is missing or names nothing: the newest complete checkpoint
            return complete[-1]
    raise VitlabError(
        f"no checkpoint found at {path}; give a run directory (with checkpoints/latest) "
        "or a checkpoint folder (with model.safetensors and meta.json)"
    )


def read_meta(checkpoint: Path) -> dict:
    """The JSON metadata of a checkpoint folder."""
    path = checkpoint / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VitlabError(f"{path} cannot be read ({type(exc).__name__}); {older_checkpoint_hint(checkpoint)}") from None


def older_checkpoint_hint(checkpoint: Path) -> str:
    """What to do about a damaged checkpoint: the previous intact one, if any."""
    older = [c for c in complete_checkpoints(checkpoint.parent) if c.name < checkpoint.name]
    if not older:
        return "no older checkpoint is intact; start the run again"
    return f"the previous intact checkpoint is {older[-1]}: delete {checkpoint} to resume from it"


def is_sharded(checkpoint: Path) -> bool:
    """Whether a checkpoint is an `fsdp` run's (its meta.json's config says so) and holds `sharded/`."""
    config = read_meta(checkpoint).get("config")
    train = config.get("train") if isinstance(config, dict) else None
    return isinstance(train, dict) and train.get("strategy") == "fsdp" and (checkpoint / SHARDED).is_dir()


def load_tensors(checkpoint: Path, name: str = "model") -> dict[str, torch.Tensor]:
    """The tensors of `NAME.safetensors` in a checkpoint folder (an `fsdp` run's model: of `sharded/`)."""
    path = checkpoint / f"{name}.safetensors"
    if not path.is_file() and name == "model" and is_sharded(checkpoint):
        return read_sharded(checkpoint / SHARDED, "model")
    if not path.is_file():
        raise VitlabError(f"{checkpoint} holds no {path.name}; is it a checkpoint of another kind of run?")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error type for a truncated or malformed file
        raise VitlabError(f"{path} is damaged ({str(exc)[:120]}); {older_checkpoint_hint(checkpoint)}") from None


def read_sharded(folder: Path, key: str) -> dict[str, torch.Tensor]:
    """The full tensors under `key` of a torch.distributed.checkpoint folder, read by this process alone."""
    metadata = SafeReader(folder).read_metadata().state_dict_metadata
    prefix = f"{key}."
    tensors = {
        name[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in metadata.items()
        if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    load_sharded({key: tensors}, folder, local=True)
    return tensors


def load_sharded(state: dict, folder: Path, local: bool) -> None:
    """Fill `state` in place from a torch.distributed.checkpoint folder; `local`: by this process alone."""
    with warnings.catch_warnings():  # dcp warns when it loads without collectives, which `local` asks for
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        SafeReader(folder).read_metadata()  # dcp.load hides a failure here behind a fallback: fail first, by name
        try:
            dcp.load(state, storage_reader=SafeReader(folder), planner=SafeLoadPlanner(folder), no_dist=local)
        except CheckpointException as err:  # dcp wraps every rank's exception; show ours as they are
            refused = [exc for exc, _ in err.failures.values() if isinstance(exc, VitlabError)]
            if refused:
                raise refused[0] from None
            raise


_USE_ANOTHER = "delete its step-N folder, or use another checkpoint"
_NOT_OURS = f"vitlab did not write this checkpoint: {_USE_ANOTHER}"


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with `.metadata` unpickled through the allow-list of DCP's own metadata classes."""

    def read_metadata(self, *args: object, **kwargs: object) -> Metadata:
        """The checkpoint's Metadata, as FileSystemReader.read_metadata gives it, without running foreign code."""
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as file:
                metadata = safe_pickle.load(file, safe_pickle.DCP_METADATA, path, _NOT_OURS)
        except VitlabError:
            raise
        except Exception as err:  # a missing or damaged pickle can fail in almost any way
            raise VitlabError(f"{path} is not readable DCP metadata ({err}); {_USE_ANOTHER}") from err
        if not isinstance(metadata, Metadata):
            raise VitlabError(f"{path} holds a {type(metadata).__name__}, not DCP metadata; {_NOT_OURS}")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def put_nested(root: dict, path: tuple[str | int, ...], value: object) -> None:
    """Put `value` at `path` (keys of dicts, indices of lists) in a nested state dict, making the containers on the way.

    DCP's flattened keys map to such paths (`DefaultLoadPlanner.mappings`); torch's own setter is private.
    """
    *parents, last = path
    container: dict | list = root
    for key, inner in zip(parents, path[1:]):
        empty = [] if isinstance(inner, int) else {}
        if isinstance(container, list):
            container.extend([None] * (key + 1 - len(container)))
            container[key] = empty if container[key] is None else container[key]
            container = container[key]
        else:
            container = container.setdefault(key, empty)
    if isinstance(container, list):
        container.extend([None] * (last + 1 - len(container)))
    container[last] = value


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with non-tensor values (numbers, strings, containers) read with weights_only=True."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Put one non-tensor value in place, refusing pickled objects other than plain data and tensors."""
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise VitlabError(
                f"{read_item.dest_index.fqn} in {self.folder} holds pickled objects other than numbers, strings, "
                f"containers and tensors; refusing to load it (it could run code); {_NOT_OURS}"
            ) from None
        if self.flatten_state_dict:
            put_nested(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_weights(checkpoint: Path, model: torch.nn.Module, name: str = "model") -> None:
    """Load `model.safetensors` (or `ema.safetensors`, or `NAME.safetensors`) into `model`."""
    fit_state_dict(model, load_tensors(checkpoint, name), checkpoint / f"{name}.safetensors")


def fit_state_dict(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    """`model.load_state_dict`, with a one-line error when the tensors come from a differently shaped model."""
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise VitlabError(
            f"{source} does not fit the model built from the config ({detail[:200]}); settings that change the "
            "model (model.*, data.image_size, the dataset's classes) cannot change on resume: start a new run, "
            "or fine-tune from this one (finetune.checkpoint)"
        ) from None


def load_optimizer(checkpoint: Path, optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer]) -> None:
    """Restore one optimizer's state, or several by name (tensors and numbers only: weights_only=True)."""
    state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    if isinstance(optimizer, Mapping):
        for name, opt in optimizer.items():
            opt.load_state_dict(state[name])
    else:
        optimizer.load_state_dict(state)
