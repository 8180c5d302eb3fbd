"""FSDP2 on 2 gloo ranks: exact init, training equal to one process, sharded checkpoints that resume and load anywhere.

One torchrun launch (tests/train/fsdp_worker.py) runs the comparisons and a sharded training run; a second
resumes a copy of that run from its middle checkpoint.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.train.test_classify import read_losses, tiny_config
from vitlab import VitlabError, create_model
from vitlab.config import OptimConfig, load_config
from vitlab.eval.classification import evaluate_checkpoint
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.builders import build_model
from vitlab.runtime.context import Runtime
from vitlab.train.classify import train
from vitlab.train.optim import build_optimizer
from vitlab.train.scaffold import load_run_config
from vitlab.train.sharding import consolidate, load_checkpoint, wrap_model


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    torchrun("-m", "tests.train.fsdp_worker", str(tmp / "results.json"), str(tmp))
    return json.loads((tmp / "results.json").read_text()), tmp / "fsdp"


def test_sharded_init_equals_a_normal_init_bit_for_bit(worker):
    results, _ = worker
    assert results["init_exact_vit"] and results["init_exact_vit22b_sincos"] and results["init_exact_stabilisers"]
    assert results["init_exact_hybrid"]  # a ResNet stem inside: its own init, replayed


@pytest.mark.parametrize("variant", ["fsdp", "fsdp_cpu_offload"])
def test_fsdp_with_checkpointing_trains_like_one_process_on_the_whole_batch(worker, variant):
    differences = worker[0][variant]
    assert differences["loss"] < 1e-5 and differences["grad_norm"] < 1e-5 and differences["params"] < 1e-5


def test_bf16_mixed_precision_keeps_fp32_parameters_and_tracks_fp32(worker):
    bf16 = worker[0]["bf16"]
    assert bf16["dtypes"] == ["torch.float32"] and bf16["loss"] < 0.05


def test_sharded_checkpoint_resumes_on_two_ranks_with_the_same_loss_curve(worker, tmp_path):
    _, run_dir = worker
    resumed = tmp_path / "fsdp"
    shutil.copytree(run_dir, resumed)
    (resumed / "checkpoints" / "latest").write_text("step-00000012")
    torchrun("-m", "vitlab.cli", "train", "--resume", str(resumed), "--no-progress")
    expected, got = read_losses(run_dir), read_losses(resumed)
    assert list(got) == list(expected) == list(range(1, 17))
    assert got == expected


def test_sharded_checkpoint_loads_into_one_process(worker, tmp_path):
    _, run_dir = worker
    checkpoint = ckpt.find_checkpoint(run_dir)
    assert {p.name for p in checkpoint.iterdir()} == {"sharded", "meta.json"}
    results = json.loads((run_dir / "results.json").read_text())
    assert evaluate_checkpoint(run_dir)["acc1"] == pytest.approx(results["test"]["acc1"])

    out = consolidate(run_dir, tmp_path / "model.safetensors")
    config = load_run_config(run_dir)
    model = build_model(config, config.data.image_size, 10)
    model.load_state_dict(load_file(out))
    optimizer = build_optimizer(model, OptimConfig())
    load_checkpoint(checkpoint, model, optimizer)  # model and AdamW state, in a plain single-process model
    consolidated = load_file(out)
    assert all(torch.equal(tensor, consolidated[name]) for name, tensor in model.state_dict().items())
    assert all(state["step"] == results["steps"] for state in optimizer.state.values())


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["train.strategy=zero"], "train.strategy"),
        (["train.cpu_offload=true"], "needs train.strategy=fsdp"),
        (["train.strategy=fsdp", "train.ema_decay=0.999"], "not supported with train.strategy=fsdp"),
        (["train.strategy=fsdp", "finetune={checkpoint: runs/x}"], "not supported yet"),
    ],
)
def test_bad_strategy_settings_name_the_key(overrides, words):
    with pytest.raises(VitlabError, match=words):
        load_config(None, overrides)


def test_single_strategy_refuses_several_processes():
    ctx = Runtime(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(VitlabError, match="use ddp or fsdp"):
        wrap_model(lambda: create_model("vit-ti/8", img_size=16), "single", ctx)


def test_fsdp_runs_in_one_process(tmp_path):
    results = train(tiny_config(tmp_path, "train.strategy=fsdp", "train.epochs=1", "data.num_train=256"), progress=False)
    assert results["world_size"] == 1 and results["steps"] == 4
    assert (ckpt.find_checkpoint(results["run_dir"]) / ckpt.SHARDED).is_dir()
