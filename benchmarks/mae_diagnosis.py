"""Issue 26: why a MAE-pretrained encoder fine-tunes worse than a random one, measured at the start of fine-tuning.

Each variant is a fine-tuning model built as `vitlab finetune` builds it (the built-in fine-tuning config with
`--set`-style overrides; `finetune=null` is the random init; `tweak=` an in-script change: reset-norm,
random-head, bn-head). On a fixed batch of labelled images, before any step, per block (over all patches, and
over a random 25 % as MAE's encoder saw them in pretraining): the tokens' RMS, the share of their energy in the
one token common to every position and image, the attention entropy; and of the pooled features the head sees,
their RMS and the share of their energy that varies between images. Then `--steps` steps of fine-tuning (the
config's warm-up, cosine over the steps): the training loss, the gradient norm per part (embeddings, blocks,
final norm, head) and the test accuracy. Writes `mae-diagnosis.md`, `.json` and `.png` to `--results`, after
every variant.

    PYTHONPATH=src python3 benchmarks/mae_diagnosis.py --variant "scratch|finetune=null" \\
        --variant "mae|finetune.checkpoint=runs/builtin-mae-vit22b-ti" \\
        --variant "mae, fc_norm|finetune.checkpoint=runs/builtin-mae-vit22b-ti;model.options={pool: gap, fc_norm: true}"
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab.config import RunConfig, load_config
from vitlab.data import load_splits
from vitlab.data.augment import augment_batch, normalize
from vitlab.figures import new_figure, save_figure
from vitlab.models.blocks import watch_attention
from vitlab.models.masked import random_masking
from vitlab.models.vit import VisionTransformer
from vitlab.runs.builders import build_model
from vitlab.runtime.context import local
from vitlab.runtime.precision import autocast
from vitlab.train.finetune import prepare_model
from vitlab.train.optim import build_optimizer
from vitlab.train.schedule import lr_factor, warmup_steps

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "builtin-finetune-vit22b-ti.yaml"
PARTS = ("embed", "blocks", "norm", "head")


def part(name: str) -> str:
    """Which part of the model a parameter belongs to, for the gradient norms."""
    if name.startswith(("patch_embed.", "pos_embed", "cls_token")):
        return "embed"
    if name.startswith("blocks."):
        return "blocks"
    return "head" if name.startswith(("head.", "pre_logits.")) else "norm"


@torch.no_grad()
def layer_stats(model: VisionTransformer, x: torch.Tensor, keep: float = 1.0) -> dict[str, list[float]]:
    """Per block, on all patches or a random `keep` of them: the tokens' RMS, the share of their energy in the one
    token common to every position and image, and the attention entropy / log(tokens)."""
    model.eval()
    prefix = model.num_prefix_tokens
    tokens = model.embed(x)
    if keep < 1:
        kept, _, _ = random_masking(tokens[:, prefix:], 1 - keep)
        tokens = torch.cat([tokens[:, :prefix], kept], dim=1)
    entropy: list[float] = []

    def record(_: int, logits: torch.Tensor) -> None:
        p = logits.float().softmax(-1)
        entropy.append((-(p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(p.shape[-1])).item())

    rms, common = [], []
    with watch_attention(model, record):
        for block in model.blocks:
            tokens = block(tokens)
            energy = tokens.float().square()
            rms.append(energy.mean(-1).sqrt().mean().item())
            common.append((tokens.float().mean((0, 1)).square().mean() / energy.mean()).item())
    model.train()
    return {"token_rms": rms, "common_share": common, "attention_entropy": entropy}


def variant_model(config: RunConfig, num_classes: int, tweak: str) -> VisionTransformer:
    """The fine-tuning model of `config`, with an in-script `tweak`: reset-norm, random-head or bn-head."""
    torch.manual_seed(config.train.seed)
    model, _ = prepare_model(build_model(config, config.data.image_size, num_classes), config.finetune, load=True)
    if tweak == "reset-norm":
        model.norm.reset_parameters()
    elif tweak == "random-head":  # the head a from-scratch run starts with, not fine-tuning's zero one
        model.reset_head(num_classes, zero=False)
    elif tweak == "bn-head":  # MAE's linear-probe head: BatchNorm without affine parameters, then the linear layer
        model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), model.head)
    return model


def measure(label: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """Statistics at the start of fine-tuning, then `args.steps` steps of it, of one variant."""
    tweak = next((o.split("=", 1)[1] for o in overrides if o.startswith("tweak=")), "")
    overrides = [o for o in overrides if not o.startswith("tweak=")]
    base = [f"data.num_train={args.labelled}", f"data.num_test={args.test_images}", f"train.seed={args.seed}"]
    config = load_config(CONFIG, [*base, *args.set, *overrides], RunConfig)
    d, tc, oc = config.data, config.train, config.optim
    splits = load_splits(
        d.name, d.root, d.image_size, d.download, num_train=d.num_train, num_test=d.num_test, seed=d.seed, **d.builtin
    )
    model = variant_model(config, splits.train.num_classes, tweak)
    ctx = local("cpu", tc.precision)  # bf16 where the CPU has it, as `vitlab finetune` runs
    probe = normalize(splits.train.images[: args.stats_images].float() / 255, d.mean, d.std)
    full, visible = layer_stats(model, probe), layer_stats(model, probe, keep=0.25)
    with torch.no_grad():
        model.eval()
        pooled = model.pooled(model.forward_features(probe)).float()
        model.train()
    between = ((pooled - pooled.mean(0)).square().mean() / pooled.square().mean()).item()
    optimizer = build_optimizer(model, oc)
    steps_per_epoch = len(splits.train) // tc.batch_size
    warmup = warmup_steps(oc, steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    losses, grads = [], {p: [] for p in PARTS}
    for step in range(args.steps):
        idx = torch.randint(len(splits.train), (tc.batch_size,), generator=gen)
        x, y = augment_batch(
            splits.train.images[idx], splits.train.labels[idx], config.augment, gen, splits.train.num_classes, d.mean, d.std
        )
        for group in optimizer.param_groups:
            group["lr"] = oc.lr * lr_factor(step, args.steps, warmup, oc) * group["lr_scale"]
        with autocast(ctx.device, ctx.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        squares = dict.fromkeys(PARTS, 0.0)
        for name, param in model.named_parameters():
            if param.grad is not None:
                squares[part(name)] += param.grad.float().square().sum().item()
        for p in PARTS:
            grads[p].append(math.sqrt(squares[p]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        test = splits.test
        with autocast(ctx.device, ctx.precision):
            logits = torch.cat([model(normalize(b.float() / 255, d.mean, d.std)).float() for b in test.images.split(256)])
    tail = max(1, args.steps // 10)
    head_weight = [p for n, p in model.named_parameters() if n.startswith("head.") and p.ndim == 2][-1]
    return {
        "label": label,
        "overrides": overrides + ([f"tweak={tweak}"] if tweak else []),
        "full": full,
        "visible_25": visible,
        "pooled_rms": pooled.square().mean().sqrt().item(),
        "pooled_between_share": between,
        "loss": losses,
        "grad_norm": grads,
        "final_loss": sum(losses[-tail:]) / tail if losses else math.nan,
        "final_grad": {p: sum(grads[p][-tail:]) / tail if losses else math.nan for p in PARTS},
        "head_weight_rms": head_weight.float().square().mean().sqrt().item(),
        "test_acc1": (logits.argmax(-1) == test.labels).float().mean().item(),
    }


def table(rows: list[dict]) -> str:
    """One markdown row per variant."""
    lines = [
        "| variant | token RMS, last block (all / 25 %) | common share, last block | attention entropy, mean over blocks "
        "(all / 25 %) | pooled RMS | between-image share of pooled | train loss, last 10 % | "
        "grad norm blocks / head, last 10 % | head RMS | test acc@1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, v = r["full"], r["visible_25"]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        lines.append(
            f"| {r['label']} | {f['token_rms'][-1]:.2f} / {v['token_rms'][-1]:.2f} | {f['common_share'][-1]:.2f} | "
            f"{mean(f['attention_entropy']):.3f} / {mean(v['attention_entropy']):.3f} | {r['pooled_rms']:.3f} | "
            f"{r['pooled_between_share']:.2f} | "
            f"{r['final_loss']:.3f} | {r['final_grad']['blocks']:.2f} / {r['final_grad']['head']:.2f} | "
            f"{r['head_weight_rms']:.3f} | {100 * r['test_acc1']:.1f} % |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """Per block: token RMS, common share, attention entropy (solid: all patches, dotted: 25 %); per step: loss, block gradient norm."""
    fig = new_figure(17, 3.6)
    axes = fig.subplots(1, 5)
    for i, r in enumerate(rows):
        colour = f"C{i}"
        for key, ax in (("token_rms", axes[0]), ("common_share", axes[1]), ("attention_entropy", axes[2])):
            ax.plot(r["full"][key], color=colour, label=r["label"])
            ax.plot(r["visible_25"][key], color=colour, ls=":")
        axes[3].plot(r["loss"], color=colour, lw=0.8)
        axes[4].plot(r["grad_norm"]["blocks"], color=colour, lw=0.8)
    axes[0].set(title="token RMS after each block", xlabel="block", yscale="log")
    axes[1].set(title="energy share of the common token", xlabel="block")
    axes[2].set(title="attention entropy / log(tokens)", xlabel="block")
    axes[3].set(title="fine-tuning loss", xlabel="step")
    axes[4].set(title="gradient norm of the blocks", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7)
    return save_figure(fig, path, axes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="LABEL|override;override;… (tweak=reset-norm|…)")
    parser.add_argument("--merge", nargs="+", type=Path, default=[], help="only tabulate and plot the rows of these JSON files")
    parser.add_argument("--set", action="append", default=[], help="an override for every variant, e.g. optim.lr=2.5e-4")
    parser.add_argument("--labelled", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--stats-images", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default="mae-diagnosis")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.results.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items() if k != "results"}
    rows = [row for path in args.merge for row in json.loads(path.read_text())["rows"]]
    if args.merge:
        (args.results / f"{args.stem}.md").write_text(f"{table(rows)}\n\nMerged from: {', '.join(map(str, args.merge))}\n")
        plot(rows, args.results / f"{args.stem}.png")
    for spec in args.variant:  # the files are rewritten after every variant, so a stopped run keeps what it measured
        label, _, overrides = spec.partition("|")
        rows.append(measure(label, [o for o in overrides.split(";") if o], args))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        (args.results / f"{args.stem}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
        (args.results / f"{args.stem}.md").write_text(f"{table(rows)}\n\nSettings: {json.dumps(settings)}\n")
        plot(rows, args.results / f"{args.stem}.png")


if __name__ == "__main__":
    main()
