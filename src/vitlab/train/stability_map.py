"""`vitlab stability-map`: learning-rate sensitivity (Wortsman et al. 2023, arXiv 2309.14322) per block, size and
intervention, from one ordinary classification run per cell (block, size, intervention, lr, seed).

Each cell trains in out_dir/name/<block>/<size>/<intervention>/lr<lr>-seed<seed>. A finished cell (results.json,
or diverged.json for one that diverged) is never trained again and an unfinished one is resumed, so running the
map again fills in only what is missing; a cell that fails does not stop the others. Before training, a worker
claims the cell with an exclusive lock (CLAIM_FILE in the cell's folder, released by the OS if the worker dies):
several workers (`--workers K`, or `--shard` runs sharing one map folder) never train the same cell.

ℓ₀ is the cell's test loss at step 0 (train.divergence_patience makes the loop measure it). A cell is diverged when
it stops with TrainingDiverged: a non-finite loss or gradient, or `patience` evaluations in a row with a test loss
above ℓ₀ (the loop stops there). LR sensitivity = mean over the LR grid of min(ℓ(η), ℓ₀) − ℓ*, with ℓ* the lowest
final test loss over the grid and a diverged cell counted as ℓ₀; the best LR η* is the one of ℓ*.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

import torch

from vitlab.config import MapConfig, RunConfig
from vitlab.errors import VitlabError
from vitlab.models.planner import flops_per_step, parameter_count, preset_shape
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.checkpoint import write_text_atomic
from vitlab.train import stability_map_figures as figures
from vitlab.train.classify import train
from vitlab.train.run_log import pngs_to_tensorboard, read_csv
from vitlab.train.scaffold import AUTO, RunInterrupted, TrainingDiverged, has_checkpoint

DIVERGED = "diverged.json"  # written in a cell that stopped with TrainingDiverged: it is finished too
CLAIM_FILE = "map-claim.lock"  # held by the worker training the cell
OUTPUT_FILE = "output.txt"  # what a cell trained by a worker printed


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
    capped = [figures.capped(c) for c in cells]
    best = min(range(len(cells)), key=capped.__getitem__)
    return {
        "sensitivity": sum(v - capped[best] for v in capped) / len(capped),
        "best_loss": capped[best],
        "best_lr": cells[best]["lr"],
    }


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "results.json").is_file() or (run_dir / DIVERGED).is_file()


@contextmanager
def claim(run_dir: Path) -> Iterator[bool]:
    """Hold the cell's claim for the body; yields False (holding nothing) when another worker holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / CLAIM_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def config_hash(config: RunConfig) -> str:
    """A short hash of what a cell trains: its config without where it goes and how many threads it uses."""
    plain = config.to_dict()
    for key in ("out_dir", "name"):
        plain.pop(key)
    for key in ("threads", "resume", "device"):
        plain["train"].pop(key)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:12]


def trace_peaks(steps: dict[str, list[float]]) -> dict:
    """The monitored traces of a cell: peak attention logit and update RMS, and the last log Z and high-norm fraction."""

    def finite(values: list[float]) -> list[float]:
        return [v for v in values if math.isfinite(v)]

    attention = finite([v for k, column in steps.items() if k.startswith("attn_logit_max/") for v in column])
    last = {k: finite(steps.get(k, [])) for k in ("log_z", "high_norm_tokens")}
    return {
        "max_attention_logit": max(attention, default=None),
        "max_update_rms": max(finite(steps.get("update_rms_max", [])), default=None),
        "final_log_z": last["log_z"][-1] if last["log_z"] else None,
        "final_high_norm_tokens": last["high_norm_tokens"][-1] if last["high_norm_tokens"] else None,
    }


def cell_record(run_config: RunConfig, num_classes: int | None) -> dict | None:
    """What a finished cell measured (ℓ₀, final test loss and accuracy, divergence, traces, cost), or None if unfinished."""
    run_dir = Path(run_config.out_dir) / run_config.name
    if not is_finished(run_dir):
        return None
    evals = read_csv(run_dir / "epochs.csv") if (run_dir / "epochs.csv").is_file() else {}
    l0 = evals["test_loss"][0] if evals.get("step", [None])[0] == 0 else math.nan
    steps = read_csv(run_dir / "steps.csv") if (run_dir / "steps.csv").is_file() else {}
    if (run_dir / DIVERGED).is_file():
        facts = json.loads((run_dir / DIVERGED).read_text())
        outcome = {"loss": None, "acc1": None, "diverged": True, "diverged_step": facts["step"], "stopped": facts["error"]}
        trained, seconds = facts["step"], facts.get("seconds")
    else:
        test = json.loads((run_dir / "results.json").read_text())
        outcome = {"loss": test["test"]["loss"], "acc1": test["test"]["acc1"], "diverged": False, "diverged_step": None}
        trained, seconds = test["steps"], test["train_seconds_this_session"]
    model = run_config.model
    shape = preset_shape(model.name, run_config.data.image_size, num_classes, **model.options) if num_classes else None
    return {
        "l0": l0,
        **outcome,
        **trace_peaks(steps),
        "num_parameters": parameter_count(shape) if shape else None,
        "steps": trained,
        "train_flops": flops_per_step(shape, run_config.train.batch_size) * trained if shape else None,
        "train_seconds": seconds,
        "config_hash": config_hash(run_config),
    }


