"""Issue 14's measurement: does MAE or MPP pretraining on unlabeled built-in images help with 1 000 labels?

For each family, method and seed: pretrain on `--pretrain-images` unlabeled images, fine-tune on
`--labelled` labelled ones (`--layer-decay`: none by default), and linear-probe the frozen encoder; against the same
model trained from scratch with the same fine-tuning budget and the probe of a randomly initialised
encoder. Writes a table (mean ± std over seeds) and each pretraining run's curves and last sample grid.

    PYTHONPATH=src python3 benchmarks/bench_pretrain.py --families vit22b --seeds 0 1 2   # about 60 minutes
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from vitlab.config import PretrainConfig, RunConfig, load_config
from vitlab.eval.probe import probe_run
from vitlab.train.classify import train
from vitlab.train.pretrain import pretrain

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "pretrain"


def options(args: argparse.Namespace, family: str, seed: int) -> list[str]:
    """Overrides shared by pretraining and fine-tuning: the model, the image size, the seed, the machine."""
    options = [f"model.options={args.model_options}"] if args.model_options else []  # else the configs' (pool: gap)
    return [
        f"model.name={family}-ti/{args.patch}",
        *options,
        f"train.seed={seed}",
        f"train.threads={args.threads}",
        f"train.precision={args.precision}",
        f"out_dir={args.out_dir}",
    ]


def fine_tune(args: argparse.Namespace, family: str, seed: int, checkpoint: str | None, name: str) -> float:
    """Test accuracy after fine-tuning `checkpoint` (None: from scratch, no layer decay) on the labelled images."""
    layer_decay = f"optim.layer_decay={args.layer_decay if checkpoint else 'null'}"
    extra = [f"finetune.checkpoint={checkpoint}", layer_decay] if checkpoint else ["finetune=null", layer_decay]
    config = load_config(
        CONFIGS / "builtin-finetune-vit22b-ti.yaml",
        [
            *options(args, family, seed),
            f"name={name}",
            f"data.num_train={args.labelled}",
            f"data.num_test={args.test_images}",
            f"train.epochs={args.finetune_epochs}",
            f"train.eval_every_epochs={args.finetune_epochs}",
            *extra,
        ],
        RunConfig,
    )
    return train(config, progress=False)["test"]["acc1"]


def measure(args: argparse.Namespace, family: str, method: str, seed: int) -> dict:
    """Pretrain, fine-tune and probe one (family, method, seed); with the random-init probe of the same encoder."""
    name = f"{family}-{method}-seed{seed}"
    config = load_config(
        CONFIGS / f"builtin-{method}-vit22b-ti.yaml",
        [
            *options(args, family, seed),
            f"name={name}",
            f"data.num_train={args.pretrain_images}",
            f"data.num_test={args.test_images}",
            f"train.epochs={getattr(args, method + '_epochs')}",
            f"optim.warmup_epochs={args.warmup}",
            f"train.batch_size={args.pretrain_batch}",
            f"pretrain.sample_every_steps={10**9}",
            *args.pretrain_set,
        ],
        PretrainConfig,
    )
    started = time.perf_counter()
    run_dir = pretrain(config, progress=False)["run_dir"]
    pretrain_s = time.perf_counter() - started
    for picture in ("curves.png", "samples.png"):
        source = Path(run_dir) / picture if picture == "curves.png" else max(Path(run_dir, "samples").glob("*.png"))
        shutil.copy(source, args.results / f"pretrain-{name}-{picture}")
    probe = dict(num_train=args.labelled, epochs=args.probe_epochs, seed=seed)
    return {
        "family": family,
        "method": method,
        "seed": seed,
        "pretrain_seconds": pretrain_s,
        "finetuned": fine_tune(args, family, seed, run_dir, f"{name}-finetune"),
        "probe": probe_run(run_dir, **probe)["acc1"],
        "probe_random_init": probe_run(run_dir, random_init=True, **probe)["acc1"],
    }


def spread(values: list[float]) -> str:
    """Mean ± standard deviation in percent (± 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(rows: list[dict]) -> str:
    """The markdown table: per family and method, over seeds."""
    lines = [
        "| family | method | seeds | from scratch | fine-tuned | gain (points) | probe random init | probe pretrained | probe ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, method in dict.fromkeys((r["family"], r["method"]) for r in rows):
        group = [r for r in rows if r["family"] == family and r["method"] == method]
        ratio = [r["probe"] / max(r["probe_random_init"], 1e-9) for r in group]
        lines.append(
            f"| {family} | {method} | {len(group)} | {spread([r['scratch'] for r in group])} | "
            f"{spread([r['finetuned'] for r in group])} | {spread([r['finetuned'] - r['scratch'] for r in group])} | "
            f"{spread([r['probe_random_init'] for r in group])} | {spread([r['probe'] for r in group])} | "
            f"{statistics.mean(ratio):.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["vit22b", "vit"])
    parser.add_argument("--methods", nargs="+", default=["mae", "mpp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--patch", type=int, default=4, help="patch size of the Ti encoder (4: 64 patches at 32 px)")
    parser.add_argument("--model-options", help="model.options YAML in place of the configs', e.g. a smaller encoder")
    parser.add_argument("--pretrain-images", type=int, default=20000)
    # Within the 10 minutes on 2 AVX512-BF16 cores: MAE's encoder sees a quarter of the patches (~2× MPP's rate).
    parser.add_argument("--mae-epochs", type=float, default=8)
    parser.add_argument("--mpp-epochs", type=float, default=3)
    parser.add_argument("--pretrain-batch", type=int, default=256)
    parser.add_argument("--warmup", type=float, default=1, help="pretraining warm-up epochs")
    parser.add_argument("--labelled", type=int, default=1000)
    parser.add_argument("--finetune-epochs", type=float, default=30)
    parser.add_argument("--layer-decay", default="null", help="of the pretrained encoder's fine-tuning (null: none; MAE's: 0.75)")
    parser.add_argument("--probe-epochs", type=int, default=300, help="on 1 000 precomputed features: seconds")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="train.precision of every run (auto: bf16 where the CPU has it)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="pretrain_set",
        help="extra --set of the pretraining runs, e.g. pretrain.decoder_depth=4",
    )
    parser.add_argument("--out-dir", default="runs/bench-pretrain")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--merge", nargs="+", type=Path, help="only tabulate the rows of these result JSON files")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)

    settings = {k: str(v) for k, v in vars(args).items()}
    if args.merge:
        rows = [row for path in args.merge for row in json.loads(path.read_text())["rows"]]
        settings = {**json.loads(args.merge[0].read_text())["settings"], "seeds": str(sorted({r["seed"] for r in rows}))}
        stem = "pretrain"
    else:
        rows = []
        for family in args.families:
            for seed in args.seeds:
                scratch = fine_tune(args, family, seed, None, f"{family}-scratch-seed{seed}")
                for method in args.methods:
                    rows.append({**measure(args, family, method, seed), "scratch": scratch})
                    print(json.dumps(rows[-1]), flush=True)
        stem = f"pretrain-{'-'.join(args.families)}-seed{'-'.join(map(str, args.seeds))}"
    text = table(rows)
    (args.results / f"{stem}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    (args.results / f"{stem}.md").write_text(f"{text}\n\nSettings: {json.dumps(settings)}\n")
    print(text)


if __name__ == "__main__":
    main()
