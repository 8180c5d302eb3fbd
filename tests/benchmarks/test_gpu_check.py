"""benchmarks/gpu_check.py end to end on the CPU at tiny sizes, so that the GPU check is ready whenever a GPU is."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_section_and_writes_the_table(tmp_path):
    assert load_gpu_check().main(["--out", str(tmp_path), "--dry-run"]) == 0
    table = (tmp_path / "gpu_check.md").read_text()
    for section in ("tests", "precision", "peak", "train", "fsdp", "streaming"):
        assert f"| {section} |" in table
    assert "| tests | pytest -m gpu on cpu | ok |" in table
    assert "| train | vit22b-b/16 bf16 compiled | ok |" in table
    assert "| train | vit22b-b/16 qk_norm=false bf16 | ok |" in table and "qk_norm=false bf16 compiled" not in table


def test_a_failing_section_is_recorded_and_the_rest_still_run(tmp_path):
    gpu_check = load_gpu_check()
    plan = gpu_check.make_plan("cpu", tiny=True, budget_s=60)
    rows = []

    def broken(plan, rows):
        raise RuntimeError("out of memory")

    plan.limits["broken"] = 5
    gpu_check.run_section("broken", broken, plan, rows, deadline=float("inf"))
    gpu_check.run_section("precision", gpu_check.precision_auto, plan, rows, deadline=float("inf"))
    assert [(r.section, r.status) for r in rows] == [("broken", "error"), ("precision", "ok")]
    assert "RuntimeError: out of memory" in rows[0].note


def test_a_section_past_its_time_limit_is_stopped(tmp_path):
    gpu_check = load_gpu_check()
    plan = gpu_check.make_plan("cpu", tiny=True, budget_s=60)
    rows = []
    plan.limits["slow"] = 1.5

    def slow(plan, rows):
        while True:
            pass

    gpu_check.run_section("slow", slow, plan, rows, deadline=float("inf"))
    assert rows[0].status == "error" and "TimeoutError" in rows[0].note
