"""`vitlab predict`: top-k classes of image files with the run's preprocessing, as a CSV and a grid PNG."""

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitlab import VitlabError
from vitlab.cli import main
from vitlab.config import load_config
from vitlab.data.augment import normalize
from vitlab.data.builtin import BUILTIN_CLASSES, make_builtin
from vitlab.data.images import read_images
from vitlab.eval.predict import image_files, predict_run
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.builders import build_model

TINY = "model.options={depth: 1, embed_dim: 48, num_heads: 3, mlp_dim: 96}"


def saved_run(tmp_path: Path, name: str = "vit-ti/8", overrides: tuple[str, ...] = ()) -> Path:
    """A run folder with one checkpoint of a tiny randomly initialised model on the built-in data (10 classes)."""
    config = load_config(None, [f"model.name={name}", TINY, "train.precision=fp32", "train.device=cpu", *overrides])
    torch.manual_seed(0)
    model = build_model(config, config.data.image_size, 10)
    meta = {"config": config.to_dict(), "num_classes": 10}
    ckpt.save_checkpoint(tmp_path / "run", 1, model, torch.optim.SGD(model.parameters(), lr=0.1), meta)
    return tmp_path / "run"


def image_folder(tmp_path: Path, count: int = 5, size: int = 40) -> Path:
    """PNG files of built-in shapes at another size than the run's (so that resizing is exercised)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(make_builtin(count, seed=3, image_size=size).images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predictions_are_the_models_softmax_on_the_runs_preprocessing(tmp_path):
    run, folder = saved_run(tmp_path), image_folder(tmp_path)
    predictions, written = predict_run(run, [folder], top_k=3, out=tmp_path / "out")
    assert [p.name for p in predictions.files] == [f"img{i}.png" for i in range(5)]
    assert predictions.classes == list(BUILTIN_CLASSES)
    from vitlab.runs.stored import load_checkpoint_model

    model, _ = load_checkpoint_model(run)
    with torch.no_grad():
        expected = model.eval()(normalize(read_images(predictions.files, 32))).softmax(-1).topk(3)
    torch.testing.assert_close(predictions.probabilities, expected.values)
    assert torch.equal(predictions.indices, expected.indices)
    rows = list(csv.reader((tmp_path / "out" / "predictions.csv").open()))
    assert rows[0] == ["file", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3"]
    assert len(rows) == 6 and rows[1][1] == BUILTIN_CLASSES[expected.indices[0, 0]]
    assert [p.name for p in written] == ["predictions.csv", "predictions.png"] and written[1].stat().st_size > 0


def test_vitlab_predict_on_files_and_folders_writes_next_to_the_run(tmp_path, capsys):
    run, folder = saved_run(tmp_path), image_folder(tmp_path, count=2)
    assert main(["predict", str(run), str(folder / "img0.png"), str(folder), "--top-k", "2"]) == 0
    assert (run / "predictions" / "predictions.csv").is_file() and (run / "predictions" / "predictions.png").is_file()
    assert capsys.readouterr().out.count("img0.png:") == 2


def test_bad_inputs_are_named(tmp_path):
    run, folder = saved_run(tmp_path), image_folder(tmp_path, count=1)
    with pytest.raises(VitlabError, match="neither an image file nor a folder"):
        image_files([tmp_path / "missing.png"])
    assert image_files([run]) == []  # a folder without images: predict names it
    with pytest.raises(VitlabError, match="no .png"):
        predict_run(run, [run])
    with pytest.raises(VitlabError, match="--top-k 0"):
        predict_run(run, [folder], top_k=0)


def test_an_unreadable_image_is_skipped_and_named_and_the_rest_predicted(tmp_path, capsys):
    run, folder = saved_run(tmp_path), image_folder(tmp_path, count=2)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    predictions, _ = predict_run(run, [folder], top_k=1, out=tmp_path / "out")
    assert [p.name for p in predictions.files] == ["img0.png", "img1.png"] and len(predictions.indices) == 2
    assert predictions.skipped == [f"{folder / 'broken.png'} (unreadable)"]
    assert main(["predict", str(run), str(folder)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count(".png:") == 2
    assert captured.err == f"vitlab predict: skipped 1 unreadable image(s): {folder / 'broken.png'} (unreadable)\n"
    (folder / "img0.png").write_bytes(b"")
    (folder / "img1.png").write_bytes(b"")
    with pytest.raises(VitlabError, match="skipped 3 unreadable image.*no image is left"):
        predict_run(run, [folder], out=tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_an_output_path_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, out):
    run, folder = saved_run(tmp_path), image_folder(tmp_path, count=1)
    (tmp_path / "file").write_text("mine")
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'file'} is a file, not a folder; give another --out" in err
    assert (tmp_path / "file").read_text() == "mine"
