"""Export a stored run: its model, class names, preprocessing and a model card, into a folder that is neither the run
nor its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from vitlab import __version__
from vitlab.errors import VitlabError
from vitlab.models.export import export_model
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.checkpoint import LATEST, LOCK_FILE
from vitlab.runs.trained import TrainedRun, load_trained_run

LIBRARIES = {"timm": "timm", "hf": "transformers", "onnx": "onnx", "torch-export": "pytorch"}  # the Hub's library_name
SCORES = {"acc1": "acc@1", "acc5": "acc@5", "auroc": "AUROC"}  # results.json's names as read
BLOCKS = {
    "serial": "the classic ViT: serial pre-LN blocks, attention then MLP",
    "parallel": "ViT-22B-style: parallel blocks, attention and MLP from one LayerNorm, fused projections",
}


def _enclosing_run(path: Path) -> Path | None:
    """The vitlab run directory that is or holds `path` (it has checkpoints/latest, or config.yaml and a run lock)."""
    for folder in (path, *path.parents):
        if (folder / "checkpoints" / LATEST).is_file() or ((folder / "config.yaml").is_file() and (folder / LOCK_FILE).is_file()):
            return folder
    return None


def export_run(run: str | Path, fmt: str, out: str | Path, ema: bool = False, force: bool = False) -> list[Path]:
    """Export the model of a run's last checkpoint (or of a checkpoint folder), with its class names and preprocessing.

    A folder inside a run directory is refused unless `force`, and inside its checkpoints/ always; what `force`
    may then replace is an earlier export only (`export_target`), never a file of the run.
    """
    target = Path(out).resolve()
    inside = _enclosing_run(target)
    if inside is not None and target.is_relative_to(inside / "checkpoints"):
        raise VitlabError(
            f"{out} is inside the checkpoints of the run {inside}; vitlab export never writes there: give a folder outside them"
        )
    if inside is not None and not force:
        raise VitlabError(
            f"{out} is inside the run {inside}; give a folder outside it, or add --force to write a new "
            "folder there (a run's own files are never replaced)"
        )
    trained = load_trained_run(run, ema)
    card = model_card(trained, fmt, ema)
    return export_model(trained.model, fmt, out, trained.preprocessing, trained.classes, force, card)


def _results(checkpoint: Path, step: int) -> dict | None:
    """The run's results.json where it measured this checkpoint (the run's last step), else None."""
    try:
        results = json.loads((checkpoint.parent.parent / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("steps") == step else None


def model_card(trained: TrainedRun, fmt: str, ema: bool) -> str:
    """README.md of an export: the architecture, data, recipe, test accuracy (results.json) and preprocessing."""
    config, model, p = trained.config, trained.model, trained.preprocessing
    step = ckpt.read_meta(trained.checkpoint).get("step")
    data, tc, oc, c = config.data, config.train, config.optim, model.config
    shown = ", ".join(trained.classes[:10]) + (", ..." if len(trained.classes) > 10 else "")
    results = _results(trained.checkpoint, step)
    if results is None:
        accuracy = f"Not measured for this checkpoint: the run's results.json is missing or of another step than {step}."
    else:
        test = results.get("test", {})
        scores = ", ".join(
            f"{SCORES.get(k, k)} {100 * v:.2f} %" if k.startswith("acc") else f"{SCORES.get(k, k)} {v:.4g}"
            for k, v in test.items()
        )
        accuracy = (
            f"On the run's test set, from its results.json (step {step}{', the EMA weights' if tc.ema_decay else ''}): {scores}."
        )
        if ema != bool(tc.ema_decay):
            accuracy += f" This export holds the {'EMA' if ema else 'raw'} weights, not those measured."
    resize = (
        f"the centre square of {p.crop_fraction:g} of the shorter side"
        if p.crop_fraction is not None
        else "the whole image, squashed to a square"
    )
    mean, std = p.per_channel(c["in_chans"])
    return "\n".join(
        [
            "---",
            f"library_name: {LIBRARIES[fmt]}",
            "pipeline_tag: image-classification",
            "tags: [vitlab, vision-transformer]",
            "---",
            "",
            f"# {config.name}: {config.model.name}",
            "",
            f"Exported by vitlab {__version__} (`vitlab export --format {fmt}`{' --ema' if ema else ''}) from the "
            f"checkpoint of step {step} of the run `{config.name}`.",
            "",
            "## Architecture",
            "",
            f"{BLOCKS[c['block']]}; {sum(t.numel() for t in model.parameters()):,} parameters.",
            "",
            *(f"- {key}: {value}" for key, value in c.items() if key not in ("attn_impl", "grad_checkpointing")),
            "",
            "## Data",
            "",
            f"`{data.name}`{f' from `{data.root}`' if data.root else ''}, {len(trained.classes)} classes ({shown}), "
            f"{data.image_size}-pixel images.",
            "",
            "## Recipe",
            "",
            f"{tc.epochs:g} epochs of batch {tc.batch_size}, {oc.name} at learning rate {oc.lr:g} ({oc.schedule} schedule, "
            f"weight decay {oc.weight_decay:g}), precision {(results or {}).get('precision', tc.precision)}"
            f"{f', fine-tuned from `{config.finetune.checkpoint}`' if config.finetune else ''}. The run's config:",
            "",
            "```yaml",
            yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip(),
            "```",
            "",
            "## Accuracy",
            "",
            accuracy,
            "",
            "## Preprocessing",
            "",
            f"RGB; {resize}, resized to {c['img_size']}x{c['img_size']} ({p.interpolation}); pixels / 255, then "
            f"(x - mean) / std with mean {mean} and std {std}.",
            "",
        ]
    )
