"""A tiny trained run shared by the tests of stored runs: trained for a few steps on the built-in shapes."""

from pathlib import Path

import pytest

from tests.train.test_classify import TINY
from vitlab.config import load_config
from vitlab.train.classify import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """runs/default in a temporary folder: a finished run (results.json) of the ViT-22B-style default model."""
    root = tmp_path_factory.mktemp("trained")
    overrides = ["data.num_train=128", "data.num_test=64", "train.epochs=2", "train.batch_size=32", "train.eval_every_epochs=2"]
    config = load_config(None, [*TINY, *overrides, f"out_dir={root / 'runs'}", "name=default"])
    return Path(train(config, progress=False)["run_dir"])
