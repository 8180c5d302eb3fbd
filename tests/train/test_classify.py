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
from vitlab.eval.classification import evaluate_checkpoint
from vitlab.runs import checkpoint as ckpt
from vitlab.train.classify import train
from vitlab.train.optim import build_optimizer
from vitlab.train.scaffold import TrainingDiverged

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


def test_tiny_run_learns_and_writes_every_artefact(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = train(tiny_config(tmp_path, "train.epochs=10", "train.eval_every_epochs=5"), progress=False)
    run_dir = Path(results["run_dir"])
    out = capsys.readouterr().out
    assert f"vitlab train: {run_dir} (new run)" in out and "160 (16 per epoch × 10 epochs) of batch 64" in out
    assert "step 160/160  loss" in out and "ETA" in out  # a line per log_every_steps without the progress bar
    assert "\n  host memory  " in out  # what vitlab.runtime.allocator did (nothing, called as a library)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert "curves" in events.Tags()["images"] and "steps/loss" in events.Tags()["scalars"]
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
    common = [a for item in TINY for a in ("--set", item)] + [
        "--set",
        "train.epochs=3",
        "--set",
        "train.checkpoint_every_steps=7",
        "--no-progress",
    ]
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
    config = tiny_config(
        tmp_path,
        "optim.name=sgd",
        "optim.lr=1.0e+12",
        "optim.warmup_epochs=0",
        "train.checkpoint_every_steps=1",
        "train.max_bad_steps=2",
    )
    with pytest.raises(TrainingDiverged, match=r"2 steps in a row .* at step \d+") as info:
        train(config, progress=False)
    latest = sorted((tmp_path / "default" / "checkpoints").glob("step-*"))[-1]
    assert all(torch.isfinite(t).all() for t in load_file(latest / "model.safetensors").values())
    assert f"last good checkpoint: {latest}" in str(info.value)


def test_eval_refuses_a_folder_without_checkpoint(tmp_path):
    from vitlab import VitlabError

    with pytest.raises(VitlabError, match="no checkpoint found"):
        evaluate_checkpoint(tmp_path)


COMMON = [a for item in TINY for a in ("--set", item)] + ["--set", "train.epochs=3", "--no-progress"]


def wait_for_rows(run_dir: Path, rows: int, process) -> None:
    deadline = time.time() + 120
    while not (run_dir / "steps.csv").is_file() or len(read_losses(run_dir)) < rows:
        assert time.time() < deadline and process.poll() is None, "the run did not get going"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_preemption_saves_the_step_in_progress_and_auto_resume_continues_exactly(tmp_path, signum, code):
    # No checkpoint on cadence before the signal (every 1000 steps): only the preemption save keeps the work.
    args = [*COMMON, "--set", "train.checkpoint_every_steps=1000", "--set", "name=run"]
    whole = run_cli("train", *args, "--set", f"out_dir={tmp_path / 'whole'}")
    killed = run_cli("train", *args, "--set", f"out_dir={tmp_path / 'killed'}", stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "killed" / "run"
    wait_for_rows(run_dir, 10, killed)
    killed.send_signal(signum)
    assert killed.wait(timeout=120) == code
    lines = killed.stderr.read().strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert f"resume with `vitlab train --resume {run_dir}`" in lines[-1]
    saved = ckpt.read_meta(ckpt.find_checkpoint(run_dir))["step"]
    assert saved >= 10 and f"checkpoint: {run_dir}/checkpoints/step-{saved:08d}" in lines[-1]
    assert whole.wait(timeout=300) == 0
    # The restart a scheduler (or torchrun --max-restarts) makes: the same command with --resume auto.
    resumed = run_cli("train", *args, "--set", f"out_dir={tmp_path / 'killed'}", "--resume", "auto")
    assert resumed.wait(timeout=300) == 0
    assert read_losses(run_dir) == read_losses(tmp_path / "whole" / "run")
    assert not (tmp_path / "killed" / "run-2").exists()


def test_resume_auto_starts_a_run_that_does_not_exist_yet(tmp_path):
    results = train(tiny_config(tmp_path, "train.epochs=1", "name=fresh", "train.resume=auto"), progress=False)
    assert results["run_dir"] == str(tmp_path / "fresh") and results["steps"] == 16


def test_a_finished_run_is_not_resumed(tmp_path):
    results = train(tiny_config(tmp_path, "train.epochs=1"), progress=False)
    before = (Path(results["run_dir"]) / "results.json").read_text()
    proc = run_cli("train", "--resume", results["run_dir"], stderr=subprocess.PIPE, text=True)
    assert proc.wait(timeout=120) == 2
    err = proc.stderr.read()
    assert "is finished (step 16 of 16)" in err and "--set train.epochs" in err
    assert (Path(results["run_dir"]) / "results.json").read_text() == before
    # Extending it is a resume with more epochs.
    longer = train(load_run_config_with(results["run_dir"], "train.epochs=2"), resume_dir=results["run_dir"], progress=False)
    assert longer["steps"] == 32


def load_run_config_with(run_dir, *overrides):
    from vitlab.config import RunConfig, apply_overrides, from_dict
    from vitlab.train.scaffold import load_run_config

    return from_dict(RunConfig, apply_overrides(load_run_config(Path(run_dir)).to_dict(), list(overrides))).validate()


def test_no_checkpoint_is_written_during_a_non_finite_streak(tmp_path):
    # Three non-finite steps in a row stop the run; a checkpoint is due after every step.
    config = tiny_config(
        tmp_path,
        "optim.name=sgd",
        "optim.lr=1.0e+12",
        "optim.warmup_epochs=0",
        "train.checkpoint_every_steps=1",
        "train.max_bad_steps=3",
        "train.keep_checkpoints=1",
    )
    with pytest.raises(TrainingDiverged) as info:
        train(config, progress=False)
    with (tmp_path / "default" / "steps.csv").open() as f:
        first_bad = next(int(r["step"]) for r in csv.DictReader(f) if float(r["skipped"]) > 0)
    latest = ckpt.find_checkpoint(tmp_path / "default")
    assert ckpt.read_meta(latest)["step"] == first_bad - 1  # the step before the streak began
    assert f"last good checkpoint: {latest}" in str(info.value)


def test_a_model_changing_set_on_resume_is_one_line(tmp_path):
    results = train(tiny_config(tmp_path, "train.epochs=0.5", "train.checkpoint_every_steps=4"), progress=False)
    (Path(results["run_dir"]) / "results.json").unlink()  # as if killed before the end
    proc = run_cli(
        "train",
        "--resume",
        results["run_dir"],
        "--set",
        "model.options.depth=3",
        "--no-progress",
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.wait(timeout=120) == 2
    err = proc.stderr.read()
    assert "Traceback" not in err and "does not fit the model built from the config" in err


def test_gradient_accumulation_gives_the_same_training(tmp_path):
    whole = train(tiny_config(tmp_path / "one", "train.epochs=1"), progress=False)
    accumulated = train(tiny_config(tmp_path / "four", "train.epochs=1", "train.accumulate_steps=4"), progress=False)
    one, four = read_losses(Path(whole["run_dir"])), read_losses(Path(accumulated["run_dir"]))
    assert list(one) == list(four) and max(abs(one[s] - four[s]) for s in one) < 1e-5
    assert one[16] < one[1]  # and it trained: the same curve is not a flat one
    with open(Path(whole["run_dir"]) / "epochs.csv") as f:
        assert 0 <= float(next(csv.DictReader(f))["data_wait"]) < 1


def test_accumulation_must_divide_the_batch(tmp_path):
    from vitlab import VitlabError

    with pytest.raises(VitlabError, match="train.accumulate_steps=3 must divide"):
        train(tiny_config(tmp_path, "train.accumulate_steps=3"), progress=False)


def test_the_run_s_normalisation_is_kept_for_eval(tmp_path):
    imagenet = ["data.mean=[0.485, 0.456, 0.406]", "data.std=[0.229, 0.224, 0.225]"]
    results = train(tiny_config(tmp_path, "train.epochs=1", *imagenet), progress=False)
    assert evaluate_checkpoint(results["run_dir"])["loss"] == pytest.approx(results["test"]["loss"], rel=1e-6)


def test_metrics_also_go_to_weights_and_biases_when_asked(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    results = train(tiny_config(tmp_path, "train.epochs=0.5", "log.wandb=true"), progress=False)
    run_dir = Path(results["run_dir"])
    run_id = (run_dir / "wandb_id").read_text()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb"))
    assert wandb.run is None  # finished with the run


def test_fp16_trains_with_a_loss_scaler_that_resumes_exactly(tmp_path):
    import shutil

    results = train(
        tiny_config(
            tmp_path, "train.epochs=1", "train.precision=fp16", "train.checkpoint_every_steps=5", "train.keep_checkpoints=5"
        ),
        progress=False,
    )
    run_dir = Path(results["run_dir"])
    losses = read_losses(run_dir)
    assert results["precision"] == "fp16" and results["skipped_steps"] == 0 and losses[16] < losses[1]
    assert ckpt.read_meta(run_dir / "checkpoints" / "step-00000005")["grad_scaler"]["scale"] == 2.0**16
    # Resume from step 5, as if killed there: the same curve.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    for later in ("step-00000010", "step-00000015", "step-00000016"):
        shutil.rmtree(resumed / "checkpoints" / later)
    (resumed / "checkpoints" / "latest").write_text("step-00000005")
    (resumed / "results.json").unlink()
    train(load_run_config_with(resumed), resume_dir=resumed, progress=False)
    assert read_losses(resumed) == losses
    assert (run_dir / "confusion_matrix.png").is_file()


CONVNETS = {
    "bit-r26x1": "{stem_width: 16, channels: [32, 64], layers: [1, 1], groups: 8}",
    "hybrid-r26-vit22b-ti/8": "{depth: 1, embed_dim: 32, num_heads: 2, mlp_dim: 64, stem_width: 16, stem_channels: [32, 64], stem_groups: 8}",
}


@pytest.mark.parametrize("name", sorted(CONVNETS))
def test_a_resnet_and_a_hybrid_train_and_evaluate_through_the_same_loop(tmp_path, name):
    extra = [f"model.name={name}", f"model.options={CONVNETS[name]}", "data.num_train=128", "data.num_test=64", "train.epochs=1"]
    results = train(tiny_config(tmp_path, *extra), progress=False)
    assert results["steps"] == 2 and 0 <= results["test"]["acc1"] <= 1
    assert evaluate_checkpoint(results["run_dir"])["acc1"] == pytest.approx(results["test"]["acc1"])
    logged = (Path(results["run_dir"]) / "steps.csv").read_text().splitlines()[0].split(",")
    assert ("high_norm_tokens" in logged) == name.startswith("hybrid")  # a ResNet has no tokens


def test_a_resnet_is_refused_where_only_vit_blocks_work(tmp_path):
    from vitlab import VitlabError
    from vitlab.config import PretrainConfig
    from vitlab.runs.kinds import check_experiment

    resnet = ["model.name=bit-r26x1", f"model.options={CONVNETS['bit-r26x1']}"]
    with pytest.raises(VitlabError, match="train.strategy=ddp"):
        check_experiment(tiny_config(tmp_path, *resnet, "train.strategy=fsdp"))
    with pytest.raises(VitlabError, match="MAE and MPP mask patches"):
        check_experiment(load_config(None, ["model.name=hybrid-r50-vit-b/16"], PretrainConfig))
