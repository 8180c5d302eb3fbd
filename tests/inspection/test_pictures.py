"""`inspect_model` writes every picture, for both block families and both poolings; the package's import boundary."""

import ast
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitlab.inspection
from vitlab import create_model
from vitlab.inspection import inspect_model

PNGS = {
    "attention_image0.png",
    "attention_image1.png",
    "rollout.png",
    "attention_distance.png",
    "position_similarity.png",
    "patch_embedding_pcs.png",
}


@pytest.mark.parametrize("family,pool,query", [("vit", "cls", None), ("vit22b", "gap", 3)])
def test_every_png_is_written(tmp_path, family, pool, query):
    model = create_model(f"{family}-ti/8", img_size=24, num_classes=3, depth=2, embed_dim=32, num_heads=2, pool=pool)
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    written = inspect_model(model, images, tmp_path, query=query, components=6, mean=(0.5,), std=(0.5,))
    assert {p.name for p in written.values()} == PNGS == {p.name for p in tmp_path.iterdir()}
    for path in written.values():
        with Image.open(path) as png:
            assert png.width > 200 and png.height > 200


def test_inspect_imports_neither_training_nor_the_cli():
    for source in Path(vitlab.inspection.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith(("vitlab.train", "vitlab.cli"))], source.name
