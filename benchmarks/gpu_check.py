"""One-call health and speed check of vitlab on one GPU, writing one markdown table (issue 16).

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out DIR            # the real run, ≤ 8 minutes
    PYTHONPATH=src python3 benchmarks/gpu_check.py --out DIR --dry-run  # the same code, CPU, tiny sizes

Sections, each bounded in time; one that fails or runs out of time records its error and the rest go on:
the tests marked `gpu`, `precision: auto`, the bf16/fp16 matmul peak, training steps of ViT-B/16 and
ViT-22B-B/16 (and timm's vit_base_patch16_224) in bf16 and fp16 with and without torch.compile, one FSDP2
step in one process, and the streaming loader feeding the GPU from a JPEG folder (skipped until
`vitlab.data.stream.files` exists). MFU counts FLOPs as benchmarks/README.md does, with MLP width M:
6·B·N·L·(4D² + 2DM) + 12·B·L·N²·D per training step, against the peak measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import vitlab
from vitlab.config import apply_overrides
from vitlab.models import preset_config
from vitlab.runtime.precision import choose_precision

ROOT = Path(__file__).resolve().parent.parent
# "name key=value": the preset with that model option, timed eager only. ViT-22B without its QK LayerNorm
# separates what the parallel formulation gains from what QK norm costs (on the CPU: +2 % and -2 to -4 %).
MODELS = ("vit-b/16", "vit22b-b/16", "vit22b-b/16 qk_norm=false", "timm:vit_base_patch16_224")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Plan:
    """Sizes and time limits of one run: the real GPU check or the tiny CPU dry run."""

    device: torch.device
    tiny: bool
    budget_s: float
    img_size: int = 224
    batch: int = 128
    warmup: int = 3
    steps: int = 10
    matmul_n: int = 8192
    images: int = 4096  # JPEG files for the streaming section: 32 batches of 128
    tests: str = "tests"  # where pytest looks for the tests marked `gpu`
    dtypes: tuple[str, ...] = ("bf16", "fp16")
    compile_backend: str = "inductor"
    limits: dict[str, float] = field(default_factory=dict)  # seconds per section
    peaks: dict[str, float] = field(default_factory=dict)  # GFLOP/s by dtype, measured by the peak section

    def model_overrides(self) -> dict:
        """Keywords that shrink every model in a dry run (none on the GPU)."""
        if not self.tiny:
            return {}
        return dict(img_size=self.img_size, patch_size=8, embed_dim=64, depth=1, num_heads=2, mlp_dim=128, num_classes=10)


def make_plan(device: str, tiny: bool, budget_s: float) -> Plan:
    """The GPU plan, or the tiny one whose every section runs in seconds on a CPU."""
    limits = dict(tests=90, precision=15, peak=20, train=240, fsdp=30, streaming=60)
    plan = Plan(torch.device(device), tiny, budget_s, limits=limits)
    if tiny:
        plan.img_size, plan.batch, plan.warmup, plan.steps, plan.matmul_n, plan.images = 16, 4, 1, 1, 128, 16
        plan.tests = "tests/models/test_cuda.py"  # collecting the whole suite alone takes seconds
        plan.dtypes = ("bf16",)  # fp16 differs by the gradient scaler only, which the fp16 gpu tests run
        plan.compile_backend = "eager"  # dynamo's graph capture without inductor's minutes of code generation
    return plan


# ---------------------------------------------------------------- the frame: rows, time limits, errors


@dataclass
class Row:
    """One line of the table."""

    section: str
    item: str
    status: str  # ok, FAIL, error, skipped
    measured: str = ""
    note: str = ""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread once `seconds` have passed."""

    def expire(signum, frame):
        raise TimeoutError(f"stopped after its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def error_note(exc: BaseException) -> str:
    """The exception as one table-safe line, with the place it was raised."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" ({Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{place}"[:300]


def run_section(name: str, fn: Callable[[Plan, list[Row]], None], plan: Plan, rows: list[Row], deadline: float) -> None:
    """Run one section within its limit (and the run's deadline); its failure becomes a row."""
    limit = min(plan.limits[name], deadline - time.monotonic())
    if limit <= 1:
        rows.append(Row(name, "—", "skipped", note="the run's time budget was spent"))
        return
    start = time.monotonic()
    try:
        with time_limit(limit):
            fn(plan, rows)
    except Exception as exc:  # noqa: BLE001 - a failing section is reported, the check goes on
        rows.append(Row(name, "—", "error", note=error_note(exc)))
    finally:
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"[gpu_check] {name}: {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- sections


def gpu_tests(plan: Plan, rows: list[Row]) -> None:
    """The tests marked `gpu`, in a subprocess; in a dry run they run on the CPU (VITLAB_TEST_DEVICE)."""
    env = os.environ | {"PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if plan.device.type != "cuda":
        env["VITLAB_TEST_DEVICE"] = plan.device.type
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", plan.tests]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=plan.limits["tests"] - 5)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    status = "ok" if proc.returncode == 0 else "FAIL"
    rows.append(Row("tests", f"pytest -m gpu on {plan.device.type}", status, summary, "; ".join(failed)[:300]))


def precision_auto(plan: Plan, rows: list[Row]) -> None:
    """`precision: auto` picks bf16 exactly where the device supports it well."""
    picked, _ = choose_precision("auto", plan.device)
    if plan.device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        why = f"torch.cuda.is_bf16_supported() = {supported}, capability {torch.cuda.get_device_capability()}"
    else:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        why = f"native CPU bf16 GEMM (oneDNN) = {supported}"
    expected = "bf16" if supported else "fp32"
    rows.append(
        Row("precision", "auto", "ok" if picked == expected else "FAIL", f"picked {picked}", f"{why}; expected {expected}")
    )


def timed_mm(n: int, dtype: torch.dtype, device: torch.device, repeat: int) -> float:
    """GFLOP/s of `repeat` torch.mm of n² matrices (after one warm-up)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * n**3 * repeat / (time.perf_counter() - start) / 1e9


def matmul_peak(plan: Plan, rows: list[Row]) -> None:
    """The fastest of five samples of a square bf16 and fp16 matmul, kept in `plan.peaks` for the MFU."""
    repeat = 20 if plan.device.type == "cuda" else 2
    for name, dtype in DTYPES.items():
        gflops = max(timed_mm(plan.matmul_n, dtype, plan.device, repeat) for _ in range(5))
        plan.peaks[name] = gflops
        rows.append(Row("peak", f"torch.mm {name} {plan.matmul_n}²", "ok", f"{gflops / 1e3:.1f} TFLOP/s"))


def build_model(name: str, plan: Plan) -> torch.nn.Module:
    """A vitlab preset (`name` or `name key=value ...`), or a timm model (`timm:<name>`), at the plan's sizes."""
    if name.startswith("timm:"):
        import timm  # imports only where torchvision works (PLATFORM.md)

        return timm.create_model(name.removeprefix("timm:"), pretrained=False, **plan.model_overrides())
    preset, *options = name.split()
    return vitlab.create_model(preset, **plan.model_overrides(), **apply_overrides({}, options))


def model_shape(plan: Plan) -> dict:
    """Width, depth, MLP width, tokens of the timed models (ViT-B/16 at the plan's size, or the tiny one)."""
    cfg = preset_config("vit-b/16") | plan.model_overrides()
    tokens = (plan.img_size // cfg["patch_size"]) ** 2 + 1
    return dict(d=cfg["embed_dim"], depth=cfg["depth"], m=cfg["mlp_dim"], n=tokens)


def train_step_flops(plan: Plan) -> float:
    """Model FLOPs of one training step (the module docstring's count)."""
    s = model_shape(plan)
    b, n, d, m, depth = plan.batch, s["n"], s["d"], s["m"], s["depth"]
    return 6 * b * n * depth * (4 * d * d + 2 * d * m) + 12 * b * depth * n * n * d


def time_training(name: str, dtype: str, compiled: bool, plan: Plan) -> float:
    """Median seconds of a fwd+bwd+AdamW step under `dtype` autocast (fp16 with a gradient scaler)."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # a fresh compile per configuration: recompiles of one forward stop at a limit (8)
    model = build_model(name, plan).to(plan.device)
    net = torch.compile(model, backend=plan.compile_backend) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=plan.device.type == "cuda")
    scaler = torch.amp.GradScaler(plan.device.type, enabled=dtype == "fp16")
    num_classes = plan.model_overrides().get("num_classes", 1000)
    x = torch.randn(plan.batch, 3, plan.img_size, plan.img_size, device=plan.device)
    y = torch.randint(0, num_classes, (plan.batch,), device=plan.device)
    times = []
    for i in range(plan.warmup + plan.steps):
        sync(plan.device)
        start = time.perf_counter()
        with torch.autocast(plan.device.type, dtype=DTYPES[dtype]):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync(plan.device)
        if i >= plan.warmup:
            times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    return statistics.median(times)


def training(plan: Plan, rows: list[Row]) -> None:
    """Every model × dtype eager first (seconds each), then compiled (a compile each): img/s, MFU, ratios."""
    flops = train_step_flops(plan)
    seconds: dict[tuple[str, str, bool], float] = {}
    for compiled in (False, True):
        for dtype in plan.dtypes:
            for name in MODELS:
                if compiled and " " in name:
                    continue
                item = f"{name} {dtype}{' compiled' if compiled else ''}"
                if name.startswith("timm:"):
                    try:
                        import timm  # noqa: F401
                    except Exception as exc:  # noqa: BLE001 - timm fails to import without a working torchvision
                        rows.append(Row("train", item, "skipped", note=f"timm does not import: {error_note(exc)}"))
                        continue
                try:
                    seconds[name, dtype, compiled] = t = time_training(name, dtype, compiled, plan)
                except TimeoutError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one configuration failing leaves the others
                    rows.append(Row("train", item, "error", note=error_note(exc)))
                    continue
                peak = plan.peaks.get(dtype)
                mfu = f", MFU {flops / t / 1e9 / peak:.0%}" if peak else ""
                timm_t = seconds.get(("timm:vit_base_patch16_224", dtype, compiled))
                serial_t = seconds.get(("vit-b/16", dtype, compiled))
                notes = [
                    f"{timm_t / t:.2f}× timm" if timm_t and not name.startswith("timm:") else "",
                    f"{serial_t / t:.2f}× vit-b/16" if name.startswith("vit22b-b/16") and serial_t else "",
                ]
                measured = f"{plan.batch / t:,.0f} img/s{mfu}"
                rows.append(Row("train", item, "ok", measured, ", ".join(n for n in notes if n)))


def fsdp_one_process(plan: Plan, rows: list[Row]) -> None:
    """One bf16 training step of a small ViT-22B sharded by FSDP2 over one process; its loss equals the plain model's."""
    import torch.distributed as dist

    from vitlab.runtime.context import Runtime
    from vitlab.train.sharding import wrap_model

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return vitlab.create_model("vit22b-s/16", img_size=32, patch_size=8, depth=2, num_classes=10)

    ctx = Runtime(rank=0, world_size=1, device=plan.device)
    x = torch.randn(8, 3, 32, 32, device=plan.device)
    y = torch.arange(8, device=plan.device) % 10
    try:
        model, net = wrap_model(build, "fsdp", ctx, precision="bf16")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        start = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        sync(plan.device)
        elapsed = time.perf_counter() - start
        with torch.no_grad(), torch.autocast(plan.device.type, dtype=torch.bfloat16):
            plain = F.cross_entropy(build().to(plan.device)(x), y)
        close = abs(loss.item() - plain.item()) < 2e-2 * max(1.0, abs(plain.item()))
        note = f"loss {loss.item():.4f} sharded, {plain.item():.4f} plain bf16 autocast"
        rows.append(Row("fsdp", "fully_shard, world size 1, one step", "ok" if close else "FAIL", f"{elapsed:.2f} s", note))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def write_jpegs(folder: Path, count: int, size: int) -> None:
    """`count` random JPEGs of `size`² in two classes under folder/{train,test}/<class>/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("test", 2)):
        for i in range(n):
            path = folder / split / f"c{i % 2}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)


def streaming(plan: Plan, rows: list[Row]) -> None:
    """Train ViT-B/16 (bf16) from a JPEG folder through the streaming loader: images/s and data-wait share."""
    try:
        from vitlab.data.stream.files import stream_splits
        from vitlab.data.stream.workers import DataWait, make_loader
    except ImportError as exc:
        rows.append(Row("streaming", "JPEG folder → GPU", "skipped", note=f"streaming loader not in this tree yet ({exc})"))
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), plan.images, plan.img_size * 5 // 4)
        loader = make_loader(
            stream_splits(tmp, image_size=plan.img_size).train,
            plan.batch,
            workers=min(12, os.cpu_count() or 1) if not plan.tiny else 0,
        )
        model = build_model("vit-b/16", plan).to(plan.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        mean = torch.tensor([0.5, 0.5, 0.5], device=plan.device).view(1, 3, 1, 1)
        wait, images = DataWait(), 0
        for step, batch in enumerate(wait.wrap(loader.epoch(0))):
            if step == 1:  # the first batch waits for the workers to start
                wait.reset()
                images = 0
            x = batch.images.to(plan.device, non_blocking=True).float().div_(255).sub_(mean).div_(0.5)
            with torch.autocast(plan.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), batch.labels.to(plan.device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            images += len(batch)
        sync(plan.device)
        note = f"{plan.images} JPEGs of {plan.img_size * 5 // 4}² px, decode + crop in workers"
        rows.append(
            Row(
                "streaming", "JPEG folder → GPU", "ok", f"{images / wait.elapsed:,.0f} img/s, data wait {wait.fraction:.0%}", note
            )
        )


SECTIONS = {
    "tests": gpu_tests,
    "precision": precision_auto,
    "peak": matmul_peak,
    "train": training,
    "fsdp": fsdp_one_process,
    "streaming": streaming,
}


# ---------------------------------------------------------------- report


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})"
    return f"CPU ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores), torch {torch.__version__}"


def render(plan: Plan, rows: list[Row], total_s: float) -> str:
    """The header lines and the one table."""
    shape = model_shape(plan)
    lines = [
        f"# GPU check{' (dry run: tiny sizes)' if plan.tiny else ''}",
        "",
        f"Machine: {machine(plan.device)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"total {total_s:.0f} s of a {plan.budget_s:.0f} s budget.  ",
        f"Training: {plan.img_size} px, batch {plan.batch}, D={shape['d']}, depth {shape['depth']}, {shape['n']} tokens, "
        f"AdamW, {plan.warmup} warm-up + {plan.steps} timed steps, medians; compile backend {plan.compile_backend}; "
        f"MFU against the matmul peak of the same dtype measured in this run.",
        "",
        "| section | item | status | measured | note |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.section} | {r.item} | {r.status} | {r.measured} | {r.note.replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, every section in seconds")
    parser.add_argument("--dry-run", action="store_true", help="the same as --device cpu --tiny")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time; later sections are skipped past it")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated among {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else args.device
    plan = make_plan(device, args.tiny or args.dry_run, args.budget_s)
    start = time.monotonic()
    deadline = start + args.budget_s
    rows: list[Row] = []
    if plan.device.type == "cuda" and not torch.cuda.is_available():
        rows.append(Row("device", "cuda", "error", note="torch sees no CUDA device; use --dry-run on a CPU"))
    else:
        for name in args.sections.split(","):
            run_section(name, SECTIONS[name], plan, rows, deadline)
    args.out.mkdir(parents=True, exist_ok=True)
    report = render(plan, rows, time.monotonic() - start)
    (args.out / "gpu_check.md").write_text(report)
    print(report)
    return 0 if all(r.status in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
