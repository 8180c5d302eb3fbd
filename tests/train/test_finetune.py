"""Fine-tuning: pretrained weights from every format fitted to a new resolution and class count, frozen
backbone, layer-wise LR decay, `vitlab finetune` and `vitlab inspect` end to end, and (slow) fine-tuning at
48 px beating training from scratch."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.models.test_resnet import SMALL as SMALL_RESNET
from tests.models.test_weights import google_npz, google_params
from vitlab import VitlabError, create_model
from vitlab.cli import main
from vitlab.config import DataConfig, FinetuneConfig, OptimConfig, load_config
from vitlab.data.builtin import make_builtin
from vitlab.models.export import export_model, run_preprocessing
from vitlab.models.weights import resample_pos_embed
from vitlab.runs import checkpoint as ckpt
from vitlab.train.classify import train
from vitlab.train.finetune import checkpoint_format, prepare_model
from vitlab.train.optim import build_optimizer, parameter_groups

SMALL = dict(depth=2, embed_dim=48, num_heads=3, mlp_dim=96)


def small_vit(img_size: int, num_classes: int, **overrides):
    return create_model("vit-ti/8", img_size=img_size, num_classes=num_classes, **{**SMALL, **overrides})


def saved_run(tmp_path: Path, model: torch.nn.Module) -> Path:
    """`model` saved as a vitlab run's checkpoint."""
    ckpt.save_checkpoint(tmp_path / "run", 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    return tmp_path / "run"


def test_pretrained_weights_fit_a_larger_image_and_a_new_head(tmp_path):
    source = small_vit(32, 10)
    torch.nn.init.normal_(source.head.weight)
    run = saved_run(tmp_path, source)
    model, said = prepare_model(small_vit(48, 5), FinetuneConfig(checkpoint=str(run)), load=True)
    assert said == f"vitlab run {run}: position embedding resampled 4×4 → 6×6 patches, new zero head of 5 classes"
    old, new = source.state_dict(), model.state_dict()
    for name in old:
        if not name.startswith(("head.", "pos_embed")):
            assert torch.equal(old[name], new[name]), name
    assert new["pos_embed"].shape == (1, 1 + 36, 48)
    torch.testing.assert_close(new["pos_embed"], resample_pos_embed(old["pos_embed"], (6, 6), 1))
    assert new["head.weight"].shape == (5, 48) and not new["head.weight"].any() and not new["head.bias"].any()


def test_a_frozen_backbone_trains_the_head_only_also_when_resumed(tmp_path):
    run = saved_run(tmp_path, small_vit(32, 10))
    for load in (True, False):
        model, said = prepare_model(small_vit(32, 4), FinetuneConfig(checkpoint=str(run), freeze_backbone=True), load=load)
        assert said.endswith("backbone frozen (the head alone trains)") and ("resumed" in said) != load
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
        optimized = [p for g in build_optimizer(model, OptimConfig()).param_groups for p in g["params"]]
        assert len(optimized) == 2


def test_timm_and_google_files_are_found_by_their_suffix_and_fitted_alike(tmp_path):
    source = small_vit(32, 10)
    save_file(source.state_dict(), tmp_path / "timm.safetensors")
    timm_file = FinetuneConfig(checkpoint=str(tmp_path / "timm.safetensors"))
    from_timm, said = prepare_model(small_vit(48, 3), timm_file, load=True)
    assert said.startswith(f"timm file {tmp_path / 'timm.safetensors'}: position embedding resampled 4×4 → 6×6 patches")
    torch.testing.assert_close(from_timm.pos_embed, resample_pos_embed(source.pos_embed, (6, 6), 1))
    # A Google ViT .npz (the original release's layout, 32 px, 10 classes) fine-tuned at 48 px on 3 classes.
    params = google_params()
    np.savez(tmp_path / "vit.npz", **google_npz(params, "vit"))
    google, _ = prepare_model(small_vit(48, 3), FinetuneConfig(checkpoint=str(tmp_path / "vit.npz")), load=True)
    torch.testing.assert_close(google.cls_token, params["cls"])
    pos = torch.cat([params["pos_cls"], params["pos"]], dim=1)
    torch.testing.assert_close(google.pos_embed, resample_pos_embed(pos, (6, 6), 1))
    assert not google.head.weight.any()
    found = [checkpoint_format(p) for p in (tmp_path, tmp_path / "a.npz", tmp_path / "a.pth")]
    assert found == ["vitlab", "npz", "timm"]


def test_a_hugging_face_vit_folder_is_found_by_its_config_and_fitted_like_the_others(tmp_path):
    source = small_vit(32, 10)
    # The layout of google/vit-base-patch16-224: config.json + model.safetensors.
    export_model(source, "hf", tmp_path / "hf", run_preprocessing(DataConfig(), streamed=False))
    assert checkpoint_format(tmp_path / "hf") == "hf"
    tuned, _ = prepare_model(small_vit(48, 3), FinetuneConfig(checkpoint=str(tmp_path / "hf")), load=True)
    torch.testing.assert_close(tuned.pos_embed, resample_pos_embed(source.pos_embed, (6, 6), 1))
    torch.testing.assert_close(tuned.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert not tuned.head.weight.any()


def test_a_vitlab_run_with_non_finite_weights_is_refused_with_the_tensor_named(tmp_path):
    source = small_vit(32, 10)
    with torch.no_grad():
        source.blocks[0].attn.proj.weight[1, 2] = float("nan")
    with pytest.raises(VitlabError, match=r"blocks\.0\.attn\.proj\.weight hold NaN or infinite values"):
        prepare_model(small_vit(32, 3), FinetuneConfig(checkpoint=str(saved_run(tmp_path, source))), load=True)


def test_a_hugging_face_folder_of_another_model_or_with_a_bad_config_or_tensor_is_named(tmp_path):
    export_model(small_vit(32, 10), "hf", tmp_path / "hf", run_preprocessing(DataConfig(), streamed=False))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tuned = FinetuneConfig(checkpoint=str(tmp_path / "hf"))
    for written, named in [(config | {"model_type": "bert"}, "a 'bert' model"), ([config], "config.json holds a JSON list")]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps(written))
        with pytest.raises(VitlabError, match=named):  # not "no checkpoint found"
            prepare_model(small_vit(48, 3), tuned, load=True)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "hf" / "model.safetensors") | {"vit.embeddings.position_embeddings": torch.zeros(7)}
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(VitlabError, match=r"pos_embed: checkpoint \(7,\) vs model \(1, 37, 48\)"):
        prepare_model(small_vit(48, 3), tuned, load=True)


