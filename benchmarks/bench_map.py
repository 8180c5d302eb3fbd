"""Cells per hour of a stability map: `--workers K` (K cells side by side, the CPU threads divided) against the same
cells one after another with every thread.

    python benchmarks/bench_map.py --out benchmarks/results/stability-map-speed.md

The cells are the first `--cells` of configs/stability/map-cpu.yaml (or `--config`), unchanged but for the threads:
the sequential runs give each cell all `--threads` threads, the workers runs one worker per `--workers` with
threads / workers each. Every repeat trains the cells afresh in an empty folder; the repeats alternate
(sequential, workers, workers, sequential, …) so both see the same machine load, and the table quotes medians.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitlab.config import MapConfig
from vitlab.runs.kinds import load_experiment
from vitlab.train.stability_map import run_cells, run_workers

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU model, its core count and whether it has native bf16 matmuls."""
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return f"{name or platform.processor()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def time_cells(config: MapConfig, mode: str, cells: int, threads: int, workers: int) -> float:
    """Seconds to train the first `cells` cells of `config` in an empty folder, sequentially or with workers."""
    with tempfile.TemporaryDirectory() as out:
        config.out_dir = out
        config.base.setdefault("train", {})["threads"] = threads
        start = time.perf_counter()
        shard = (0, len(config.cells()) // cells)  # every (total / cells)-th cell: a spread over the grid
        failed = run_cells(config, shard, progress=False) if mode == "sequential" else run_workers(config, shard, workers)
        if failed:
            raise SystemExit(f"{len(failed)} cell(s) failed: {failed}")
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "stability" / "map-cpu.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a map config key")
    parser.add_argument("--cells", type=int, default=8, help="cells per repeat, spread over the grid")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="all the machine's threads")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="repeats of each mode, alternating")
    parser.add_argument("--out", help="write the table here (Markdown)")
    args = parser.parse_args(argv)

    config = load_experiment(args.config, args.set, cls=MapConfig)
    cells = len(config.cells()[:: len(config.cells()) // args.cells])
    seconds = {"sequential": [], "workers": []}
    order = ["sequential", "workers", "workers", "sequential"] * args.repeats
    for mode in order[: 2 * args.repeats]:
        seconds[mode].append(time_cells(config, mode, args.cells, args.threads, args.workers))
        print(f"{mode}: {seconds[mode][-1]:.1f} s for {cells} cells", file=sys.stderr, flush=True)
    rate = {mode: 3600 * cells / statistics.median(s) for mode, s in seconds.items()}
    table = "\n".join(
        [
            f"Stability-map cells per hour: {cells} cells of {Path(args.config).name}, median of {args.repeats} repeat(s) each",
            f"(alternating), on {cpu_name()}.",
            "",
            "| mode | threads per cell | seconds (each repeat) | cells per hour |",
            "|---|---:|---|---:|",
            f"| one after another | {args.threads} | {', '.join(f'{s:.1f}' for s in seconds['sequential'])} | "
            f"{rate['sequential']:.0f} |",
            f"| --workers {args.workers} | {max(1, args.threads // args.workers)} | "
            f"{', '.join(f'{s:.1f}' for s in seconds['workers'])} | {rate['workers']:.0f} |",
            "",
            f"Speed-up of --workers {args.workers}: {rate['workers'] / rate['sequential']:.2f}×",
            "",
        ]
    )
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
