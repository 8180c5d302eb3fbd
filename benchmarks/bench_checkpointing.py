"""Activation checkpointing: memory saved and time paid per training step, measured against the planner.

    python benchmarks/bench_checkpointing.py [--model vit22b-s/16] [--image-size 224] [--batch 64] [--steps 3] [--threads 1]

fp32 training steps (forward, backward, AdamW) on the CPU, each measurement in a fresh process:
- time: one model, steps with checkpointing off and on taking turns (so both see the same machine
  load), after a warm-up step of each; the fastest step of each mode is reported;
- memory, one process per mode: the bytes autograd holds at the end of the forward (saved-tensor
  hooks, exact), and how far the process's peak resident memory rises during a step (VmHWM after
  resetting it), with glibc's mmap threshold fixed so that freed tensors go back to the OS.
The planner's figures sit beside them: the saved activations, and for the step's peak its activation
peak plus the gradients that the backward allocates. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab import create_model
from vitlab.models.planner import activation_bytes, measured_saved_bytes, parameter_count, preset_shape, saved_activation_bytes
from vitlab.models.vit import VisionTransformer

MIB = 2**20


def memory_figure(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def training_step(args: argparse.Namespace) -> tuple[VisionTransformer, torch.Tensor, Callable[[], None]]:
    """The model, a batch of images, and one AdamW training step on it."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.image_size, num_classes=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 1000, (args.batch,))

    def step() -> None:
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, images, step


def measure_time(args: argparse.Namespace) -> dict:
    """Fastest step with checkpointing off and on, the two taking turns."""
    model, _, step = training_step(args)
    seconds = {False: [], True: []}
    for turn in range(args.steps + 1):  # turn 0 warms up
        for checkpointing in (False, True):
            model.grad_checkpointing = checkpointing
            start = time.perf_counter()
            step()
            if turn:
                seconds[checkpointing].append(time.perf_counter() - start)
    return {"off": min(seconds[False]), "on": min(seconds[True])}


def measure_memory(args: argparse.Namespace, checkpointing: bool) -> dict:
    """Saved activation bytes and the rise of peak resident memory during one step."""
    model, images, step = training_step(args)
    model.grad_checkpointing = checkpointing
    step()  # warm-up: AdamW allocates its state
    saved = measured_saved_bytes(model, images)
    before = memory_figure("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    step()
    return dict(saved=saved, peak=memory_figure("VmHWM") - before)


def child(mode: str, env: dict | None = None) -> dict:
    """Run this script in a fresh process for one measurement."""
    command = [sys.executable, __file__, *sys.argv[1:], "--child", mode]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    """Measure in child processes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit22b-s/16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=("time", "off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure_time(args) if args.child == "time" else measure_memory(args, args.child == "on")
        print(json.dumps(result))
        return

    seconds = child("time")
    returned = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}  # large tensors go back to the OS when freed
    memory = {mode: child(mode, returned) for mode in ("off", "on")}
    shape = preset_shape(args.model, args.image_size, 1000)
    grads = 4 * parameter_count(shape)
    print(
        f"{args.model}, {args.image_size} px, batch {args.batch}, fp32, AdamW, {args.threads} thread(s), "
        f"{platform.machine()}, torch {torch.__version__}"
    )
    print("\n| checkpointing | saved activations: measured (planner) | step peak: measured (planner) | s / step |")
    print("|---|---:|---:|---:|")
    for mode in ("off", "on"):
        on = mode == "on"
        saved, peak = saved_activation_bytes(shape, args.batch, on, "fp32"), activation_bytes(shape, args.batch, on, "fp32")
        m = memory[mode]
        print(
            f"| {mode} | {m['saved'] / MIB:,.0f} MiB ({saved / MIB:,.0f}) | {m['peak'] / MIB:,.0f} MiB "
            f"({(peak + grads) / MIB:,.0f}) | {seconds[mode]:.1f} |"
        )
    off, on = memory["off"], memory["on"]
    print(
        f"\nCheckpointing keeps {off['saved'] / on['saved']:.1f}x fewer activation bytes, lowers the step's peak by "
        f"{(off['peak'] - on['peak']) / MIB:,.0f} MiB ({1 - on['peak'] / off['peak']:.0%}) and takes "
        f"{seconds['on'] / seconds['off'] - 1:+.0%} time per step."
    )


if __name__ == "__main__":
    main()
