"""`vitlab stability-map`: the LR-sensitivity arithmetic, resumable cells, shards, and config errors before training."""

import fcntl
import json
import math

import pytest
import yaml

from vitlab import VitlabError
from vitlab.cli import main
from vitlab.config import MapConfig, config_kind
from vitlab.runs.kinds import load_experiment
from vitlab.train.stability_map import CLAIM_FILE, claim, parse_shard, run_cells, run_map, sensitivity, summarise
from vitlab.train.stability_map_figures import fit_logit_trend

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


def test_seeds_give_the_mean_and_spread_of_the_sensitivity():
    def grid(loss_at_001: float) -> list[dict]:
        return [
            {"lr": 0.001, "l0": 2.0, "loss": 1.0, "diverged": False, "num_parameters": 10, "train_flops": 5.0},
            {"lr": 0.01, "l0": 2.0, "loss": loss_at_001, "diverged": False, "num_parameters": 10, "train_flops": 5.0},
        ]

    # seed 0: ℓ* 1.0, sensitivity (0 + 1.0) / 2 = 0.5; seed 1: ℓ* 0.5, sensitivity (0.5 + 0) / 2 = 0.25
    row = summarise("serial", "w32", "none", {0: grid(3.0), 1: grid(0.5)})
    assert row["sensitivity"] == pytest.approx(0.375) and row["sensitivity_std"] == pytest.approx(0.125)
    assert row["best_lr"] == [0.001, 0.01] and row["best_loss"] == pytest.approx(0.75) and row["train_flops"] == 20.0


def test_logit_trend_is_a_power_law_fit_extrapolated_to_the_threshold():
    cells = [
        {"block": "serial", "intervention": "none", "num_parameters": n, "max_attention_logit": 2.0 * n**0.5}
        for n in (100, 400, 1600)
    ] + [{"block": "serial", "intervention": "qk", "num_parameters": n, "max_attention_logit": 5.0} for n in (100, 400)]
    fits = {f["intervention"]: f for f in fit_logit_trend(cells, threshold=200.0)}
    assert fits["none"]["slope"] == pytest.approx(0.5)
    assert fits["none"]["params_at_threshold"] == pytest.approx(10_000)  # 2 · √n = 200
    assert fits["qk"]["params_at_threshold"] is None  # flat: never reaches it


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
        assert cell["l0"] == pytest.approx(math.log(10), abs=0.3)  # the test loss at step 0: near ln(classes)
        assert cell["num_parameters"] > 0 and cell["train_flops"] > 0 and len(cell["config_hash"]) == 12
        if not cell["diverged"]:
            assert cell["max_attention_logit"] > 0 and cell["final_log_z"] > 0 and cell["max_update_rms"] == 0  # SGD: no v
    hashes = {c["config_hash"] for c in saved["cells"]}
    assert len(hashes) == 4  # block and LR change what trains
    for summary in saved["summaries"]:
        assert summary["best_lr"] == [0.01] and summary["sensitivity"] > 0
    assert "| serial | w32 | none |" in (root / "map.md").read_text()
    for png in ("loss_vs_lr", "sensitivity_vs_params", "excess_loss_heatmap", "attention_logit_trend"):
        assert (root / f"{png}.png").is_file()
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))


def test_a_cell_whose_test_loss_stays_above_l0_stops_early_as_diverged(tmp_path):
    # SGD at lr 30 with gradients clipped to norm 1: finite steps that wreck the model, so the loss stays above ℓ₀
    base = {**BASE, "optim": {**BASE["optim"], "clip_grad_norm": 1.0}, "data": {"num_train": 256, "num_test": 32}}
    base["train"] = {**BASE["train"], "epochs": 4, "eval_every_epochs": 0.25, "max_bad_steps": 3}
    config = load_experiment(write_map(tmp_path, base=base, lrs=[30.0], blocks={"serial": []}, patience=2), cls=MapConfig)
    assert run_cells(config, progress=False) == {}
    result = run_map(config, report_only=True)
    cell = result["cells"][0]
    assert cell["diverged"] and "step-0 value" in cell["stopped"]
    assert cell["diverged_step"] == 4  # two evaluations (every 2 steps) above ℓ₀: stopped at step 4 of 32


def test_a_cell_claimed_by_another_worker_is_not_trained(tmp_path, capsys):
    config = load_experiment(write_map(tmp_path, lrs=[0.01], blocks={"serial": []}), cls=MapConfig)
    run_config = config.cell_config(*config.cells()[0])
    run_dir = tmp_path / "m" / "serial" / "w32" / "none" / "lr0.01-seed0"
    with claim(run_dir) as mine:
        assert mine
        with open(run_dir / CLAIM_FILE) as other:  # a second open file: what another process would hold
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_cells(config, progress=False) == {}
    assert "claimed by another worker; skipped" in capsys.readouterr().out
    assert not (run_dir / "steps.csv").exists() and run_config.name == "lr0.01-seed0"
    assert run_cells(config, progress=False) == {}  # released: now it trains
    assert (run_dir / "results.json").is_file()
    # killed after its last checkpoint, before results.json: the rerun resumes the cell instead of starting over
    (run_dir / "results.json").unlink()
    rows = (run_dir / "steps.csv").read_text()
    capsys.readouterr()
    assert run_cells(config, progress=False) == {}
    assert "step 1/" not in capsys.readouterr().out  # no step trained again
    assert (run_dir / "results.json").is_file() and (run_dir / "steps.csv").read_text() == rows


def test_two_workers_train_every_cell_once(tmp_path):
    config = load_experiment(write_map(tmp_path, lrs=[0.01, 0.03]), cls=MapConfig)
    result = run_map(config, workers=2)
    assert len(result["cells"]) == 4
    for cell in config.cells():
        run_dir = tmp_path / "m" / cell[0] / cell[1] / cell[2] / f"lr{cell[3]:g}-seed{cell[4]}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["threads"] == 1  # 2 cores / 2 workers
        printed = (run_dir / "output.txt").read_text()  # a worker's cell prints into its folder
        assert printed.count("step 1/") == 1 and "test acc@1" in printed  # trained once, by one worker


def test_a_bad_override_fails_before_any_cell_trains(tmp_path, capsys):
    path = write_map(tmp_path, interventions={"none": [], "odd": ["model.options.nope=1"]})
    assert config_kind(yaml.safe_load(open(path))) is MapConfig
    assert main(["stability-map", path, "--no-progress"]) == 2
    assert "odd" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_a_map_is_named_by_its_kind_and_refused_by_sweep(tmp_path):
    from vitlab.sweep import load_sweep_config

    assert config_kind({"kind": "stability-map"}) is MapConfig
    assert config_kind({"base": {}, "interventions": {"none": []}}) is MapConfig  # the default lrs: told by its grid
    with pytest.raises(VitlabError, match="vitlab stability-map"):
        load_sweep_config(write_map(tmp_path), [])


def test_repeated_lrs_are_refused():
    with pytest.raises(VitlabError, match="must not repeat"):
        MapConfig(base=BASE, lrs=(0.01, 0.0100000001)).validate()
