"""Configs: YAML into dataclasses, with errors that name the key at load time."""

import time
from pathlib import Path

import pytest
import yaml

from vitlab import VitlabError
from vitlab.config import PretrainConfig, RunConfig, StabilityConfig, TranslateConfig, config_kind, load_config
from vitlab.runs.kinds import load_experiment


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
        ("", ["train.precision=fp8"], ["train.precision", "'bf16'"]),
        ("", ["train.batch_size=abc"], ["train.batch_size", "int"]),
        ("", ["augment.hflip=3"], ["augment.hflip", "true or false"]),
        ("", ["model.name=vit-x/4"], ["'x'"]),
        ("", ["model.options={qk_nrom: true}"], ["model.options", "qk_nrom"]),
        ("", ["model.options={img_size: 64}"], ["data.image_size"]),
        ("", ["data.name=imagenet"], ["data.name", "'cifar10'"]),
        ("", ["data.name=cifar10"], ["data.root"]),
        ("", ["data.builtin.num_train=256"], ["data.builtin", "'num_train'", "noise_std", "data.num_train"]),
        ("", ["data.builtin.noise_std=-1"], ["noise_std=-1", ">= 0"]),
        ("", ["optim.milestones=[30, 60]"], ["fractions"]),
        ("", ["train.epochs"], ["key.sub=value"]),
        ("optim: [1, 2\n", [], ["not valid YAML"]),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, words):
    with pytest.raises(VitlabError) as info:
        load_experiment(write(tmp_path, text), overrides)
    for word in words:
        assert word in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(VitlabError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))

# expected to fail until it does, and then this mark must go (strict)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    keys = yaml.safe_load(path.read_text())
    kind = config_kind(keys)
    config = load_config(path, cls=kind)
    if path.parent.name == "paper" and config.data.name.startswith("cifar"):
        # The paper's recipe (Sec. 3.2): AdamW, 200 epochs, multistep at 30/60/90 %, flips only.
        assert config.optim.name == "adamw" and config.train.epochs == 200
        assert config.optim.schedule == "multistep" and config.optim.milestones == (0.3, 0.6, 0.9)
        assert config.augment.randaugment_ops == 0 and config.augment.mixup_alpha == 0
        assert config.optim.warmup_epochs == 0  # the paper has no warm-up
    if path.parent.name == "code" and kind is RunConfig:
        # The paper's code (ai602 main.py): 224 px, patch 16, batch 32, AdamW 1e-3, wd 1e-4 on everything,
        # MultiStepLR x0.5 at 30/60/90 % of 150 epochs, flips with p = 0.33, its own models.
        assert config.model.name.startswith("ai602-") and config.model.name.endswith("/16")
        assert (config.data.image_size, config.train.batch_size, config.train.epochs) == (224, 32, 150)
        assert (config.optim.lr, config.optim.weight_decay, config.optim.decay_all) == (1e-3, 1e-4, True)
        assert config.optim.milestones == (0.3, 0.6, 0.9) and config.optim.gamma == 0.5
        assert config.augment.flip_prob == 0.33 and config.optim.warmup_epochs == 0


@pytest.mark.parametrize("folder", ["paper", "code"])
def test_paper_configs_cover_figure_2(folder):
    names = {p.stem for p in CONFIGS if p.parent.name == folder}
    for data in ("cifar10", "cifar100"):
        for family in ("vit", "vit22b"):
            for size in ("ti", "s", "b", "l"):
                assert f"{data}-{family}-{size}" in names


