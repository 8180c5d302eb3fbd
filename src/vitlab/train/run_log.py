"""What a run records: per-step and per-epoch metrics as CSV, TensorBoard (and Weights & Biases if asked), and curves as PNG."""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from vitlab.errors import VitlabError
from vitlab.figures import log_y, new_figure, plot_curve, save_figure


class CsvLog:
    """Append rows of scalars to a CSV file whose columns are fixed by the first row."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] | None = None
        if path.is_file():
            with path.open(newline="") as f:
                self.columns = next(csv.reader(f), None) or None

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (by a run killed after its last checkpoint) and torn rows.

        The file is rewritten through a temporary file and a rename: a kill during the rewrite leaves
        the old file whole.
        """
        if not self.path.is_file():
            return
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if row_step(r) is not None and row_step(r) <= step and None not in r and None not in r.values()]
        if not kept:  # nothing worth keeping (or an empty or torn header): start the file afresh
            self.path.unlink()
            self.columns = None
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


def row_step(row: dict) -> int | None:
    """The step of a CSV row, or None for a torn one."""
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return None


def flat_values(tree: Mapping, prefix: str = "") -> dict[str, bool | int | float | str | None]:
    """The leaves of nested dicts by dotted key (`optim.lr`); lists and tuples as text."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= flat_values(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value) if isinstance(value, (list, tuple)) else value
    return flat


def read_csv(path: Path) -> dict[str, list[float]]:
    """Columns of a metrics CSV as float lists (empty cells become NaN)."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    columns = rows[0].keys() if rows else []
    return {c: [float(r[c]) if r[c] not in ("", None) else float("nan") for r in rows] for c in columns}


class RunLog:
    """steps.csv, epochs.csv, TensorBoard events and (optionally) Weights & Biases for one run (main rank only).

    TensorBoard also gets the config: as text at the start, and as hparams beside the final numbers (`hparams`).
    """

    def __init__(
        self, run_dir: Path, resume_step: int | None = None, wandb_project: str | None = None, config: dict | None = None
    ):
        self.run_dir = run_dir
        self.steps = CsvLog(run_dir / "steps.csv")
        self.epochs = CsvLog(run_dir / "epochs.csv")
        if resume_step is not None:
            self.steps.truncate_after(resume_step)
            self.epochs.truncate_after(resume_step)
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        self.config = config
        if config is not None:  # indented: a code block in TensorBoard's markdown
            text = yaml.safe_dump(config, sort_keys=False)
            self.tensorboard.add_text("config", "\n".join(f"    {line}" for line in text.splitlines()), resume_step or 0)
        self.wandb = start_wandb(run_dir, wandb_project, config) if wandb_project else None

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Record `values` at `step` under `kind` ('steps' or 'epochs')."""
        getattr(self, kind).write({"step": step, **values})
        for key, value in values.items():
            self.tensorboard.add_scalar(f"{kind}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{key}": value for key, value in values.items()}, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """Show a PNG the run wrote (curves, a sample grid) in TensorBoard's Images tab too."""
        add_png(self.tensorboard, tag, path, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(str(path))}, step=step)

    def hparams(self, results: Mapping, step: int) -> None:
        """The config's keys as TensorBoard hparams, with the run's final numbers (`final/test.acc1`, …) to compare runs by."""
        if self.config is None:
            return
        config = {key: "None" if value is None else value for key, value in flat_values(self.config).items()}
        numbers = flat_values(results).items()
        final = {f"final/{k}": v for k, v in numbers if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.tensorboard.add_hparams(config, final, run_name=".", global_step=step)  # ".": into this run's own folder

    def close(self) -> None:
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def add_png(writer: SummaryWriter, tag: str, path: Path, step: int) -> None:
    """Add a PNG file to TensorBoard's Images tab."""
    with Image.open(path) as image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    writer.add_image(tag, pixels, step, dataformats="HWC")


def pngs_to_tensorboard(run_dir: Path, pngs: dict[str, Path], step: int) -> None:
    """Add PNGs made after the run (`vitlab inspect`'s attention maps, …) to the run's TensorBoard at `step`."""
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for tag, path in pngs.items():
            add_png(writer, tag, path, step)


def start_wandb(run_dir: Path, project: str, config: dict | None):
    """A Weights & Biases run for `run_dir`, resumed under the same id when the run is resumed (WANDB_MODE applies)."""
    try:
        import wandb
    except ImportError:
        raise VitlabError("log.wandb needs the wandb package: pip install wandb (or set log.wandb: false)") from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config)


def plot_curves(run_dir: Path) -> Path:
    """Draw training loss, learning rate and test accuracy against step into curves.png."""
    steps = read_csv(run_dir / "steps.csv")
    epochs = read_csv(run_dir / "epochs.csv") if (run_dir / "epochs.csv").is_file() else {}
    fig = new_figure(14, 3.8)
    axes = fig.subplots(1, 3)
    plot_curve(axes[0], steps["step"], steps["loss"], lw=0.8)
    axes[0].set(title="training loss", xlabel="step")
    log_y(axes[0])
    plot_curve(axes[1], steps["step"], steps["lr"], lw=0.8)
    axes[1].set(title="learning rate", xlabel="step")
    if epochs:
        axes[2].plot(epochs["step"], [100 * a for a in epochs["test_acc1"]], marker="o")
    axes[2].set(title="test accuracy (%)", xlabel="step")
    return save_figure(fig, run_dir / "curves.png", axes)


def plot_gan_curves(run_dir: Path) -> Path:
    """Draw CycleGAN's adversarial, cycle and identity losses, the LR and the error to the truth into curves.png."""
    steps = read_csv(run_dir / "steps.csv")
    epochs = read_csv(run_dir / "epochs.csv") if (run_dir / "epochs.csv").is_file() else {}
    panels = [
        ("adversarial losses", steps, ["gan_a", "gan_b", "d_a", "d_b"]),
        ("cycle and identity losses", steps, ["cycle_a", "cycle_b", "idt_a", "idt_b"]),
        ("learning rate", steps, ["lr"]),
        ("L1 to the truth", epochs, ["l1_ab", "l1_ba"]),
    ]
    fig = new_figure(4.6 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels))
    for ax, (title, table, columns) in zip(axes, panels):
        for column in columns:
            if column in table:
                plot_curve(ax, table["step"], table[column], lw=0.8, label=column)
        if len(columns) > 1 and ax.lines:
            ax.legend(fontsize=8)
        ax.set(title=title, xlabel="step")
    return save_figure(fig, run_dir / "curves.png", axes)
