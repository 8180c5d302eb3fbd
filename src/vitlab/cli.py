"""`vitlab …` subcommands: each one parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vitlab import __version__
from vitlab.errors import VitlabError
from vitlab.runtime.allocator import keep_freed_memory

DESCRIPTION = """Train, fine-tune, inspect and export Vision Transformers (the classic ViT and the ViT-22B-style
parallel block) on a laptop CPU or on GPUs. `vitlab train` with no arguments trains a small model on
built-in data in minutes; `vitlab COMMAND -h` explains each command."""
# One geometry for `params` and `plan`: 224 px, patch 16 (the ViT paper's base patch, at which its parameter
# counts are quoted) and ImageNet's 1000 classes. `vitlab plan vit22b-22b/14` names the ViT-22B patch.
DEFAULT_IMAGE_SIZE, DEFAULT_PATCH_SIZE, DEFAULT_NUM_CLASSES = 224, 16, 1000

if TYPE_CHECKING:
    from vitlab.config import PretrainConfig, RunConfig, TranslateConfig


def cmd_params(args: argparse.Namespace) -> None:
    """Print Table 1: parameter counts of every preset in both families; then the ResNets and hybrids with FLOPs."""
    from vitlab.models.presets import convnet_table, parameter_table

    rows = parameter_table(args.image_size, args.patch_size, args.num_classes)
    print(f"Parameters at {args.image_size} px, patch {args.patch_size}, {args.num_classes} classes (meta device)")
    header = f"{'size':>5} {'layers':>6} {'width':>6} {'MLP':>6} {'heads':>5} {'ViT':>16} {'ViT-22B':>16}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size']:>5} {r['depth']:>6} {r['width']:>6} {r['mlp_dim']:>6} {r['heads']:>5} {r['vit']:>16,} {r['vit22b']:>16,}"
        )
    print(
        f"\nBiT ResNets and hybrids at {args.image_size} px, {args.num_classes} classes (meta device; FLOPs = 2 per multiply-add)"
    )
    print(f"{'preset':>24} {'parameters':>14} {'GFLOPs/image':>13}")
    for r in convnet_table(args.image_size, args.num_classes):
        print(f"{r['name']:>24} {r['params']:>14,} {r['gflops']:>13.2f}")


def cmd_plan(args: argparse.Namespace) -> None:
    """Print what training a preset needs per device under DDP and FSDP, or the fewest devices for every preset."""
    from vitlab.models.planner import format_overview, format_plan, preset_shape
    from vitlab.models.presets import is_convnet

    if args.preset and is_convnet(args.preset):
        raise VitlabError(
            f"vitlab plan models ViT blocks only, not {args.preset}; `vitlab params` gives its parameters and FLOPs"
        )
    if args.preset:
        shape = preset_shape(args.preset, args.image_size, args.num_classes, num_registers=args.num_registers)
        print(format_plan(args.preset, shape, args.devices, args.device_memory, args.batch, args.precision))
    else:
        print(format_overview(args.patch_size, args.device_memory, args.batch, args.image_size, args.precision))


def cmd_consolidate(args: argparse.Namespace) -> None:
    """Merge a sharded (FSDP) checkpoint into one safetensors file."""
    from vitlab.train.sharding import consolidate

    print(f"wrote {consolidate(args.checkpoint, args.out)}")


def cmd_train(args: argparse.Namespace) -> None:
    """Train a classifier from a config (or the default run), or resume a run."""
    from vitlab.config import RunConfig
    from vitlab.eval.classification import metrics_line
    from vitlab.train.classify import train

    if vars(args).get("strategy"):
        args.set.append(f"train.strategy={args.strategy}")
    results = train(run_config(args, RunConfig), resume_dir=args.resume, progress=not args.no_progress)
    if "run_dir" in results:
        print(f"run {results['run_dir']}: test {metrics_line(results['test'])} after {results['epochs']:.2f} epochs")


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune pretrained weights: `vitlab train` with a config that has a `finetune` section."""
    from vitlab.runs.kinds import load_experiment

    if load_experiment(args.config, args.set).finetune is None:
        raise VitlabError(f"{args.config} has no finetune section; add one with finetune.checkpoint: PATH (see README)")
    cmd_train(args)


