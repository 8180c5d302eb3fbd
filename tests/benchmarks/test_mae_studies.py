"""benchmarks/mae_diagnosis.py and benchmarks/label_efficiency.py at tiny sizes: the statistics, the LR choice, the tables."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TINY = "model.options={depth: 1, embed_dim: 32, num_heads: 2, mlp_dim: 64, pool: gap}"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnosis_measures_each_variant_and_a_merge_tabulates_them_again(tmp_path):
    diagnosis = script("mae_diagnosis")
    common = ["--set", TINY, "--set", "train.batch_size=16", "--set", "train.precision=fp32"]
    sizes = ["--steps", "2", "--labelled", "32", "--test-images", "16", "--stats-images", "8"]
    variants = ["--variant", "scratch|finetune=null", "--variant", "bn head|finetune=null;tweak=bn-head"]
    diagnosis.main([*common, *sizes, *variants, "--results", str(tmp_path)])
    rows = json.loads((tmp_path / "mae-diagnosis.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["scratch", "bn head"]
    for r in rows:
        assert len(r["full"]["token_rms"]) == len(r["visible_25"]["common_share"]) == len(r["full"]["attention_entropy"]) == 1
        assert 0 <= r["full"]["common_share"][0] <= 1 and 0 <= r["pooled_between_share"] <= 1
        assert len(r["loss"]) == len(r["grad_norm"]["blocks"]) == 2 and 0 <= r["test_acc1"] <= 1
    diagnosis.main(["--merge", str(tmp_path / "mae-diagnosis.json"), "--results", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "mae-diagnosis.md").read_text().count("| bn head |") == 1
    assert (tmp_path / "merged" / "mae-diagnosis.png").is_file()


def test_label_efficiency_takes_each_methods_best_lr_and_reports_the_gain():
    rows = [dict(method="scratch", fraction=0.1, lr=1e-3, seed=s, acc1=a) for s, a in enumerate((0.50, 0.52))] + [
        dict(method="scratch", fraction=0.1, lr=3e-3, seed=s, acc1=0.40) for s in range(2)
    ]
    rows += [dict(method="mae", fraction=0.1, lr=3e-3, seed=s, acc1=a) for s, a in enumerate((0.60, 0.62))]
    rows += [dict(method="mae", fraction=0.1, lr=1e-3, seed=s, acc1=0.30) for s in range(2)]
    table = script("label_efficiency").table(rows, ["scratch", "mae"], [0.1])
    assert "| 10 % | 51.0 ± 1.4 (0.001) | 61.0 ± 1.4 (0.003) | +10.0 |" in table


def test_label_efficiency_runs_scratch_at_a_fraction_and_needs_a_run_for_each_pretrained_method(tmp_path, capsys):
    bench = script("label_efficiency")
    sizes = ["--pool", "64", "--fractions", "0.5", "--lrs", "1e-3", "--seeds", "0", "--steps", "2", "--batch-size", "16"]
    args = [*sizes, "--test-images", "16", "--set", TINY, "--set", "train.precision=fp32"]
    bench.main([*args, "--methods", "scratch", "--out-dir", str(tmp_path / "runs"), "--results", str(tmp_path)])
    (row,) = json.loads((tmp_path / "label-efficiency.json").read_text())["rows"]
    assert (row["method"], row["fraction"], row["lr"]) == ("scratch", 0.5, 1e-3) and 0 <= row["acc1"] <= 1
    bench.main(
        [
            "--merge",
            str(tmp_path / "label-efficiency.json"),
            "--methods",
            "scratch",
            "--fractions",
            "0.5",
            "--results",
            str(tmp_path / "m"),
        ]
    )
    assert f"| 50 % | {100 * row['acc1']:.1f} ± 0.0 (0.001) |" in (tmp_path / "m" / "label-efficiency.md").read_text()
    with pytest.raises(SystemExit):
        bench.main([*args, "--methods", "scratch", "mae"])
    assert "give --pretrained mae=RUN_DIR" in capsys.readouterr().err
