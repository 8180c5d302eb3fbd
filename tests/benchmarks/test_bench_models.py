"""benchmarks/bench_models.py and profile_step.py at tiny sizes, so that the scripts behind the speed tables never rot."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_models_measures_every_variant_side_by_side(tmp_path):
    out = tmp_path / "models.md"
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_models.py"),
            "--depth",
            "1",
            "--batch",
            "4",
            "--steps",
            "1",
            "--dtypes",
            "fp32",
            "--impls",
            "system-malloc",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    raw = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["model"], r["impl"]): r for r in raw["rows"]}
    assert set(rows) == {(m, i) for m in ("vit-s/4", "vit22b-s/4") for i in ("vitlab", "reference", "system-malloc")}
    for row in rows.values():
        assert row["train_wall_s"] > 0 and row["infer_wall_s"] > 0 and row["train_times"][0]["faults"] >= 0
        assert row["params"] == rows[row["model"], "vitlab"]["params"]  # the naive model is the same size
    assert rows["vit-s/4", "reference"]["train_wall_ratio"] == 1.0
    sizes = raw["peaks"]["fp32"]["bf16"]["sizes"]
    assert [s["n"] for s in sizes][:1] == [1024] and raw["peaks"]["fp32"]["bf16"]["wall"] == max(s["wall"] for s in sizes)
    table = out.read_text()
    assert "| vit22b-s/4 | fp32 | system-malloc |" in table and "vit22b-s/4 / vit-s/4 speed (system-malloc, fp32)" in table


def test_profile_step_splits_a_step_into_ops_and_gemm_share():
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "profile_step.py"),
            "--model",
            "vit22b-s/4",
            "--depth",
            "1",
            "--batch",
            "4",
            "--steps",
            "1",
            "--precision",
            "fp32",
            "--option",
            "qk_norm=false",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = run.stdout.splitlines()
    assert lines[0].startswith("vit22b-s/4 qk_norm=false fp32, depth 1, batch 4")
    assert any(line.startswith("aten::mm ") for line in lines)
    assert "GEMMs (aten::mm, aten::addmm, aten::bmm)" in lines[-1]