def test_keep_head_keeps_it_and_a_new_head_drops_the_pretrained_pre_logits(tmp_path):
    source = small_vit(32, 4, head="mlp")
    run = str(saved_run(tmp_path, source))
    kept, said = prepare_model(small_vit(32, 4, head="mlp"), FinetuneConfig(checkpoint=run, keep_head=True), load=True)
    assert said.endswith("position embedding kept (4×4 patches), pretrained head kept of 4 classes")
    assert torch.equal(kept.head.weight, source.head.weight)
    assert torch.equal(kept.pre_logits.fc.weight, source.pre_logits.fc.weight)
    replaced, _ = prepare_model(small_vit(32, 4), FinetuneConfig(checkpoint=run), load=True)  # linear head: no pre-logits
    assert not replaced.head.weight.any()
    with pytest.raises(VitlabError, match="does not exist"):
        prepare_model(small_vit(32, 4), FinetuneConfig(checkpoint=str(tmp_path / "nope.npz")), load=True)


def test_fc_norm_drops_the_pretrained_token_norm_and_starts_its_own_as_mae_fine_tunes(tmp_path):
    source = small_vit(32, 0, pool="gap")
    torch.nn.init.normal_(source.norm.weight)
    run = str(saved_run(tmp_path, source))
    model, _ = prepare_model(small_vit(32, 4, pool="gap", fc_norm=True), FinetuneConfig(checkpoint=run), load=True)
    assert torch.equal(model.fc_norm.weight, torch.ones(48)) and not model.fc_norm.bias.any()
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    tuned = saved_run(tmp_path / "tuned", model)  # a classifier with fc_norm keeps its own when fine-tuned again
    torch.nn.init.normal_(model.fc_norm.weight)
    ckpt.save_checkpoint(tuned, 2, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    again, _ = prepare_model(small_vit(32, 4, pool="gap", fc_norm=True), FinetuneConfig(checkpoint=str(tuned)), load=True)
    assert torch.equal(again.fc_norm.weight, model.fc_norm.weight)


def test_layer_decay_scales_the_lr_by_depth_and_keeps_weight_decay_off_biases():
    model = small_vit(32, 4)  # 2 blocks: embeddings at depth 0, blocks at 1 and 2, norm and head at 3
    groups = parameter_groups(model, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.125
    assert scale["blocks.0.attn.qkv.weight"] == 0.25 and scale["blocks.1.mlp.fc2.bias"] == 0.5
    assert scale["head.weight"] == scale["norm.weight"] == 1.0
    assert all(g["weight_decay"] == 0 for g in groups if any(names[id(p)].endswith("bias") for p in g["params"]))
    assert [g["lr_scale"] for g in parameter_groups(model, 0.05)] == [1.0, 1.0]


def test_decay_all_gives_every_parameter_weight_decay():
    model = create_model("vit-ti/16", img_size=32, num_classes=10, depth=1)
    default = {id(p): g["weight_decay"] for g in parameter_groups(model, 0.05) for p in g["params"]}
    everything = [g["weight_decay"] for g in parameter_groups(model, 0.05, decay_all=True)]
    assert 0.0 in default.values() and everything == [0.05]


def test_embeddings_and_mask_token_inside_a_pretraining_wrapper_get_no_weight_decay():
    from vitlab.models.masked import MaskedAutoencoder

    model = MaskedAutoencoder(
        create_model("vit-ti/16", img_size=32, num_classes=0, depth=1), decoder_dim=16, decoder_depth=1, decoder_heads=2
    )
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in parameter_groups(model, 0.05) for p in g["params"]}
    assert decay["encoder.pos_embed"] == decay["encoder.cls_token"] == decay["mask_token"] == 0.0
    assert decay["encoder.patch_embed.proj.weight"] == decay["decoder_embed.weight"] == 0.05


def test_finetune_config_is_validated_with_the_key_named(tmp_path):
    with pytest.raises(VitlabError, match="finetune.checkpoint is required"):
        load_config(None, ["finetune={freeze_backbone: true}"])
    with pytest.raises(VitlabError, match="finetune.format"):
        load_config(None, ["finetune={checkpoint: x, format: onnx}"])
    with pytest.raises(VitlabError, match="optim.layer_decay"):
        load_config(None, ["optim.layer_decay=1.5"])
    (tmp_path / "plain.yaml").write_text("name: plain\n")
    assert main(["finetune", str(tmp_path / "plain.yaml")]) == 2


def test_a_fine_tuning_run_that_never_takes_an_optimizer_step_fails(tmp_path, capsys):
    """Every step's loss is infinite (an absurd z-loss weight): no step reaches the optimizer, so no accuracy is reported."""
    config = {
        "name": "ft",
        "out_dir": str(tmp_path),
        "model": {"name": "vit-ti/8", "options": SMALL},
        "data": {"name": "builtin", "image_size": 32, "num_train": 32, "num_test": 16},
        "train": {"epochs": 1, "batch_size": 16, "precision": "fp32", "threads": 1, "z_loss": 1e300, "max_bad_steps": 100},
        "finetune": {"checkpoint": str(saved_run(tmp_path, small_vit(32, 10)))},
    }
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune", str(tmp_path / "ft.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no optimizer step was taken: all 2 steps had a non-finite loss" in err
    assert not (tmp_path / "ft" / "results.json").exists()


def write_folder(root: Path, image_size: int, classes: int, counts: dict[str, int], seed: int, **difficulty) -> Path:
    """Built-in shape images of the first `classes` classes as an image folder, `counts[split]` of them per split."""
    from vitlab.data.builtin import BuiltinDifficulty

    for offset, (split, count) in enumerate(counts.items()):
        data = make_builtin(count * 10 // classes + 10, seed + offset, image_size, BuiltinDifficulty(**difficulty))
        keep = (data.labels < classes).nonzero()[:count, 0]
        for i in keep.tolist():
            folder = root / split / data.classes[int(data.labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


CLEAN = dict(num_blobs=0, num_lines=0, noise_std=0.0, gradient=0.0)
TINY = [
    "model.name=vit-ti/8",
    f"model.options={{depth: {SMALL['depth']}, embed_dim: 48, num_heads: 3, mlp_dim: 96}}",
    "train.precision=fp32",
    "train.threads=1",
    "train.log_every_steps=5",
    "train.eval_every_epochs=1000",
]


def test_vitlab_finetune_at_48px_then_vitlab_inspect(tmp_path, capsys):
    pre = train(
        load_config(
            None,
            TINY
            + [
                f"out_dir={tmp_path}",
                "name=pre",
                "data.num_train=256",
                "data.num_test=64",
                "train.batch_size=64",
                "train.epochs=1",
            ],
        ),
        progress=False,
    )
    root = write_folder(tmp_path / "shapes", 48, 3, {"train": 48, "test": 24}, seed=7, **CLEAN)
    config = {
        "name": "ft",
        "out_dir": str(tmp_path),
        "model": {"name": "vit-ti/8", "options": SMALL},
        "data": {"name": "folder", "root": str(root), "image_size": 48},
        "train": {"epochs": 2, "batch_size": 16, "precision": "fp32", "threads": 1, "log_every_steps": 1},
        "optim": {"lr": 1e-3, "layer_decay": 0.75},
        "finetune": {"checkpoint": pre["run_dir"]},
    }
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["finetune", str(tmp_path / "ft.yaml"), "--no-progress"]) == 0
    out = capsys.readouterr().out  # the start block says what was loaded; 3 classes: no acc@5 (100 % by construction)
    loaded = f"vitlab run {pre['run_dir']}: position embedding resampled 4×4 → 6×6 patches, new zero head of 3 classes"
    assert f"  finetune     {loaded}\n" in out
    assert "test acc@1 " in out and "acc@5" not in out
    run = tmp_path / "ft"
    assert json.loads((run / "results.json").read_text())["steps"] == 6
    assert yaml.safe_load((run / "config.yaml").read_text())["finetune"]["checkpoint"] == pre["run_dir"]
    assert main(["eval", str(run)]) == 0  # the fine-tuned run rebuilds without the pretrained source
    out = capsys.readouterr().out  # one readable line; every number with --json
    assert out.startswith(f"{run}: test acc@1 ") and out.count("\n") == 1 and ", AUROC " in out and "acc@5" not in out
    assert main(["eval", str(run), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"acc1", "auroc", "loss"}
    assert main(["inspect", str(run), "--num-images", "1", "--query", "5"]) == 0
    pngs = {"attention_image0.png", "rollout.png", "attention_distance.png", "position_similarity.png", "patch_embedding_pcs.png"}
    assert {p.name for p in (run / "inspect").iterdir()} == pngs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"inspect/attention_0", "inspect/rollout", "curves"} <= set(events.Tags()["images"])  # the maps in TensorBoard


@pytest.mark.slow
def test_finetuning_at_48px_beats_training_from_scratch_for_the_same_steps(tmp_path):
    """Pre-train on the 10 built-in shapes at 32 px; on 5 of the shapes at 48 px (500 training images) fine-tuning
    beats training from scratch by at least 5 points and by 3 standard errors on 1000 test images."""
    model = ["model.name=vit-ti/8", "model.options={depth: 3, embed_dim: 64, num_heads: 4, mlp_dim: 128}"]
    common = model + ["train.precision=fp32", "train.threads=1", "train.eval_every_epochs=1000", f"out_dir={tmp_path}"]
    pre = train(
        load_config(
            None,
            common
            + [
                "name=pre",
                "data.num_train=2000",
                "data.num_test=500",
                f"data.builtin={CLEAN}",
                "train.batch_size=64",
                "train.epochs=40",
                "optim.lr=0.003",
                "optim.warmup_epochs=0.5",
            ],
        ),
        progress=False,
    )
    root = write_folder(tmp_path / "shapes48", 48, 5, {"train": 500, "test": 1000}, seed=11)
    target = common + [
        "data.name=folder",
        f"data.root={root}",
        "data.image_size=48",
        "train.batch_size=32",
        "train.epochs=10",
        "optim.warmup_epochs=0.5",
        "augment.vflip=false",
    ]
    scratch = train(load_config(None, target + ["name=scratch", "optim.lr=0.003"]), progress=False)
    finetune = f"finetune={{checkpoint: {pre['run_dir']}}}"
    tuned = train(load_config(None, target + ["name=tuned", "optim.lr=0.001", finetune]), progress=False)
    assert tuned["steps"] == scratch["steps"]
    a, b = tuned["test"]["acc1"], scratch["test"]["acc1"]
    pooled = (a + b) / 2
    z = (a - b) / math.sqrt(pooled * (1 - pooled) * 2 / 1000)
    print(f"pre-trained at 32 px: {pre['test']['acc1']:.3f}; at 48 px: fine-tuned {a:.3f}, scratch {b:.3f}, z = {z:.1f}")
    assert a - b >= 0.05 and z >= 3


def test_an_ai602_model_without_a_replaceable_head_is_refused_in_one_line():
    from vitlab.config import FinetuneConfig
    from vitlab.runs.kinds import load_experiment

    model = create_model("ai602-vit-ti/8", img_size=16, num_classes=3, depth=1)
    with pytest.raises(VitlabError, match="Ai602ViT has no replaceable head to fine-tune"):
        prepare_model(model, FinetuneConfig(checkpoint="unused"), load=True)
    with pytest.raises(VitlabError, match="ai602-vit-ti/8: the paper code's models have no replaceable head"):  # at load
        load_experiment(None, ["model.name=ai602-vit-ti/8", "finetune.checkpoint=unused"])


def test_a_timm_resnet_file_fine_tunes_into_a_new_head(tmp_path):
    torch.manual_seed(0)
    source = create_model("bit-r26x1", num_classes=10, **SMALL_RESNET)
    save_file(source.state_dict(), tmp_path / "resnetv2.safetensors")
    model, said = prepare_model(
        create_model("bit-r26x1", num_classes=3, **SMALL_RESNET),
        FinetuneConfig(checkpoint=str(tmp_path / "resnetv2.safetensors")),
        load=True,
    )
    torch.testing.assert_close(model.stages[1].blocks[0].conv2.weight, source.stages[1].blocks[0].conv2.weight)
    assert said.endswith("no pretrained position embedding, new zero head of 3 classes")
    assert model.head.fc.weight.shape == (3, 64, 1, 1) and not model.head.fc.weight.any()
    with pytest.raises(VitlabError, match="finetune.format=npz"):
        prepare_model(model, FinetuneConfig(checkpoint=str(tmp_path / "resnetv2.safetensors"), format="npz"), load=True)


def test_a_timm_hybrid_file_fine_tunes_at_another_image_size(tmp_path):
    torch.manual_seed(0)
    options = dict(depth=1, embed_dim=32, num_heads=2, mlp_dim=64, stem_width=16, stem_channels=[32, 64], stem_groups=8)
    source = create_model("hybrid-r26-vit-ti/8", img_size=32, num_classes=10, **options)
    save_file(source.state_dict(), tmp_path / "hybrid.safetensors")
    tuned, said = prepare_model(
        create_model("hybrid-r26-vit-ti/8", img_size=48, num_classes=3, **options),
        FinetuneConfig(checkpoint=str(tmp_path / "hybrid.safetensors")),
        load=True,
    )
    torch.testing.assert_close(tuned.pos_embed, resample_pos_embed(source.pos_embed, (6, 6), 1))
    assert "position embedding resampled 4×4 → 6×6 patches" in said
    stem = "patch_embed.backbone.stages.1.blocks.2.conv2.weight"
    torch.testing.assert_close(tuned.state_dict()[stem], source.state_dict()[stem])
    assert not tuned.head.weight.any()
