"""Input pipeline at 224 px: JPEG folder -> uint8 batches through DataLoader workers, in images/s and resident memory.

    python benchmarks/bench_input.py [--images 2000] [--big 20000] [--batch 64] [--batches 16] [--rounds 3]
                                     [--vit-steps 3] [--readme benchmarks/README.md]

Writes a folder of photo-sized JPEGs (500x375, quality 90; a smooth random colour field, random
shapes and per-image grain, so the files are 60-110 kB like camera photos) and measures, with 1 and
2 DataLoader workers, training order, batches of `--batch`:
(a) the decode-only limit: Pillow's full decode to RGB in the workers, nothing returned;
(b) a reference pipeline written the way torchvision and timm do it: open, RGB, RandomResizedCrop
    (scale 0.08-1, ratio 3/4-4/3, Pillow crop + bilinear resize), flip, ToTensor (float32 CHW in
    [0, 1]), default collate;
(c) vitlab's: FolderStream + make_loader (draft decoding, torch's uint8 antialiased resize, uint8 batches).
The rows take turns round by round, so they share the machine's load; each figure is the median
over rounds of images/s after the first two batches (worker start-up excluded), and of CPU time per
image over the whole epoch. Resident memory: the proportional set size (PSS, so pages shared with
forked workers count once) of the anonymous and shared memory of the process and its workers
(library code left out) after `--batches` batches of (c), for a dataset of `--images` and of `--big`
entries (the big one hard-links the same files under more names). `--vit-steps` trains ViT-S/16 at 224 px
(fp32, AdamW, batch 32) on (c) with one worker and reports the share of step time spent waiting
on data. Prints a markdown table and, with `--readme`, puts it in that file's "Input pipeline" section.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Subset

from vitlab.data.stream.files import stream_splits
from vitlab.data.stream.workers import DataWait, make_loader

CLASSES = 10


def _photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """A photo-like image: smooth colour field, a few shapes, grain."""
    cells = rng.integers(3, 12)
    field = (rng.random((cells, cells * 4 // 3, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 8)):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = rng.integers(10, 120)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r // 2, x + r, y + r), fill=fill)
    pixels = np.asarray(image).astype(np.int16) + rng.normal(0, rng.uniform(3, 12), (height, width, 1)).astype(np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_folder(root: Path, images: int, seed: int = 0) -> None:
    """`images` JPEGs under root/train/<class>/ and 10 per class under root/val/<class>/."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", 10 * CLASSES)):
        for c in range(CLASSES):
            (root / split / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _photo(rng).save(root / split / f"class{i % CLASSES:02d}" / f"{i:06d}.JPEG", quality=90)


def link_folder(source: Path, root: Path, entries: int) -> None:
    """A folder of `entries` train files, hard links cycling through the source's."""
    files = sorted((source / "train").rglob("*.JPEG"))
    for i in range(entries):
        target = root / "train" / files[i % len(files)].parent.name / f"{i:06d}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(files[i % len(files)], target)
    os.symlink(source / "val", root / "val")


def _files(root: Path) -> tuple[list[str], list[int]]:
    files = sorted(str(p) for p in (root / "train").rglob("*.JPEG"))
    return files, [int(Path(f).parent.name[5:]) for f in files]


class DecodeOnly(Dataset):
    """(a): full Pillow decode to RGB, nothing returned."""

    def __init__(self, root: Path):
        self.files, _ = _files(root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as image:
            image.convert("RGB")
        return torch.zeros(())


class Reference(Dataset):
    """(b): torchvision/timm-style RandomResizedCrop + flip + ToTensor, written out."""

    def __init__(self, root: Path, size: int = 224):
        self.files, self.labels = _files(root)
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def crop_params(width: int, height: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params: (top, left, height, width)."""
        area, log_ratio = width * height, (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * random.uniform(0.08, 1.0)
            aspect = math.exp(random.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        side = min(width, height)
        return (height - side) // 2, (width - side) // 2, side, side

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as image:
            rgb = image.convert("RGB")
        top, left, h, w = self.crop_params(*rgb.size)
        rgb = rgb.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.Resampling.BILINEAR)
        if random.random() < 0.5:
            rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).contiguous()
        return tensor.float().div(255), self.labels[i]


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (finished DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _measure(make_batches, batch: int) -> tuple[float, float]:
    """(images/s after the first two batches, CPU ms per image over the whole run) of one epoch drained to the end."""
    cpu, count, timed = _cpu_seconds(), 0, 0
    batches = make_batches()
    for step, _ in enumerate(batches):
        count += batch
        if step == 1:
            start = time.perf_counter()
        elif step > 1:
            timed += batch
    elapsed = time.perf_counter() - start
    del batches
    gc.collect()  # shuts the workers down, so that their CPU time is counted
    return timed / elapsed, 1e3 * (_cpu_seconds() - cpu) / count


def _pipelines(root: Path, batch: int, batches: int, workers: int, seed: int):
    """The three pipelines, over the first (batches + 2) x batch images, as makers of an epoch's batch iterator."""
    subset = list(range((batches + 2) * batch))

    def plain(dataset: Dataset):
        return lambda: iter(
            DataLoader(
                Subset(dataset, subset), batch_size=batch, shuffle=True, num_workers=workers, prefetch_factor=2, drop_last=True
            )
        )

    train = stream_splits(root, 224, seed=seed).train
    train.table = train.table.subset(np.array(subset))
    loader = make_loader(train, batch, seed=seed, workers=workers, pin_memory=False)
    epochs = iter(range(10**6))
    return {
        "(a) decode only": plain(DecodeOnly(root)),
        "(b) reference": plain(Reference(root)),
        "(c) vitlab": lambda: loader.epoch(next(epochs)),
    }


def _pss_mib() -> float:
    """Anonymous and shared-memory PSS of this process and its children, in MiB.

    File-backed pages (torch's and Pillow's libraries) are left out: their PSS depends on how many
    other processes on the machine map the same files.
    """
    pids = [os.getpid()] + [int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()]
    total = 0
    for pid in pids:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        total += sum(int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) for field in ("Pss_Anon", "Pss_Shmem"))
    return total / 1024


def _memory(root: Path, batch: int, batches: int) -> float:
    """PSS of the vitlab pipeline (2 workers) after `batches` batches and a second for the prefetch to fill, in a fresh process."""
    script = "\n".join(
        [
            "import time",
            "from pathlib import Path",
            "from benchmarks.bench_input import _pss_mib",
            "from vitlab.data.stream.workers import make_loader",
            "from vitlab.data.stream.files import stream_splits",
            f"batches = make_loader(stream_splits(Path({str(root)!r}), 224).train, {batch}, workers=2, pin_memory=False).epoch(0)",
            f"for _ in range({batches}): next(batches)",
            "time.sleep(1)",
            "print(_pss_mib())",
        ]
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(repo)])}
    return float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout)


