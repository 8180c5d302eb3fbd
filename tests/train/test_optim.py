"""The optimizer's stabiliser settings: independent weight decay (Wortsman et al. 2023) and AdamW's ε, checked on
the optimizer's own step; and one tiny run with every stabiliser switch on."""

import pytest
import torch

from vitlab import VitlabError, create_model
from vitlab.cli import main
from vitlab.config import OptimConfig, load_config
from vitlab.runs.kinds import load_experiment
from vitlab.train.classify import train
from vitlab.train.optim import build_optimizer
from vitlab.train.scaffold import Run

from .test_classify import read_losses, tiny_config


def decayed_by_one_step(lr: float, factor: float, **optim) -> dict[str, float]:
    """Each decayed weight matrix's relative shrink after one AdamW step at lr·factor with zero gradients."""
    torch.manual_seed(0)
    model = create_model("vit-ti/8", img_size=16, num_classes=3, depth=2)
    optimizer = build_optimizer(model, OptimConfig(lr=lr, **optim))
    Run.set_lr(optimizer, lr * factor)  # what the loop does at a step whose schedule factor is `factor`
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is then 0: only the decay moves the weights
    optimizer.step()
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] for p in group["params"]}
    return {name: (1 - p / before[name]).mean().item() for name, p in model.named_parameters() if id(p) in decayed}


@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_independent_weight_decay_shrinks_by_lambda_times_the_schedule_whatever_the_lr(layer_decay):
    for lr in (1e-3, 0.3):
        shrink = decayed_by_one_step(lr, 0.25, weight_decay=1e-2, independent_weight_decay=True, layer_decay=layer_decay)
        assert shrink and all(v == pytest.approx(1e-2 * 0.25, rel=1e-4) for v in shrink.values()), (lr, shrink)
    coupled = decayed_by_one_step(0.3, 0.25, weight_decay=1e-2)  # torch's AdamW: the decay is multiplied by the LR
    assert coupled["blocks.0.attn.qkv.weight"] == pytest.approx(0.3 * 1e-2 * 0.25, rel=1e-4)


def test_adamw_eps_reaches_every_parameter_group():
    model = create_model("vit-ti/8", img_size=16, num_classes=3, depth=1)
    assert {g["eps"] for g in build_optimizer(model, OptimConfig()).param_groups} == {1e-8}  # torch's default
    assert {g["eps"] for g in build_optimizer(model, OptimConfig(eps=1e-6)).param_groups} == {1e-6}


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["optim.eps=0"], "optim.eps=0.0 must be > 0"),
        (["optim.eps=-1e-8"], "optim.eps=-1e-08 must be > 0"),
        (["optim.name=sgd", "optim.independent_weight_decay=true"], "optim.independent_weight_decay needs optim.name=adamw"),
        (["model.options.layer_scale=-0.1"], "model.options: layer_scale=-0.1 must be a finite number >= 0"),
        (["model.options.num_registers=-4"], "model.options: num_registers=-4 must be a whole number >= 0"),
    ],
)
def test_bad_stabiliser_settings_are_refused_at_load(overrides, named):
    with pytest.raises(VitlabError, match=named):
        load_experiment(None, overrides)


def test_a_bad_stabiliser_setting_is_one_line_from_the_cli(capsys):
    assert main(["train", "--set", "model.options.num_registers=-2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_registers=-2" in err


def test_a_run_with_every_stabiliser_on_learns(tmp_path):
    switches = [
        "model.options.layer_scale=0.1",
        "model.options.num_registers=2",
        "optim.independent_weight_decay=true",
        "optim.weight_decay=1e-4",
        "optim.eps=1e-7",
    ]
    config = tiny_config(tmp_path, "train.epochs=4", "train.eval_every_epochs=4", *switches)
    assert load_config(None, [f"out_dir={tmp_path}", *switches]).optim.eps == 1e-7
    results = train(config, progress=False)
    losses = list(read_losses(tmp_path / config.name).values())
    assert len(losses) == 64 and sum(losses[-8:]) < 0.9 * sum(losses[:8])
    assert results["test"]["acc1"] > 0.15  # 10 classes: chance 0.1
