"""Export a stored run: its model, class names and preprocessing, into a folder that is neither the run nor its checkpoints."""

from __future__ import annotations

from pathlib import Path

from vitlab.data.classes import class_names
from vitlab.data.sources import streams
from vitlab.errors import VitlabError
from vitlab.models.export import export_model, run_preprocessing
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.checkpoint import LATEST, LOCK_FILE
from vitlab.runs.stored import load_checkpoint_model


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
    model, config = load_checkpoint_model(run, ema)
    saved = ckpt.read_meta(ckpt.find_checkpoint(run)).get("classes")
    classes = class_names(config.data, model.num_classes, saved)
    return export_model(model, fmt, out, run_preprocessing(config.data, streams(config.data)), classes, force)
