"""Per-op CPU times of one training step (fwd+bwd+AdamW) of a vitlab preset, by torch.profiler.

    python benchmarks/profile_step.py --model vit22b-s/4 --precision bf16 --depth 6
    python benchmarks/profile_step.py --model vit22b-s/4 --depth 2 --by-shape aten::copy_,aten::cat

The step of benchmarks/bench_models.py (32 px, batch 128, 10 classes, fused AdamW), once for warm-up and
once under the profiler; prints ops by self CPU time, or with --by-shape the named ops split by input shape.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import vitlab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-s/4")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--by-shape", help="comma-separated op names (aten::copy_) to split by input shape")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = vitlab.create_model(args.model, img_size=32, num_classes=10, depth=args.depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=bool(args.by_shape)) as prof:
        step()
    print(f"{args.model} {args.precision}, depth {args.depth}, batch {args.batch}")
    if not args.by_shape:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))
        return
    names = args.by_shape.split(",")
    events = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key in names),
                    key=lambda e: -e.self_cpu_time_total)  # fmt: skip
    for e in events[: args.rows]:
        print(f"{e.key:34s} {e.self_cpu_time_total / 1e3:8.1f} ms  n={e.count:3d}  {str(e.input_shapes)[:100]}")


if __name__ == "__main__":
    main()
