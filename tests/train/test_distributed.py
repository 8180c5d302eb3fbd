"""The same config under torchrun with 2 gloo ranks: replicas stay identical, accuracy matches one process."""

import json
import os
import subprocess
import sys

from tests.train.test_classify import TINY

RESNET = ["model.name=bit-r26x1", "model.options={stem_width: 16, channels: [32, 64], layers: [1, 1], groups: 8}"]


def run(tmp_path, name, launcher, *extra, epochs=10):
    args = [a for item in [*TINY, *extra] for a in ("--set", item)]
    args += ["--set", f"train.epochs={epochs}", "--set", f"out_dir={tmp_path}", "--set", f"name={name}", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "vitlab.cli", "train", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / name / "results.json").read_text())


def test_two_rank_ddp_matches_one_process(tmp_path):
    single = run(tmp_path, "single", [sys.executable])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = run(tmp_path, "ddp", torchrun)
    assert ddp["world_size"] == 2 and ddp["steps"] == single["steps"]  # the global batch is split, not doubled
    assert ddp["max_rank_param_difference"] == 0.0
    assert abs(ddp["test"]["acc1"] - single["test"]["acc1"]) < 0.1
    assert ddp["test"]["acc1"] > 0.22


def test_a_resnet_trains_under_ddp_like_one_process(tmp_path):
    single = run(tmp_path, "single", [sys.executable], *RESNET, epochs=6)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = run(tmp_path, "ddp", torchrun, *RESNET, epochs=6)
    assert ddp["world_size"] == 2 and ddp["steps"] == single["steps"] and ddp["max_rank_param_difference"] == 0.0
    assert abs(ddp["test"]["acc1"] - single["test"]["acc1"]) < 0.1  # GroupNorm: no batch statistics to differ
    assert ddp["test"]["acc1"] > 0.22
