"""`vitlab stability-map`: learning-rate sensitivity (Wortsman et al. 2023, arXiv 2309.14322) per block, size and
intervention, from one ordinary classification run per cell (block, size, intervention, lr, seed).

Each cell trains in out_dir/name/<block>/<size>/<intervention>/lr<lr>-seed<seed>. A finished cell (results.json,
or diverged.json for one that diverged) is never trained again and an unfinished one is resumed, so running the
map again fills in only what is missing; a cell that fails does not stop the others.

ℓ₀ is the first logged training loss of the cell (steps.csv; the loss of the initial weights when
train.log_every_steps is 1). A cell is diverged when it stops with TrainingDiverged (non-finite loss or gradient)
or when `patience` evaluations in a row had a test loss above ℓ₀ (counted after the run: no early stop).
LR sensitivity = mean over the LR grid of min(ℓ(η), ℓ₀) − ℓ*, with ℓ* the lowest final test loss over the grid
and a diverged cell counted as ℓ₀; the best LR η* is the one of ℓ*.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import traceback
from pathlib import Path

from vitlab.config import MapConfig
from vitlab.errors import VitlabError
from vitlab.figures import new_figure, save_figure
from vitlab.runs.checkpoint import write_text_atomic
from vitlab.train.classify import train
from vitlab.train.run_log import read_csv
from vitlab.train.scaffold import AUTO, RunInterrupted, TrainingDiverged

DIVERGED = "diverged.json"  # written in a cell that stopped with TrainingDiverged: it is finished too


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` as (I, N), 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise VitlabError(f"--shard {text} must be I/N with 0 <= I < N, e.g. --shard 0/4 for the first of 4 shards")
    return index, count


def sensitivity(cells: list[dict]) -> dict:
    """LR sensitivity, ℓ* and η* of one LR grid: cells with lr, l0, loss (None if none) and diverged."""
    capped = [
        c["l0"] if c["diverged"] or c["loss"] is None or not math.isfinite(c["loss"]) else min(c["loss"], c["l0"]) for c in cells
    ]
    best = min(range(len(cells)), key=capped.__getitem__)
    return {
        "sensitivity": sum(v - capped[best] for v in capped) / len(capped),
        "best_loss": capped[best],
        "best_lr": cells[best]["lr"],
    }


def diverged_step(steps: list[float], losses: list[float], l0: float, patience: int) -> int | None:
    """The step of the `patience`-th evaluation in a row with a test loss above ℓ₀ (or non-finite), or None."""
    bad = 0
    for step, loss in zip(steps, losses):
        bad = bad + 1 if not (math.isfinite(loss) and loss <= l0) else 0
        if bad == patience:
            return int(step)
    return None


def cell_record(run_dir: Path, patience: int) -> dict | None:
    """What a finished cell measured (ℓ₀, final test loss and accuracy, divergence), or None if it is unfinished."""
    results, stopped = run_dir / "results.json", run_dir / DIVERGED
    if not results.is_file() and not stopped.is_file():
        return None
    curves = read_csv(run_dir / "steps.csv")
    l0 = curves["loss"][0] if curves.get("loss") else math.nan
    if stopped.is_file():
        facts = json.loads(stopped.read_text())
        return {"l0": l0, "loss": None, "acc1": None, "diverged": True, "diverged_step": facts["step"], "stopped": facts["error"]}
    test = json.loads(results.read_text())
    evals = read_csv(run_dir / "epochs.csv") if (run_dir / "epochs.csv").is_file() else {}
    step = diverged_step(evals.get("step", []), evals.get("test_loss", []), l0, patience)
    return {
        "l0": l0,
        "loss": test["test"]["loss"],
        "acc1": test["test"]["acc1"],
        "diverged": step is not None,
        "diverged_step": step,
        "num_parameters": test["num_parameters"],
        "train_seconds": test["train_seconds_this_session"],
    }


def run_cells(config: MapConfig, shard: tuple[int, int] = (0, 1), progress: bool = True) -> dict[str, str]:
    """Train this shard's unfinished cells (every N-th, from the I-th); returns the error of each cell that failed."""
    cells = config.cells()[shard[0] :: shard[1]]
    failed = {}
    for i, cell in enumerate(cells, 1):
        run_config = config.cell_config(*cell)
        run_dir = Path(run_config.out_dir) / run_config.name
        where = f"stability-map cell {i}/{len(cells)}: {run_dir}"
        if (run_dir / "results.json").is_file() or (run_dir / DIVERGED).is_file():
            print(f"{where} is finished; skipped", flush=True)
            continue
        try:
            train(run_config, resume_dir=AUTO, progress=progress)
        except TrainingDiverged as exc:
            steps = read_csv(run_dir / "steps.csv").get("step", [])
            write_text_atomic(run_dir / DIVERGED, json.dumps({"step": int(steps[-1]) if steps else 0, "error": str(exc)}))
            print(f"{where} diverged", flush=True)
        except RunInterrupted:
            raise  # SIGTERM or Ctrl-C stops the map; running it again resumes
        except Exception as exc:  # one failed cell must not stop the others
            if not isinstance(exc, VitlabError):
                traceback.print_exc()
            failed[str(run_dir)] = str(exc) or type(exc).__name__
            print(f"{where} failed: {failed[str(run_dir)]}", file=sys.stderr, flush=True)
    return failed


