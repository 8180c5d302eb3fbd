"""Per-op CPU times of a training step (fwd+bwd+AdamW) of a vitlab preset, by torch.profiler.

    python benchmarks/profile_step.py --model vit22b-s/4 --precision bf16 --depth 6
    python benchmarks/profile_step.py --model vit22b-s/4 --depth 2 --by-shape aten::copy_,aten::cat
    python benchmarks/profile_step.py --model vit22b-s/4 --option qk_norm=false --compile

The step of benchmarks/bench_models.py (32 px, batch 128, 10 classes, fused AdamW, freed host memory kept in
the process as the vitlab command does: vitlab.runtime.allocator), two steps for warm-up and then `--steps` under the profiler; prints
the ops by self CPU time per step and the GEMMs' share of the step, or with --by-shape the named ops split
by input shape. `--compile` profiles the model under torch.compile (what `train.compile: true` runs).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import vitlab
from vitlab.config import apply_overrides
from vitlab.runtime.allocator import keep_freed_memory

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-s/4")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps; times are per step")
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model option over the preset's, e.g. qk_norm=false (repeatable)",
    )
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc malloc's defaults")
    parser.add_argument("--by-shape", help="comma-separated op names (aten::copy_) to split by input shape")
    args = parser.parse_args()
    if not args.system_malloc:
        keep_freed_memory()
    torch.manual_seed(0)
    options = apply_overrides({}, args.option)
    model = vitlab.create_model(args.model, img_size=32, num_classes=10, depth=args.depth, **options)
    forward = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(), step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=bool(args.by_shape)) as prof:
        for _ in range(args.steps):
            step()
    print(
        f"{args.model} {' '.join(args.option)} {args.precision}{' compiled' if args.compile else ''}, depth {args.depth}, batch {args.batch}; "
        f"ms per step, mean of {args.steps}"
    )
    by_op = prof.key_averages()
    events = prof.key_averages(group_by_input_shape=True) if args.by_shape else by_op
    if args.by_shape:
        names = args.by_shape.split(",")
        events = [e for e in events if e.key in names]
    events = sorted(events, key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in by_op)
    for e in events[: args.rows]:
        shapes = f"  {str(e.input_shapes)[:90]}" if args.by_shape else ""
        print(
            f"{e.key[:44]:44s} {e.self_cpu_time_total / 1e3 / args.steps:8.1f} ms {e.self_cpu_time_total / total:6.1%}"
            f"  n={e.count // args.steps:3d}{shapes}"
        )
    gemm = sum(e.self_cpu_time_total for e in by_op if e.key in GEMMS)
    print(f"{'total':44s} {total / 1e3 / args.steps:8.1f} ms; GEMMs ({', '.join(GEMMS)}) {gemm / total:.1%}")


if __name__ == "__main__":
    main()