def cmd_inspect(args: argparse.Namespace) -> None:
    """Write the inspection PNGs of a run's model: attention maps, rollout, distances, embeddings."""
    from vitlab.data.images import read_images
    from vitlab.inspection.images import dataset_images
    from vitlab.inspection.pictures import inspect_model
    from vitlab.runs import checkpoint as ckpt
    from vitlab.runs.stored import load_checkpoint_model
    from vitlab.train.run_log import pngs_to_tensorboard

    model, config = load_checkpoint_model(args.checkpoint, args.ema)
    images = read_images(args.image, config.data.image_size) if args.image else dataset_images(config.data, args.num_images)
    out_dir = Path(args.out or Path(args.checkpoint) / "inspect")
    written = inspect_model(model, images, out_dir, args.query, mean=config.data.mean, std=config.data.std)
    print(f"wrote {len(written)} PNGs to {out_dir}")
    checkpoint = ckpt.find_checkpoint(args.checkpoint)
    run_dir = checkpoint.parent.parent  # RUN/checkpoints/step-N
    if (run_dir / "tensorboard").is_dir():  # also in the run's TensorBoard, at the checkpoint's step
        pngs_to_tensorboard(
            run_dir, {f"inspect/{name}": path for name, path in written.items()}, ckpt.read_meta(checkpoint)["step"]
        )


def cmd_cka(args: argparse.Namespace) -> None:
    """Layer × layer linear CKA of two runs on the same images: cka.json, cka.png, and TensorBoard."""
    from vitlab.inspection.cka import compare_runs
    from vitlab.runs import checkpoint as ckpt
    from vitlab.train.run_log import pngs_to_tensorboard

    out = Path(args.out or Path(args.run_a) / f"cka-{Path(args.run_b).resolve().name}")
    result, written = compare_runs(args.run_a, args.run_b, out, args.num_images, args.batch_size, args.ema)
    print(f"CKA of {len(result.layers_a)} × {len(result.layers_b)} layers on {result.images} images")
    print(f"wrote {written['json']} and {written['png']}")
    checkpoint = ckpt.find_checkpoint(args.run_a)
    run_dir = checkpoint.parent.parent  # RUN/checkpoints/step-N
    if (run_dir / "tensorboard").is_dir():
        pngs_to_tensorboard(run_dir, {f"cka/{result.names[1]}": written["png"]}, ckpt.read_meta(checkpoint)["step"])


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint on its run's test data (or another dataset)."""
    from vitlab.eval.classification import evaluate_checkpoint, metrics_line

    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.data_root, args.batch_size, args.ema)
    print(json.dumps(metrics, indent=2) if args.json else f"{args.checkpoint}: test {metrics_line(metrics)}")


def run_config(args: argparse.Namespace, cls: type) -> RunConfig | TranslateConfig | PretrainConfig:
    """The config of a loop: the one saved in `--resume RUN_DIR` (with `--set` applied), else CONFIG's (or the defaults)."""
    from vitlab.config import apply_overrides, from_dict
    from vitlab.runs.kinds import check_experiment, load_experiment
    from vitlab.train.scaffold import AUTO, load_run_config

    if args.resume and args.resume != AUTO:
        saved = load_run_config(Path(args.resume), cls).to_dict()
        return check_experiment(from_dict(cls, apply_overrides(saved, args.set)).validate())
    return load_experiment(args.config, args.set, cls)


TRANSLATION_HEADER = "test metrics, the identity mapping's in brackets"


