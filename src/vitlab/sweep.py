"""`vitlab sweep`: a list of configs trained one after another (or their torchrun commands), then the report.

A sweep can be run again after it fails or is stopped: each config trains in its own run directory
(`out_dir/name`, never `name-2`), a finished run (one with results.json) is skipped, an unfinished one is
resumed from its checkpoint (`--resume auto`), a failed config does not stop the others, and the report is
drawn from the runs that finished. Pretraining runs are trained but are in no report (Fig. 2 and Table 2
are of classification and translation runs).
"""

from __future__ import annotations

import shlex
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from vitlab.config import MapConfig, PretrainConfig, RunConfig, StabilityConfig, TranslateConfig, config_kind, parse_yaml
from vitlab.errors import VitlabError
from vitlab.models.presets import is_convnet
from vitlab.report import compare, fig2, table2
from vitlab.runs.kinds import load_experiment
from vitlab.train.scaffold import AUTO, RunInterrupted

REPORTS = {RunConfig: ("fig2", fig2), TranslateConfig: ("table2", table2)}  # pretraining runs have no report


def sweep_reports(configs: list) -> dict:
    """The report of each kind of run in the sweep; classifiers with a ResNet or hybrid among them get `compare`."""
    if any(isinstance(c, RunConfig) and is_convnet(c.model.name) for c in configs):
        return REPORTS | {RunConfig: ("compare", compare)}
    return REPORTS


def load_sweep_config(path: str | Path, overrides: list[str]):
    """A config of the sweep, of the kind its sections say (classification, translation or pretraining)."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text(encoding="utf-8", errors="replace"), str(path))  # load_config names bad bytes
    kind = config_kind(data if isinstance(data, dict) else {})
    if kind in (StabilityConfig, MapConfig):
        raise VitlabError(f"{path} is a {kind.KIND} config, not a run; run it with `vitlab {kind.KIND}`")
    return load_experiment(path, overrides, cls=kind)


def load_sweep(paths: list[str], overrides: list[str]) -> list:
    """Every config of the sweep, checked before anything runs; two configs may not share a run directory."""
    configs, owners = [], {}
    for path in paths:
        config = load_sweep_config(path, overrides)
        run_dir = Path(config.out_dir) / config.name
        if run_dir in owners:
            raise VitlabError(f"{owners[run_dir]} and {path} both train {run_dir}; give each config its own name (name: …)")
        owners[run_dir] = path
        configs.append(config)
    return configs


def sweep_commands(paths: list[str], overrides: list[str], nproc: int = 1, report_dir: str = "report") -> list[str]:
    """The shell commands of the sweep (torchrun to train or pretrain, one process to translate), then the report's."""
    sets = "".join(f" --set {shlex.quote(item)}" for item in overrides)
    configs = load_sweep(paths, overrides)
    drawn = sweep_reports(configs)
    commands, runs = [], {name: [] for name, _ in drawn.values()}
    for path, config in zip(paths, configs):
        kind, command = type(config), type(config).KIND
        if kind in drawn:
            runs[drawn[kind][0]].append(shlex.quote(str(Path(config.out_dir) / config.name)))
        if kind is TranslateConfig:
            commands.append(f"vitlab {command} {shlex.quote(path)}{sets}")
        else:
            commands.append(f"torchrun --standalone --nproc_per_node={nproc} -m vitlab.cli {command} {shlex.quote(path)}{sets}")
    reports = [
        f"vitlab report {name} {' '.join(found)} --out {shlex.quote(str(report_dir))}" for name, found in runs.items() if found
    ]
    return commands + reports


@dataclass
class SweepResult:
    """What a sweep did: the run directory of each config that finished, each failed config's error, the reports drawn."""

    finished: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    reports: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def check(self) -> None:
        """Raise one error naming every failed config, if any failed."""
        if self.failed:
            total = len(self.finished) + len(self.failed)
            failed = "; ".join(f"{path}: {error}" for path, error in self.failed.items())
            raise VitlabError(
                f"{len(self.failed)} of {total} configs failed ({failed}); fix them and run the same "
                "sweep again: finished runs are skipped and unfinished ones resumed"
            )


def run_sweep(paths: list[str], overrides: list[str], report_dir: str | Path, progress: bool = True) -> SweepResult:
    """Train every config in this process, in order, skipping finished runs and resuming unfinished ones; a config
    that fails is reported and the next one runs; then draw Fig. 2 and/or Table 2 of the finished runs."""
    from vitlab.train.classify import train
    from vitlab.train.cyclegan import train_translation
    from vitlab.train.pretrain import pretrain

    trainers = {RunConfig: train, TranslateConfig: train_translation, PretrainConfig: pretrain}
    result = SweepResult()
    configs = load_sweep(paths, overrides)  # all checked first
    for i, (path, config) in enumerate(zip(paths, configs), 1):
        run_dir = Path(config.out_dir) / config.name
        if (run_dir / "results.json").is_file():
            print(f"sweep {i}/{len(paths)}: {path}: {run_dir} is finished; skipped", flush=True)
            result.finished[path] = run_dir
            continue
        try:
            result.finished[path] = Path(trainers[type(config)](config, resume_dir=AUTO, progress=progress)["run_dir"])
        except RunInterrupted:
            raise  # SIGTERM or Ctrl-C stops the sweep; its message says how to resume
        except Exception as exc:  # one failed config must not stop the others
            if not isinstance(exc, VitlabError):
                traceback.print_exc()  # not a user error: show it whole
            result.failed[path] = str(exc) or type(exc).__name__
            print(f"sweep {i}/{len(paths)}: {path} failed: {result.failed[path]}", file=sys.stderr, flush=True)
    kinds = {path: type(config) for path, config in zip(paths, configs)}
    for kind, (name, draw) in sweep_reports(configs).items():
        found = [str(run_dir) for path, run_dir in result.finished.items() if kinds[path] is kind]
        if found:
            result.reports[name] = draw(found, report_dir)
    return result
