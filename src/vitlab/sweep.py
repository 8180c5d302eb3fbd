"""`vitlab sweep`: a list of configs trained one after another (or their torchrun commands), then the report."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from vitlab.config import RunConfig, TranslateConfig, load_config
from vitlab.errors import VitlabError
from vitlab.report import fig2, table2


def config_kind(path: str | Path) -> type:
    """RunConfig (classification) or TranslateConfig (CycleGAN), by the config's sections."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"config file {path} does not exist")
    keys = yaml.safe_load(path.read_text()) or {}
    if "variants" in keys:
        raise VitlabError(f"{path} is a stability study; run it with `vitlab stability`")
    return TranslateConfig if "generator" in keys else RunConfig


def sweep_commands(paths: list[str], overrides: list[str], nproc: int = 1, report_dir: str = "report") -> list[str]:
    """The shell commands of the sweep (torchrun for classification, one process for translation), then the report's."""
    sets = "".join(f" --set {shlex.quote(item)}" for item in overrides)
    commands, runs = [], {"fig2": [], "table2": []}
    for path in paths:
        kind = config_kind(path)
        config = load_config(path, overrides, cls=kind)
        runs["table2" if kind is TranslateConfig else "fig2"].append(shlex.quote(str(Path(config.out_dir) / config.name)))
        if kind is TranslateConfig:
            commands.append(f"vitlab translate-train {shlex.quote(path)}{sets}")
        else:
            commands.append(f"torchrun --standalone --nproc_per_node={nproc} -m vitlab.cli train {shlex.quote(path)}{sets}")
    reports = [f"vitlab report {name} {' '.join(found)} --out {shlex.quote(str(report_dir))}" for name, found in runs.items() if found]
    return commands + reports


def run_sweep(paths: list[str], overrides: list[str], report_dir: str | Path, progress: bool = True) -> dict[str, list]:
    """Train every config in this process, in order, then draw Fig. 2 and/or Table 2 of the finished runs."""
    from vitlab.train.classify import train
    from vitlab.train.cyclegan import train_translation

    kinds = [config_kind(path) for path in paths]
    configs = [(kind, load_config(path, overrides, cls=kind)) for kind, path in zip(kinds, paths)]  # all checked first
    runs: dict[str, list] = {"fig2": [], "table2": []}
    for kind, config in configs:
        if kind is TranslateConfig:
            runs["table2"].append(train_translation(config, progress=progress)["run_dir"])
        else:
            runs["fig2"].append(train(config, progress=progress)["run_dir"])
    reports = {"fig2": fig2, "table2": table2}
    return {name: list(reports[name](found, report_dir)) for name, found in runs.items() if found}
