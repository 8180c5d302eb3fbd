"""`vitlab stability`: variants share data and seed; the summary and Fig. 1 are written."""

import json

import pytest

from vitlab import VitlabError
from vitlab.config import StabilityConfig, load_config
from vitlab.train.stability import run_study, summarise

BASE = {
    "model": {"name": "vit22b-ti/8", "options": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_dim": 64}},
    "data": {"num_train": 128, "num_test": 64},
    "optim": {"lr": 0.01, "schedule": "constant"},
    "train": {"epochs": 1, "batch_size": 32, "precision": "fp32", "log_every_steps": 1, "threads": 1, "max_bad_steps": 1},
}


def test_study_runs_each_variant_and_flags_the_diverged_one(tmp_path):
    config = StabilityConfig(
        name="study",
        out_dir=str(tmp_path),
        threshold=4000.0,
        base=BASE,
        variants={"plain": [], "blown": ["optim.lr=1.0e+30", "optim.name=sgd"]},
    ).validate()
    summary = run_study(config, progress=False)
    assert summary["plain"]["diverged"] is False and summary["plain"]["final_acc1"] is not None
    assert summary["blown"]["diverged"] is True and "diverged" in summary["blown"]["stopped"]
    assert summary["blown"]["first_step_nonfinite"] is not None or summary["blown"]["first_step_over_threshold"]
    saved = json.loads((tmp_path / "study" / "stability.json").read_text())
    assert set(saved) == {"plain", "blown"} and (tmp_path / "study" / "stability.png").is_file()


def test_summary_finds_first_step_over_threshold():
    curves = {
        "step": [1, 2, 3, 4],
        "max_logit": [1.0, 5000.0, float("nan"), 2.0],
        "skipped": [0, 0, 1, 1],
        "max_abs_grad": [1.0, 2.0, float("nan"), 3.0],
        "grad_norm": [1, 1, 1, 1],
        "attn_logit_max/0": [3, 9, 4, 1],
    }
    facts = summarise(curves, 4000.0)
    assert facts["first_step_over_threshold"] == 2 and facts["first_step_nonfinite"] == 3
    assert facts["first_step_attention_logit_over_threshold"] is None
    assert facts["max_logit"] == 5000.0 and facts["max_abs_grad"] == 3.0 and facts["max_attention_logit"] == 9


def test_bad_variant_is_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("variants:\n  odd: ['optim.lr=-1']\n")
    with pytest.raises(VitlabError, match="variants.odd"):
        load_config(path, cls=StabilityConfig)