def cmd_translate_train(args: argparse.Namespace) -> None:
    """Train ViTUnet or the ResNet generator as a CycleGAN, or resume a run."""
    from vitlab.config import TranslateConfig
    from vitlab.eval.translation import metrics_lines
    from vitlab.train.cyclegan import train_translation
    from vitlab.train.scaffold import AUTO

    if not args.config and args.resume in (None, AUTO):
        raise VitlabError("give a config (e.g. configs/translate-builtin.yaml) or --resume RUN_DIR")
    config = run_config(args, TranslateConfig)
    results = train_translation(config, resume_dir=args.resume, progress=not args.no_progress)
    print(f"run {results['run_dir']} after {results['epochs']:.2f} epochs ({TRANSLATION_HEADER}; all in results.json):")
    print("\n".join(f"  {line}" for line in metrics_lines(results["test"])))


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Pretrain an encoder with MAE or MPP on unlabeled images, or resume a run."""
    from vitlab.config import PretrainConfig
    from vitlab.train.pretrain import pretrain

    results = pretrain(run_config(args, PretrainConfig), resume_dir=args.resume, progress=not args.no_progress)
    if "run_dir" in results:  # the main rank
        print(
            f"run {results['run_dir']}: held-out {results['method']} loss {results['test']['loss']:.4f} "
            f"after {results['epochs']:.2f} epochs; fine-tune it with finetune.checkpoint: {results['run_dir']}"
        )


def cmd_probe(args: argparse.Namespace) -> None:
    """Linear-probe accuracy of a pretraining run's frozen encoder."""
    from vitlab.eval.probe import probe_line, probe_run

    result = probe_run(args.run, args.num_train, args.epochs, args.lr, args.batch_size, args.random_init, data=args.set)
    print(json.dumps(result, indent=2) if args.json else probe_line(result))


def cmd_translate_eval(args: argparse.Namespace) -> None:
    """FID, KID (and the error to the truth on the built-in pair) of a translation run's last checkpoint."""
    from vitlab.eval.translation import evaluate_run, metrics_lines

    results = evaluate_run(args.run_dir, args.features, args.inception_weights, args.batch_size)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{results['checkpoint']} (step {results['step']}; {TRANSLATION_HEADER}):")
    print("\n".join(f"  {line}" for line in metrics_lines(results["test"])))


def cmd_translate(args: argparse.Namespace) -> None:
    """Translate a folder of images with a trained generator."""
    from vitlab.eval.translation import translate_folder

    written = translate_folder(args.checkpoint, args.in_dir, args.out_dir, args.direction, args.batch_size)
    print(f"wrote {len(written)} image(s) to {args.out_dir}")


def cmd_shard(args: argparse.Namespace) -> None:
    """Write an image folder as WebDataset shards."""
    from vitlab.data.stream.shards import write_shards

    info = write_shards(args.folder, args.out_dir, args.max_count, args.max_size * 1e6, args.val_fraction, args.seed)
    for split, facts in info["splits"].items():
        print(f"{split}: {facts['samples']} images in {len(facts['shards'])} shard(s) {Path(args.out_dir) / facts['pattern']}")


def cmd_stability(args: argparse.Namespace) -> None:
    """Run a stability study (paper Fig. 1) and print which variants diverged."""
    from vitlab.config import StabilityConfig
    from vitlab.runs.kinds import load_experiment
    from vitlab.train.stability import run_study

    summary = run_study(load_experiment(args.config, args.set, cls=StabilityConfig), progress=not args.no_progress)
    for variant, facts in summary.items():
        state = "diverged" if facts["diverged"] else "stable"
        at = facts["first_step_over_threshold"] or facts["first_step_nonfinite"]
        acc = f"{100 * facts['final_acc1']:.2f} %" if facts["final_acc1"] is not None else "-"
        print(
            f"{variant:>24}: {state}{f' at step {at}' if at else ''}, max logit {facts['max_logit']:.4g}, "
            f"max |grad| {facts['max_abs_grad']:.4g}, test acc@1 {acc}"
        )


