"""Mean attention distance of hand-built attention matrices, whose answer is known."""

import math

import torch

from vitlab.inspection import mean_attention_distance, patch_distances


def test_patch_distances_are_pixel_distances_between_patch_centres():
    d = patch_distances(2, 4)
    assert d.tolist()[0] == [0.0, 4.0, 4.0, torch.tensor(32.0).sqrt().item()]
    torch.testing.assert_close(d, d.T)


def neighbour_attention(side: int) -> torch.Tensor:
    """Each patch attends equally to its 4-neighbours (fewer at the border)."""
    n = side * side
    a = torch.zeros(n, n)
    for i in range(n):
        r, c = divmod(i, side)
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            if 0 <= r + dr < side and 0 <= c + dc < side:
                a[i, (r + dr) * side + c + dc] = 1.0
    return a / a.sum(-1, keepdim=True)


def test_neighbours_are_one_patch_away_and_self_attention_zero_whatever_the_class_token_takes():
    side, patch = 3, 8
    n = side * side
    maps = torch.zeros(1, 2, 2, n + 1, n + 1)  # 1 layer, 2 images, 2 heads, class token first
    maps[0, :, 0, 1:, 1:] = 0.5 * neighbour_attention(side)
    maps[0, :, 0, :, 0] = 0.5  # half of every row goes to the class token, which has no place
    maps[0, :, 1, 1:, 1:] = torch.eye(n)
    maps[0, :, :, 0, :] = 1.0 / (n + 1)  # the class token's own row is ignored
    distance = mean_attention_distance(maps, 1, patch)
    torch.testing.assert_close(distance, torch.tensor([[8.0, 0.0]]))


def test_attending_to_one_corner_gives_the_mean_distance_to_it():
    side, patch = 4, 2
    maps = torch.zeros(2, 1, 1, side * side, side * side)
    maps[..., 0] = 1.0  # every query looks at patch (0, 0)
    expected = sum(math.hypot(r, c) * patch for r in range(side) for c in range(side)) / side**2
    torch.testing.assert_close(mean_attention_distance(maps, 0, patch), torch.full((2, 1), expected))
