"""The kinds of run vitlab makes, in one registry: each one's config class, the command that makes it, what
it is for, and the checks of its config that need the models or the data sources.

`vitlab.config` holds the schemas and checks what a schema alone can tell; what needs a model built (on the
meta device, instant even for 22B) or the data sources asked is checked here, still at load time and before
any run directory exists: `load_experiment` is `load_config` plus these checks, and every loop repeats them
on entry for configs built in code.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vitlab.config import (
    DataConfig,
    Experiment,
    GeneratorConfig,
    MapConfig,
    ModelConfig,
    PairDataConfig,
    PretrainConfig,
    RunConfig,
    StabilityConfig,
    TranslateConfig,
    config_kind,
    load_config,
)
from vitlab.data.builtin import difficulty_knobs
from vitlab.data.sources import streams
from vitlab.errors import VitlabError, brief
from vitlab.models.gan import ResnetGenerator
from vitlab.models.presets import create_model, is_convnet, model_options, preset_config
from vitlab.models.unet import create_unet, unet_options


def check_buildable(section: str, build: Callable[[], object]) -> None:
    """Build a model on the meta device (instant, even for 22B): a bad option fails at load, not mid-study."""
    import torch

    try:
        with torch.device("meta"):
            build()
    except VitlabError as exc:
        raise VitlabError(f"{section}.options: {exc}") from None
    except (TypeError, ValueError, RuntimeError) as exc:
        raise VitlabError(f"{section}.options do not build a model: {brief(str(exc))}") from None


def check_model(model: ModelConfig, image_size: int) -> None:
    """The preset exists, its options are its keywords, and it builds at `image_size`."""
    preset_config(model.name)
    allowed = model_options(model.name)
    unknown = sorted(set(model.options) - set(allowed) - {"img_size", "num_classes"})
    if unknown:
        raise VitlabError(f"model.options: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    check_buildable("model", lambda: create_model(model.name, img_size=image_size, **model.options))


def check_data(data: DataConfig | PairDataConfig) -> None:
    """The built-in set's difficulty knobs are known ones."""
    difficulty_knobs(data.builtin)


def check_generator(generator: GeneratorConfig, crop_size: int) -> None:
    """The generator's options are its keywords, and a ViTUnet builds at `crop_size`."""
    if generator.name == "resnet":
        allowed = list(inspect.signature(ResnetGenerator).parameters)
    else:
        preset_config(generator.name)
        allowed = [k for k in unet_options(generator.name) if k != "img_size"]
    unknown = sorted(set(generator.options) - set(allowed))
    if unknown:
        raise VitlabError(f"generator.options: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    if generator.name != "resnet":
        check_buildable("generator", lambda: create_unet(generator.name, img_size=crop_size, **generator.options))


def check_classification(config: RunConfig) -> None:
    check_data(config.data)
    fixes = {"crop_padding": 0, "vflip": "auto"}  # in-memory augmentations set by the user, and what fits a stream
    clashing = {key: fix for key, fix in fixes.items() if getattr(config.augment, key) not in (fix, False)}
    if streams(config.data) and clashing:
        raise VitlabError(
            f"{' and '.join(f'augment.{k}={str(getattr(config.augment, k)).lower()}' for k in clashing)} "
            f"{'is' if len(clashing) == 1 else 'are'} for in-memory data: streamed images get Inception crops "
            "(data.crop_scale) and horizontal flips in the workers; set "
            + " ".join(f"--set augment.{k}={fix}" for k, fix in clashing.items())
        )
    check_model(config.model, config.data.image_size)
    if config.model.name.strip().lower().startswith("bit-") and (config.train.strategy == "fsdp" or config.optim.layer_decay):
        raise VitlabError(
            f"model.name={config.model.name}: FSDP and optim.layer_decay work on a ViT's blocks, which a ResNet has not; "
            "use train.strategy=ddp (or single) and unset optim.layer_decay"
        )
    if config.finetune is not None and not config.finetune.keep_head and config.model.name.startswith("ai602-"):
        raise VitlabError(
            f"model.name={config.model.name}: the paper code's models have no replaceable head to fine-tune; "
            "fine-tune a vit-… or vit22b-… preset, or set finetune.keep_head: true"
        )


def check_pretraining(config: PretrainConfig) -> None:
    check_data(config.data)
    if is_convnet(config.model.name):
        raise VitlabError(
            f"model.name={config.model.name}: MAE and MPP mask patches of pixels, which a ResNet or hybrid has not; "
            "pretrain a vit-… or vit22b-… preset"
        )
    check_model(config.model, config.data.image_size)
    patch = {**preset_config(config.model.name), **config.model.options}["patch_size"]
    grid = config.data.image_size // patch
    config.pretrain.check_patches(grid**2, f"data.image_size={config.data.image_size} in patches of {patch}: {grid}x{grid}")


def check_translation(config: TranslateConfig) -> None:
    check_data(config.data)
    check_generator(config.generator, config.data.crop_size)


def check_study(config: StabilityConfig) -> None:
    for variant in config.variants:
        try:
            check_classification(config.variant_config(variant))
        except VitlabError as exc:
            raise VitlabError(f"variants.{variant}: {exc}") from exc


def check_map(config: MapConfig) -> None:
    for block, size, intervention in itertools.product(config.blocks, config.sizes, config.interventions):
        cell = config.cell_config(block, size, intervention, config.lrs[0], config.seeds[0])  # names itself on error
        try:
            check_classification(cell)
        except VitlabError as exc:
            raise VitlabError(f"cell {block}/{size}/{intervention}: {exc}") from exc


@dataclass(frozen=True)
class RunKind:
    """One kind of run: what it is for, and its config's checks beyond the schema (the command is its config's KIND)."""

    uses: str  # named where a run of another kind was given
    check: Callable


KINDS: Mapping[type, RunKind] = {
    RunConfig: RunKind("`vitlab eval`, `predict`, `inspect`, `export` or `report fig2`", check_classification),
    PretrainConfig: RunKind("`vitlab probe` or finetune.checkpoint", check_pretraining),
    TranslateConfig: RunKind("`vitlab translate`, `translate-eval` or `report table2`", check_translation),
    StabilityConfig: RunKind("its own Fig. 1; each variant folder is a `vitlab train` run", check_study),
    MapConfig: RunKind("its own map.json and figures; each cell folder is a `vitlab train` run", check_map),
}


def run_command(config: dict) -> str:
    """The command that made a run, from the config saved with it (or a YAML file's sections)."""
    return config_kind(config).KIND


def check_experiment(config: Experiment) -> Experiment:
    """Run the checks of `config`'s kind that need models or data sources; returns the config."""
    KINDS[type(config)].check(config)
    return config


def load_experiment(path: str | Path | None, overrides: list[str] = (), cls: type = RunConfig) -> Experiment:
    """`load_config` and the checks of its kind: everything a run will refuse, refused before it starts."""
    return check_experiment(load_config(path, overrides, cls))
