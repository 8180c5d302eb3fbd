"""`vitlab sweep`: configs trained in order, then the report; or the commands printed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.sweep import run_sweep, sweep_commands
from vitlab.train.scaffold import Run

TINY = {
    "model": {"options": {"depth": 1, "embed_dim": 16, "num_heads": 2, "mlp_dim": 32}},
    "data": {"name": "builtin", "num_train": 64, "num_test": 32},
    "optim": {"warmup_epochs": 0},
    "train": {"epochs": 1, "batch_size": 32, "threads": 1, "strategy": "single", "precision": "fp32"},
}


PRETRAIN = {
    "model": {"name": "vit-ti/8", "options": TINY["model"]["options"]},
    "data": {"name": "builtin", "image_size": 16, "num_train": 16, "num_test": 8},
    "pretrain": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "num_samples": 2},
    "optim": {"warmup_epochs": 0},
    "train": {"epochs": 1, "batch_size": 8, "threads": 1, "precision": "fp32"},
}


def tiny(tmp_path: Path, name: str, model: str, base: dict = TINY) -> str:
    path = tmp_path / f"{name}.yaml"
    config = {**base, "name": name, "out_dir": str(tmp_path / "runs"), "model": {**base["model"], "name": model}}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_sweep_trains_each_config_in_order_then_draws_fig2(tmp_path: Path) -> None:
    paths = [tiny(tmp_path, "vit", "vit-ti/8"), tiny(tmp_path, "code22b", "ai602-vit22b-ti/8")]
    table, figure = run_sweep(paths, ["train.epochs=2"], tmp_path / "report", progress=False).reports["fig2"]
    text = table.read_text()
    assert "`vit-ti/8`" in text and "`ai602-vit22b-ti/8`" in text and figure.is_file()
    assert (tmp_path / "runs" / "vit" / "results.json").is_file()
    assert yaml.safe_load((tmp_path / "runs" / "vit" / "config.yaml").read_text())["train"]["epochs"] == 2


def test_print_gives_torchrun_commands_and_nothing_runs(tmp_path: Path, capsys) -> None:
    path = tiny(tmp_path, "vit", "vit-ti/8")
    assert sweep_commands([path], ["train.epochs=5"], 4) == [
        f"torchrun --standalone --nproc_per_node=4 -m vitlab.cli train {path} --set train.epochs=5",
        f"vitlab report fig2 {tmp_path / 'runs' / 'vit'} --out report",
    ]
    assert main(["sweep", path, "--print"]) == 0
    assert capsys.readouterr().out.startswith("torchrun") and not (tmp_path / "runs").exists()


def test_a_bad_config_stops_the_sweep_before_anything_trains(tmp_path: Path) -> None:
    good = tiny(tmp_path, "vit", "vit-ti/8")
    with pytest.raises(VitlabError, match="does not exist"):
        run_sweep([good, str(tmp_path / "missing.yaml")], [], tmp_path / "report", progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_failed_config_does_not_stop_the_sweep_and_a_rerun_only_finishes_it(tmp_path: Path, capsys, monkeypatch) -> None:
    models = {"a": "vit-ti/8", "b": "vit22b-ti/8", "c": "ai602-vit22b-ti/8"}
    paths = [tiny(tmp_path, name, model) for name, model in models.items()]
    finish = Run.finish

    def fail_b(run: Run, *args, **kwargs) -> dict:  # b fails after its last checkpoint, before results.json
        if run.config.name == "b":
            raise RuntimeError("b broke")
        return finish(run, *args, **kwargs)

    monkeypatch.setattr(Run, "finish", fail_b)
    args = ["sweep", *paths, "--out", str(tmp_path / "report"), "--no-progress"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert "1 of 3 configs failed" in last and f"{paths[1]}: b broke" in last and "run the same sweep again" in last
    runs = tmp_path / "runs"
    assert (runs / "c" / "results.json").is_file() and not (runs / "b" / "results.json").is_file()
    report = (tmp_path / "report" / "fig2.md").read_text()
    assert "`vit-ti/8`" in report and "`ai602-vit22b-ti/8`" in report and "`vit22b-ti/8`" not in report
    steps = {name: (runs / name / "steps.csv").read_bytes() for name in ("a", "c")}

    monkeypatch.setattr(Run, "finish", finish)  # the failure fixed: the same sweep again
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("is finished; skipped") == 2 and "b (resuming from step 2" in out
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "c"]  # no a-2, b-2 or c-2
    assert {name: (runs / name / "steps.csv").read_bytes() for name in ("a", "c")} == steps
    assert (runs / "b" / "results.json").is_file() and "`vit22b-ti/8`" in (tmp_path / "report" / "fig2.md").read_text()


def test_a_sweep_pretrains_a_pretraining_config_and_leaves_it_out_of_the_report(tmp_path: Path) -> None:
    vit, mae = tiny(tmp_path, "vit", "vit-ti/8"), tiny(tmp_path, "mae", "vit-ti/8", PRETRAIN)
    assert sweep_commands([vit, mae], [], 2) == [
        f"torchrun --standalone --nproc_per_node=2 -m vitlab.cli train {vit}",
        f"torchrun --standalone --nproc_per_node=2 -m vitlab.cli pretrain {mae}",
        f"vitlab report fig2 {tmp_path / 'runs' / 'vit'} --out report",
    ]
    result = run_sweep([mae], [], tmp_path / "report", progress=False)
    assert result.finished == {mae: tmp_path / "runs" / "mae"} and not result.failed and not result.reports
    assert "loss" in yaml.safe_load((tmp_path / "runs" / "mae" / "results.json").read_text())["test"]


def test_two_configs_of_one_run_directory_are_refused_before_anything_trains(tmp_path: Path) -> None:
    first = tiny(tmp_path, "vit", "vit-ti/8")
    second = tmp_path / "other.yaml"
    second.write_text(Path(first).read_text())
    with pytest.raises(VitlabError, match=f"both train {tmp_path / 'runs' / 'vit'}; give each config its own name"):
        run_sweep([first, str(second)], [], tmp_path / "report", progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_sweep_with_a_resnet_draws_the_comparison_with_training_flops_and_cka(tmp_path: Path) -> None:
    from vitlab.models.presets import forward_flops

    options = {"stem_width": 16, "channels": [32, 64], "layers": [1, 1], "groups": 8}
    paths = [tiny(tmp_path, "vit", "vit-ti/8"), tiny(tmp_path, "resnet", "bit-r26x1", {**TINY, "model": {"options": options}})]
    assert sweep_commands(paths, [], 1)[-1].startswith("vitlab report compare ")
    table, figure = run_sweep(paths, [], tmp_path / "report", progress=False).reports["compare"]
    vit, resnet = table.read_text().splitlines()[2:4]
    assert "| ViT |" in vit and "| ResNet |" in resnet
    trained = 2 * 32  # 64 images in batches of 32, one epoch
    assert f"| {3 * forward_flops('bit-r26x1', 32, num_classes=10, **options) * trained:.3g} |" in resnet
    assert {p.name for p in (tmp_path / "report" / "cka").iterdir()} == {"vit-vit", "vit-resnet", "resnet-resnet"}
    assert figure.is_file() and (tmp_path / "report" / "cka-maps.png").is_file()
