"""The CycleGAN loop: losses against hand computation, LR schedule, image pool, a tiny run, exact resume, CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from tests.train.preemption import sigterm_after_steps
from vitlab.cli import main
from vitlab.config import CycleLossConfig, TranslateConfig, load_config
from vitlab.errors import VitlabError
from vitlab.models.ai602 import Ai602Discriminator
from vitlab.runs.kinds import load_experiment
from vitlab.train.cyclegan import (
    ImagePool,
    discriminator_loss,
    generator_loss,
    lsgan_loss,
    train_translation,
)
from vitlab.train.scaffold import TrainingDiverged

TINY = [
    "generator.name=vit-ti/4",
    "generator.options={embed_dim: 16, depth: 6, num_heads: 2, mlp_dim: 32, refine_channels: 4, refine_blocks: 1}",
    "discriminator={base_channels: 4, num_layers: 2}",
    "data={name: builtin, load_size: 20, crop_size: 16, num_train: 16, num_test: 8}",
    "train={epochs: 1, decay_epochs: 1, batch_size: 4, threads: 1, precision: fp32, log_every_steps: 1, "
    "checkpoint_every_steps: 3, keep_checkpoints: 10, eval_every_epochs: 1, sample_every_epochs: 1, num_samples: 2}",
    "eval={features: randconv, kid_subset_size: 4}",
]


def tiny_config(tmp_path: Path, *extra: str) -> TranslateConfig:
    return load_experiment(None, [*TINY, f"out_dir={tmp_path}", *extra], TranslateConfig)


class Affine(nn.Module):
    """x ↦ scale·x + shift: a generator whose outputs are easy to compute by hand."""

    def __init__(self, scale: float, shift: float):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.shift


class ChannelMean(nn.Module):
    """A discriminator whose score map is the mean over channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True)


def hand_nets() -> nn.ModuleDict:
    return nn.ModuleDict({"g_a": Affine(1, 1), "g_b": Affine(0.5, 0), "d_a": ChannelMean(), "d_b": ChannelMean()})


def test_lsgan_loss_is_the_mean_square_distance_to_the_target() -> None:
    scores = torch.tensor([0.5, 2.0])
    assert lsgan_loss(scores, True).item() == pytest.approx((0.25 + 1.0) / 2)
    assert lsgan_loss(scores, False).item() == pytest.approx((0.25 + 4.0) / 2)


def test_generator_loss_parts_by_hand() -> None:
    a, b = torch.full((1, 3, 4, 4), 0.2), torch.full((1, 3, 4, 4), -0.4)
    total, parts, fake_a, fake_b = generator_loss(hand_nets(), a, b, CycleLossConfig())
    # G_A(a) = 1.2, G_B(b) = -0.2; G_B(G_A(a)) = 0.6, G_A(G_B(b)) = 0.8; G_A(b) = 0.6, G_B(a) = 0.1
    expected = {
        "gan_a": (1.2 - 1) ** 2,
        "gan_b": (-0.2 - 1) ** 2,
        "cycle_a": 10 * abs(0.6 - 0.2),
        "cycle_b": 10 * abs(0.8 + 0.4),
        "idt_a": 0.5 * 10 * abs(0.6 + 0.4),
        "idt_b": 0.5 * 10 * abs(0.1 - 0.2),
    }
    assert {k: pytest.approx(v) for k, v in expected.items()} == {k: v.item() for k, v in parts.items()}
    assert total.item() == pytest.approx(sum(expected.values()))
    assert torch.allclose(fake_b, torch.full_like(a, 1.2)) and torch.allclose(fake_a, torch.full_like(b, -0.2))
    _, without_identity, _, _ = generator_loss(hand_nets(), a, b, CycleLossConfig(lambda_identity=0))
    assert set(without_identity) == {"gan_a", "gan_b", "cycle_a", "cycle_b"}


def test_discriminator_loss_is_halved() -> None:
    real, fake = torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), 0.3)
    assert discriminator_loss(ChannelMean(), real, fake).item() == pytest.approx(0.5 * ((0.5 - 1) ** 2 + 0.3**2))


def test_pool_fills_first_then_swaps_half_of_the_fakes_for_older_ones() -> None:
    pool, gen = ImagePool(3), torch.Generator().manual_seed(0)
    first = torch.arange(3.0).view(3, 1)
    assert torch.equal(pool.query(first, gen), first) and len(pool.images) == 3
    returned_old, seen = 0, set(first.flatten().tolist())
    for i in range(3, 403):
        (out,) = pool.query(torch.tensor([[float(i)]]), gen)
        if out.item() != i:
            returned_old += 1
            assert out.item() in seen and i in {int(x) for x in torch.stack(pool.images).flatten().tolist()}
        seen.add(float(i))
        assert len(pool.images) == 3
    assert 150 < returned_old < 250  # probability 1/2 each


