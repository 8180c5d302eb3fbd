"""What every training loop shares: run directories, per-step seeds and the divergence error."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import yaml

from vitlab.config import RunConfig, from_dict
from vitlab.errors import VitlabError


class TrainingDiverged(VitlabError):
    """Raised after too many consecutive steps with a non-finite loss or gradient."""


class NamedRun(Protocol):
    """A run config: where runs go and what this one is called."""

    name: str
    out_dir: str


def step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """A distinct 63-bit seed per (seed, step, rank, stream)."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + stream * 15_485_863) % (2**63 - 1)


def new_run_dir(config: NamedRun) -> Path:
    """`out_dir/name`, or `out_dir/name-2`, … when taken."""
    base = Path(config.out_dir) / config.name
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def load_run_config(run_dir: Path, cls: type = RunConfig):
    """The resolved config (of kind `cls`) saved in a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise VitlabError(f"{run_dir} is not a vitlab run directory (no config.yaml); give the folder a run made")
    return from_dict(cls, yaml.safe_load(path.read_text())).validate()