def cmd_stability_map(args: argparse.Namespace) -> None:
    """Train the unfinished cells of a stability map (or only merge them) and print the LR sensitivities."""
    from vitlab.config import MapConfig
    from vitlab.runs.kinds import load_experiment
    from vitlab.train.stability_map import parse_shard, run_map

    shard = parse_shard(args.shard)
    if args.workers < 1:
        raise VitlabError(f"--workers {args.workers} must be at least 1 (cells trained side by side on this machine)")
    config = load_experiment(args.config, args.set, cls=MapConfig)
    result = run_map(config, shard, args.report, not args.no_progress, args.workers)
    for s in result["summaries"]:
        print(
            f"{s['block']}/{s['size']}/{s['intervention']}: LR sensitivity {s['sensitivity']:.3f}, "
            f"best LR {', '.join(f'{lr:g}' for lr in s['best_lr'])}, best loss {s['best_loss']:.3f}, "
            f"{s['diverged']} of {s['cells']} cells diverged"
        )
    print(f"{len(result['cells'])} of {result['expected_cells']} cells finished; map.json, map.md and figures written")


RESUME_HELP = (
    "continue a run from its last checkpoint; `auto`: continue the config's run (out_dir/name) if it has a "
    "checkpoint, else start it (for preemptible jobs and torchrun --max-restarts) (default: start a new run)"
)


def cmd_export(args: argparse.Namespace) -> None:
    """Write a run's model for timm, Hugging Face transformers, ONNX or torch.export."""
    from vitlab.runs.export import export_run

    written = export_run(args.run, args.format, args.out, args.ema, args.force)
    print(f"wrote {', '.join(p.name for p in written)} to {args.out}")


def cmd_predict(args: argparse.Namespace) -> None:
    """Top-k classes of images under a run's model: a CSV and a labelled grid."""
    from vitlab.eval.predict import predict_run, skipped_note

    predictions, written = predict_run(args.run, args.images, args.top_k, args.out, args.ema, args.batch_size)
    for file, indices, probs in zip(predictions.files, predictions.indices.tolist(), predictions.probabilities.tolist()):
        print(f"{file}: " + ", ".join(f"{predictions.classes[i]} {100 * p:.1f} %" for i, p in zip(indices, probs)))
    if predictions.skipped:
        print(f"vitlab predict: {skipped_note(predictions.skipped)}", file=sys.stderr)
    print(f"wrote {' and '.join(map(str, written))}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except switches and options whose help says it (no value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or action.default == []:
            return action.help
        return super()._get_help_string(action)


def add_geometry_options(parser: argparse.ArgumentParser) -> None:
    """`--image-size`, `--num-classes` with the defaults that `params` and `plan` share."""
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="image side in pixels")
    parser.add_argument("--num-classes", type=int, default=DEFAULT_NUM_CLASSES, help="classes of the head")


def cmd_report(args: argparse.Namespace) -> None:
    """Draw Fig. 2 or Table 2 of the paper, or the ViT-against-ConvNets comparison, from finished runs."""
    from vitlab.report import compare, fig2, table2

    table, figure = {"fig2": fig2, "table2": table2, "compare": compare}[args.what](args.runs, args.out)
    print(table.read_text())
    print(f"wrote {table} and {figure}")


def cmd_sweep(args: argparse.Namespace) -> None:
    """Run configs one after another (or print their commands), then draw the paper's report."""
    from vitlab.sweep import run_sweep, sweep_commands

    if args.print:
        print("\n".join(sweep_commands(args.configs, args.set, args.nproc, args.out)))
        return
    result = run_sweep(args.configs, args.set, args.out, progress=not args.no_progress)
    for table, figure in result.reports.values():
        print(f"wrote {table} and {figure}")
    result.check()  # after the report of the runs that finished


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """`--json`: every number as JSON instead of the readable summary."""
    parser.add_argument("--json", action="store_true", help="print every number as JSON instead of a short summary")


