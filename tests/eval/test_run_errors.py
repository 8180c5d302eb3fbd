"""`vitlab probe`, `eval` and `predict`: a bad setting, or a run of the wrong kind, is one line that names it and the fix."""

from pathlib import Path

import pytest
import torch

from vitlab.cli import main
from vitlab.runs import checkpoint as ckpt


def run_made_by(tmp_path: Path, section: str) -> Path:
    """A run folder with one checkpoint whose saved config has the section that marks the command that made it."""
    model = torch.nn.Linear(1, 1)
    ckpt.save_checkpoint(tmp_path / "run", 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {"config": {section: {}}})
    return tmp_path / "run"


def one_line_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "flag,value",
    [("--num-train", "0"), ("--epochs", "0"), ("--epochs", "-1"), ("--lr", "nan"), ("--lr", "0.0"), ("--batch-size", "0")],
)
def test_probe_refuses_a_setting_that_trains_nothing_naming_the_flag(tmp_path, capsys, flag, value):
    run = run_made_by(tmp_path, "pretrain")
    assert f"{flag}={value} must be" in one_line_error(capsys, "probe", str(run), flag, value)


def test_eval_refuses_data_root_without_data(tmp_path, capsys):
    run = run_made_by(tmp_path, "model")
    err = one_line_error(capsys, "eval", str(run), "--data-root", str(tmp_path / "other"))
    assert "without --data" in err and "pass --data too" in err
    assert "--batch-size=0 must be" in one_line_error(capsys, "eval", str(run), "--batch-size", "0")


@pytest.mark.parametrize("command", [["eval"], ["predict", "x.png"]])
def test_a_pretraining_run_where_a_classifier_is_needed_says_to_fine_tune_it(tmp_path, capsys, command):
    run = run_made_by(tmp_path, "pretrain")
    (tmp_path / "x.png").write_bytes(b"")
    err = one_line_error(capsys, command[0], str(run), *[str(tmp_path / a) for a in command[1:]])
    assert "made by `vitlab pretrain`" in err and "`vitlab finetune`" in err


def test_a_classifier_given_to_probe_names_the_run_probe_needs(tmp_path, capsys):
    err = one_line_error(capsys, "probe", str(run_made_by(tmp_path, "model")))
    assert "made by `vitlab train`, not `vitlab pretrain`" in err and "give a run made by `vitlab pretrain`" in err
