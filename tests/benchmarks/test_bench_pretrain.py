"""benchmarks/bench_pretrain.py end to end at tiny sizes: every run of the protocol, and the table."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pretrain.py"


def test_tiny_protocol_pretrains_fine_tunes_probes_and_tabulates(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_pretrain", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        [
            "--families",
            "vit22b",
            "--seeds",
            "0",
            "--patch",
            "8",
            "--threads",
            "1",
            "--precision",
            "fp32",
            "--model-options",
            "{depth: 1, embed_dim: 32, num_heads: 2, mlp_dim: 64, pool: gap}",
            "--pretrain-images",
            "64",
            "--pretrain-batch",
            "32",
            "--mae-epochs",
            "1",
            "--mpp-epochs",
            "1",
            "--labelled",
            "64",
            "--finetune-epochs",
            "1",
            "--probe-epochs",
            "2",
            "--test-images",
            "32",
            "--set",
            "pretrain.decoder_dim=16",
            "--set",
            "pretrain.decoder_heads=2",
            "--out-dir",
            str(tmp_path / "runs"),
            "--results",
            str(tmp_path / "results"),
        ]
    )
    rows = json.loads((tmp_path / "results" / "pretrain-vit22b-seed0.json").read_text())["rows"]
    assert [(r["family"], r["method"]) for r in rows] == [("vit22b", "mae"), ("vit22b", "mpp")]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("scratch", "finetuned", "probe", "probe_random_init"))
    table = (tmp_path / "results" / "pretrain-vit22b-seed0.md").read_text()
    assert "| vit22b | mae | 1 |" in table and "| vit22b | mpp | 1 |" in table
    assert {p.name for p in (tmp_path / "results").glob("*.png")} == {
        f"pretrain-vit22b-{m}-seed0-{kind}.png" for m in ("mae", "mpp") for kind in ("curves", "samples")
    }
