"""`vitlab export` of a trained run: ONNX and torch.export files that compute the run's predictions, the model card."""

import json

import pytest
import torch

from tests.eval.test_predict import image_folder, saved_run
from tests.models.test_export import one_line_error
from vitlab.cli import main
from vitlab.data.builtin import BUILTIN_CLASSES
from vitlab.runs.trained import load_trained_run


def photos(tmp_path):
    """Built-in shapes as PIL images of 40 pixels, not the run's 32: the preprocessing resizes them."""
    from PIL import Image

    folder = image_folder(tmp_path, count=3)
    return [Image.open(path) for path in sorted(folder.glob("*.png"))]


def test_the_onnx_export_of_a_trained_run_predicts_as_the_run(trained_run, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert main(["export", str(trained_run), str(out), "--format", "onnx"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "class_names.json", "model.onnx", "preprocessing.json"]
    run = load_trained_run(trained_run)
    assert json.loads((out / "class_names.json").read_text()) == list(BUILTIN_CLASSES) == run.classes
    images = photos(tmp_path)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixel_values": run.preprocess(images).numpy()})
    torch.testing.assert_close(torch.from_numpy(logits).softmax(-1), run.probabilities(images), atol=1e-5, rtol=0)


def test_a_torch_export_replaces_an_earlier_export_only_with_force(trained_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(trained_run), str(out), "--format", "torch-export"]) == 0
    assert main(["export", str(trained_run), str(out), "--format", "torch-export"]) == 2
    assert "--force" in one_line_error(capsys)
    assert main(["export", str(trained_run), str(out), "--format", "torch-export", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "class_names.json", "model.pt2", "preprocessing.json"]
    run = load_trained_run(trained_run)
    program = torch.export.load(out / "model.pt2")  # a file vitlab wrote: torch.export.load unpickles (README)
    with torch.no_grad():
        pixels = run.preprocess(photos(tmp_path))
        torch.testing.assert_close(program.module()(pixels), run.model(pixels), atol=1e-5, rtol=0)


def test_hf_refuses_the_default_block_and_names_the_formats_that_carry_it(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run), str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = one_line_error(capsys)
    assert "block='parallel'" in err and "--format onnx, torch-export and timm carry them" in err
    assert not (tmp_path / "hf").exists()


def test_the_model_card_holds_architecture_data_recipe_accuracy_and_preprocessing(trained_run, tmp_path):
    assert main(["export", str(trained_run), str(tmp_path / "timm"), "--format", "timm"]) == 0
    card = (tmp_path / "timm" / "README.md").read_text()
    test = json.loads((trained_run / "results.json").read_text())["test"]
    assert card.startswith("---\nlibrary_name: timm\npipeline_tag: image-classification\n")
    assert "# default: vit22b-ti/8" in card and "ViT-22B-style: parallel blocks" in card
    assert "- depth: 2\n" in card and "- embed_dim: 64\n" in card and "- qk_norm: True\n" in card
    assert f"`builtin`, 10 classes ({', '.join(BUILTIN_CLASSES)}), 32-pixel images" in card
    assert "2 epochs of batch 32, adamw at learning rate 0.003" in card and "  num_train: 128\n" in card
    assert f"from its results.json (step 8): acc@1 {100 * test['acc1']:.2f} %, acc@5 {100 * test['acc5']:.2f} %" in card
    assert "the whole image, squashed to a square, resized to 32x32 (bicubic)" in card and "mean [0.5, 0.5, 0.5]" in card


def test_the_card_of_an_hf_export_says_when_no_accuracy_was_measured(tmp_path):
    run = saved_run(tmp_path, overrides=("data.mean=[0.485, 0.456, 0.406]",))  # a checkpoint without results.json
    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "hf"]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "library_name: transformers" in card and "the classic ViT: serial pre-LN blocks" in card
    assert "Not measured for this checkpoint" in card and "mean [0.485, 0.456, 0.406]" in card
