"""Configs: YAML into dataclasses, with errors that name the key at load time."""

from pathlib import Path

import pytest
import yaml

from vitlab import VitlabError
from vitlab.config import PretrainConfig, RunConfig, StabilityConfig, TranslateConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_default_run():
    config = load_config()
    assert isinstance(config, RunConfig) and config.data.name == "builtin"


def test_yaml_and_overrides_are_applied(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.002\n  milestones: [0.5]\nmodel:\n  name: vit-s/4\n  options: {drop_path: 0.1}\n")
    config = load_config(path, ["train.epochs=3", "optim.betas=[0.9, 0.95]", "augment.vflip=true"])
    assert config.optim.lr == 0.002 and config.optim.milestones == (0.5,)
    assert config.train.epochs == 3 and config.optim.betas == (0.9, 0.95) and config.augment.vflip is True
    assert config.model.options == {"drop_path": 0.1}
    assert load_config(path).to_dict()["optim"]["milestones"] == [0.5]


@pytest.mark.parametrize(
    "text,overrides,words",
    [
        ("optim:\n  lrr: 0.1\n", [], ["optim.lrr", "lr"]),
        ("trian:\n  epochs: 1\n", [], ["trian", "train"]),
        ("", ["optim.schedule=linear"], ["optim.schedule", "'cosine'"]),
        ("", ["train.precision=fp16"], ["train.precision", "'bf16'"]),
        ("", ["train.batch_size=abc"], ["train.batch_size", "int"]),
        ("", ["augment.hflip=3"], ["augment.hflip", "true or false"]),
        ("", ["model.name=vit-x/4"], ["'x'"]),
        ("", ["model.options={qk_nrom: true}"], ["model.options", "qk_nrom"]),
        ("", ["model.options={img_size: 64}"], ["data.image_size"]),
        ("", ["data.name=imagenet"], ["data.name", "'cifar10'"]),
        ("", ["data.name=cifar10"], ["data.root"]),
        ("", ["optim.milestones=[30, 60]"], ["fractions"]),
        ("", ["train.epochs"], ["key.sub=value"]),
        ("optim: [1, 2\n", [], ["not valid YAML"]),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, words):
    with pytest.raises(VitlabError) as info:
        load_config(write(tmp_path, text), overrides)
    for word in words:
        assert word in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(VitlabError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    keys = yaml.safe_load(path.read_text())
    kinds = {"generator": TranslateConfig, "variants": StabilityConfig, "pretrain": PretrainConfig}
    kind = next((cls for key, cls in kinds.items() if key in keys), RunConfig)
    config = load_config(path, cls=kind)
    if path.parent.name == "paper" and config.data.name.startswith("cifar"):
        # The paper's recipe (Sec. 3.2): AdamW, 200 epochs, multistep at 30/60/90 %, flips only.
        assert config.optim.name == "adamw" and config.train.epochs == 200
        assert config.optim.schedule == "multistep" and config.optim.milestones == (0.3, 0.6, 0.9)
        assert config.augment.randaugment_ops == 0 and config.augment.mixup_alpha == 0


def test_paper_configs_cover_figure_2():
    names = {p.stem for p in CONFIGS if p.parent.name == "paper"}
    for data in ("cifar10", "cifar100"):
        for family in ("vit", "vit22b"):
            for size in ("ti", "s", "b", "l"):
                assert f"{data}-{family}-{size}" in names
