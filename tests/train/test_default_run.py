"""The default run (`vitlab train` with no arguments) on the built-in data: ≥ 90 % test accuracy.

It takes about 8 minutes on a quiet 2-core CPU (README, "The default run"), too long for the
default test command, so it carries the `slow` marker:
`python3 -m pytest -m slow tests/train/test_default_run.py`.
"""

import pytest

from vitlab.config import load_config
from vitlab.train.classify import train


@pytest.mark.slow
def test_default_run_reaches_90_percent(tmp_path):
    results = train(load_config(None, [f"out_dir={tmp_path}"]), progress=False)
    assert results["test"]["acc1"] >= 0.90