BAD_RUN_VALUES = [
    ("optim.clip_grad_norm", "-1"),
    ("optim.clip_grad_norm", "0"),
    ("optim.clip_grad_value", "-1"),
    ("optim.lr", "0"),
    ("optim.lr", ".nan"),
    ("optim.lr", ".inf"),
    ("optim.weight_decay", "-0.1"),
    ("optim.warmup_epochs", "-1"),
    ("optim.min_lr_ratio", "5"),
    ("optim.gamma", "0"),
    ("optim.momentum", "1"),
    ("optim.betas", "[0.9, 1.0]"),
    ("optim.betas", "[-0.1, 0.9]"),
    ("optim.layer_decay", "1.5"),
    ("train.epochs", ".nan"),
    ("train.epochs", ".inf"),
    ("train.epochs", "0"),
    ("train.batch_size", "0"),
    ("train.log_every_steps", "0"),
    ("train.checkpoint_every_steps", "0"),
    ("train.max_bad_steps", "0"),
    ("train.label_smoothing", "2"),
    ("train.label_smoothing", "-0.5"),
    ("train.label_smoothing", "1"),
    ("train.z_loss", "-1"),
    ("train.grad_penalty", "-1"),
    ("train.eval_every_epochs", "0"),
    ("train.threads", "-1"),
    ("train.keep_checkpoints", "-1"),
    ("train.keep_checkpoints", "0"),
    ("train.ema_decay", "1"),
    ("train.seed", "-1"),
    ("augment.randaugment_magnitude", "1000"),
    ("augment.randaugment_ops", "-1"),
    ("augment.mixup_alpha", "-1"),
    ("augment.cutmix_alpha", "-0.5"),
    ("augment.crop_padding", "-2"),
    ("data.image_size", "0"),
    ("data.num_train", "0"),
    ("data.num_test", "0"),
    ("data.seed", "-3"),
]
BAD_TRANSLATE_VALUES = [
    ("optim.lr", "-1"),
    ("optim.betas", "[0.5, 2]"),
    ("train.epochs", "-1"),
    ("train.decay_epochs", ".nan"),
    ("train.batch_size", "0"),
    ("train.log_every_steps", "0"),
    ("train.checkpoint_every_steps", "0"),
    ("train.keep_checkpoints", "0"),
    ("train.eval_every_epochs", "0"),
    ("train.sample_every_epochs", "0"),
    ("train.num_samples", "0"),
    ("train.max_bad_steps", "0"),
    ("train.threads", "0"),
    ("train.seed", "-1"),
    ("loss.lambda_cycle", "-1"),
    ("loss.pool_size", "-1"),
    ("data.load_size", "0"),
    ("data.num_train", "0"),
    ("discriminator.num_layers", "0"),
    ("eval.kid_subset_size", "1"),
    ("eval.batch_size", "0"),
]


@pytest.mark.parametrize(
    "cls,key,value", [(RunConfig, *kv) for kv in BAD_RUN_VALUES] + [(TranslateConfig, *kv) for kv in BAD_TRANSLATE_VALUES]
)
def test_out_of_range_values_are_refused_at_load_naming_key_value_and_range(cls, key, value):
    with pytest.raises(VitlabError) as info:
        load_config(None, [f"{key}={value}"], cls)
    message = str(info.value)
    assert key in message and ("must be in" in message or "must be >" in message), message
    assert "\n" not in message


def test_null_turns_gradient_clipping_off():
    config = load_config(None, ["optim.clip_grad_norm=null", "optim.clip_grad_value=0.5", "train.threads=null"])
    assert config.optim.clip_grad_norm is None and config.optim.clip_grad_value == 0.5 and config.train.threads is None


@pytest.mark.parametrize(
    "raw,value", [("5e-4", 5e-4), ("1e4", 1e4), ("1E-3", 1e-3), (".5", 0.5), ("2.5e+1", 25.0), ("1.0e-4", 1e-4), ("3", 3.0)]
)
def test_numbers_are_read_as_people_write_them(tmp_path, raw, value):
    assert load_config(None, [f"optim.lr={raw}"]).optim.lr == value
    assert load_config(write(tmp_path, f"optim:\n  lr: {raw}\n")).optim.lr == value


def test_ints_stay_ints_and_whole_floats_count_as_ints():
    config = load_config(None, ["train.batch_size=64", "train.checkpoint_every_steps=1e4"])
    assert config.train.batch_size == 64 and type(config.train.checkpoint_every_steps) is int
    with pytest.raises(VitlabError, match="train.batch_size must be int"):
        load_config(None, ["train.batch_size=1.5"])


def test_set_inside_an_options_dict_merges_into_the_defaults():
    default = load_config().model.options
    assert load_config(None, ["model.options.depth=2"]).model.options == {**default, "depth": 2}
    assert load_config(None, ["model.options={depth: 2}"]).model.options == {"depth": 2}, "a whole dict replaces"


def test_set_inside_options_merges_into_the_files_options(tmp_path):
    path = write(tmp_path, "model:\n  name: vit-s/4\n  options: {drop_path: 0.1}\n")
    assert load_config(path, ["model.options.depth=2"]).model.options == {"drop_path": 0.1, "depth": 2}


def test_another_model_does_not_inherit_the_default_runs_sizes(tmp_path):
    assert load_config(None, ["model.name=vit-s/4", "model.options.drop_path=0.1"]).model.options == {"drop_path": 0.1}
    assert load_config(write(tmp_path, "model:\n  name: vit-s/4\n")).model.options == {}


def test_set_inside_a_stability_variant_merges_too():
    study = load_config(None, ["variants={a: [model.options.depth=2]}"], StabilityConfig)
    assert study.variant_config("a").model.options == {**load_config().model.options, "depth": 2}


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "..", "", "a\\b"])
@pytest.mark.parametrize("cls", [RunConfig, TranslateConfig, StabilityConfig])
def test_names_that_leave_out_dir_are_refused(name, cls):
    extra = ["variants={a: []}"] if cls is StabilityConfig else []
    with pytest.raises(VitlabError, match="one plain folder name"):
        load_config(None, [f"name='{name}'", *extra], cls)


