"""Export for timm and Hugging Face: names, the arguments that rebuild the model, the same logits, refusals."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vitlab import VitlabError, create_model
from vitlab.config import DataConfig
from vitlab.models.export import FORMATS, export_model, run_preprocessing
from vitlab.models.weights import load_hf_checkpoint, load_timm_checkpoint

DIM, HEADS, DEPTH, MLP, PATCH, IMG, CLASSES = 48, 3, 2, 96, 8, 32, 5
DATA = run_preprocessing(DataConfig(image_size=IMG), streamed=False)


def tiny(family: str = "vit", **overrides):
    options = dict(img_size=IMG, num_classes=CLASSES, embed_dim=DIM, num_heads=HEADS, depth=DEPTH, mlp_dim=MLP)
    return create_model(f"{family}-ti/{PATCH}", **{**options, **overrides})


def randomised(model):
    """`model` with every parameter drawn at random, so that no zero or one hides a misplaced tensor."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def timm_parallel_logits(sd: dict, args: dict, x: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer with ParallelScalingBlock (fuse_out_proj=False), written functionally from
    timm/models/vision_transformer.py: in_proj rows [mlp, q, k, v], separate attention and MLP out projections,
    tokens [cls, registers, patches] all under pos_embed (no_embed_class=False), LayerScale `ls` on the sum."""
    ln = lambda t, name, d=DIM: F.layer_norm(t, (d,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)  # noqa: E731
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    prefix = [sd[k] for k, on in (("cls_token", args["class_token"]), ("reg_token", args.get("reg_tokens"))) if on]
    t = torch.cat([p.expand(len(t), -1, -1) for p in prefix] + [t], dim=1) + sd["pos_embed"]
    b, n, _ = t.shape
    hidden = int(args["mlp_ratio"] * DIM)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = F.linear(ln(t, p + "in_norm"), sd[p + "in_proj.weight"], sd.get(p + "in_proj.bias"))
        mlp, q, k, v = y.split([hidden, DIM, DIM, DIM], dim=-1)
        if p + "mlp_bias" in sd:
            mlp = mlp + sd[p + "mlp_bias"]
        q, k, v = (z.view(b, n, HEADS, DIM // HEADS).transpose(1, 2) for z in (q, k, v))
        if args["qk_norm"]:
            q, k = ln(q, p + "q_norm", DIM // HEADS), ln(k, p + "k_norm", DIM // HEADS)
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(DIM // HEADS)).softmax(-1) @ v
        attn = attn.transpose(1, 2).reshape(b, n, DIM)
        out = F.linear(attn, sd[p + "attn_out_proj.weight"], sd[p + "attn_out_proj.bias"])
        out = out + F.linear(F.gelu(mlp), sd[p + "mlp_out_proj.weight"], sd[p + "mlp_out_proj.bias"])
        t = t + out * sd.get(p + "ls.gamma", 1)
    if args["fc_norm"]:  # timm: no per-token norm, a LayerNorm of the pooled tokens
        return F.linear(ln(t.mean(dim=1), "fc_norm"), sd["head.weight"], sd["head.bias"])
    t = ln(t, "norm")
    pooled = t[:, 0] if args["global_pool"] == "token" else t[:, sum(p.shape[1] for p in prefix) :].mean(dim=1)
    return F.linear(pooled, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("vit", {}),
        ("vit", dict(norm_bias=False, pos_embed="sincos", qkv_bias=False, qk_norm=True)),
        ("vit22b", {}),  # QK norm, no QKV or LayerNorm biases
        ("vit22b", dict(qkv_bias=True, pool="gap", pos_embed="sincos")),
        ("vit22b", dict(pool="gap", fc_norm=True)),  # MAE's fine-tuning head: timm's fc_norm
    ],
)
def test_timm_export_reimports_through_vitlabs_timm_loader_with_the_same_logits(tmp_path, family, overrides):
    model = randomised(tiny(family, **overrides))
    files = export_model(model, "timm", tmp_path, DATA, [f"shape {i}" for i in range(CLASSES)])
    assert [f.name for f in files] == ["model.safetensors", "create_model.json", "class_names.json"]
    args = json.loads((tmp_path / "create_model.json").read_text())
    assert (args["embed_dim"], args["depth"], args["num_heads"], int(args["mlp_ratio"] * DIM)) == (DIM, DEPTH, HEADS, MLP)
    rebuilt = load_timm_checkpoint(tiny(family, **overrides), tmp_path / "model.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images()), model(images()), atol=1e-5, rtol=0)
    if family == "vit22b":
        sd = load_file(tmp_path / "model.safetensors")
        assert {
            "blocks.0.in_norm.weight",
            "blocks.0.in_proj.weight",
            "blocks.0.attn_out_proj.weight",
            "blocks.0.mlp_out_proj.weight",
            "blocks.0.q_norm.weight",
        } <= set(sd)
        assert ("blocks.0.in_proj.bias" in sd) == args["qkv_bias"] != ("blocks.0.mlp_bias" in sd)
        with torch.no_grad():
            reference = timm_parallel_logits(sd, args, images())
            torch.testing.assert_close(reference, model(images()), atol=1e-4, rtol=0)


TRACED_MODELS = [
    ("vit", {}),
    ("vit22b", {}),  # the default block: parallel, QK norm, no biases
    ("vit22b", dict(branch_norm="mlp", head="mlp", pool="gap", pos_embed="sincos")),  # neither timm nor transformers has these
]


@pytest.mark.parametrize("family, overrides", TRACED_MODELS)
def test_a_torch_export_program_computes_the_models_logits_at_any_batch_size(tmp_path, family, overrides):
    model = randomised(tiny(family, dropout=0.5, **overrides)).train()
    files = export_model(model, "torch-export", tmp_path / "out", DATA)
    assert [f.name for f in files] == ["model.pt2", "class_names.json", "preprocessing.json"]
    assert model.training  # traced in eval mode (no dropout), left as it was
    program = torch.export.load(tmp_path / "out" / "model.pt2")  # a file vitlab wrote: torch.export.load unpickles
    with torch.no_grad():
        for batch in (1, 5):
            torch.testing.assert_close(program.module()(images(batch)), model.eval()(images(batch)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, overrides", TRACED_MODELS)
def test_an_onnx_export_under_onnxruntime_computes_the_models_logits_at_any_batch_size(tmp_path, family, overrides):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = randomised(tiny(family, **overrides))
    files = export_model(model, "onnx", tmp_path, DATA, [f"shape {i}" for i in range(CLASSES)])
    assert [f.name for f in files] == ["model.onnx", "class_names.json", "preprocessing.json"]
    assert json.loads((tmp_path / "class_names.json").read_text())[4] == "shape 4"
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (inputs,), (outputs,) = session.get_inputs(), session.get_outputs()
    assert (inputs.name, outputs.name, inputs.shape[1:]) == ("pixel_values", "logits", [3, IMG, IMG])
    with torch.no_grad():
        for batch in (1, 5):
            (logits,) = session.run(None, {"pixel_values": images(batch).numpy()})
            torch.testing.assert_close(torch.from_numpy(logits), model(images(batch)), atol=1e-5, rtol=0)


CONVNETS = [
    ("bit-r26x1", dict(stem_width=16, channels=[32, 64], groups=8, layers=[1, 2])),  # no layout timm registers
    (
        "hybrid-r26-vit-ti/8",
        dict(depth=1, embed_dim=32, num_heads=2, mlp_dim=64, stem_width=16, stem_channels=[32, 64], stem_groups=8),
    ),
]


@pytest.mark.parametrize("name, options", CONVNETS)
def test_a_resnet_or_hybrid_of_any_layout_exports_for_onnxruntime(tmp_path, name, options):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = create_model(name, img_size=IMG, num_classes=CLASSES, **options).eval()
    export_model(model, "onnx", tmp_path, DATA)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for batch in (1, 4):
            (logits,) = session.run(None, {"pixel_values": images(batch).numpy()})
            torch.testing.assert_close(torch.from_numpy(logits), model(images(batch)), atol=1e-4, rtol=1e-4)


def test_onnx_without_its_exporter_names_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "onnxscript" else find_spec(name, *args))
    with pytest.raises(VitlabError, match=r"--format onnx needs onnxscript: pip install 'vitlab\[onnx\]'"):
        export_model(tiny(), "onnx", tmp_path / "out", DATA)
    assert not (tmp_path / "out").exists()


def test_the_preprocessing_is_written_beside_a_traced_export(tmp_path):
    crop = run_preprocessing(DataConfig(image_size=IMG, mean=(0.485, 0.456, 0.406), crop_fraction=0.8), streamed=True)
    export_model(tiny(), "torch-export", tmp_path, crop)
    assert json.loads((tmp_path / "preprocessing.json").read_text()) == {
        "image_size": IMG,
        "in_chans": 3,
        "crop_fraction": 0.8,
        "interpolation": "bilinear",
        "rescale_factor": 1 / 255,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.5, 0.5, 0.5],
    }


@pytest.mark.parametrize(
    "fmt, overrides, named",
    [
        ("timm", dict(head="mlp"), "head='mlp'"),
        ("hf", dict(qk_norm=True), "qk_norm"),
        ("hf", dict(pool="gap"), "pool='gap'"),
        ("timm", dict(num_classes=0), "num_classes=0"),
    ],
)
def test_options_without_an_equivalent_are_refused_by_name(tmp_path, fmt, overrides, named):
    with pytest.raises(VitlabError, match=named):
        export_model(tiny(**overrides), fmt, tmp_path, DATA)


def test_parallel_blocks_with_a_branch_norm_or_for_hf_are_refused(tmp_path):
    with pytest.raises(VitlabError, match="branch_norm='mlp'"):
        export_model(tiny("vit22b", branch_norm="mlp"), "timm", tmp_path, DATA)
    with pytest.raises(VitlabError, match=r"block='parallel'.*QK LayerNorm \(--format onnx, torch-export and timm carry them\)$"):
        export_model(tiny("vit22b"), "hf", tmp_path, DATA)
    with pytest.raises(VitlabError, match="--format"):
        export_model(tiny(), "tflite", tmp_path, DATA)


def test_hf_export_reads_back_into_vitlab_with_the_same_logits(tmp_path):
    model = randomised(tiny(norm_bias=False, qkv_bias=False))
    export_model(model, "hf", tmp_path, DATA)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vit" and config["qkv_bias"] is False and config["id2label"]["4"] == "class 4"
    names = set(load_file(tmp_path / "model.safetensors"))
    assert {
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "classifier.weight",
        "vit.encoder.layer.1.attention.attention.query.weight",
        "vit.layernorm.bias",
    } <= names
    rebuilt = load_hf_checkpoint(tiny(norm_bias=False, qkv_bias=False), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images()), model(images()), atol=1e-5, rtol=0)


def test_transformers_vit_computes_the_exported_models_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = randomised(tiny(norm_bias=False))
    export_model(model, "hf", tmp_path, DATA, [f"shape {i}" for i in range(CLASSES)])
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert hf.config.id2label[2] == "shape 2"
    with torch.no_grad():
        difference = (hf(pixel_values=images()).logits - model(images())).abs().max().item()
    assert difference < 1e-4


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_a_transformers_vit_saved_with_save_pretrained_loads_with_equal_logits(tmp_path, weights_file):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        image_size=IMG,
        patch_size=PATCH,
        num_labels=CLASSES,
    )  # fmt: skip  (layer_norm_eps stays at transformers' 1e-12)
    hf = randomised(transformers.ViTForImageClassification(config))
    hf.save_pretrained(tmp_path)
    if weights_file == "pytorch_model.bin":  # the older layout of the Hub's google/vit-* folders
        torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / weights_file)
        (tmp_path / "model.safetensors").unlink()
    model = load_hf_checkpoint(tiny(), tmp_path).eval()
    with torch.no_grad():
        difference = (hf(pixel_values=images()).logits - model(images())).abs().max().item()
    assert difference < 1e-4


def test_hf_checkpoints_that_do_not_fit_are_refused_with_the_reason(tmp_path):
    export_model(tiny(), "hf", tmp_path, DATA)
    with pytest.raises(VitlabError, match="set num_heads=3"):
        load_hf_checkpoint(tiny(num_heads=6), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu_new"}))
    with pytest.raises(VitlabError, match="gelu_new"):
        load_hf_checkpoint(tiny(), tmp_path)
    with pytest.raises(VitlabError, match="no config.json"):
        load_hf_checkpoint(tiny(), tmp_path / "nowhere")


@pytest.mark.parametrize("name, fmt", [("vit-ti/8", "hf"), ("vit22b-ti/8", "timm")])
def test_vitlab_export_writes_a_runs_model_with_its_class_names(tmp_path, name, fmt):
    from tests.eval.test_predict import saved_run
    from vitlab.cli import main
    from vitlab.data.builtin import BUILTIN_CLASSES
    from vitlab.runs.stored import load_checkpoint_model

    run = saved_run(tmp_path, name)
    assert main(["export", str(run), str(tmp_path / "out"), "--format", fmt]) == 0
    model, _ = load_checkpoint_model(run)
    fresh, _ = load_checkpoint_model(run)
    if fmt == "hf":
        assert json.loads((tmp_path / "out" / "config.json").read_text())["id2label"]["0"] == BUILTIN_CLASSES[0]
        load_hf_checkpoint(fresh, tmp_path / "out")
    else:
        assert json.loads((tmp_path / "out" / "class_names.json").read_text()) == list(BUILTIN_CLASSES)
        torch.nn.init.zeros_(fresh.head.weight)
        load_timm_checkpoint(fresh, tmp_path / "out" / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def one_line_error(capsys) -> str:
    """The error `vitlab` printed: one line, no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_export_never_writes_over_a_run_or_into_its_checkpoints(tmp_path, capsys):
    from tests.eval.test_predict import saved_run
    from vitlab.cli import main

    run = saved_run(tmp_path)
    step = next((run / "checkpoints").glob("step-*"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for out, force in [
        (step, False),
        (step, True),
        (run / "checkpoints" / "new", True),
        (run, False),
        (run, True),
        (run / "hf", False),
    ]:
        assert main(["export", str(run), str(out), "--format", "hf", *(["--force"] * force)]) == 2
        assert str(out) in one_line_error(capsys)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing of the run was replaced
    assert main(["export", str(run), str(run / "hf"), "--format", "hf", "--force"]) == 0  # a new folder inside: allowed
    assert sorted(p.name for p in (run / "hf").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]


def test_force_replaces_an_earlier_export_whole_and_nothing_else(tmp_path, capsys):
    from tests.eval.test_predict import saved_run
    from vitlab.cli import main

    run, out = saved_run(tmp_path), tmp_path / "exports" / "model"
    assert main(["export", str(run), str(out), "--format", "hf"]) == 0
    assert main(["export", str(run), str(out), "--format", "timm"]) == 2
    assert "--force" in one_line_error(capsys)
    assert main(["export", str(run), str(out), "--format", "timm", "--force"]) == 0  # the hf files go with the old folder
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "class_names.json", "create_model.json", "model.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no staging folder left beside it
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(run), str(out), "--format", "timm", "--force"]) == 2
    assert "notes.txt" in one_line_error(capsys) and (out / "notes.txt").read_text() == "mine"