def _vit_wait(root: Path, steps: int) -> tuple[float, float]:
    """(images/s, data-wait fraction) of ViT-S/16 training at 224 px on the vitlab pipeline, one worker."""
    from vitlab import create_model
    from vitlab.data.augment import normalize

    model = create_model("vit-s/16", img_size=224, num_classes=CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = make_loader(stream_splits(root, 224).train, 32, workers=1, pin_memory=False)
    wait, seen = DataWait(), 0
    for step, batch in enumerate(wait.wrap(loader.epoch(0))):
        if step == 1:  # the first step pays worker start-up and allocator warm-up
            wait.reset()
        if step > steps:
            break
        loss = torch.nn.functional.cross_entropy(model(normalize(batch.images)), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(batch) if step >= 1 else 0
    return seen / wait.elapsed, wait.fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--big", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vit-steps", type=int, default=3)
    parser.add_argument("--readme", type=Path)
    args = parser.parse_args()
    began = time.perf_counter()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    kind = "AVX512-BF16" if "avx512_bf16" in lscpu else ("AVX-512" if "avx512f" in lscpu else "AVX2")
    with tempfile.TemporaryDirectory() as tmp:
        root, big = Path(tmp) / "small", Path(tmp) / "big"
        write_folder(root, args.images)
        link_folder(root, big, args.big)
        sizes = [p.stat().st_size for p in (root / "train").rglob("*.JPEG")]
        rates: dict[tuple[str, int], list[float]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for workers in (1, 2):
                for name, epoch in _pipelines(root, args.batch, args.batches, workers, seed=0).items():
                    rate, ms = _measure(epoch, args.batch)
                    rates.setdefault((name, workers), []).append(rate)
                    cpu.setdefault((name, workers), []).append(ms)
        memory: dict[int, list[float]] = {}
        for _ in range(args.rounds):
            for n, folder in ((args.images, root), (args.big, big)):
                memory.setdefault(n, []).append(_memory(folder, args.batch, args.batches))
        vit = _vit_wait(root, args.vit_steps) if args.vit_steps else None
    names = ("(a) decode only", "(b) reference", "(c) vitlab")
    lines = [
        f"Machine: {model.group(1) if model else platform.processor()} ({kind}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, Pillow {Image.__version__}; load average at the end "
        f"{os.getloadavg()[0]:.1f}; total {time.perf_counter() - began:.0f} s.",
        f"Data: {args.images} JPEGs 500x375 (median {statistics.median(sizes) / 1e3:.0f} kB), 224 px crops, "
        f"batch {args.batch}, {args.batches + 2} batches per measurement, median of {args.rounds} rounds [min-max].",
    ]
    for title, values, unit, better in (
        ("Wall clock, after the first two batches", rates, "img/s", 1),
        ("CPU time of the process and its workers, whole epoch", cpu, "CPU ms/img", -1),
    ):
        median = {key: statistics.median(v) for key, v in values.items()}
        lines += [
            "",
            f"{title}:",
            "",
            f"| pipeline | 1 worker ({unit}) | 2 workers ({unit}) | x (b), 1 worker | x (b), 2 workers |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in names:
            cells = [
                f"{median[name, w]:.{0 if better > 0 else 2}f} [{min(values[name, w]):.{0 if better > 0 else 2}f}-"
                f"{max(values[name, w]):.{0 if better > 0 else 2}f}]"
                for w in (1, 2)
            ]
            ratios = [f"{(median[name, w] / median['(b) reference', w]) ** better:.2f}x" for w in (1, 2)]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratios[0]} | {ratios[1]} |")
    for w in (1, 2):
        per_round = [c / b for c, b in zip(rates["(c) vitlab", w], rates["(b) reference", w])]
        lines.append(f"\n(c)/(b) img/s round by round, {w} worker(s): {', '.join(f'{r:.2f}' for r in per_round)}.")
    small, large = (statistics.median(memory[n]) for n in (args.images, args.big))
    spread = "; ".join(f"{n}: {', '.join(f'{v:.0f}' for v in memory[n])}" for n in (args.images, args.big))
    lines.append(
        f"\nResident memory of (c) with 2 workers (anonymous + shared-memory PSS of the process and its workers, a "
        f"fresh process each, after "
        f"{args.batches} batches and 1 s for the prefetch to fill; median of {args.rounds}): {small:.0f} MiB for "
        f"{args.images} images, {large:.0f} MiB for {args.big} ({100 * (large / small - 1):+.1f} %; rounds: {spread} MiB)."
    )
    if vit:
        lines.append(
            f"ViT-S/16 at 224 px (fp32, AdamW, batch 32, {args.vit_steps} steps) on (c) with one worker: "
            f"{vit[0]:.1f} img/s, waiting on data {100 * vit[1]:.1f} % of the time."
        )
    table = "\n".join(lines)
    print(table)
    if args.readme:
        _write_section(args.readme, table)


def _write_section(readme: Path, table: str) -> None:
    """Replace the measured block of the README's "Input pipeline" section (or add the section)."""
    text = readme.read_text()
    begin, end = "<!-- bench_input: begin -->", "<!-- bench_input: end -->"
    block = f"{begin}\n{table}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = (
            text.rstrip()
            + f"\n\n## Input pipeline\n\n`python benchmarks/bench_input.py --readme benchmarks/README.md`\n\n{block}\n"
        )
    readme.write_text(text)


if __name__ == "__main__":
    main()
