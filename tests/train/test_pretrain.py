"""The pretraining loop: a tiny MAE and MPP run of each family, exact resume (checkpoint copy and SIGTERM),
the encoder loaded by `vitlab finetune` with only the head new, `vitlab probe`, configs and errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train.preemption import sigterm_after_steps
from tests.train.test_streamed_training import jpeg_folder
from vitlab import VitlabError, create_model
from vitlab.cli import main
from vitlab.config import FinetuneConfig, PretrainConfig, load_config
from vitlab.eval.probe import linear_probe
from vitlab.models.weights import fit_to_model
from vitlab.train.finetune import prepare_model, pretrained_state_dict
from vitlab.train.pretrain import pretrain
from vitlab.train.scaffold import RunInterrupted

MODEL = "{depth: 2, embed_dim: 32, num_heads: 2, mlp_dim: 64}"
TINY = [
    f"model={{name: vit22b-ti/8, options: {MODEL}}}",
    "data={name: builtin, image_size: 16, num_train: 32, num_test: 8}",
    "pretrain={decoder_dim: 16, decoder_depth: 1, decoder_heads: 2, sample_every_steps: 4, num_samples: 2}",
    "optim.warmup_epochs=1",
    "train={epochs: 2, batch_size: 8, threads: 1, precision: fp32, log_every_steps: 1, checkpoint_every_steps: 3, "
    "keep_checkpoints: 10, eval_every_epochs: 1}",
]


def tiny_config(out_dir: Path, *extra: str) -> PretrainConfig:
    return load_config(None, [*TINY, f"out_dir={out_dir}", *extra], PretrainConfig)


def steps_table(run_dir: Path) -> list[dict]:
    with (run_dir / "steps.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]


@pytest.mark.parametrize("method", ["mae", "mpp"])
def test_tiny_run_writes_grids_curves_and_resumes_exactly(tmp_path: Path, method: str) -> None:
    results = pretrain(tiny_config(tmp_path, f"pretrain.method={method}"), progress=False)
    run_dir = Path(results["run_dir"])
    assert results["steps"] == 8 and results["method"] == method
    for name in ("config.yaml", "steps.csv", "epochs.csv", "curves.png", "results.json"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-00000004.png", "step-00000008.png"]
    final = run_dir / "checkpoints" / "step-00000008"
    assert {p.name for p in final.iterdir()} == {"model.safetensors", "decoder.safetensors", "optimizer.pt", "meta.json"}
    classifier = create_model("vit22b-ti/8", img_size=16, num_classes=10, **yaml.safe_load(MODEL))
    encoder = load_file(final / "model.safetensors")
    assert set(classifier.state_dict()) - set(encoder) == {"head.weight", "head.bias"}
    assert set(encoder) <= set(classifier.state_dict())

    # Resume from step 3, as if the run had been killed after its first checkpoint.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    for later in ("step-00000006", "step-00000008"):
        shutil.rmtree(resumed / "checkpoints" / later)
    (resumed / "checkpoints" / "latest").write_text("step-00000003")
    again = pretrain(tiny_config(tmp_path, f"pretrain.method={method}"), resume_dir=resumed, progress=False)
    assert steps_table(resumed) == steps_table(run_dir)
    for name in ("model", "decoder"):
        whole, redone = (load_file(d / "checkpoints" / "step-00000008" / f"{name}.safetensors") for d in (run_dir, resumed))
        assert all(torch.equal(whole[k], redone[k]) for k in whole), name
    assert again["test"] == results["test"]


@pytest.mark.parametrize("source", ["folder", "wds"])
def test_pretraining_streams_unlabeled_folders_and_shards(tmp_path: Path, source: str, capsys: pytest.CaptureFixture) -> None:
    from vitlab.data.stream.shards import write_shards

    root = jpeg_folder(tmp_path / "data", train=8, test=4)  # 24 training and 12 held-out JPEGs of 96×80
    if source == "wds":
        write_shards(root, tmp_path / "shards", max_count=10)
        root = tmp_path / "shards"
    data = f"data={{name: {source}, root: {root}, image_size: 16, stream: true, workers: 1, crop_scale: [0.2, 1.0]}}"
    results = pretrain(tiny_config(tmp_path, data, "train.batch_size=6"), progress=False)
    run_dir = Path(results["run_dir"])
    assert results["steps"] == 2 * (24 // 6) and np.isfinite(results["test"]["loss"])
    with (run_dir / "epochs.csv").open() as f:
        assert [float(r["test_loss"]) for r in csv.DictReader(f)][-1] == pytest.approx(results["test"]["loss"])
    assert len(list((run_dir / "samples").glob("*.png"))) == 2
    assert "(streamed): 24 unlabeled training / 12 held-out images" in capsys.readouterr().out

    # The probe holds its labelled images in memory: a streamed run's data is refused in one line,
    # another labelled set is probed instead; only data may change.
    assert main(["probe", str(run_dir), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data.name={source} is streamed" in err and "--set data.name=folder" in err
    builtin = [
        "--set",
        "data.name=builtin",
        "--set",
        "data.stream=auto",
        "--set",
        "data.num_train=16",
        "--set",
        "data.num_test=8",
    ]
    assert main(["probe", str(run_dir), "--epochs", "2", "--batch-size", "8", *builtin, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_images"] == 16
    assert main(["probe", str(run_dir), "--set", "model.name=vit-s/8"]) == 2
    assert "changes the data only" in capsys.readouterr().err


def test_pretrained_encoder_fine_tunes_and_probes_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = Path(pretrain(tiny_config(tmp_path, "name=mae"), progress=False)["run_dir"])

    # Only the head is new: load_state_dict_strict names any missing or unexpected tensor.
    config = FinetuneConfig(checkpoint=str(run_dir))
    model = create_model("vit22b-ti/8", img_size=16, num_classes=10, **yaml.safe_load(MODEL))
    source = pretrained_state_dict(run_dir, "auto", model)
    assert set(model.state_dict()) - set(source) == {"head.weight", "head.bias"} and set(source) <= set(model.state_dict())
    model, _ = prepare_model(model, config, load=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fit_to_model(source, model, False).items())

    finetune = {
        "name": "ft",
        "out_dir": str(tmp_path),
        "model": {"name": "vit22b-ti/8", "options": yaml.safe_load(MODEL)},
        "data": {"name": "builtin", "image_size": 16, "num_train": 32, "num_test": 8},
        "optim": {"lr": 1e-3, "layer_decay": 0.75},
        "train": {"epochs": 1, "batch_size": 8, "threads": 1, "precision": "fp32", "log_every_steps": 1},
        "finetune": {"checkpoint": str(run_dir)},
    }
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(finetune))
    assert main(["finetune", str(tmp_path / "ft.yaml"), "--no-progress"]) == 0
    assert "test acc@1" in capsys.readouterr().out

    assert main(["probe", str(run_dir), "--num-train", "16", "--epochs", "2", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out  # one readable line; every number with --json
    assert out.count("\n") == 1 and out.startswith(f"linear probe of the pretrained encoder of {run_dir / 'checkpoints'}")
    assert "test acc@1 " in out and "% on 8 images (trained on 16 for 2 epochs)" in out
    assert main(["probe", str(run_dir), "--num-train", "16", "--epochs", "2", "--random-init", "--json"]) == 0
    probed = json.loads(capsys.readouterr().out)
    assert probed["encoder"] == "random init" and probed["train_images"] == 16 and 0 <= probed["acc1"] <= 1

    assert main(["eval", str(run_dir)]) == 2  # a pretraining run is no classifier: one line says so
    assert "made by `vitlab pretrain`" in capsys.readouterr().err


def test_linear_probe_separates_separable_features() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(3, (300,), generator=gen)
    feats = torch.randn(300, 8, generator=gen) * 0.1 + 100 * torch.nn.functional.one_hot(labels, 8).float()
    assert linear_probe(feats[:200], labels[:200], feats[200:], labels[200:], 3, epochs=5, batch_size=50) == 1.0


def test_sigterm_saves_the_step_in_progress_and_auto_resume_continues_exactly(tmp_path: Path) -> None:
    settings = [
        "train.checkpoint_every_steps=1000",
        "name=mpp",
        "pretrain.method=mpp",
        "model.name=vit-ti/8",
        "model.options.pool=gap",
        "augment={resized_crop: true, hflip: true}",
        "data.crop_scale=[0.2, 1.0]",
    ]
    whole = pretrain(tiny_config(tmp_path / "whole", *settings), progress=False)
    run_dir = tmp_path / "cut" / "mpp"

    sigterm_after_steps(run_dir, 3)  # a scheduler's preemption
    with pytest.raises(
        RunInterrupted, match=f"stopped by SIGTERM at step (\\d+); checkpoint: {run_dir}.*vitlab pretrain"
    ) as info:
        pretrain(tiny_config(tmp_path / "cut", *settings), progress=False)
    assert info.value.exit_code == 143 and not (run_dir / "results.json").exists()
    again = pretrain(tiny_config(tmp_path / "cut", *settings, "train.resume=auto"), progress=False)
    assert steps_table(run_dir) == steps_table(Path(whole["run_dir"]))
    assert again["test"] == whole["test"]


def test_config_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(VitlabError, match="pretrain.method"):
        tiny_config(tmp_path, "pretrain.method=simclr")
    with pytest.raises(VitlabError, match="crop and flip only"):
        tiny_config(tmp_path, "augment.mixup_alpha=0.8")
    with pytest.raises(VitlabError, match="decoder_dim"):
        tiny_config(tmp_path, "pretrain.decoder_dim=18")
    assert main(["pretrain", "--set", "pretrain.mask_ratio=1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pretrain.mask_ratio=1.5" in err


@pytest.mark.parametrize("setting", ["pretrain.mask_ratio=0.001", "pretrain.mask_ratio=0.9", "data.image_size=8"])
def test_a_mask_that_hides_no_patch_or_every_patch_is_refused_before_a_run_starts(tmp_path: Path, capsys, setting: str) -> None:
    assert main(["pretrain", "--no-progress", *[a for s in [*TINY, setting, f"out_dir={tmp_path}"] for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []
    if setting.startswith("pretrain"):
        assert f"{setting} masks" in err and "of the 4 patches" in err and "set it in [0.25, 0.75]" in err
    else:
        assert "1x1 is 1 patch" in err


def test_fp16_pretraining_scales_the_loss_and_saves_the_scaler(tmp_path: Path) -> None:
    results = pretrain(tiny_config(tmp_path, "train.precision=fp16", "train.epochs=1"), progress=False)
    meta = json.loads((Path(results["run_dir"]) / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert results["precision"] == "fp16" and results["skipped_steps"] == 0
    assert meta["grad_scaler"]["scale"] > 1  # a loss scaler ran, and resumes from its state


def test_warmup_steps_clip_grad_value_and_compile_are_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitlab.train import sharding

    compiled = []
    wrap = sharding.wrap_model
    monkeypatch.setattr(
        sharding, "wrap_model", lambda *a, **k: compiled.append(a[4] if len(a) > 4 else k.get("compile")) or wrap(*a[:4])
    )
    plain = steps_table(Path(pretrain(tiny_config(tmp_path, "name=plain", "train.epochs=1"), progress=False)["run_dir"]))
    changed = tiny_config(
        tmp_path, "name=changed", "train.epochs=1", "optim.warmup_steps=2", "optim.clip_grad_value=1e-6", "train.compile=true"
    )
    steps = steps_table(Path(pretrain(changed, progress=False)["run_dir"]))
    lr = float(changed.optim.lr)
    assert float(steps[0]["lr"]) == pytest.approx(lr / 2) and float(plain[0]["lr"]) == pytest.approx(lr / 4)
    assert compiled == [False, True]
    assert steps[0]["loss"] == plain[0]["loss"] and steps[-1]["loss"] != plain[-1]["loss"]  # clipped steps move less


def test_a_pretraining_run_that_never_takes_an_optimizer_step_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitlab.train.step import OptimizerStep

    step = OptimizerStep.step
    monkeypatch.setattr(OptimizerStep, "step", lambda self, opt, params, loss: step(self, opt, params, loss * math.nan))
    with pytest.raises(VitlabError, match="no optimizer step was taken: all 4 steps"):
        pretrain(tiny_config(tmp_path, "train.epochs=1", "train.max_bad_steps=10"), progress=False)
    assert not (tmp_path / "pretrain" / "results.json").exists()


@pytest.mark.parametrize("key", ["label_smoothing=0.1", "z_loss=1e-4", "grad_penalty=0.1"])
def test_classifier_loss_terms_are_refused_at_load(tmp_path: Path, key: str) -> None:
    with pytest.raises(VitlabError, match=f"train.{key.split('=')[0]}"):
        tiny_config(tmp_path, f"train.{key}")


def test_two_rank_ddp_pretraining_keeps_replicas_identical_and_splits_the_global_batch(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    def run(name: str, launcher: list[str], strategy: str) -> dict:
        args = [
            a
            for item in [*TINY, "train.epochs=3", f"train.strategy={strategy}", f"out_dir={tmp_path}", f"name={name}"]
            for a in ("--set", item)
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [*launcher, "-m", "vitlab.cli", "pretrain", *args, "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "results.json").read_text())

    single = run("single", [sys.executable], "single")
    ddp = run("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "ddp")
    assert ddp["world_size"] == 2 and ddp["steps"] == single["steps"] == 12  # the global batch of 8 is split, not doubled
    assert ddp["max_rank_param_difference"] == 0.0
    assert abs(ddp["test"]["loss"] - single["test"]["loss"]) < 0.15 * single["test"]["loss"]