def map_num_classes(run_configs: list[RunConfig]) -> int | None:
    """The classes of the map's data (for the head in parameter and FLOP counts): from the first cell with a checkpoint."""
    for run_config in run_configs:
        run_dir = Path(run_config.out_dir) / run_config.name
        if has_checkpoint(run_dir):
            return ckpt.read_meta(ckpt.find_checkpoint(run_dir))["num_classes"]
    return None


def train_cell(run_config: RunConfig, where: str, progress: bool, quiet: bool = False) -> str | None:
    """Train one claimed, unfinished cell; returns its error if it failed (a divergence is a result, not a failure).

    `quiet` (a worker beside others): the run's own lines go to OUTPUT_FILE in the cell, one line per cell to the console.
    """
    run_dir = Path(run_config.out_dir) / run_config.name
    start = time.monotonic()
    try:
        with open(run_dir / OUTPUT_FILE, "a") if quiet else nullcontext() as output, redirect_stdout(output or sys.stdout):
            result = train(run_config, resume_dir=AUTO, progress=progress and not quiet)
        print(f"{where} finished in {time.monotonic() - start:.0f} s: test loss {result['test']['loss']:.4g}", flush=True)
    except TrainingDiverged as exc:
        steps = read_csv(run_dir / "steps.csv").get("step", []) if (run_dir / "steps.csv").is_file() else []
        facts = {"step": int(steps[-1]) if steps else 0, "error": str(exc), "seconds": time.monotonic() - start}
        write_text_atomic(run_dir / DIVERGED, json.dumps(facts))
        print(f"{where} diverged at step {facts['step']}", flush=True)
    except RunInterrupted:
        raise  # SIGTERM or Ctrl-C stops the map; running it again resumes
    except Exception as exc:  # one failed cell must not stop the others
        if not isinstance(exc, VitlabError):
            traceback.print_exc()
        error = str(exc) or type(exc).__name__
        print(f"{where} failed: {error}", file=sys.stderr, flush=True)
        return error
    return None


def run_cells(
    config: MapConfig, shard: tuple[int, int] = (0, 1), progress: bool = True, threads: int | None = None, quiet: bool = False
) -> dict:
    """Train this shard's unfinished, unclaimed cells (every N-th, from the I-th); returns the error of each that failed.

    `threads` overrides each cell's train.threads; `quiet` sends each cell's own output to its OUTPUT_FILE.
    """
    cells = config.cells()[shard[0] :: shard[1]]
    failed = {}
    for i, cell in enumerate(cells, 1):
        run_config = config.cell_config(*cell)
        if threads is not None:
            run_config.train.threads = threads
        run_dir = Path(run_config.out_dir) / run_config.name
        where = f"stability-map cell {i}/{len(cells)}: {run_dir}"
        with claim(run_dir) as mine:
            if not mine:
                print(f"{where} is claimed by another worker; skipped", flush=True)
            elif is_finished(run_dir):
                print(f"{where} is finished; skipped", flush=True)
            elif error := train_cell(run_config, where, progress, quiet):
                failed[str(run_dir)] = error
    return failed


def worker_main(config: MapConfig, shard: tuple[int, int], index: int, threads: int | None, gpus: int) -> dict:
    """One of `--workers K` processes: one visible GPU each (round robin), or `threads` CPU threads."""
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    return run_cells(config, shard, progress=False, threads=threads, quiet=True)


def run_workers(config: MapConfig, shard: tuple[int, int], workers: int) -> dict:
    """Train this shard's cells with `workers` processes side by side, each claiming the next free cell."""
    gpus = torch.cuda.device_count() if config.base.get("train", {}).get("device", "auto") != "cpu" else 0
    threads = None if gpus else max(1, (os.cpu_count() or 1) // workers)
    failed = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(worker_main, config, shard, i, threads, gpus) for i in range(workers)]:
            failed |= future.result()
    return failed