def test_a_file_or_a_forbidden_target_is_one_line_without_a_set_option(tmp_path, capsys, monkeypatch):
    from tests.eval.test_predict import saved_run
    from vitlab.cli import main

    run = saved_run(tmp_path)
    (tmp_path / "file").write_text("keep")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        assert main(["export", str(run), str(out), "--format", "timm"]) == 2
        assert "is a file" in one_line_error(capsys)
    assert (tmp_path / "file").read_text() == "keep"

    def forbidden(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", forbidden)
    assert main(["export", str(run), str(tmp_path / "locked" / "out"), "--format", "timm"]) == 2
    err = one_line_error(capsys)
    assert "Permission denied" in err and "another output folder" in err and "--set" not in err


def test_non_finite_weights_are_not_exported(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
        model.head.bias[2] = float("inf")
    for fmt in FORMATS:
        with pytest.raises(VitlabError, match=r"blocks\.1\.mlp\.fc1\.weight, head\.bias hold NaN or infinite") as info:
            export_model(model, fmt, tmp_path / fmt, DATA)
        assert "export an earlier checkpoint" in str(info.value) and not (tmp_path / fmt).exists()


IMAGENET = ["data.mean=[0.485, 0.456, 0.406]", "data.std=[0.229, 0.224, 0.225]"]
STREAMED = ["data.name=folder", "data.root=unused", "data.stream=true", "augment.crop_padding=0", "augment.vflip=false"]


def test_the_runs_own_normalisation_crop_and_resampling_are_exported(tmp_path):
    from tests.eval.test_predict import saved_run
    from vitlab.cli import main

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    run = saved_run(tmp_path / "memory", overrides=tuple(IMAGENET))
    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "hf"]) == 0
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert (processor["image_mean"], processor["image_std"], processor["resample"]) == (mean, std, 3)
    assert main(["export", str(run), str(tmp_path / "timm"), "--format", "timm"]) == 0
    overlay = json.loads((tmp_path / "timm" / "create_model.json").read_text())["pretrained_cfg_overlay"]
    assert (overlay["mean"], overlay["std"], overlay["interpolation"]) == (mean, std, "bicubic")
    assert (overlay["crop_pct"], overlay["crop_mode"]) == (1.0, "squash")  # the whole image, resized to the square
    # A streamed run is evaluated on the centre crop of data.crop_fraction, resized bilinearly.
    run = saved_run(tmp_path / "streamed", overrides=(*STREAMED, "data.crop_fraction=0.8", *IMAGENET))
    assert main(["export", str(run), str(tmp_path / "hf-streamed"), "--format", "hf"]) == 0
    processor = json.loads((tmp_path / "hf-streamed" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 40} and processor["crop_size"] == {"height": 32, "width": 32}
    assert (processor["image_mean"], processor["resample"]) == (mean, 2)
    assert main(["export", str(run), str(tmp_path / "timm-streamed"), "--format", "timm"]) == 0
    overlay = json.loads((tmp_path / "timm-streamed" / "create_model.json").read_text())["pretrained_cfg_overlay"]
    assert (overlay["mean"], overlay["crop_pct"], overlay["interpolation"]) == (mean, 0.8, "bilinear")
    assert overlay["crop_mode"] == "center"


def test_transformers_preprocesses_as_the_run_did(tmp_path):
    """The exported image processor gives the pixels vitlab's own evaluation gives, ImageNet normalisation included."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from tests.eval.test_predict import saved_run
    from vitlab.cli import main
    from vitlab.data.augment import normalize
    from vitlab.data.images import read_images
    from vitlab.data.stream.crops import CropDecoder

    gen = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 6, 8, generator=gen), size=(60, 80), mode="bilinear", align_corners=False)
    Image.fromarray((smooth[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "photo.png")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for name, overrides, vitlab_pixels in [
        ("memory", IMAGENET, lambda: read_images([tmp_path / "photo.png"], IMG)),
        ("streamed", [*STREAMED, *IMAGENET], lambda: CropDecoder(size=IMG, train=False)(tmp_path / "photo.png")[None]),
    ]:
        run = saved_run(tmp_path / name, overrides=tuple(overrides))
        assert main(["export", str(run), str(tmp_path / f"hf-{name}"), "--format", "hf"]) == 0
        processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / f"hf-{name}")
        theirs = torch.as_tensor(processor(Image.open(tmp_path / "photo.png"), return_tensors="np")["pixel_values"])
        ours = normalize(vitlab_pixels(), mean, std)
        # Resampling differs a little (about 0.04); a warped instead of cropped image, or mean/std 0.5, is off by 0.4.
        assert theirs.shape == ours.shape and (theirs - ours).abs().mean() < 0.1, name


def test_resnets_and_hybrids_export_as_timms_registered_models_of_their_layout(tmp_path):
    # Checked against timm 1.0.31 here: timm.create_model(**create_model.json) loads model.safetensors and gives the
    # same logits (within 3e-5) for bit-r50x1, hybrid-r50-vit-b/16 and hybrid-r26-vit-s/32.
    resnet = randomised(create_model("bit-r50x1", img_size=IMG, num_classes=CLASSES))
    export_model(resnet, "timm", tmp_path / "r50", DATA)
    args = json.loads((tmp_path / "r50" / "create_model.json").read_text())
    assert args["model_name"] == "resnetv2_50x1_bit" and args["num_classes"] == CLASSES
    assert load_file(tmp_path / "r50" / "model.safetensors").keys() == resnet.state_dict().keys()
    hybrid = create_model("hybrid-r50-vit-b/16", img_size=IMG, num_classes=CLASSES, depth=1, pool="gap")
    export_model(hybrid, "timm", tmp_path / "hybrid", DATA)
    args = json.loads((tmp_path / "hybrid" / "create_model.json").read_text())
    assert (args["model_name"], args["patch_size"], args["depth"], args["global_pool"]) == ("vit_base_r50_s16_224", 1, 1, "avg")
    assert "patch_embed.backbone.stages.2.blocks.8.conv3.weight" in load_file(tmp_path / "hybrid" / "model.safetensors")
    with pytest.raises(VitlabError, match=r"stem_width=32: timm.s builder fixes 64.*timm registers resnetv2_50x1_bit"):
        export_model(create_model("bit-r26x1", stem_width=32), "timm", tmp_path / "small", DATA)
    with pytest.raises(VitlabError, match="HybridViT: transformers' ViT has none.*block='parallel'"):
        export_model(create_model("hybrid-r50-vit22b-b/16", img_size=IMG, depth=1), "hf", tmp_path / "hf", DATA)