def test_variant_names_that_leave_out_dir_are_refused():
    with pytest.raises(VitlabError, match="one plain folder name"):
        load_config(None, ["variants={'../up': []}"], StabilityConfig)


def _alias_bomb(levels: int) -> str:
    """A billion-laughs document: 9**levels values from a few hundred bytes."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "{" + ", ".join(lines) + "}"


@pytest.mark.parametrize("where", ["file", "set"])
def test_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path, where):
    bomb = _alias_bomb(10)
    assert len(bomb) < 600
    started = time.perf_counter()
    with pytest.raises(VitlabError) as info:
        if where == "file":
            load_config(write(tmp_path, f"train:\n  epochs: {bomb}\n"))
        else:
            load_config(None, [f"train.epochs={bomb}"])
    assert time.perf_counter() - started < 2
    assert len(str(info.value)) < 300 and "aliases" in str(info.value)


def test_long_wrong_values_are_cut_short_in_messages():
    with pytest.raises(VitlabError) as info:
        load_config(None, [f"train.epochs=[{', '.join(['x' * 1000] * 1000)}]"])
    assert len(str(info.value)) < 300 and "train.epochs must be float" in str(info.value)


def test_non_utf8_config_is_one_sentence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(VitlabError, match=r"not UTF-8 text \(byte 0xe9 at offset 9\); save it as UTF-8"):
        load_config(path)


def test_a_config_that_is_not_a_mapping_is_named(tmp_path):
    with pytest.raises(VitlabError, match="must be a mapping of sections"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_model_options_are_checked_by_building_the_model_on_the_meta_device():
    import time

    started = time.perf_counter()
    load_experiment(None, ["model.name=vit22b-22b/14", "data.image_size=224", "model.options={}"])  # 22 B parameters, no memory
    assert time.perf_counter() - started < 5
    with pytest.raises(VitlabError, match="model.options: embed_dim=128 is not divisible by num_heads=5"):
        load_experiment(None, ["model.options.num_heads=5"])


def test_a_bad_fourth_variant_fails_before_the_first_variant_trains(tmp_path):
    from vitlab.config import StabilityConfig

    study = {
        "out_dir": str(tmp_path),
        "base": {"train": {"epochs": 1}},
        "variants": {"a": [], "b": [], "c": [], "d": ["model.options.num_heads=3"]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(VitlabError, match=r"variants.d: model.options: .*num_heads=3"):
        load_experiment(path, cls=StabilityConfig)
    assert not any(tmp_path.glob("stability*"))


def test_the_loops_share_one_base_for_their_run_settings():
    from vitlab.config import RunSettings, TrainConfig, TranslateTrainConfig

    assert issubclass(TrainConfig, RunSettings) and issubclass(TranslateTrainConfig, RunSettings)
    with pytest.raises(VitlabError, match="train.keep_checkpoints=0 must be >= 1"):
        load_config(None, ["train.keep_checkpoints=0"], TranslateConfig)


@pytest.mark.parametrize(
    "raw,words", [("9" * 5000, ["--set train.epochs", "cannot read"]), ("1" + "0" * 400, ["train.epochs", "too large"])]
)
def test_numbers_python_cannot_hold_are_one_sentence(raw, words):
    with pytest.raises(VitlabError) as info:
        load_config(None, [f"train.epochs={raw}"])
    assert all(word in str(info.value) for word in words) and len(str(info.value)) < 300


def test_every_config_records_its_kind_and_a_wrong_kind_is_refused(tmp_path):
    for cls in (RunConfig, PretrainConfig, TranslateConfig, StabilityConfig):
        assert cls().kind == cls.KIND and config_kind({"kind": cls.KIND}) is cls
    assert load_config(None).to_dict()["kind"] == "train"  # written into every run's config.yaml
    assert config_kind({"kind": "pretrain", "model": {}}) is PretrainConfig  # the kind wins over the sections
    with pytest.raises(VitlabError, match="kind: 'pretrain' is not a `vitlab train` config; run it with `vitlab pretrain`"):
        load_config(write(tmp_path, "kind: pretrain\n"))


def test_setting_one_augment_key_of_a_pretrain_config_keeps_pretrainings_own_augment_defaults(tmp_path):
    from vitlab.config import PretrainConfig
    from vitlab.runs.kinds import load_experiment

    path = tmp_path / "mae.yaml"
    path.write_text("name: mae\n")
    config = load_experiment(str(path), ["augment.hflip=false"], cls=PretrainConfig)
    assert config.augment.hflip is False
    assert config.augment.crop_padding == PretrainConfig().augment.crop_padding == 4  # not AugmentConfig's 0
    assert config.augment.vflip == PretrainConfig().augment.vflip
