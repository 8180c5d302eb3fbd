"""`vitlab stability-map`: the LR-sensitivity arithmetic, resumable cells, shards, and config errors before training."""

import json

import pytest
import yaml

from vitlab import VitlabError
from vitlab.cli import main
from vitlab.config import MapConfig, config_kind
from vitlab.runs.kinds import load_experiment
from vitlab.train.stability_map import diverged_step, parse_shard, sensitivity

BASE = {
    "model": {"name": "vit-ti/8", "options": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_dim": 64}},
    "data": {"num_train": 64, "num_test": 32},
    "optim": {"name": "sgd", "schedule": "constant", "warmup_epochs": 0},
    "train": {"epochs": 1, "batch_size": 32, "precision": "fp32", "log_every_steps": 1, "threads": 1, "max_bad_steps": 1},
}


def test_sensitivity_of_a_hand_worked_grid_caps_a_diverged_cell_at_l0():
    grid = [
        {"lr": 0.001, "l0": 2.3, "loss": 1.5, "diverged": False},
        {"lr": 0.01, "l0": 2.3, "loss": 1.0, "diverged": False},
        {"lr": 0.1, "l0": 2.3, "loss": 2.9, "diverged": False},  # worse than ℓ₀: counts as ℓ₀
        {"lr": 1.0, "l0": 2.3, "loss": None, "diverged": True},  # stopped: counts as ℓ₀
    ]
    # ℓ* = 1.0 at η* = 0.01; (0.5 + 0 + 1.3 + 1.3) / 4 = 0.775
    assert sensitivity(grid) == pytest.approx({"sensitivity": 0.775, "best_loss": 1.0, "best_lr": 0.01})
    grid[1]["diverged"] = True  # a diverged cell never counts below ℓ₀, even with a low final loss
    assert sensitivity(grid) == pytest.approx({"sensitivity": (0 + 0.8 + 0.8 + 0.8) / 4, "best_loss": 1.5, "best_lr": 0.001})


def test_patience_counts_evaluations_in_a_row_above_l0():
    assert diverged_step([10, 20, 30, 40], [3.0, 1.0, 3.0, float("nan")], 2.0, 2) == 40
    assert diverged_step([10, 20, 30], [3.0, 1.0, 3.0], 2.0, 2) is None


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(VitlabError, match="--shard"):
            parse_shard(bad)


def write_map(tmp_path, **fields) -> str:
    data = {"name": "m", "out_dir": str(tmp_path), "base": BASE, "lrs": [0.01, 1.0e30], "sizes": {"w32": []}, **fields}
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_shards_partition_the_grid_reruns_skip_finished_cells_and_the_report_is_written(tmp_path, capsys):
    path = write_map(tmp_path)
    config = load_experiment(path, cls=MapConfig)
    assert len(config.cells()) == 4  # 2 blocks × 1 size × 1 intervention × 2 LRs
    root = tmp_path / "m"
    finished = lambda: {p.parent for p in root.glob("*/*/*/*/*") if p.name in ("results.json", "diverged.json")}  # noqa: E731
    assert main(["stability-map", path, "--shard", "0/2", "--no-progress"]) == 0
    first = finished()
    assert main(["stability-map", path, "--shard", "1/2", "--no-progress"]) == 0
    second = finished() - first
    assert len(first) == len(second) == 2 and not first & second
    assert {p.relative_to(root).as_posix() for p in first | second} == {
        f"{block}/w32/none/lr{lr}-seed0" for block in ("serial", "parallel") for lr in ("0.01", "1e+30")
    }
    stamps = {p: (p / "steps.csv").stat().st_mtime_ns for p in first | second}
    capsys.readouterr()
    assert main(["stability-map", path, "--no-progress"]) == 0  # everything finished: nothing trains again
    assert capsys.readouterr().out.count("is finished; skipped") == 4
    assert {p: (p / "steps.csv").stat().st_mtime_ns for p in first | second} == stamps
    assert not list(root.glob("*/*/*/*-2"))
    saved = json.loads((root / "map.json").read_text())
    assert len(saved["cells"]) == 4 and len(saved["summaries"]) == 2
    for cell in saved["cells"]:
        assert cell["diverged"] is (cell["lr"] == 1e30)
    for summary in saved["summaries"]:
        assert summary["best_lr"] == [0.01] and summary["sensitivity"] > 0
    assert "| serial | w32 | none |" in (root / "map.md").read_text()
    assert (root / "loss_vs_lr.png").is_file() and (root / "sensitivity_vs_params.png").is_file()


def test_a_bad_override_fails_before_any_cell_trains(tmp_path, capsys):
    path = write_map(tmp_path, interventions={"none": [], "odd": ["model.options.nope=1"]})
    assert config_kind(yaml.safe_load(open(path))) is MapConfig
    assert main(["stability-map", path, "--no-progress"]) == 2
    assert "odd" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_a_map_is_named_by_its_kind_and_refused_by_sweep(tmp_path):
    from vitlab.sweep import load_sweep_config

    assert config_kind({"kind": "stability-map"}) is MapConfig
    with pytest.raises(VitlabError, match="vitlab stability-map"):
        load_sweep_config(write_map(tmp_path), [])


def test_repeated_lrs_are_refused():
    with pytest.raises(VitlabError, match="must not repeat"):
        MapConfig(base=BASE, lrs=(0.01, 0.0100000001)).validate()
