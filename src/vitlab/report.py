"""The paper's figures and tables drawn from finished runs: Fig. 2 (`fig2`) and Table 2 (`table2`); and `compare`, the
ViT lecture's ViT against ConvNets (accuracy against training FLOPs, CKA maps)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from vitlab.errors import VitlabError
from vitlab.eval.figures import output_folder
from vitlab.figures import new_figure, save_figure
from vitlab.inspection.cka import compare_runs, plot_heat_maps
from vitlab.models.presets import SIZES, forward_flops, is_convnet, parse_name
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.checkpoint import write_text_atomic
from vitlab.runs.stored import check_made_by
from vitlab.train.run_log import read_csv

FAMILY_TITLES = {"vit": "ViT", "ai602-vit": "ViT", "vit22b": "ViT-22B", "ai602-vit22b": "ViT-22B"}
BEST_NOTE = {
    "val_acc1": "best epoch chosen on the minival held out of train (data.val_fraction); its test accuracy shown",
    "test": "best epoch chosen on the test set itself (the run held out no minival: set data.val_fraction)",
}


def read_mapping(path: Path, parse: Callable[[str], object], fix: str) -> dict:
    """A run's YAML or JSON file as a mapping; one line naming the file and `fix` when it is torn or not the run's."""
    try:
        value = parse(path.read_text())
    except (ValueError, yaml.YAMLError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        value = None
    if not isinstance(value, dict):
        raise VitlabError(f"{path} is torn or is not a run's {path.suffix[1:].upper()} file; {fix}")
    return value


def read_run(run_dir: str | Path, needed: str) -> tuple[Path, dict, dict]:
    """A finished run of `vitlab needed`: its directory, config and results; an error that names what is wrong otherwise."""
    run_dir = Path(run_dir)
    missing = [name for name in ("config.yaml", "results.json") if not (run_dir / name).is_file()]
    if missing:
        raise VitlabError(f"{run_dir} is not a finished run (no {' or '.join(missing)}); give run directories")
    config = read_mapping(run_dir / "config.yaml", yaml.safe_load, f"restore it from a copy of the run, or leave {run_dir} out")
    check_made_by(run_dir, config, needed)
    results = read_mapping(
        run_dir / "results.json",
        json.loads,
        f"delete it and resume the run to write it again: `vitlab {needed} --resume {run_dir}`",
    )
    return run_dir, config, results


def read_runs(run_dirs: list[str | Path], needed: str) -> list[tuple[Path, dict, dict]]:
    """`read_run` of each run, refusing a run named twice (it would be drawn twice)."""
    resolved = [Path(path).resolve() for path in run_dirs]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise VitlabError(f"{run_dirs[i]} is given twice (also as {run_dirs[resolved.index(path)]}); name each run once")
    return [read_run(path, needed) for path in run_dirs]


def read_epochs(path: Path) -> dict[str, list[float]]:
    """A classification run's epochs.csv as columns ({} without one); one line naming it when it is corrupt."""
    if not path.is_file():
        return {}
    try:
        epochs = read_csv(path)
    except (ValueError, TypeError, csv.Error):  # a cell that is no number, a torn row, bytes that are no text
        epochs = None
    if epochs is None or (epochs and not {"epoch", "test_acc1"} <= epochs.keys()):
        raise VitlabError(
            f"{path} is corrupt (not the epoch, test_acc1, … columns of numbers vitlab writes); "
            "restore it from a copy of the run, or delete it to report the final accuracy only"
        )
    return epochs


def fig2_rows(run_dirs: list[str | Path]) -> list[dict]:
    """One row per classification run: dataset, model, family, size, final and best test acc@1."""
    rows = []
    for run_dir, config, results in read_runs(run_dirs, "train"):
        if is_convnet(config["model"]["name"]):
            raise VitlabError(f"{run_dir} trained {config['model']['name']}, not a ViT; draw it with `vitlab report compare`")
        family, size, _ = parse_name(config["model"]["name"])
        epochs = read_epochs(run_dir / "epochs.csv")
        accs = epochs.get("test_acc1", [])
        chooser = epochs.get("val_acc1", accs)  # the minival (data.val_fraction) where the run held one out
        scores = [(a, i) for i, a in enumerate(chooser) if math.isfinite(a)]
        best = max(scores)[1] if scores else None
        rows.append(
            dict(
                dataset=config["data"]["name"],
                model=config["model"]["name"],
                family=FAMILY_TITLES.get(family, family),
                size=size,
                final=results["test"]["acc1"],
                best=accs[best] if scores else None,
                best_epoch=epochs["epoch"][best] if scores else None,
                chosen_on="val_acc1" if "val_acc1" in epochs else "test",
                run=str(run_dir),
            )
        )
    order = list(SIZES)
    return sorted(rows, key=lambda r: (r["dataset"], order.index(r["size"]), r["family"], r["model"]))