def add_run_options(parser: argparse.ArgumentParser, what: str = "config") -> None:
    """`--set KEY=VALUE` (repeatable) and `--no-progress`, shared by every command that trains."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a {what} key")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from vitlab.config import STRATEGIES

    parser = argparse.ArgumentParser(prog="vitlab", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", formatter_class=HelpFormatter)

    params = command("params", "parameter counts of every preset (Table 1 of the paper)")
    add_geometry_options(params)
    params.add_argument("--patch-size", type=int, default=DEFAULT_PATCH_SIZE, help="patch side in pixels")
    params.set_defaults(func=cmd_params)

    plan = command("plan", "memory per device under DDP and FSDP, FLOPs per step, fewest devices (on paper)")
    plan.add_argument("preset", nargs="?", help="e.g. vit22b-22b/14; without it: the fewest devices for every preset")
    plan.add_argument("--devices", type=int, default=8, help="device count to show the memory for")
    plan.add_argument("--device-memory", type=float, default=80.0, metavar="GIB", help="memory per device in GiB")
    plan.add_argument("--batch", type=int, default=1024, help="global batch")
    add_geometry_options(plan)
    plan.add_argument("--patch-size", type=int, default=DEFAULT_PATCH_SIZE, help="patch of every preset when no preset is named")
    plan.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="compute precision")
    plan.add_argument("--num-registers", type=int, default=0, help="register tokens of the named preset (model.options)")
    plan.set_defaults(func=cmd_plan)

    consolidate = command("consolidate", "merge a sharded (FSDP) checkpoint into one safetensors file")
    consolidate.add_argument("checkpoint", help="run directory or checkpoint folder")
    consolidate.add_argument("--out", help="output file (default: CHECKPOINT/model.safetensors)")
    consolidate.set_defaults(func=cmd_consolidate)

    train = command("train", "train a classifier (no arguments: the default run on built-in data)")
    train.add_argument("config", nargs="?", help="YAML config (see configs/); default: the built-in default run")
    add_run_options(train)
    train.add_argument("--resume", metavar="RUN_DIR|auto", help=RESUME_HELP)
    train.add_argument("--strategy", choices=STRATEGIES, help="train.strategy: one process, DDP or FSDP2 (default: the config's)")
    train.set_defaults(func=cmd_train)

    finetune = command("finetune", "fine-tune pretrained weights (a config with a finetune section)")
    finetune.add_argument("config", help="YAML config with a finetune section (finetune.checkpoint: PATH)")
    add_run_options(finetune)
    finetune.set_defaults(func=cmd_finetune, resume=None)

    inspect = command("inspect", "attention maps, rollout, attention distances and embedding PNGs of a run")
    inspect.add_argument("checkpoint", help="run directory or checkpoint folder")
    inspect.add_argument("--image", nargs="+", metavar="PATH", help="images to look at (default: the run's test images)")
    inspect.add_argument("--num-images", type=int, default=4, help="test images to use without --image")
    inspect.add_argument(
        "--query",
        type=lambda text: int(text) if text.isdigit() else text,
        help="cls, mean or a patch index (default: cls, or mean for a model with pool=gap)",
    )
    inspect.add_argument("--out", help="output folder (default: CHECKPOINT/inspect)")
    inspect.add_argument("--ema", action="store_true", help="inspect the EMA weights")
    inspect.set_defaults(func=cmd_inspect)

    cka = command("cka", "layer × layer linear CKA of two runs on the same test images (heat map, JSON, TensorBoard)")
    cka.add_argument("run_a", help="run directory or checkpoint folder (its test images are used)")
    cka.add_argument("run_b", help="run directory or checkpoint folder (the same run: its self-similarity)")
    cka.add_argument("--num-images", type=int, default=512, help="test images (in minibatches; Nguyen et al. 2021)")
    cka.add_argument("--batch-size", type=int, default=64, help="images per minibatch (at least 4)")
    cka.add_argument("--out", help="output folder (default: RUN_A/cka-<RUN_B's name>)")
    cka.add_argument("--ema", action="store_true", help="compare the EMA weights")
    cka.set_defaults(func=cmd_cka)

    stability = command("stability", "train variants side by side and draw Fig. 1 (logits, gradients)")
    stability.add_argument("config", help="stability study YAML (see configs/stability/)")
    add_run_options(stability, "study")
    stability.set_defaults(func=cmd_stability)

    stability_map = command("stability-map", "learning-rate sensitivity per block, size and intervention (a run per cell)")
    stability_map.add_argument("config", help="stability map YAML (see configs/stability/map-cpu.yaml)")
    add_run_options(stability_map, "map")
    stability_map.add_argument("--shard", default="0/1", metavar="I/N", help="run only every N-th cell, from the I-th")
    stability_map.add_argument(
        "--workers", type=int, default=1, metavar="K", help="train K cells side by side (CPU threads divided, or a GPU each)"
    )
    stability_map.add_argument("--report", action="store_true", help="train nothing: merge finished cells and draw")
    stability_map.set_defaults(func=cmd_stability_map)

    evaluate = command("eval", "evaluate a checkpoint on test data")
    evaluate.add_argument("checkpoint", help="run directory or checkpoint folder")
    evaluate.add_argument("--data", help="dataset name (builtin, cifar10, cifar100, folder, wds); default: the run's")
    evaluate.add_argument("--data-root", help="dataset location; default: the run's")
    evaluate.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    evaluate.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    add_json_option(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    predict = command("predict", "top-k classes of image files under a run's model: a CSV and a labelled grid PNG")
    predict.add_argument("run", help="run directory or checkpoint folder")
    predict.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDER", help="image files and/or folders of images")
    predict.add_argument("--top-k", type=int, default=5, help="classes listed per image")
    predict.add_argument("--out", help="output folder (default: RUN/predictions)")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    predict.add_argument("--ema", action="store_true", help="predict with the EMA weights")
    predict.set_defaults(func=cmd_predict)

    export = command("export", "write a run's model for timm, Hugging Face, ONNX or torch.export, with a model card")
    export.add_argument("run", help="run directory or checkpoint folder")
    export.add_argument("out", help="output folder: new or empty, outside the run (see --force)")
    export.add_argument(
        "--format",
        required=True,
        choices=("timm", "hf", "onnx", "torch-export"),
        help="timm: model.safetensors + create_model.json; hf: a ViTForImageClassification folder; "
        "onnx: model.onnx; torch-export: model.pt2 (an ExportedProgram); the last two with a dynamic batch size",
    )
    export.add_argument("--ema", action="store_true", help="export the EMA weights")
    export.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export in OUT, or write a new folder inside "
        "a run directory (never over a run's own files or into its checkpoints/)",
    )
    export.set_defaults(func=cmd_export)

    pretrain = command("pretrain", "self-supervised pretraining: MAE or masked patch prediction (pretrain.method)")
    pretrain.add_argument("config", nargs="?", help="YAML config (see configs/pretrain/); default: MAE on built-in data")
    add_run_options(pretrain)
    pretrain.add_argument("--resume", metavar="RUN_DIR|auto", help=RESUME_HELP)
    pretrain.set_defaults(func=cmd_pretrain)

    probe = command("probe", "linear probe of a pretraining run's frozen features (BatchNorm + linear)")
    probe.add_argument("run", help="pretraining run directory or checkpoint folder")
    probe.add_argument("--num-train", type=int, help="labelled training images (default: the run's data.num_train)")
    probe.add_argument("--epochs", type=int, default=90, help="epochs of the linear layer (MAE's)")
    probe.add_argument("--lr", type=float, default=0.1, help="learning rate of the linear layer")
    probe.add_argument("--batch-size", type=int, default=256, help="images per step")
    probe.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="data.KEY=VALUE",
        help="probe on other labelled data than the run's, e.g. --set data.name=cifar10 --set data.root=data",
    )
    probe.add_argument("--random-init", action="store_true", help="probe the same encoder untrained (the baseline)")
    add_json_option(probe)
    probe.set_defaults(func=cmd_probe)

    translate_train = command("translate-train", "train a CycleGAN: ViTUnet or the ResNet generator (paper §4)")
    translate_train.add_argument("config", nargs="?", help="YAML config, e.g. configs/translate-builtin.yaml")
    add_run_options(translate_train)
    translate_train.add_argument("--resume", metavar="RUN_DIR|auto", help=RESUME_HELP)
    translate_train.set_defaults(func=cmd_translate_train)

    shard = command("shard", "write FOLDER/{train,val,test}/<class>/ images as WebDataset .tar shards")
    shard.add_argument("folder", help="dataset root holding train/<class>/ and val/ or test/")
    shard.add_argument("out_dir", help="where the shards and info.json go")
    shard.add_argument("--max-count", type=int, default=10_000, help="images per shard at most")
    shard.add_argument("--max-size", type=float, default=1000, metavar="MB", help="shard size at most")
    shard.add_argument("--val-fraction", type=float, default=0.0, help="also write a minival split held out of train")
    shard.add_argument("--seed", type=int, default=0, help="seed of the minival draw")
    shard.set_defaults(func=cmd_shard)

    translate_eval = command("translate-eval", "FID/KID (and L1/PSNR to the truth) of a translation run")
    translate_eval.add_argument("run_dir", help="run directory or checkpoint folder")
    translate_eval.add_argument(
        "--features",
        help="auto, inception, inception-2048, inception-64, randconv, FILE.pt2 (torch.export) "
        "or module:callable (default: the run's eval.features)",
    )
    translate_eval.add_argument("--inception-weights", help="torch-fidelity's Inception weights file (default: none)")
    translate_eval.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    add_json_option(translate_eval)
    translate_eval.set_defaults(func=cmd_translate_eval)

    report = command("report", "the paper's Fig. 2 or Table 2, or ViT against ConvNets (markdown + PNG) from finished runs")
    report.add_argument(
        "what",
        choices=("fig2", "table2", "compare"),
        help="fig2: classification runs; table2: translation runs; compare: accuracy against training FLOPs and CKA maps",
    )
    report.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    report.add_argument("--out", default="report", help="output folder")
    report.set_defaults(func=cmd_report)

    sweep = command(
        "sweep", "train configs one after another (run again: finished skipped, others resumed), then Fig. 2 / Table 2"
    )
    sweep.add_argument("configs", nargs="+", metavar="CONFIG", help="classification, translation and/or pretraining configs")
    add_run_options(sweep)
    sweep.add_argument("--print", action="store_true", help="print the torchrun / vitlab commands instead of running")
    sweep.add_argument("--nproc", type=int, default=1, help="processes per torchrun command with --print")
    sweep.add_argument("--out", default="report", help="report folder")
    sweep.set_defaults(func=cmd_sweep)

    translate = command("translate", "translate a folder of images with a trained generator")
    translate.add_argument("checkpoint", help="run directory or checkpoint folder")
    translate.add_argument("in_dir", help="folder of .png/.jpg/.jpeg images")
    translate.add_argument("out_dir", help="where the translated PNGs go (same names)")
    translate.add_argument("--direction", default="AtoB", choices=("AtoB", "BtoA"), help="which generator translates")
    translate.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    translate.set_defaults(func=cmd_translate)
    return parser


_DISK_FIXES = {  # errors of the disk, not of vitlab: each names its fix
    errno.EACCES: "fix its permissions, or write elsewhere (--set out_dir=...)",
    errno.EPERM: "fix its permissions, or write elsewhere (--set out_dir=...)",
    errno.EROFS: "the file system is read-only; choose another folder (--set out_dir=...)",
    errno.ENOSPC: "the disk is full; free space or choose another folder (--set out_dir=...)",
    errno.EDQUOT: "the disk quota is used up; free space or choose another folder (--set out_dir=...)",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vitlab` console script."""
    args = build_parser().parse_args(argv)
    from vitlab.train.scaffold import RunInterrupted

    try:
        args.func(args)
    except RunInterrupted as exc:
        print(f"vitlab {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except VitlabError as exc:
        print(f"vitlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        fix = _DISK_FIXES.get(exc.errno)
        if exc.filename is None or fix is None:
            raise  # not a full disk or a forbidden path: a bug to see whole
        print(f"vitlab {args.command}: error: {exc.filename}: {exc.strerror}; {fix}", file=sys.stderr)
        return 2
    return 0


def run() -> int:
    """The `vitlab` console script: `main`, ending quietly when the reader of its output goes away (`| head`)."""
    keep_freed_memory()
    try:
        status = main()
        sys.stdout.flush()  # inside the try: a closed pipe fails here, not at interpreter exit
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        return 128 + 13  # as a program killed by SIGPIPE, like `cat` or `yes` in a pipe


if __name__ == "__main__":
    sys.exit(run())
