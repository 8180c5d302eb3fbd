"""Linear CKA: the unbiased HSIC against its U-statistic, CKA's invariances, the minibatch form, two runs compared."""

import itertools
import json

import pytest
import torch
from PIL import Image

from tests.eval.test_predict import saved_run
from vitlab import VitlabError, create_model
from vitlab.cli import main
from vitlab.inspection.cka import compare_models, gram, hsic1, linear_cka, representation_layers


def hsic_u_statistic(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Song et al. 2012's unbiased HSIC written as sums over distinct index tuples (i, j), (i, j, q), (i, j, q, r)."""
    n = len(k)
    pairs = sum(k[i, j] * l[i, j] for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    triples = sum(k[i, j] * l[i, q] for i, j, q in itertools.permutations(range(n), 3)) / (n * (n - 1) * (n - 2))
    quads = sum(k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(range(n), 4)) / (n * (n - 1) * (n - 2) * (n - 3))
    return float(pairs + quads - 2 * triples)


def test_unbiased_hsic_is_the_u_statistic():
    torch.manual_seed(0)
    x, y = torch.randn(7, 3), torch.randn(7, 5)
    k, l = gram(x), gram(y)  # noqa: E741
    assert hsic1(k[None], l[None]).item() == pytest.approx(hsic_u_statistic(k, l), rel=1e-9)
    both = hsic1(torch.stack([k, l]), torch.stack([k, l]))  # every pair at once
    assert both[0, 1].item() == pytest.approx(hsic_u_statistic(k, l), rel=1e-9)
    assert both[1, 1].item() == pytest.approx(hsic_u_statistic(l, l), rel=1e-9)


def test_cka_is_one_on_the_same_features_and_invariant_to_rotation_and_isotropic_scaling():
    torch.manual_seed(0)
    x, y = torch.randn(20, 6), torch.randn(20, 4)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0)
    base = linear_cka(x, y)
    assert 0 < abs(base) < 0.9
    assert linear_cka(x @ q, y) == pytest.approx(base) and linear_cka(x, 0.1 * y) == pytest.approx(base)
    assert linear_cka(x * torch.tensor([10.0, 1, 1, 1, 1, 1]), y) != pytest.approx(base)  # not per-feature scaling


def test_cka_by_hand_on_four_examples():
    # X = [1, 2, 3, 4]ᵀ, Y = [1, 1, 2, 2]ᵀ, K = XXᵀ, L = YYᵀ: by the U-statistic's sums (12 pairs, 24 triples,
    # 24 quadruples) HSIC(K, L) = 46/3 + 31/3 − 2 · 301/24 = 7/12, HSIC(K, K) = 13/6, HSIC(L, L) = 1/6,
    # so CKA = (7/12) / √(13/36) = 7 / (2√13).
    x, y = torch.tensor([[1.0], [2], [3], [4]]), torch.tensor([[1.0], [1], [2], [2]])
    assert [hsic1(gram(a)[None], gram(b)[None]).item() for a, b in ((x, y), (x, x), (y, y))] == pytest.approx(
        [7 / 12, 13 / 6, 1 / 6]
    )
    assert linear_cka(x, y) == pytest.approx(7 / (2 * 13**0.5))


def test_minibatch_cka_sums_hsic_over_batches_and_a_model_matches_itself():
    torch.manual_seed(0)
    vit = create_model("vit-ti/8", img_size=16, num_classes=3, depth=3, embed_dim=32, num_heads=2, mlp_dim=64)
    other = create_model("vit22b-ti/8", img_size=16, num_classes=3, depth=2, embed_dim=32, num_heads=2, mlp_dim=64)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    same = compare_models(vit, vit, images, batch_size=5)
    assert [row[i] for i, row in enumerate(same.cka)] == pytest.approx([1.0] * 3)
    assert same.layers_a == ["block1", "block2", "block3"] and same.images == 10
    result = compare_models(vit, other, images, batch_size=5)
    assert len(result.cka) == 3 and len(result.cka[0]) == 2 and len(result.to_input_b) == 2

    feats = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: feats.setdefault(n, []).append(o)) for n, m in representation_layers(vit)
    ]
    hooks += [
        m.register_forward_hook(lambda m, i, o, n=n: feats.setdefault("o" + n, []).append(o))
        for n, m in representation_layers(other)
    ]
    with torch.no_grad():
        for batch in images.split(5):
            x = batch.float() / 255 * 2 - 1
            vit(x), other(x)
    for h in hooks:
        h.remove()

    def summed(a: list, b: list) -> float:
        return sum(hsic1(gram(u)[None], gram(v)[None]).item() for u, v in zip(a, b))

    a, b = feats["block2"], feats["oblock1"]
    expected = summed(a, b) / (summed(a, a) * summed(b, b)) ** 0.5
    assert result.cka[1][0] == pytest.approx(expected, rel=1e-6)
    assert result.cka[1][0] != pytest.approx(linear_cka(torch.cat(a), torch.cat(b)), rel=1e-4)  # not one big batch


def test_too_few_images_are_refused():
    vit = create_model("vit-ti/8", img_size=16, num_classes=3, depth=1, embed_dim=32, num_heads=2, mlp_dim=64)
    with pytest.raises(VitlabError, match="at least 4"):
        compare_models(vit, vit, torch.zeros(3, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(VitlabError, match="--batch-size 2"):
        compare_models(vit, vit, torch.zeros(8, 3, 16, 16, dtype=torch.uint8), batch_size=2)


def test_vitlab_cka_writes_json_and_heat_map(tmp_path, capsys):
    run_a = saved_run(tmp_path / "a", "vit-ti/8")
    run_b = saved_run(tmp_path / "b", "vit22b-ti/8")
    out = tmp_path / "cka"
    assert main(["cka", str(run_a), str(run_b), "--num-images", "12", "--batch-size", "6", "--out", str(out)]) == 0
    facts = json.loads((out / "cka.json").read_text())
    assert facts["layers_a"] == ["block1"] and len(facts["cka"]) == 1 and facts["images"] == 12
    with Image.open(out / "cka.png") as png:
        assert png.width > 600
    assert "CKA" in capsys.readouterr().out


def test_the_layers_are_resnet_units_then_vit_blocks_in_forward_order():
    small = dict(stem_width=16, stem_channels=[32, 64], stem_groups=8, depth=2, embed_dim=32, num_heads=2)
    hybrid = create_model("hybrid-r26-vit-ti/8", img_size=32, num_classes=3, **small)
    names = [name for name, _ in representation_layers(hybrid)]
    assert names == ["s1.u1", "s1.u2", *(f"s2.u{i}" for i in range(1, 7)), "block1", "block2"]
    resnet = create_model("bit-r26x1", num_classes=3, stem_width=16, channels=[32, 64], layers=[1, 2], groups=8)
    assert [name for name, _ in representation_layers(resnet)] == ["s1.u1", "s2.u1", "s2.u2"]