def percent(value: float | None) -> str:
    """An accuracy in [0, 1] as a percentage with two decimals, or a dash."""
    return "–" if value is None else f"{100 * value:.2f} %"


def fig2(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """Fig. 2: test accuracy per dataset and size, ViT beside ViT-22B, final and best; writes fig2.md and fig2.png."""
    rows = fig2_rows(run_dirs)
    out_dir = output_folder(out_dir)
    lines = ["| dataset | size | family | model | final acc@1 | best acc@1 (epoch) |", "|---|---|---|---|---:|---:|"]
    for r in rows:
        best = f"{percent(r['best'])} ({r['best_epoch']:g})" if r["best"] is not None else "–"
        lines.append(f"| {r['dataset']} | {r['size']} | {r['family']} | `{r['model']}` | {percent(r['final'])} | {best} |")
    table = out_dir / "fig2.md"
    notes = "\n".join(f"Best: {BEST_NOTE[chosen]}." for chosen in sorted({r["chosen_on"] for r in rows}))
    write_text_atomic(table, "\n".join(lines) + f"\n\n{notes}\n")

    datasets = sorted({r["dataset"] for r in rows})
    fig = new_figure(6 * len(datasets), 4)
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        sizes = [s for s in SIZES if any(r["size"] == s for r in mine)]
        for offset, family in ((-0.2, "ViT"), (0.2, "ViT-22B")):
            found = {r["size"]: r for r in mine if r["family"] == family}
            present = [s for s in sizes if s in found]
            xs = [sizes.index(s) + offset for s in present]
            ax.bar(xs, [100 * found[s]["final"] for s in present], width=0.4, label=f"{family} final")
            best = [(x, 100 * found[s]["best"]) for x, s in zip(xs, present) if found[s]["best"] is not None]
            if best:
                ax.scatter(*zip(*best), marker="_", s=300, color="black", label="best epoch" if offset < 0 else None)
        ax.set(title=dataset, xticks=range(len(sizes)), xticklabels=sizes, ylabel="test acc@1 (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 2 from runs (bars: final weights; marks: the best epoch, see fig2.md)", fontsize=9)
    figure = save_figure(fig, out_dir / "fig2.png")
    return table, figure


def table2_row(run_dir: Path, config: dict, results: dict) -> dict:
    """One translation run as a Table 2 row: FID per domain column (real images vs translations into them)."""
    test = results["test"]
    names = config.get("eval", {}).get("domain_names", ["A", "B"])
    if "paper-table2" in test:
        scores = test["paper-table2"]
        columns, features = {n: scores[n] for n in (*names, "Average")}, f"{scores['features']}, paper-table2"
    else:  # vitlab's protocol: the BtoA row holds real A against translations into A
        keys = [k for k in test["AtoB"] if k.startswith("fid_")]
        if not keys:
            raise VitlabError(f"{run_dir} has no FID; evaluate it with `vitlab translate-eval` first")
        a, b = test["BtoA"][keys[0]], test["AtoB"][keys[0]]
        columns, features = {names[0]: a, names[1]: b, "Average": (a + b) / 2}, keys[0].removeprefix("fid_")
    dataset = Path(config["data"].get("root") or config["data"]["name"]).name
    return dict(
        dataset=dataset,
        generator=config["generator"]["name"],
        params=results.get("generator_parameters"),
        columns=columns,
        features=features,
        samples=run_dir / "samples.png",
    )


def table2(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """Table 2 (FID per domain and average) as table2.md, and table2.png with each run's sample grid (Fig. 4/5)."""
    rows = [table2_row(*run) for run in read_runs(run_dirs, "translate-train")]
    out_dir = output_folder(out_dir)
    lines = ["| dataset | generator | # params | FID per column (lower is better) | features |", "|---|---|---:|---|---|"]
    for r in rows:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in r["columns"].items())
        params = f"{r['params'] / 1e6:.1f} M" if r["params"] else "–"
        lines.append(f"| {r['dataset']} | `{r['generator']}` | {params} | {scores} | {r['features']} |")
    table = out_dir / "table2.md"
    note = "Each column compares a domain's real test images with translations into it."
    write_text_atomic(table, "\n".join(lines) + f"\n\n{note}\n")
    fig = new_figure(8, 4 * len(rows))
    axes = fig.subplots(len(rows), 1, squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        if r["samples"].is_file():
            with Image.open(r["samples"]) as image:
                ax.imshow(np.asarray(image.convert("RGB")))
        scores = ", ".join(f"{k} {v:.3g}" for k, v in r["columns"].items())
        ax.set_title(f"{r['dataset']} · {r['generator']} · FID {scores} ({r['features']})", fontsize=9)
        ax.axis("off")
    figure = save_figure(fig, out_dir / "table2.png")
    return table, figure


def model_kind(name: str) -> str:
    """ViT, ViT-22B, ResNet or hybrid (with its block family), from a preset name."""
    lowered = name.strip().lower()
    if lowered.startswith("bit-"):
        return "ResNet"
    if is_convnet(lowered):
        return "hybrid (ViT-22B blocks)" if "-vit22b-" in lowered else "hybrid"
    family = parse_name(name)[0]
    return FAMILY_TITLES.get(family, family)


def compare_rows(run_dirs: list[str | Path]) -> list[dict]:
    """One row per classification run: its model, parameters, FLOPs and test acc@1, and acc@1 against training FLOPs.

    Training FLOPs are 3 × the forward FLOPs of an image (`forward_flops`; the backward twice the forward) × the images
    trained on (steps × train.batch_size), at each evaluation and at the end.
    """
    rows = []
    for run_dir, config, results in read_runs(run_dirs, "train"):
        model, batch = config["model"], config["train"]["batch_size"]
        classes = ckpt.read_meta(ckpt.find_checkpoint(run_dir))["num_classes"]
        flops = forward_flops(model["name"], config["data"]["image_size"], num_classes=classes, **model["options"])
        epochs = read_epochs(run_dir / "epochs.csv")
        curve = [
            (3 * flops * step * batch, acc)
            for step, acc in zip(epochs.get("step", []), epochs.get("test_acc1", []))
            if math.isfinite(acc)
        ]
        rows.append(
            dict(
                name=run_dir.name,
                model=model["name"],
                kind=model_kind(model["name"]),
                params=results["num_parameters"],
                forward_flops=flops,
                train_flops=3 * flops * results["steps"] * batch,
                acc1=results["test"]["acc1"],
                train_seconds=results["train_seconds_this_session"],
                curve=curve,
                run=str(run_dir),
            )
        )
    return rows


def compare(run_dirs: list[str | Path], out_dir: str | Path, cka_images: int = 512) -> tuple[Path, Path]:
    """ViT against ConvNets: compare.md, compare.png (test acc@1 against training FLOPs, the ViT paper's Fig. 5 at
    small scale) and linear CKA (Raghu et al. 2021) of the first ViT run against every run and of every run with itself,
    in cka/ (one heat map and JSON per pair) and cka-maps.png."""
    rows = compare_rows(run_dirs)
    out_dir = output_folder(out_dir)
    lines = [
        "| run | model | kind | parameters | forward MFLOPs / image | training FLOPs | test acc@1 | train time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | `{r['model']}` | {r['kind']} | {r['params']:,} | {r['forward_flops'] / 1e6:.1f} | "
            f"{r['train_flops']:.3g} | {percent(r['acc1'])} | {r['train_seconds'] / 60:.1f} min |"
        )
    reference = next((r for r in rows if r["kind"] in ("ViT", "ViT-22B")), rows[0])
    pairs = [(reference, r) for r in rows] + [(r, r) for r in rows if r is not reference]
    similarities = []
    for a, b in pairs:
        result, _ = compare_runs(a["run"], b["run"], out_dir / "cka" / f"{a['name']}-{b['name']}", cka_images)
        result.names = (a["name"], b["name"])
        similarities.append(result)
    plot_heat_maps(similarities, out_dir / "cka-maps.png")
    cka_note = (
        f"CKA on {similarities[0].images} test images of {reference['name']}'s data: cka-maps.png, cka/A-B/cka.png and .json."
    )
    table = out_dir / "compare.md"
    write_text_atomic(table, "\n".join(lines) + f"\n\nTraining FLOPs: 3 × forward × images trained on. {cka_note}\n")

    fig = new_figure(6.5, 4.2)
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        if r["curve"]:
            ax.plot(*zip(*[(f, 100 * a) for f, a in r["curve"]]), marker=".", alpha=0.6, color=f"C{i}")
        ax.scatter([r["train_flops"]], [100 * r["acc1"]], s=50, color=f"C{i}", label=f"{r['name']} ({r['kind']})")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="test acc@1 (%)")
    ax.legend(fontsize=8)
    ax.set_title("Accuracy against training compute (each run's evaluations; dots: final)", fontsize=9)
    figure = save_figure(fig, out_dir / "compare.png", [ax])
    return table, figure
