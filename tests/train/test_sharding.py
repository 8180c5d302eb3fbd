"""Sharded checkpoints run no code from disk: DCP's pickles pass allow-lists, and only `fsdp` runs read `sharded/`."""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata

from tests.test_safe_pickle import planted
from tests.train.test_classify import tiny_config
from vitlab import safe_pickle
from vitlab.cli import main
from vitlab.config import OptimConfig
from vitlab.errors import VitlabError
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.builders import build_model
from vitlab.runs.stored import load_checkpoint_model
from vitlab.train.classify import train
from vitlab.train.finetune import pretrained_state_dict
from vitlab.train.optim import build_optimizer
from vitlab.train.scaffold import load_run_config
from vitlab.train.sharding import consolidate, load_checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny run per strategy: `fsdp` (a genuine sharded checkpoint) and `single` (model.safetensors)."""
    made = {}
    for strategy in ("fsdp", "single"):
        config = tiny_config(
            tmp_path_factory.mktemp(strategy),
            f"train.strategy={strategy}",
            "train.epochs=1",
            "data.num_train=128",
            "data.num_test=64",
        )
        made[strategy] = Path(train(config, progress=False)["run_dir"])
    return made


def copy_run(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a run directory, and its last checkpoint folder."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, ckpt.find_checkpoint(copy)


def model_and_optimizer(run_dir: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh single-process model and AdamW of a run's config."""
    config = load_run_config(run_dir)
    model = build_model(config, config.data.image_size, 10)
    return model, build_optimizer(model, OptimConfig())


def resume(run_dir: Path) -> None:
    """The resume path's checkpoint read, into a single-process model and optimizer."""
    load_checkpoint(ckpt.find_checkpoint(run_dir), *model_and_optimizer(run_dir))


READERS: dict[str, Callable[[Path], object]] = {
    "load_tensors": lambda run: ckpt.load_tensors(ckpt.find_checkpoint(run)),
    "consolidate": lambda run: consolidate(run, run / "out.safetensors"),
    "resume": resume,
    "eval": lambda run: load_checkpoint_model(run),
    "finetune": lambda run: pretrained_state_dict(run, "vitlab", None),
}


def test_genuine_sharded_checkpoint_passes_the_allow_list(runs: dict[str, Path], tmp_path: Path) -> None:
    sharded = ckpt.find_checkpoint(runs["fsdp"]) / ckpt.SHARDED
    with (sharded / ".metadata").open("rb") as f:
        metadata = safe_pickle.load(f, safe_pickle.DCP_METADATA, sharded, "")
    assert isinstance(metadata, Metadata) and "model.head.weight" in metadata.state_dict_metadata

    out = consolidate(runs["fsdp"], tmp_path / "model.safetensors")
    model, optimizer = model_and_optimizer(runs["fsdp"])
    load_checkpoint(ckpt.find_checkpoint(runs["fsdp"]), model, optimizer)
    assert all(torch.equal(tensor, load_file(out)[name]) for name, tensor in model.state_dict().items())
    assert optimizer.param_groups[0]["lr"] > 0 and all(state["step"] == 2 for state in optimizer.state.values())


@pytest.mark.parametrize("reader", READERS)
def test_planted_metadata_is_refused_by_every_reader(runs: dict[str, Path], tmp_path: Path, reader: str) -> None:
    run, checkpoint = copy_run(runs["fsdp"], tmp_path)
    marker = tmp_path / "ran"
    (checkpoint / ckpt.SHARDED / ".metadata").write_bytes(planted(marker))
    with pytest.raises(VitlabError, match=r"sharded/\.metadata refers to io\.open.*refusing to unpickle.*delete its step-N"):
        READERS[reader](run)
    assert not marker.exists()


@pytest.mark.parametrize("command", [["eval"], ["inspect", "--num-images", "1"], ["consolidate"], ["train", "--resume"]])
def test_cli_reports_planted_metadata_in_one_line(
    runs: dict[str, Path], tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture
) -> None:
    run, checkpoint = copy_run(runs["fsdp"], tmp_path)
    marker = tmp_path / "ran"
    (checkpoint / ckpt.SHARDED / ".metadata").write_bytes(planted(marker, shell=True))
    if command[0] == "train":
        (run / "results.json").unlink(missing_ok=True)  # as if killed before the end: a finished run is not resumed
    assert main([*command, str(run), *(["--no-progress"] if command[0] == "train" else [])]) == 2
    assert "metadata refers to posix.system" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_or_missing_metadata_is_a_clear_error(runs: dict[str, Path], tmp_path: Path, damage: str) -> None:
    run, checkpoint = copy_run(runs["fsdp"], tmp_path)
    metadata = checkpoint / ckpt.SHARDED / ".metadata"
    if damage == "truncate":
        metadata.write_bytes(metadata.read_bytes()[:100])
    else:
        metadata.unlink()
    for reader in ("load_tensors", "resume"):
        with pytest.raises(VitlabError, match=r"\.metadata is not readable DCP metadata.*use another checkpoint"):
            READERS[reader](run)


def test_planted_value_in_a_shard_file_is_refused_on_resume(runs: dict[str, Path], tmp_path: Path) -> None:
    run, checkpoint = copy_run(runs["fsdp"], tmp_path)
    sharded = checkpoint / ckpt.SHARDED
    with (sharded / ".metadata").open("rb") as f:
        metadata = safe_pickle.load(f, safe_pickle.DCP_METADATA, sharded, "")
    marker = tmp_path / "ran"
    payload = planted(marker, protocol=2)
    (sharded / "planted.distcp").write_bytes(payload)
    index = next(i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr")
    metadata.storage_data[index] = _StorageInfo("planted.distcp", 0, len(payload))
    (sharded / ".metadata").write_bytes(pickle.dumps(metadata))  # only allowed classes: the metadata passes
    with pytest.raises(VitlabError, match=r"optimizer\.param_groups\.0\.lr in .*sharded holds pickled objects"):
        resume(run)
    assert not marker.exists()


@pytest.mark.parametrize("reader", ["load_tensors", "resume", "eval", "finetune"])
def test_non_fsdp_run_never_reads_a_planted_sharded_folder(runs: dict[str, Path], tmp_path: Path, reader: str) -> None:
    run, checkpoint = copy_run(runs["single"], tmp_path)
    marker = tmp_path / "ran"
    (checkpoint / ckpt.SHARDED).mkdir()
    (checkpoint / ckpt.SHARDED / ".metadata").write_bytes(planted(marker))
    (checkpoint / "model.safetensors").rename(checkpoint / "moved.safetensors")  # not even as a fallback
    if reader == "load_tensors":
        with pytest.raises(VitlabError, match="holds no model.safetensors"):
            READERS[reader](run)
    else:
        (checkpoint / "moved.safetensors").rename(checkpoint / "model.safetensors")
        READERS[reader](run)
    with pytest.raises(VitlabError, match="is not sharded"):
        consolidate(run)
    assert not marker.exists()


def test_non_fsdp_run_with_planted_sharded_folder_evaluates_and_resumes_from_the_cli(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run, checkpoint = copy_run(runs["single"], tmp_path)
    marker = tmp_path / "ran"
    (checkpoint / ckpt.SHARDED).mkdir()
    (checkpoint / ckpt.SHARDED / ".metadata").write_bytes(planted(marker, shell=True))
    assert main(["eval", str(run)]) == 0
    (run / "results.json").unlink(missing_ok=True)  # as if killed before the end: a finished run is not resumed
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert not marker.exists()
