"""benchmarks/bench_map.py end to end on a tiny map: both modes train the cells, and the table holds both rates."""

import importlib.util
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_map.py"


def test_tiny_map_is_timed_both_ways_and_tabulated(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_map", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = {
        "model": {"name": "vit-ti/8", "options": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_dim": 64}},
        "data": {"num_train": 64, "num_test": 32},
        "train": {"epochs": 1, "batch_size": 32, "precision": "fp32", "log_every_steps": 1},
    }
    config = tmp_path / "map.yaml"
    config.write_text(yaml.safe_dump({"name": "m", "base": base, "lrs": [0.001, 0.01], "blocks": {"serial": []}}))
    out = tmp_path / "speed.md"
    table = bench.main(["--config", str(config), "--cells", "2", "--repeats", "1", "--threads", "2", "--out", str(out)])
    assert out.read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| one after") or line.startswith("| --workers")]
    assert len(rows) == 2 and all(float(row.split("|")[-2]) > 0 for row in rows)
    assert "2 cells" in table and "Speed-up of --workers 2" in table
