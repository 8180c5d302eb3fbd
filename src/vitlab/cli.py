"""`vitlab …` subcommands: each one parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitlab.errors import VitlabError


def cmd_params(args: argparse.Namespace) -> None:
    """Print Table 1: parameter counts of every preset in both families."""
    from vitlab.models.presets import parameter_table

    rows = parameter_table(args.image_size, args.patch_size, args.num_classes)
    print(f"Parameters at {args.image_size} px, patch {args.patch_size}, {args.num_classes} classes (meta device)")
    header = f"{'size':>5} {'layers':>6} {'width':>6} {'MLP':>6} {'heads':>5} {'ViT':>16} {'ViT-22B':>16}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size']:>5} {r['depth']:>6} {r['width']:>6} {r['mlp_dim']:>6} {r['heads']:>5} "
            f"{r['vit']:>16,} {r['vit22b']:>16,}"
        )


def cmd_train(args: argparse.Namespace) -> None:
    """Train a classifier from a config (or the default run), or resume a run."""
    from vitlab.config import apply_overrides, from_dict, load_config, RunConfig
    from vitlab.train.classify import load_run_config, train

    if args.resume:
        saved = load_run_config(Path(args.resume)).to_dict()
        config = from_dict(RunConfig, apply_overrides(saved, args.set)).validate()
    else:
        config = load_config(args.config, args.set)
    results = train(config, resume_dir=args.resume, progress=not args.no_progress)
    if "run_dir" in results:
        test = results["test"]
        print(
            f"run {results['run_dir']}: test acc@1 {100 * test['acc1']:.2f} %, acc@5 {100 * test['acc5']:.2f} %, "
            f"AUROC {test['auroc']:.4f} after {results['epochs']:.2f} epochs"
        )


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint on its run's test data (or another dataset)."""
    from vitlab.train.classify import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.data_root, args.batch_size, args.ema)
    print(json.dumps(metrics, indent=2))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="vitlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    params = sub.add_parser("params", help="parameter counts of every preset (Table 1 of the paper)")
    params.add_argument("--image-size", type=int, default=224)
    params.add_argument("--patch-size", type=int, default=16)
    params.add_argument("--num-classes", type=int, default=1000)
    params.set_defaults(func=cmd_params)

    train = sub.add_parser("train", help="train a classifier (no arguments: the default run on built-in data)")
    train.add_argument("config", nargs="?", help="YAML config (see configs/); default: the built-in default run")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on test data")
    evaluate.add_argument("checkpoint", help="run directory or checkpoint folder")
    evaluate.add_argument("--data", help="dataset name (builtin, cifar10, cifar100, folder); default: the run's")
    evaluate.add_argument("--data-root", help="dataset location; default: the run's")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    evaluate.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vitlab` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except VitlabError as exc:
        print(f"vitlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