def report(config: MapConfig) -> dict:
    """Merge every finished cell into map.json and map.md, draw the figures (PNG and TensorBoard); returns map.json's content."""
    root = Path(config.out_dir) / config.name
    cells, groups = [], {}
    run_configs = {cell: config.cell_config(*cell) for cell in config.cells()}
    num_classes = map_num_classes(list(run_configs.values()))
    for (block, size, intervention, lr, seed), run_config in run_configs.items():
        record = cell_record(run_config, num_classes)
        if record is not None:
            cell = {"block": block, "size": size, "intervention": intervention, "lr": lr, "seed": seed, **record}
            cells.append(cell)
            groups.setdefault((block, size, intervention), {}).setdefault(seed, []).append(cell)
    summaries = [summarise(*key, seeds) for key, seeds in groups.items()]
    for grid in (grid for seeds in groups.values() for grid in seeds.values()):
        best = sensitivity(grid)["best_loss"]  # figure C's value: how far each cell is from ℓ*, min(ℓ, ℓ₀) − ℓ*
        for cell in grid:
            cell["excess_loss"] = figures.capped(cell) - best
    trend_lr = config.trend_learning_rate
    at_trend_lr = [c for c in cells if c["lr"] == trend_lr]
    trends = figures.fit_logit_trend(at_trend_lr, config.logit_threshold)
    result = {
        "cells": cells,
        "summaries": summaries,
        "trend": {"lr": trend_lr, "threshold": config.logit_threshold, "fits": trends},
        "expected_cells": len(config.cells()),
    }
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "map.json", json.dumps(result, indent=2))
    write_text_atomic(root / "map.md", markdown(result))
    drawn = {
        "A_loss_vs_lr": figures.plot_loss(root / "loss_vs_lr.png", cells, list(config.interventions)),
        "B_sensitivity_vs_params": figures.plot_sensitivity(root / "sensitivity_vs_params.png", summaries),
        "C_excess_loss_heatmap": figures.plot_heatmap(
            root / "excess_loss_heatmap.png", cells, list(config.blocks), list(config.sizes), list(config.interventions)
        ),
        "D_attention_logit_trend": figures.plot_logit_trend(
            root / "attention_logit_trend.png", at_trend_lr, trends, trend_lr, config.logit_threshold
        ),
    }
    pngs_to_tensorboard(root, {f"stability-map/{tag}": path for tag, path in drawn.items()}, len(cells))
    return result


def summarise(block: str, size: str, intervention: str, seeds: dict[int, list[dict]]) -> dict:
    """One block × size × intervention: LR sensitivity (mean and std over seeds), ℓ*, η*, cost."""
    per_seed = [sensitivity(grid) for grid in seeds.values()]
    values = [s["sensitivity"] for s in per_seed]
    all_cells = [c for grid in seeds.values() for c in grid]
    return {
        "block": block,
        "size": size,
        "intervention": intervention,
        "num_parameters": all_cells[0]["num_parameters"],
        "sensitivity": statistics.fmean(values),
        "sensitivity_std": statistics.pstdev(values),
        "best_loss": statistics.fmean(s["best_loss"] for s in per_seed),
        "best_lr": [s["best_lr"] for s in per_seed],
        "seeds": list(seeds),
        "cells": len(all_cells),
        "diverged": sum(c["diverged"] for c in all_cells),
        "train_flops": sum(c["train_flops"] or 0 for c in all_cells),
    }


def markdown(result: dict) -> str:
    """map.md: one row per block × size × intervention, then figure D's fitted trends."""
    summaries, trend = result["summaries"], result["trend"]
    lines = [
        f"# Stability map ({len(result['cells'])} of {result['expected_cells']} cells finished)",
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
    lines += [
        "",
        f"Peak attention logit against parameters at LR {trend['lr']:g} (fit: logit ∝ parameters^slope; the size at which "
        f"the fit reaches {trend['threshold']:g}):",
        "",
        "| block | intervention | slope | predicted parameters at the threshold |",
        "|---|---|---:|---:|",
    ]
    for fit in trend["fits"]:
        at = f"{fit['params_at_threshold']:.3g}" if fit["params_at_threshold"] else "never (no growth)"
        lines.append(f"| {fit['block']} | {fit['intervention']} | {fit['slope']:.2f} | {at} |")
    return "\n".join(lines) + "\n"


def run_map(
    config: MapConfig, shard: tuple[int, int] = (0, 1), report_only: bool = False, progress: bool = True, workers: int = 1
) -> dict:
    """Train this shard's unfinished cells (unless `report_only`; with `workers` processes), then write the outputs."""
    if report_only:
        failed = {}
    elif workers > 1:
        failed = run_workers(config, shard, workers)
    else:
        failed = run_cells(config, shard, progress)
    result = report(config)
    if failed:
        listed = "; ".join(f"{run_dir}: {error}" for run_dir, error in failed.items())
        raise VitlabError(
            f"{len(failed)} cell(s) failed ({listed}); fix them and run the same map again: finished cells are skipped"
        )
    return result