def test_pool_of_size_zero_passes_through_and_state_round_trips() -> None:
    fakes = torch.randn(4, 3, 2, 2)
    assert torch.equal(ImagePool(0).query(fakes, torch.Generator()), fakes)
    pool = ImagePool(5)
    pool.query(fakes, torch.Generator())
    copy = ImagePool(5)
    copy.load_state_dict(pool.state_dict())
    assert torch.equal(torch.stack(copy.images), fakes)
    empty = ImagePool(5)
    empty.load_state_dict(ImagePool(5).state_dict())
    assert empty.images == []


def steps_table(run_dir: Path) -> list[dict]:
    with (run_dir / "steps.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]


def test_tiny_run_writes_grids_metrics_and_resumes_exactly(tmp_path: Path) -> None:
    results = train_translation(tiny_config(tmp_path), progress=False)
    run_dir = Path(results["run_dir"])
    assert results["steps"] == 8 and results["epochs"] == 2
    for name in ("config.yaml", "steps.csv", "epochs.csv", "curves.png", "results.json", "samples.png"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-00000004.png", "step-00000008.png"]
    test = json.loads((run_dir / "results.json").read_text())["test"]
    for key in ("l1", "psnr", "identity_l1", "fid_randconv", "kid_randconv", "identity_fid_randconv"):
        assert set(test) == {"AtoB", "BtoA", "average"} and key in test["AtoB"], key
    checkpoint = run_dir / "checkpoints" / "step-00000008"
    assert {p.name for p in checkpoint.iterdir()} == {
        "g_a.safetensors",
        "g_b.safetensors",
        "d_a.safetensors",
        "d_b.safetensors",
        "pool_a.safetensors",
        "pool_b.safetensors",
        "optimizer.pt",
        "meta.json",
    }

    # Resume from step 3, as if the run had been killed after its first checkpoint.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    for later in ("step-00000006", "step-00000008"):
        shutil.rmtree(resumed / "checkpoints" / later)
    (resumed / "checkpoints" / "latest").write_text("step-00000003")
    again = train_translation(tiny_config(tmp_path), resume_dir=resumed, progress=False)
    assert steps_table(resumed) == steps_table(run_dir)
    for name in ("g_a", "g_b", "d_a", "d_b"):
        final, redone = (load_file(d / "checkpoints" / "step-00000008" / f"{name}.safetensors") for d in (run_dir, resumed))
        assert all(torch.equal(final[k], redone[k]) for k in final), name
    assert again["test"] == results["test"]

    # `vitlab translate` on a folder, and `vitlab translate-eval` of the run.
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 20), (40 * i, 90, 160)).save(in_dir / f"img{i}.jpg")
    assert main(["translate", str(run_dir), str(in_dir), str(out_dir), "--direction", "BtoA"]) == 0
    outputs = sorted(out_dir.iterdir())
    assert [p.name for p in outputs] == ["img0.png", "img1.png", "img2.png"]
    assert all(Image.open(p).size == (16, 16) for p in outputs)
    assert main(["translate-eval", str(run_dir), "--features", "randconv"]) == 0


