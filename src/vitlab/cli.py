"""`vitlab …` subcommands: each one parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="vitlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    params = sub.add_parser("params", help="parameter counts of every preset (Table 1 of the paper)")
    params.add_argument("--image-size", type=int, default=224)
    params.add_argument("--patch-size", type=int, default=16)
    params.add_argument("--num-classes", type=int, default=1000)
    params.set_defaults(func=cmd_params)
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
