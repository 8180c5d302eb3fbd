"""Fig. 2 and Table 2 drawn from run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.report import fig2, table2


def fake_run(root: Path, name: str, config: dict, results: dict, epochs: str | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "results.json").write_text(json.dumps(results))
    if epochs:
        (run / "epochs.csv").write_text(epochs)
    return run


def classifier(root: Path, name: str, model: str, accs: list[float]) -> Path:
    epochs = "step,epoch,test_acc1\n" + "".join(f"{10 * (i + 1)},{i + 1},{a}\n" for i, a in enumerate(accs))
    config = {"model": {"name": model}, "data": {"name": "cifar10"}}
    return fake_run(root, name, config, {"test": {"acc1": accs[-1]}}, epochs)


def test_fig2_puts_vit_beside_vit22b_per_size_with_final_and_best(tmp_path: Path) -> None:
    runs = [
        classifier(tmp_path, "a", "vit22b-s/4", [0.5, 0.7, 0.6]),
        classifier(tmp_path, "b", "ai602-vit-ti/16", [0.4, 0.45]),
        classifier(tmp_path, "c", "vit-s/4", [0.6, 0.65]),
    ]
    table, figure = fig2(runs, tmp_path / "report")
    lines = table.read_text().splitlines()
    assert lines[2].startswith("| cifar10 | Ti | ViT | `ai602-vit-ti/16` | 45.00 % | 45.00 % (2) |")
    assert lines[3].startswith("| cifar10 | S | ViT | `vit-s/4` | 65.00 % |")
    assert lines[4] == "| cifar10 | S | ViT-22B | `vit22b-s/4` | 60.00 % | 70.00 % (2) |"
    assert "chosen on the test set itself" in table.read_text() and figure.stat().st_size > 0


def test_table2_reads_the_paper_protocol_and_vitlabs_with_the_feature_name(tmp_path: Path) -> None:
    config = {
        "generator": {"name": "ai602-vit-s/32"},
        "data": {"name": "folder", "root": "data/apple2orange"},
        "eval": {"domain_names": ["Apple", "Orange"]},
    }
    paper = {"paper-table2": {"Apple": 2.0, "Orange": 4.0, "Average": 3.0, "images": 248, "features": "inception-64"}}
    first = fake_run(tmp_path, "p", config, {"test": paper, "generator_parameters": 13_097_219})
    Image.new("RGB", (40, 10)).save(first / "samples.png")
    own = {"AtoB": {"fid_randconv": 5.0}, "BtoA": {"fid_randconv": 1.0}, "average": {}}
    second = fake_run(tmp_path, "v", {**config, "eval": {}}, {"test": own})
    table, figure = table2([first, second], tmp_path / "report")
    lines = table.read_text().splitlines()
    assert lines[2] == (
        "| apple2orange | `ai602-vit-s/32` | 13.1 M | Apple 2.000, Orange 4.000, Average 3.000 | inception-64, paper-table2 |"
    )
    assert lines[3] == "| apple2orange | `ai602-vit-s/32` | – | A 1.000, B 5.000, Average 3.000 | randconv |"
    assert figure.is_file()


def test_report_of_something_that_is_not_a_run_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(VitlabError, match="not a finished run"):
        fig2([tmp_path], tmp_path / "out")
    assert main(["report", "fig2", str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err


def report_error(capsys, *argv: str) -> str:
    assert main(["report", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_a_run_of_the_wrong_kind_is_one_line_with_the_next_step(tmp_path: Path, capsys) -> None:
    config = {"model": {"name": "vit-s/4"}, "data": {"name": "cifar10"}, "pretrain": {"method": "mae"}}
    pretraining = fake_run(tmp_path, "mae", config, {"test": {"loss": 0.5}})
    assert "made by `vitlab pretrain`" in (err := report_error(capsys, "fig2", str(pretraining))) and "`vitlab finetune`" in err
    err = report_error(capsys, "table2", str(classifier(tmp_path, "c", "vit-s/4", [0.5])))
    assert "made by `vitlab train`, not `vitlab translate-train`" in err and "report fig2" in err


def test_a_torn_results_json_or_corrupt_epochs_csv_names_the_file_and_the_fix(tmp_path: Path, capsys) -> None:
    torn = classifier(tmp_path, "torn", "vit-s/4", [0.5])
    (torn / "results.json").write_text('{"test": {"acc')
    assert f"{torn / 'results.json'} is torn" in (err := report_error(capsys, "fig2", str(torn)))
    assert f"vitlab train --resume {torn}" in err
    corrupt = classifier(tmp_path, "corrupt", "vit-s/4", [0.5])
    (corrupt / "epochs.csv").write_text("step,epoch,test_acc1\n10,1,0.5\n20,2,0.5,9,9\n30,3,\x00garbage\n")
    assert f"{corrupt / 'epochs.csv'} is corrupt" in (err := report_error(capsys, "fig2", str(corrupt)))
    assert "delete it to report the final accuracy only" in err


def test_a_run_given_twice_is_refused(tmp_path: Path, capsys) -> None:
    run = classifier(tmp_path, "a", "vit-s/4", [0.5])
    err = report_error(capsys, "fig2", str(run), f"{run}/.", "--out", str(tmp_path / "r"))
    assert f"{run}/. is given twice (also as {run})" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_an_output_path_that_cannot_be_a_folder_is_one_line(tmp_path: Path, capsys, out: str) -> None:
    run = classifier(tmp_path, "a", "vit-s/4", [0.5])
    (tmp_path / "file").write_text("mine")
    err = report_error(capsys, "fig2", str(run), "--out", str(tmp_path / out))
    assert f"{tmp_path / 'file'} is a file, not a folder; give another --out" in err and (tmp_path / "file").read_text() == "mine"


def test_fig2_sends_a_resnet_run_to_the_comparison(tmp_path: Path) -> None:
    runs = [classifier(tmp_path, "a", "vit-s/4", [0.5]), classifier(tmp_path, "r", "bit-r50x1", [0.7])]
    with pytest.raises(VitlabError, match="vitlab report compare"):
        fig2(runs, tmp_path / "report")