def test_translate_train_and_eval_print_a_short_summary_and_eval_the_json_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sets = [arg for key in [*TINY, f"out_dir={tmp_path}"] for arg in ("--set", key)]
    assert main(["translate-train", "configs/translate-builtin.yaml", *sets, "--no-progress"]) == 0
    run_dir = tmp_path / "translate-builtin-vitunet"
    out = capsys.readouterr().out.splitlines()
    assert out[-4] == f"run {run_dir} after 2.00 epochs (test metrics, the identity mapping's in brackets; all in results.json):"
    assert [line.split()[0] for line in out[-3:]] == ["AtoB", "BtoA", "average"]
    test = json.loads((run_dir / "results.json").read_text())["test"]
    row = test["AtoB"]
    assert out[-3] == (
        f"  AtoB     L1 {row['l1']:.4g} ({row['identity_l1']:.4g}), PSNR {row['psnr']:.4g} ({row['identity_psnr']:.4g}), "
        f"FID randconv {row['fid_randconv']:.4g} ({row['identity_fid_randconv']:.4g}), "
        f"KID randconv {row['kid_randconv']:.4g} ({row['identity_kid_randconv']:.4g})"
    )
    assert main(["translate-eval", str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == out[-3:]  # the same numbers from the checkpoint
    assert main(["translate-eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == test


def test_the_codes_table2_setting_trains_ai602_networks_paired_by_index_without_a_pool(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path,
        "generator={name: ai602-vit22b-ti/4, options: {embed_dim: 16, depth: 6, num_heads: 2, mlp_dim: 32}}",
        "discriminator.kind=ai602",
        "data.pairing=index",
        "data.num_train=10",
        "loss.pool_size=0",
        "loss.lambda_identity=0",
        "train.checkpoint_every_steps=1000",
    )
    results = train_translation(config, progress=False)
    assert results["steps"] == 4  # epoch = min(|A|, |B|) // batch = 2, two epochs
    assert results["discriminator_parameters"] == sum(p.numel() for p in Ai602Discriminator().parameters())
    with pytest.raises(VitlabError, match="Inception weights file"):  # before any training
        train_translation(tiny_config(tmp_path, "eval.protocol=paper-table2", "name=refused"), progress=False)
    assert not (tmp_path / "refused").exists()


def test_run_that_blows_up_stops_with_a_message_naming_the_step(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "optim.lr=1.0e+30", "train.max_bad_steps=2", "train.checkpoint_every_steps=1000")
    with pytest.raises(TrainingDiverged, match=r"2 steps in a row with a non-finite loss, the last at step \d+"):
        train_translation(config, progress=False)


def test_translation_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(VitlabError, match="unknown config key.*loss.lambda_cyc"):
        tiny_config(tmp_path, "loss.lambda_cyc=5")
    with pytest.raises(VitlabError, match="generator.options: unknown key.*pool"):
        tiny_config(tmp_path, "generator.options={pool: gap}")
    with pytest.raises(VitlabError, match="data.crop_size=40 .* at most data.load_size=20"):
        tiny_config(tmp_path, "data.crop_size=40")


def test_cli_errors_are_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["translate-train"]) == 2
    assert main(["translate-eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "give a config" in err[0] and "no checkpoint found" in err[1]


def test_paper_configs_cover_table_2_with_the_cyclegan_recipe() -> None:
    paper = Path(__file__).parents[2] / "configs" / "paper"
    for data in ("apple2orange", "monet2photo"):
        names = {}
        for path in paper.glob(f"{data}-*.yaml"):
            config = load_config(path, cls=TranslateConfig)
            names[path.stem] = config.generator.name
            assert (config.data.load_size, config.data.crop_size, config.data.root) == (286, 256, f"data/{data}")
            assert (config.train.epochs, config.train.decay_epochs, config.train.batch_size) == (100, 100, 1)
            assert (config.loss.lambda_cycle, config.loss.lambda_identity, config.loss.pool_size) == (10, 0.5, 50)
            assert (config.optim.lr, config.optim.betas) == (2e-4, (0.5, 0.999))
            assert config.eval.protocol == "paper-table2"  # no random-CNN FID for a published number
        assert names == {
            f"{data}-vitunet-vit-s32": "vit-s/32",
            f"{data}-vitunet-vit22b-s32": "vit22b-s/32",
            f"{data}-vitunet-vit-b32": "vit-b/32",
            f"{data}-resnet": "resnet",
        }


def test_sigterm_saves_the_step_in_progress_and_auto_resume_continues_exactly(tmp_path: Path) -> None:
    from vitlab.train.scaffold import RunInterrupted

    settings = ["train.checkpoint_every_steps=1000", "name=gan"]
    whole = train_translation(tiny_config(tmp_path / "whole", *settings), progress=False)
    run_dir = tmp_path / "cut" / "gan"

    sigterm_after_steps(run_dir, 3)  # a scheduler's preemption
    with pytest.raises(RunInterrupted, match=f"stopped by SIGTERM at step (\\d+); checkpoint: {run_dir}") as info:
        train_translation(tiny_config(tmp_path / "cut", *settings), progress=False)
    assert info.value.exit_code == 143 and not (run_dir / "results.json").exists()
    again = train_translation(tiny_config(tmp_path / "cut", *settings, "train.resume=auto"), progress=False)
    assert steps_table(run_dir) == steps_table(Path(whole["run_dir"]))
    assert again["test"] == whole["test"]


def test_code_configs_cover_table_2_as_the_paper_code_ran_it() -> None:
    code = Path(__file__).parents[2] / "configs" / "paper" / "code"
    for data, names in (("apple2orange", ("Apple", "Orange")), ("monet2photo", ("Monet", "Photo"))):
        found = {}
        for path in code.glob(f"{data}-*.yaml"):
            config = load_config(path, cls=TranslateConfig)
            found[path.stem] = config.generator.name
            assert (config.discriminator.kind, config.data.pairing, config.loss.pool_size) == ("ai602", "index", 0)
            assert (config.data.load_size, config.data.crop_size, config.data.hflip) == (256, 256, False)
            assert (config.train.batch_size, config.loss.lambda_identity) == (32, 0)
            assert (config.eval.protocol, config.eval.domain_names) == ("paper-table2", names)
        assert found == {
            f"{data}-vitunet-vit-s32": "ai602-vit-s/32",
            f"{data}-vitunet-vit22b-s32": "ai602-vit22b-s/32",
            f"{data}-vitunet-vit-b32": "ai602-vit-b/32",
        }
