"""Issue 26's label-efficiency benchmark: test accuracy with 1 %, 10 % and 100 % of the built-in labels,
from scratch and from MAE and MPP encoders, each method at its best LR of one shared grid, over seeds.

Every fine-tuning run is `vitlab train` with the built-in fine-tuning config (configs/pretrain/
builtin-finetune-vit22b-ti.yaml, plus `--set` overrides) on the first fraction of `--pool` labelled images,
for the same number of steps whatever the fraction (so 1 % repeats its images 100× as often as 100 %).
The pretrained encoders are `vitlab pretrain` runs given by `--pretrained mae=RUN mpp=RUN`. The LR is chosen
per method and fraction by the mean test accuracy over the seeds (every method gets the same grid, so the
same optimism). Writes label-efficiency.md and .json to `--results` after every run; `--merge` tabulates
the rows of several such files (runs split over machines) again.

    PYTHONPATH=src python3 -m vitlab.cli pretrain configs/pretrain/builtin-mae-vit22b-ti.yaml      # 40 epochs
    PYTHONPATH=src python3 -m vitlab.cli pretrain configs/pretrain/builtin-mpp-vit22b-ti.yaml --set train.epochs=10
    PYTHONPATH=src python3 benchmarks/label_efficiency.py \\
        --pretrained mae=runs/builtin-mae-vit22b-ti mpp=runs/builtin-mpp-vit22b-ti   # 3 x 3 x 2 LRs x 3 seeds: 54 runs
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vitlab.config import RunConfig, load_config
from vitlab.train.classify import train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "builtin-finetune-vit22b-ti.yaml"


def fine_tune(args: argparse.Namespace, method: str, fraction: float, lr: float, seed: int) -> float:
    """Test accuracy of one fine-tuning (or from-scratch) run."""
    labelled = max(args.batch_size, round(fraction * args.pool))
    start = ["finetune=null"] if method == "scratch" else [f"finetune.checkpoint={dict(args.pretrained)[method]}"]
    name = f"{method}-{fraction:g}-lr{lr:g}-seed{seed}"
    epochs = args.steps / (labelled // args.batch_size)  # full batches only, as the loader takes them
    config = load_config(
        CONFIG,
        [
            *start,
            f"name={name}",
            f"out_dir={args.out_dir}",
            f"data.num_train={labelled}",
            f"data.num_test={args.test_images}",
            f"train.batch_size={args.batch_size}",
            f"train.epochs={epochs}",
            f"train.eval_every_epochs={epochs}",
            f"train.seed={seed}",
            f"train.threads={args.threads}",
            f"optim.lr={lr}",
            f"optim.warmup_steps={round(args.warmup * args.steps)}",
            *args.set,
        ],
        RunConfig,
    )
    return train(config, progress=False)["test"]["acc1"]


def spread(values: list[float]) -> str:
    """Mean ± standard deviation in percent (± 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(rows: list[dict], methods: list[str], fractions: list[float]) -> str:
    """Per fraction: each method's accuracy at its best LR (mean ± std over seeds), and each pretrained one's gain."""
    pretrained = [m for m in methods if m != "scratch"]
    head = "| labels | " + " | ".join(f"{m} (best LR)" for m in methods) + "".join(f" | {m} − scratch" for m in pretrained)
    lines = [head + " |", "|---" * (1 + len(methods) + len(pretrained)) + "|"]
    for fraction in fractions:
        best = {}
        for method in methods:
            runs = [r for r in rows if r["method"] == method and r["fraction"] == fraction]
            by_lr = {lr: [r["acc1"] for r in runs if r["lr"] == lr] for lr in dict.fromkeys(r["lr"] for r in runs)}
            if by_lr:
                best[method] = max(by_lr.items(), key=lambda item: statistics.mean(item[1]))
        cells = [f"{spread(best[m][1])} ({best[m][0]:g})" if m in best else "–" for m in methods]
        gains = [
            f"{100 * (statistics.mean(best[m][1]) - statistics.mean(best['scratch'][1])):+.1f}"
            if m in best and "scratch" in best
            else "–"
            for m in pretrained
        ]
        lines.append(f"| {100 * fraction:g} % | " + " | ".join(cells + gains) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", nargs="*", default=[], type=lambda s: tuple(s.split("=", 1)), help="METHOD=RUN_DIR")
    parser.add_argument("--methods", nargs="+", default=["scratch", "mae", "mpp"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    parser.add_argument("--pool", type=int, default=20000, help="the labelled built-in images that 100 %% means")
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps at every fraction")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up as a fraction of the steps")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="an override of every run, e.g. optim.layer_decay=0.75")
    parser.add_argument("--out-dir", default="runs/label-efficiency")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default="label-efficiency")
    parser.add_argument("--merge", nargs="+", type=Path, default=[], help="only tabulate the rows of these JSON files")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    merged = [json.loads(path.read_text()) for path in args.merge]
    rows = [row for result in merged for row in result["rows"]]
    settings = (
        {"merged": [r["settings"] for r in merged]} if merged else {k: str(v) for k, v in vars(args).items() if k != "results"}
    )

    def write() -> None:
        text = table(rows, args.methods, args.fractions)
        (args.results / f"{args.stem}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
        (args.results / f"{args.stem}.md").write_text(f"{text}\n\nSettings: {json.dumps(settings)}\n")
        print(text)

    if args.merge:
        write()
        return
    missing = [m for m in args.methods if m != "scratch" and m not in dict(args.pretrained)]
    if missing:
        parser.error(f"no pretraining run for {', '.join(missing)}: give --pretrained {missing[0]}=RUN_DIR")
    for fraction in args.fractions:
        for method in args.methods:
            for lr in args.lrs:
                for seed in args.seeds:
                    rows.append(
                        dict(method=method, fraction=fraction, lr=lr, seed=seed, acc1=fine_tune(args, method, fraction, lr, seed))
                    )
                    print(json.dumps(rows[-1]), flush=True)
                    write()  # after every run, so that a stopped benchmark keeps what it measured


if __name__ == "__main__":
    main()
