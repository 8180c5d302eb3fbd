"""Time ViT training steps (fwd+bwd+AdamW) and inference beside a naive reference, with MFU against a measured matmul peak.

    python benchmarks/bench_models.py --out benchmarks/results/models.md

Every configuration runs in its own subprocess, so peak memory is per configuration. All configurations
of one dtype (vitlab and the reference of every model) are alive side by side and take turns step by
step (ABC..CBA order), with a sample of the fp32 matmul peak after each round, so ratios and MFU see the
same machine load. Medians are over the steps after warm-up. Each step is timed by the wall clock and by
the process's CPU time; on a shared CPU the second is what the step cost, whatever the other jobs took.

Model FLOPs (matmuls only, MLP width 4D; Kaplan et al. 2020 / PaLM appendix B style):
    training step = 6·B·N·L·12D² + 12·B·L·N²·D   (forward + backward; 12D² = qkv 3D² + out D² + MLP 8D²)
    inference     = 2·B·N·L·12D² +  4·B·L·N²·D   (one third of it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import vitlab
from vitlab.models import preset_config
from vitlab.runtime.allocator import keep_freed_memory

IMG_SIZE, NUM_CLASSES = 32, 10
# vitlab: the model as `vitlab train` runs it, freed host memory kept in the process (vitlab.runtime.allocator);
# reference: the naive model below, in the same process set-up; compiled: vitlab's model under torch.compile
# (`train.compile: true`); system-malloc: vitlab's model with glibc's defaults, which hand freed memory back
# to the kernel so that every step page-faults its activations in again.
IMPLS = ("vitlab", "reference", "compiled", "system-malloc")


# ---------------------------------------------------------------- the naive reference
# Written the way the paper's code did it: separate q, k, v projections, einsum attention, an unfused MLP;
# the ViT-22B-style block has separate q, k, v, fc1 and separate attention-out and fc2 projections.


def ln(dim: int, bias: bool) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, bias=bias)


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, qk_norm: bool, norm_bias: bool):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.q_norm = ln(dim // heads, norm_bias) if qk_norm else nn.Identity()
        self.k_norm = ln(dim // heads, norm_bias) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(f(x), "b n (h d) -> b h n d", h=self.heads) for f in (self.q, self.k, self.v))
        q, k = self.q_norm(q), self.k_norm(k)
        logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        out = torch.einsum("bhqk,bhkd->bhqd", logits.softmax(dim=-1), v)
        return rearrange(out, "b h n d -> b n (h d)")


class RefSerialBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool, qk_norm: bool, norm_bias: bool):
        super().__init__()
        self.norm1, self.norm2 = ln(dim, norm_bias), ln(dim, norm_bias)
        self.attn = RefAttention(dim, heads, qkv_bias, qk_norm, norm_bias)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.out(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class RefParallelBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool, qk_norm: bool, norm_bias: bool):
        super().__init__()
        self.norm = ln(dim, norm_bias)
        self.attn = RefAttention(dim, heads, qkv_bias, qk_norm, norm_bias)
        self.out = nn.Linear(dim, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return x + self.out(self.attn(y)) + self.fc2(self.act(self.fc1(y)))


class RefViT(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dim, norm_bias = cfg["embed_dim"], cfg.get("norm_bias", True)
        self.patch = nn.Conv2d(3, dim, cfg["patch_size"], cfg["patch_size"])
        num_tokens = (IMG_SIZE // cfg["patch_size"]) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        block = RefParallelBlock if cfg["block"] == "parallel" else RefSerialBlock
        args = (dim, cfg["num_heads"], cfg["mlp_dim"], cfg.get("qkv_bias", True), cfg.get("qk_norm", False), norm_bias)
        self.blocks = nn.Sequential(*[block(*args) for _ in range(cfg["depth"])])
        self.norm = ln(dim, norm_bias)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def build(model: str, impl: str, depth: int) -> nn.Module:
    if impl == "reference":
        return RefViT({**preset_config(model), "depth": depth})
    return vitlab.create_model(model, img_size=IMG_SIZE, num_classes=NUM_CLASSES, depth=depth)


def step_flops(model: str, depth: int, batch: int) -> float:
    """Model FLOPs of one training step (see the module docstring); inference is a third of it."""
    cfg = preset_config(model)
    d, n = cfg["embed_dim"], (IMG_SIZE // cfg["patch_size"]) ** 2 + 1
    return 6 * batch * n * depth * 12 * d * d + 12 * batch * depth * n * n * d


# ---------------------------------------------------------------- subprocess workers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reply(obj) -> None:
    print(json.dumps(obj), flush=True)


def timed(fn, device: torch.device, repeat: int = 1) -> dict:
    """Wall-clock and CPU seconds and minor page faults of one call of `fn` (the mean of `repeat` calls)."""
    sync(device)
    wall, cpu, faults = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeat):
        fn()
    sync(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"wall": (time.perf_counter() - wall) / repeat, "cpu": (time.process_time() - cpu) / repeat, "faults": faults / repeat}


def run_worker(spec: dict) -> None:
    """One model: answer each command on stdin ('train', 'infer', 'stats', 'quit') with one JSON line."""
    device = torch.device(spec["device"])
    if spec["impl"] != "system-malloc":
        keep_freed_memory()
    torch.manual_seed(0)
    model = build(spec["model"], spec["impl"], spec["depth"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)  # 3x faster than foreach on CPU
    forward = torch.compile(model) if spec["impl"] == "compiled" else model
    x = torch.randn(spec["batch"], 3, IMG_SIZE, IMG_SIZE, device=device)
    y = torch.randint(0, NUM_CLASSES, (spec["batch"],), device=device)

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")

    def train():
        with amp():
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        model.eval()
        with torch.inference_mode(), amp():
            forward(x)
        model.train()

    reply({"params": sum(p.numel() for p in model.parameters())})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            return
        if cmd == "stats":
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
            reply({"peak_rss_mib": rss, "peak_cuda_mib": cuda})
        else:
            reply(timed({"train": train, "infer": infer}[cmd], device))


def run_peak(device_name: str) -> None:
    """Matmul peak in GFLOP/s by torch.mm of square matrices. On the first command (sent once the model workers
    are built and idle) bf16: the fastest size of n = 1024, 2048, ... up to the fp32 size, the median of 3
    products each, larger sizes only while one product takes < 1 s (on this project's AVX512-BF16 CPU, 1024²
    ran at 919 GFLOP/s and 4096² at 797). Then one fp32 sample per 'mm' command, n = 4096 (8192 on CUDA; fp32
    on that CPU ran at 193-205 GFLOP/s at every size)."""
    device = torch.device(device_name)
    n_max, repeat = (8192, 10) if device.type == "cuda" else (4096, 1)

    def gflops(n: int, t: dict) -> dict:
        return {"n": n, "wall": 2 * n**3 / t["wall"] / 1e9, "cpu": 2 * n**3 / t["cpu"] / 1e9}

    reply({"ready": True})
    sys.stdin.readline()
    n, sizes = 1024, []
    while True:
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        timed(lambda: a @ b, device)  # warm-up
        samples = [gflops(n, timed(lambda: a @ b, device, repeat)) for _ in range(3)]
        sizes.append({k: statistics.median(s[k] for s in samples) for k in ("wall", "cpu")} | {"n": n})
        if samples[0]["wall"] * 1e9 < 2 * n**3 or n >= n_max:  # the product took more than 1 s
            break
        n *= 2
    a, b = (torch.randn(n_max, n_max, device=device) for _ in range(2))
    timed(lambda: a @ b, device)  # warm-up of the fp32 samples
    reply({"bf16": max(sizes, key=lambda s: s["wall"]) | {"sizes": sizes}})
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        reply(gflops(n_max, timed(lambda: a @ b, device, repeat)))


class Worker:
    """A worker subprocess answering one JSON line per command; `ask` returns None once it has timed out."""

    def __init__(self, args: list[str], timeout: float):
        command = [sys.executable, __file__, *args]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.timeout, self.timed_out = timeout, False

    def read(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.timed_out = True
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[2:]} died; see its error above")
        return json.loads(line)

    def ask(self, cmd: str):
        if self.timed_out:
            return None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read(self.timeout)

    def close(self) -> None:
        if not self.timed_out:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        self.proc.wait()


def measure_group(models: list[str], dtype: str, args) -> tuple[dict, dict]:
    """vitlab and the reference of every model side by side, taking turns (ABC..CBA) over warm-up and timed
    steps, with one fp32 matmul-peak sample after each timed round. Returns (results by (model, impl), peaks)."""
    peak = Worker(["--peak", args.device], timeout=600)
    workers = {}
    for model in models:
        for impl in args.impls:
            spec = dict(model=model, impl=impl, dtype=dtype, depth=args.depth, batch=args.batch, device=args.device)
            workers[model, impl] = Worker(["--worker", json.dumps(spec)], args.max_step_s)
    peak.read(600)
    results = {key: {"params": w.read(600)["params"], "train": [], "infer": []} for key, w in workers.items()}
    peaks = {"bf16": peak.ask("bf16")["bf16"], "fp32": []}
    keys = list(workers)
    for phase in ("train", "infer"):
        for i in range(args.warmup + args.steps):
            for key in keys if i % 2 == 0 else keys[::-1]:
                elapsed = workers[key].ask(phase)
                if elapsed is None:
                    results[key].setdefault("timed_out", phase)
                elif i >= args.warmup:
                    results[key][phase].append(elapsed)
            if i >= args.warmup:
                peaks["fp32"].append(peak.ask("mm"))
    for key, w in workers.items():
        results[key].update(w.ask("stats") or {})
        w.close()
    peak.close()
    return results, peaks


# ---------------------------------------------------------------- report


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor()
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16 matmul: {torch.ops.mkldnn._is_mkldnn_bf16_supported()})"
    )


def median_of(samples: list[dict], key: str) -> float | None:
    return statistics.median(s[key] for s in samples) if samples else None


def summarise(args, groups: dict) -> tuple[str, list[dict]]:
    rows, notes = [], []
    for dtype, (results, peaks) in groups.items():
        fp32 = {clock: median_of(peaks["fp32"], clock) for clock in ("wall", "cpu")}
        # The bf16 peak is the fastest way this device multiplies bf16 matrices: where the fp32 GEMM beats the
        # native bf16 one (CPUs without bf16 units), the fp32 GEMM of bf16 values gives the same products.
        peak = fp32 if dtype == "fp32" else {clock: max(fp32[clock], peaks["bf16"][clock]) for clock in fp32}
        notes.append(
            f"{dtype} group: fp32 matmul peak {fp32['wall']:.0f} GFLOP/s wall clock "
            f"[{min(s['wall'] for s in peaks['fp32']):.0f}–{max(s['wall'] for s in peaks['fp32']):.0f}], "
            f"{fp32['cpu']:.0f} GFLOP per CPU-second (torch.mm {peaks['fp32'][0]['n']}², one sample per round); "
            f"bf16 {peaks['bf16']['wall']:.1f} GFLOP/s (n={peaks['bf16']['n']}; "
            + ", ".join(f"{s['n']}²: {s['wall']:.0f}" for s in peaks["bf16"]["sizes"])
            + ")"
        )
        for model in args.models:
            flops = {"train": step_flops(model, args.depth, args.batch)}
            flops["infer"] = flops["train"] / 3
            by_impl = {impl: results[model, impl] for impl in args.impls}
            for impl, r in by_impl.items():
                row = dict(
                    model=model,
                    dtype=dtype,
                    impl=impl,
                    params=r["params"],
                    peak_rss_mib=r.get("peak_rss_mib"),
                    peak_cuda_mib=r.get("peak_cuda_mib"),
                    train_times=r["train"],
                    infer_times=r["infer"],
                )
                for phase in ("train", "infer"):
                    for clock in ("wall", "cpu"):
                        t, ref_t = median_of(r[phase], clock), median_of(by_impl["reference"][phase], clock)
                        row[f"{phase}_{clock}_s"] = t
                        row[f"{phase}_{clock}_ratio"] = ref_t / t if t and ref_t else None
                        row[f"{phase}_{clock}_mfu"] = flops[phase] / t / 1e9 / peak[clock] if t else None
                    row[f"{phase}_bound"] = r.get("timed_out") == phase  # slower than --max-step-s
                    ref_bound = by_impl["reference"].get("timed_out") == phase
                    if ref_bound and row[f"{phase}_wall_s"]:  # only a lower bound on the ratio is known
                        row[f"{phase}_wall_ratio_bound"] = args.max_step_s / row[f"{phase}_wall_s"]
                rows.append(row)

    def ips(row, phase):
        if row[f"{phase}_bound"]:
            return f"< {args.batch / args.max_step_s:.2f}"
        t = row[f"{phase}_wall_s"]
        return "—" if t is None else f"{args.batch / t:.2f}"

    def ratio(row, phase, clock):
        if row.get(f"{phase}_{clock}_ratio_bound"):
            return f"> {row[f'{phase}_{clock}_ratio_bound']:.1f}×"
        value = row[f"{phase}_{clock}_ratio"]
        return "—" if value is None else f"{value:.2f}×"

    def pct(x):
        return "—" if x is None else f"{100 * x:.0f} %"

    def seconds(row, phase, clock):
        t = row[f"{phase}_{clock}_s"]
        return "—" if t is None else f"{t:.2f}"

    def spread(times):
        if not times:
            return "timed out" if times is not None else "—"
        walls = [t["wall"] for t in times]
        return f"{statistics.median(walls):.2f} [{min(walls):.2f}–{max(walls):.2f}]"

    mem = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    lines = [
        f"Machine: {machine(args.device)}",
        f"Depth {args.depth}, batch {args.batch}, {IMG_SIZE} px, AdamW (fused); {args.warmup} warm-up + {args.steps} "
        f"timed steps each, medians; a step slower than {args.max_step_s:.0f} s is stopped and reported as a bound; "
        "freed host memory kept in every worker but system-malloc's (vitlab.runtime.allocator). "
        "MFU of bf16 rows is against the faster of the fp32 and bf16 matmul peaks.",
        *notes,
        "",
        "Wall clock:",
        "",
        f"| model | dtype | impl | params | train img/s | × ref | train MFU | infer img/s | × ref | infer MFU | {mem} | train step s, median [min–max] |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        memory = r["peak_cuda_mib"] if args.device == "cuda" else r["peak_rss_mib"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['impl']} | {r['params'] / 1e6:.2f} M | {ips(r, 'train')} | "
            f"{ratio(r, 'train', 'wall')} | {pct(r['train_wall_mfu'])} | {ips(r, 'infer')} | {ratio(r, 'infer', 'wall')} | "
            f"{pct(r['infer_wall_mfu'])} | {'—' if memory is None else f'{memory:.0f}'} | "
            f"{spread(r['train_times']) if not r['train_bound'] else 'timed out'} |"
        )
    if args.device == "cpu":
        lines += [
            "",
            "CPU time (all threads of the worker; what a step cost whatever the other jobs on the machine took):",
            "",
            "| model | dtype | impl | train CPU s | × ref | train MFU | page faults / train step | infer CPU s | × ref | infer MFU |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            faults = median_of(r["train_times"], "faults")
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['impl']} | {seconds(r, 'train', 'cpu')} | {ratio(r, 'train', 'cpu')} | "
                f"{pct(r['train_cpu_mfu'])} | {'—' if faults is None else f'{faults:,.0f}'} | {seconds(r, 'infer', 'cpu')} | "
                f"{ratio(r, 'infer', 'cpu')} | {pct(r['infer_cpu_mfu'])} |"
            )
    by_key = {(r["model"], r["dtype"], r["impl"]): r for r in rows}
    serial, parallel = args.models[0], args.models[-1]
    lines.append("")
    for dtype in args.dtypes:
        for impl in args.impls:
            s, p = by_key.get((serial, dtype, impl)), by_key.get((parallel, dtype, impl))
            if not s or not p or s is p:
                continue
            parts = []
            for clock in ("wall", "cpu") if args.device == "cpu" else ("wall",):
                for phase in ("train", "infer"):
                    if s[f"{phase}_{clock}_s"] and p[f"{phase}_{clock}_s"]:
                        parts.append(f"{phase} {s[f'{phase}_{clock}_s'] / p[f'{phase}_{clock}_s']:.2f}× ({clock})")
            lines.append(f"{parallel} / {serial} speed ({impl}, {dtype}): {', '.join(parts)}  ")
    return "\n".join(lines), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit-s/4,vit22b-s/4", help="comma-separated vitlab presets")
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per phase (train, inference)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--max-step-s", type=float, default=90.0, help="stop a configuration whose step takes longer")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--impls",
        default="vitlab,reference",
        help=f"comma-separated, of {', '.join(IMPLS)}; ratios are to the reference, which is always measured",
    )
    parser.add_argument("--out", type=Path, help="write the markdown tables here, and the raw numbers beside it as .json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--peak", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(json.loads(args.worker))
    if args.peak:
        return run_peak(args.peak)
    args.models, args.dtypes = args.models.split(","), args.dtypes.split(",")
    args.impls = list(dict.fromkeys(["vitlab", "reference", *args.impls.split(",")]))
    for impl in args.impls:
        if impl not in IMPLS:
            parser.error(f"--impls: {impl!r} is not one of {', '.join(IMPLS)}")
    for dtype in args.dtypes:
        if dtype not in ("fp32", "bf16"):
            parser.error(f"--dtypes: {dtype!r} is not fp32 or bf16")

    start, load = time.perf_counter(), os.getloadavg()[0]
    groups = {}
    for dtype in args.dtypes:
        groups[dtype] = measure_group(args.models, dtype, args)
        print(f"measured {dtype} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    table, rows = summarise(args, groups)
    table += f"\n\nLoad average (1 min) at start / end: {load:.1f} / {os.getloadavg()[0]:.1f}; total {time.perf_counter() - start:.0f} s"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"    python {' '.join(sys.argv)}\n\n{table}\n")
        raw = dict(args=vars(args) | {"out": str(args.out)}, peaks={d: g[1] for d, g in groups.items()}, rows=rows)
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
