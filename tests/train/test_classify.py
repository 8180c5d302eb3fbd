"""The classification loop: schedules, a real (tiny) run, its files, evaluation, resume and the NaN guard."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitlab import create_model
from vitlab.config import OptimConfig, load_config
from vitlab.train.classify import TrainingDiverged, build_optimizer, evaluate_checkpoint, lr_factor, train

# A run small enough for the test suite: an uncluttered built-in set, learnable in seconds.
TINY = [
    "model.name=vit22b-ti/8",
    "model.options={depth: 2, embed_dim: 64, num_heads: 2, mlp_dim: 128}",
    "data.num_train=1024",
    "data.num_test=256",
    "data.builtin={num_blobs: 0, num_lines: 0, noise_std: 0.0, gradient: 0.0}",
    "train.batch_size=64",
    "train.precision=fp32",
    "train.threads=1",
    "train.log_every_steps=1",
    "optim.lr=0.003",
    "optim.warmup_epochs=0.5",
]


def tiny_config(tmp_path, *extra):
    return load_config(None, TINY + [f"out_dir={tmp_path}", *extra])


def test_multistep_halves_at_30_60_90_percent():
    cfg = OptimConfig(schedule="multistep", milestones=(0.3, 0.6, 0.9), gamma=0.5)
    factors = [lr_factor(s, 100, 0, cfg) for s in (0, 29, 30, 59, 60, 89, 90, 99)]
    assert factors == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, cfg) == pytest.approx(0.55)
    assert lr_factor(100, 100, 10, cfg) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = create_model("vit-ti/8", img_size=16, num_classes=3, depth=1)
    decay, no_decay = build_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias"} <= skipped
    assert all(names[id(p)].endswith("weight") for p in decay["params"])


def read_losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "steps.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_tiny_run_learns_and_writes_every_artefact(tmp_path):
    results = train(tiny_config(tmp_path, "train.epochs=10", "train.eval_every_epochs=5"), progress=False)
    run_dir = Path(results["run_dir"])
    assert results["test"]["acc1"] > 0.22  # 10 classes: chance 0.1 ± 0.02 on 256 images
    for name in ("config.yaml", "steps.csv", "epochs.csv", "curves.png", "results.json"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    saved = json.loads((run_dir / "results.json").read_text())
    assert set(saved["test"]) == {"acc1", "acc5", "auroc", "loss"} and saved["test"]["acc5"] >= saved["test"]["acc1"]
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    assert {p.name for p in checkpoint.iterdir()} == {"model.safetensors", "optimizer.pt", "meta.json"}
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())
    losses = read_losses(run_dir)
    assert len(losses) == results["steps"] and sum(list(losses.values())[-5:]) < sum(list(losses.values())[:5])
    # `vitlab eval` on the run reproduces the final test metrics.
    assert evaluate_checkpoint(run_dir)["acc1"] == pytest.approx(saved["test"]["acc1"])


def run_cli(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitlab.cli", *args], env=env, **kwargs)


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_loss_curve(tmp_path):
    common = [a for item in TINY for a in ("--set", item)] + ["--set", "train.epochs=3", "--set", "train.checkpoint_every_steps=7", "--no-progress"]
    whole = run_cli("train", *common, "--set", f"out_dir={tmp_path / 'whole'}", "--set", "name=run")
    killed = run_cli("train", *common, "--set", f"out_dir={tmp_path / 'killed'}", "--set", "name=run")
    run_dir = tmp_path / "killed" / "run"
    deadline = time.time() + 120
    # Kill once the first checkpoint (step 7) exists and a few more steps ran: mid-epoch (16 steps/epoch).
    while time.time() < deadline and not (run_dir / "steps.csv").is_file() or len(read_losses(run_dir)) < 10:
        time.sleep(0.05)
        assert time.time() < deadline, "the run did not get going"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert whole.wait(timeout=300) == 0
    assert (run_dir / "checkpoints" / "latest").is_file() and not (run_dir / "results.json").exists()
    resumed = run_cli("train", "--resume", str(run_dir), "--no-progress")
    assert resumed.wait(timeout=300) == 0
    expected, got = read_losses(tmp_path / "whole" / "run"), read_losses(run_dir)
    assert list(got) == list(expected)
    assert got == expected  # bit-exact on CPU


def test_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path, "optim.name=sgd", "optim.lr=1.0e+12", "optim.warmup_epochs=0",
                         "train.checkpoint_every_steps=1", "train.max_bad_steps=2")  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"2 steps in a row .* at step \d+") as info:
        train(config, progress=False)
    latest = sorted((tmp_path / "default" / "checkpoints").glob("step-*"))[-1]
    assert all(torch.isfinite(t).all() for t in load_file(latest / "model.safetensors").values())
    assert f"last good checkpoint: {latest}" in str(info.value)


def test_eval_refuses_a_folder_without_checkpoint(tmp_path):
    from vitlab import VitlabError

    with pytest.raises(VitlabError, match="no checkpoint found"):
        evaluate_checkpoint(tmp_path)
