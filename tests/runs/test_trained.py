"""`vitlab.load_run`: a trained run's model, preprocessing, class names and predictions, and the README's example."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from tests.eval.test_predict import image_folder, saved_run
from tests.models.test_export import IMAGENET, STREAMED
from vitlab import VitlabError
from vitlab.data.augment import normalize
from vitlab.data.builtin import BUILTIN_CLASSES
from vitlab.data.images import read_images
from vitlab.data.stream.crops import CropDecoder
from vitlab.eval.predict import predict_run

README = Path(__file__).resolve().parents[2] / "README.md"


def test_importing_vitlab_leaves_load_run_unimported_until_used():
    code = (
        "import sys, vitlab; assert 'vitlab.runs.trained' not in sys.modules; "
        "print(vitlab.load_run.__module__, 'vitlab.runs.trained' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["vitlab.runs.trained", "True"]


def test_the_readme_example_runs_on_a_trained_run(trained_run, monkeypatch, capsys):
    section = README.read_text().split("### Python API")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 6
    root = trained_run.parents[1]  # holds runs/default
    next(image_folder(root).glob("*.png")).rename(root / "photo.png")
    monkeypatch.chdir(root)
    scope = {}
    exec(code, scope)
    (printed,) = eval(capsys.readouterr().out.strip().splitlines()[-1])  # the top 3 of the one image
    assert [name for name, _ in printed] == [BUILTIN_CLASSES[i] for i in scope["logits"][0].topk(3).indices]
    assert [p for _, p in printed] == pytest.approx(scope["logits"][0].softmax(-1).topk(3).values.tolist())


def test_predictions_on_pil_images_and_tensors_are_vitlab_predicts(trained_run, tmp_path):
    run = vitlab.load_run(trained_run)
    assert not run.model.training and run.classes == list(BUILTIN_CLASSES) and run.config.model.name == "vit22b-ti/8"
    folder = image_folder(tmp_path, count=4, size=40)  # the run's images are 32 pixels: resized
    files = sorted(folder.glob("*.png"))
    reference, _ = predict_run(trained_run, [folder], top_k=3, out=tmp_path / "predictions")
    predicted = run.predict([Image.open(f) for f in files], top_k=3)
    assert [[name for name, _ in image] for image in predicted] == [
        [run.classes[i] for i in indices] for indices in reference.indices.tolist()
    ]
    torch.testing.assert_close(
        torch.tensor([[p for _, p in image] for image in predicted]), reference.probabilities, atol=2e-3, rtol=0
    )
    # Pillow's bicubic resize (vitlab predict) and torch's antialiased one differ by at most one level of 255.
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    assert (run.preprocess(pixels) - normalize(read_images(files, 32))).abs().max() <= 1 / 255 / 0.5 + 1e-6
    floats = run.probabilities(pixels.float() / 255)  # resized without rounding to uint8
    torch.testing.assert_close(floats, run.probabilities(pixels), atol=1e-3, rtol=0)
    assert len(run.predict(pixels[0], top_k=20)) == 1 and len(run.predict(pixels[0], top_k=20)[0]) == 10


def test_a_streamed_run_crops_the_centre_as_its_evaluation(tmp_path):
    run = vitlab.load_run(saved_run(tmp_path, overrides=(*STREAMED, "data.crop_fraction=0.8", *IMAGENET)))
    photo = tmp_path / "photo.png"
    Image.effect_noise((60, 45), 60).convert("RGB").save(photo)
    expected = normalize(
        CropDecoder(size=32, train=False, crop_fraction=0.8)(photo)[None], run.preprocessing.mean, run.preprocessing.std
    )
    assert torch.equal(run.preprocess(Image.open(photo)), expected)


def test_wrong_inputs_and_runs_are_one_line_errors(tmp_path):
    run = vitlab.load_run(saved_run(tmp_path))
    with pytest.raises(VitlabError, match=r"shape \(32, 32, 3\): give \(N, 3, H, W\)"):
        run.predict(torch.zeros(32, 32, 3, dtype=torch.uint8))
    with pytest.raises(VitlabError, match="dtype torch.int64"):
        run.predict(torch.zeros(3, 32, 32, dtype=torch.long))
    with pytest.raises(VitlabError, match="top_k=0"):
        run.predict(torch.zeros(3, 32, 32), top_k=0)
    with pytest.raises(VitlabError, match="no checkpoint found"):
        vitlab.load_run(tmp_path / "nowhere")
