"""scripts/install.sh chooses the torch wheel by the machine: tried with a fake python (its pip only records) and nvidia-smi."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install.sh"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"

# Answers `-c "import torch; …"` (with TORCH_VERSION set: torch is importable), says it is not externally managed,
# and records every `-m pip …` in PIP_LOG, failing those that use the CPU index when CPU_INDEX_FAILS is set.
FAKE_PYTHON = """#!/bin/bash
if [ "$1" = -c ]; then
    [[ "$2" == "import torch"* && -n "$TORCH_VERSION" ]] && echo "$TORCH_VERSION" && exit 0
    exit 1
fi
echo "${@:2}" >> "$PIP_LOG"
[[ "$*" == *download.pytorch.org* && -n "$CPU_INDEX_FAILS" ]] && exit 1
exit 0
"""


def install(tmp_path: Path, gpu: bool | None, torch_version: str = "", cpu_index_fails: bool = False) -> tuple[str, list[str]]:
    """Run install.sh with the fake python; `gpu`: nvidia-smi lists one (True), fails (False), is absent (None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("python", FAKE_PYTHON)] + (
        [("nvidia-smi", f"#!/bin/bash\nexit {0 if gpu else 9}\n")] if gpu is not None else []
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))  # all the script needs besides bash and the fakes
    log = tmp_path / "pip.log"
    env = {
        **os.environ,
        "PATH": str(bin_dir),
        "PYTHON": str(bin_dir / "python"),
        "PIP_LOG": str(log),
        "TORCH_VERSION": torch_version,
        "CPU_INDEX_FAILS": "1" if cpu_index_fails else "",
    }
    proc = subprocess.run(["/bin/bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, log.read_text().splitlines()


@pytest.mark.parametrize("gpu", [None, False], ids=["no nvidia-smi", "nvidia-smi fails"])
def test_without_a_gpu_torch_comes_from_pytorchs_cpu_index(tmp_path: Path, gpu: bool | None) -> None:
    out, pip = install(tmp_path, gpu)
    assert pip == [f"pip install --quiet --retries 2 {CPU_INDEX} torch==2.13.0", "pip install --quiet -e ."]
    assert "no NVIDIA GPU" in out and "CPU wheel" in out


def test_when_the_cpu_index_fails_the_default_index_is_used_and_said(tmp_path: Path) -> None:
    out, pip = install(tmp_path, gpu=None, cpu_index_fails=True)
    assert pip[1:] == ["pip install --quiet torch==2.13.0", "pip install --quiet -e ."]
    assert "could not be used: installing torch==2.13.0 from the default index" in out


def test_with_a_gpu_the_default_cuda_wheel_is_installed_and_said(tmp_path: Path) -> None:
    out, pip = install(tmp_path, gpu=True)
    assert pip == ["pip install --quiet torch==2.13.0", "pip install --quiet -e ."]
    assert "NVIDIA GPU found" in out and "CUDA" in out


def test_an_importable_torch_is_kept(tmp_path: Path) -> None:
    out, pip = install(tmp_path, gpu=None, torch_version="2.5.1+cu124")
    assert pip == ["pip install --quiet -e ."]
    assert "torch 2.5.1+cu124 is importable: keeping it" in out