def report(config: MapConfig) -> dict:
    """Merge every finished cell into map.json and map.md and draw the figures; returns what map.json holds."""
    root = Path(config.out_dir) / config.name
    cells, groups = [], {}
    for block, size, intervention, lr, seed in config.cells():
        run_config = config.cell_config(block, size, intervention, lr, seed)
        record = cell_record(Path(run_config.out_dir) / run_config.name, config.patience)
        if record is not None:
            cell = {"block": block, "size": size, "intervention": intervention, "lr": lr, "seed": seed, **record}
            cells.append(cell)
            groups.setdefault((block, size, intervention), {}).setdefault(seed, []).append(cell)
    summaries = []
    for (block, size, intervention), seeds in groups.items():
        per_seed = [sensitivity(grid) for grid in seeds.values()]
        values = [s["sensitivity"] for s in per_seed]
        params = next((c["num_parameters"] for grid in seeds.values() for c in grid if "num_parameters" in c), None)
        summaries.append(
            {
                "block": block,
                "size": size,
                "intervention": intervention,
                "num_parameters": params,
                "sensitivity": statistics.fmean(values),
                "sensitivity_std": statistics.pstdev(values),
                "best_loss": statistics.fmean(s["best_loss"] for s in per_seed),
                "best_lr": [s["best_lr"] for s in per_seed],
                "seeds": list(seeds),
                "cells": sum(map(len, seeds.values())),
                "diverged": sum(c["diverged"] for grid in seeds.values() for c in grid),
            }
        )
    result = {"cells": cells, "summaries": summaries, "expected_cells": len(config.cells())}
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "map.json", json.dumps(result, indent=2))
    write_text_atomic(root / "map.md", markdown(summaries, len(cells), len(config.cells())))
    plot_loss(root / "loss_vs_lr.png", cells, list(config.interventions))
    plot_sensitivity(root / "sensitivity_vs_params.png", summaries)
    return result


def markdown(summaries: list[dict], done: int, expected: int) -> str:
    """map.md: one row per block × size × intervention."""
    lines = [
        f"# Stability map ({done} of {expected} cells finished)",
        "",
        "| block | size | intervention | parameters | LR sensitivity | η* | ℓ* | diverged cells |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for s in summaries:
        spread = f" ± {s['sensitivity_std']:.3f}" if len(s["seeds"]) > 1 else ""
        lines.append(
            f"| {s['block']} | {s['size']} | {s['intervention']} | {s['num_parameters'] or '-'} | {s['sensitivity']:.3f}{spread} "
            f"| {', '.join(f'{lr:g}' for lr in s['best_lr'])} | {s['best_loss']:.3f} | {s['diverged']} of {s['cells']} |"
        )
    return "\n".join(lines) + "\n"


def plot_loss(path: Path, cells: list[dict], interventions: list[str]) -> Path:
    """(A) final test loss (a diverged cell at its ℓ₀) against LR, a panel per intervention, a line per size and block."""
    fig = new_figure(5 * len(interventions), 4)
    axes = fig.subplots(1, len(interventions), squeeze=False)[0]
    for ax, intervention in zip(axes, interventions):
        lines = {}
        for c in cells:
            if c["intervention"] == intervention:
                loss = c["l0"] if c["diverged"] or c["loss"] is None else min(c["loss"], c["l0"])
                lines.setdefault(f"{c['size']} {c['block']}", {}).setdefault(c["lr"], []).append(loss)
        for label, points in lines.items():
            lrs = sorted(points)
            ax.plot(lrs, [statistics.fmean(points[lr]) for lr in lrs], marker="o", lw=0.9, label=label)
        ax.set(title=intervention, xlabel="peak learning rate", ylabel="final test loss, min(ℓ, ℓ₀)", xscale="log")
        ax.legend(fontsize=7)
    return save_figure(fig, path, axes)


def plot_sensitivity(path: Path, summaries: list[dict]) -> Path:
    """(B) LR sensitivity against parameter count, a line per intervention and block."""
    fig = new_figure(6, 4)
    ax = fig.subplots()
    lines = {}
    for s in summaries:
        if s["num_parameters"]:
            lines.setdefault(f"{s['intervention']} {s['block']}", []).append((s["num_parameters"], s["sensitivity"]))
    for label, points in lines.items():
        ax.plot(*zip(*sorted(points)), marker="o", lw=0.9, label=label)
    ax.set(xlabel="parameters", ylabel="LR sensitivity", xscale="log", title="LR sensitivity against size")
    if lines:
        ax.legend(fontsize=7)
    return save_figure(fig, path, [ax])


def run_map(config: MapConfig, shard: tuple[int, int] = (0, 1), report_only: bool = False, progress: bool = True) -> dict:
    """Train this shard's unfinished cells (unless `report_only`), then write map.json, map.md and the figures."""
    failed = {} if report_only else run_cells(config, shard, progress)
    result = report(config)
    if failed:
        listed = "; ".join(f"{run_dir}: {error}" for run_dir, error in failed.items())
        raise VitlabError(
            f"{len(failed)} cell(s) failed ({listed}); fix them and run the same map again: finished cells are skipped"
        )
    return result
