"""`vitlab sweep`: configs trained in order, then the report; or the commands printed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.sweep import run_sweep, sweep_commands

TINY = {
    "model": {"options": {"depth": 1, "embed_dim": 16, "num_heads": 2, "mlp_dim": 32}},
    "data": {"name": "builtin", "num_train": 64, "num_test": 32},
    "optim": {"warmup_epochs": 0},
    "train": {"epochs": 1, "batch_size": 32, "threads": 1, "strategy": "single", "precision": "fp32"},
}


def tiny(tmp_path: Path, name: str, model: str) -> str:
    path = tmp_path / f"{name}.yaml"
    config = {**TINY, "name": name, "out_dir": str(tmp_path / "runs"), "model": {**TINY["model"], "name": model}}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_sweep_trains_each_config_in_order_then_draws_fig2(tmp_path: Path) -> None:
    paths = [tiny(tmp_path, "vit", "vit-ti/8"), tiny(tmp_path, "code22b", "ai602-vit22b-ti/8")]
    reports = run_sweep(paths, ["train.epochs=2"], tmp_path / "report", progress=False)
    table, figure = reports["fig2"]
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
