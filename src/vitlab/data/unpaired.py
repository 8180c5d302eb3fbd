"""Two image domains for unpaired translation: the CycleGAN folder layout and a built-in pair with known truth.

Folders: `root/{trainA,trainB,testA,testB}/*.png|jpg|jpeg`, as CycleGAN's datasets ship. Training
images are resized to `load_size` (CycleGAN: 286) and cropped at random to `crop_size` (256) during
training; test images are resized to `crop_size` directly, so evaluation is deterministic.

Built-in pair: grey scenes from the procedural shape renderer (`vitlab.data.builtin`), shown in domain
A through a warm "sepia" tone curve and in domain B through a cool "cyanotype" one. The same scene
in both domains is known, so the translation of every test image can be compared with its truth.
Training scenes of A and B are drawn independently (the pairing is unknown to the learner); each
domain's colours lie on its own curve, so only the true tone mapping carries the distribution of A
onto that of B while keeping the scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vitlab.config import PAIR_DATASETS, PAIRING_NAMES
from vitlab.data.builtin import BuiltinDifficulty, difficulty_knobs, make_builtin
from vitlab.data.images import image_files, read_images
from vitlab.errors import VitlabError

FOLDERS = ("trainA", "trainB", "testA", "testB")

# Tone curves of the built-in domains: RGB colours at grey levels 0, 1/2 and 1, linear in between.
SEPIA = ((0.10, 0.03, 0.00), (0.78, 0.42, 0.16), (1.00, 0.94, 0.78))
CYANOTYPE = ((0.00, 0.06, 0.18), (0.16, 0.46, 0.72), (0.82, 0.96, 1.00))
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


@dataclass
class UnpairedData:
    """uint8 (N, 3, H, W) image sets of domains A and B; `truth_*` are the test sets' known counterparts.

    The training sets are empty when only the test sets were loaded (for evaluation).
    """

    train_a: torch.Tensor
    train_b: torch.Tensor
    test_a: torch.Tensor
    test_b: torch.Tensor
    truth_ab: torch.Tensor | None = None  # the B image of each test_a scene
    truth_ba: torch.Tensor | None = None  # the A image of each test_b scene

    def __post_init__(self) -> None:
        for name in ("train_a", "train_b", "test_a", "test_b"):
            images = getattr(self, name)
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise VitlabError(f"{name} must be uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if not len(self.test_a) or not len(self.test_b):
            raise VitlabError("both test sets need at least one image")
        for name, test in (("truth_ab", self.test_a), ("truth_ba", self.test_b)):
            truth = getattr(self, name)
            if truth is not None and truth.shape != test.shape:
                raise VitlabError(f"{name} has shape {tuple(truth.shape)} but its test images have {tuple(test.shape)}")

    @property
    def has_truth(self) -> bool:
        """Whether both test sets have known translations."""
        return self.truth_ab is not None and self.truth_ba is not None


def tone_map(grey: torch.Tensor, curve: tuple[tuple[float, float, float], ...]) -> torch.Tensor:
    """Grey levels (N, H, W) in [0, 1] → uint8 RGB (N, 3, H, W) through a piecewise-linear tone curve."""
    stops = torch.tensor(curve, dtype=torch.float32)  # (K, 3)
    position = grey.clamp(0, 1) * (len(curve) - 1)
    low = position.floor().long().clamp(max=len(curve) - 2)
    frac = (position - low)[..., None]
    rgb = stops[low] * (1 - frac) + stops[low + 1] * frac  # (N, H, W, 3)
    return rgb.mul(255).round().to(torch.uint8).permute(0, 3, 1, 2).contiguous()


def builtin_scenes(num_images: int, seed: int, image_size: int, difficulty: BuiltinDifficulty) -> torch.Tensor:
    """Grey scenes (N, H, W) in [0, 1]: the luma of the built-in shape images."""
    rgb = make_builtin(num_images, seed, image_size, difficulty).images.float() / 255
    return torch.einsum("nchw,c->nhw", rgb, torch.tensor(_LUMA))


def no_images(size: int) -> torch.Tensor:
    """An empty uint8 image set of the given side."""
    return torch.zeros(0, 3, size, size, dtype=torch.uint8)


def builtin_pair(
    num_train: int = 1000,
    num_test: int = 200,
    seed: int = 0,
    load_size: int = 36,
    crop_size: int = 32,
    with_train: bool = True,
    **difficulty: object,
) -> UnpairedData:
    """The built-in sepia ↔ cyanotype pair; `difficulty` takes the fields of BuiltinDifficulty."""
    knobs = difficulty_knobs(difficulty)
    seeds = torch.randint(2**62, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
    train_a, train_b = no_images(load_size), no_images(load_size)
    if with_train:
        train_a = tone_map(builtin_scenes(num_train, seeds[0], load_size, knobs), SEPIA)
        train_b = tone_map(builtin_scenes(num_train, seeds[1], load_size, knobs), CYANOTYPE)
    test_a = builtin_scenes(num_test, seeds[2], crop_size, knobs)
    test_b = builtin_scenes(num_test, seeds[3], crop_size, knobs)
    return UnpairedData(
        train_a=train_a,
        train_b=train_b,
        test_a=tone_map(test_a, SEPIA),
        test_b=tone_map(test_b, CYANOTYPE),
        truth_ab=tone_map(test_a, CYANOTYPE),
        truth_ba=tone_map(test_b, SEPIA),
    )


def folder_pair(root: str | Path, load_size: int = 286, crop_size: int = 256, with_train: bool = True) -> UnpairedData:
    """A CycleGAN dataset folder: training images at `load_size` (unless not wanted), test images at `crop_size`."""
    root = Path(root)
    layout = f"expected the CycleGAN layout {root}/{{{','.join(FOLDERS)}}}/*.png|jpg|jpeg"
    wanted = FOLDERS if with_train else FOLDERS[2:]
    missing = [name for name in wanted if not (root / name).is_dir()]
    if missing:
        raise VitlabError(f"missing folder(s) {', '.join(missing)} under {root}; {layout}")
    files = {name: image_files(root / name) for name in wanted}
    empty = [name for name, found in files.items() if not found]
    if empty:
        raise VitlabError(f"no images in {', '.join(str(root / name) for name in empty)}; {layout}")
    train = {name: read_images(files[name], load_size) if with_train else no_images(load_size) for name in FOLDERS[:2]}
    return UnpairedData(
        train_a=train["trainA"],
        train_b=train["trainB"],
        test_a=read_images(files["testA"], crop_size),
        test_b=read_images(files["testB"], crop_size),
    )


def load_pair(
    name: str, root: str | Path | None, load_size: int, crop_size: int, with_train: bool = True, **builtin: object
) -> UnpairedData:
    """The domain pair by name: `builtin` (knobs in `builtin`) or `folder` (at `root`)."""
    if load_size < crop_size:
        raise VitlabError(f"load_size={load_size} must be at least crop_size={crop_size}")
    if name == "builtin":
        return builtin_pair(load_size=load_size, crop_size=crop_size, with_train=with_train, **builtin)
    if name not in PAIR_DATASETS:
        raise VitlabError(f"unknown domain pair {name!r}; allowed: {', '.join(map(repr, PAIR_DATASETS))}")
    if root is None:
        raise VitlabError("the folder pair needs a root: the folder holding trainA, trainB, testA, testB")
    return folder_pair(root, load_size, crop_size, with_train)


def unpaired_batches(n_a: int, n_b: int, batch_size: int, epoch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index batches (into A, into B) of one epoch: A shuffled, each paired with B images drawn at random.

    An epoch has max(n_a, n_b) // batch_size batches (CycleGAN's epoch is its larger domain); A's
    permutation repeats when A is the smaller domain. Everything depends on (seed, epoch) only.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    steps = max(n_a, n_b) // batch_size
    repeats = -(-steps * batch_size // n_a)
    order_a = torch.cat([torch.randperm(n_a, generator=gen) for _ in range(repeats)])
    order_b = torch.randint(n_b, (steps * batch_size,), generator=gen)
    return list(zip(order_a[: steps * batch_size].split(batch_size), order_b.split(batch_size)))


def index_batches(n_a: int, n_b: int, batch_size: int, epoch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index batches of one epoch paired by position, as the paper's code did: A[i] always goes with B[i].

    Only the first min(n_a, n_b) images of each domain are used; an epoch shuffles those positions
    and has min(n_a, n_b) // batch_size batches. Everything depends on (seed, epoch) only.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    steps = min(n_a, n_b) // batch_size
    order = torch.randperm(min(n_a, n_b), generator=gen)[: steps * batch_size].split(batch_size)
    return [(batch, batch) for batch in order]


PAIRINGS = dict(zip(PAIRING_NAMES, (unpaired_batches, index_batches)))  # data.pairing → its batch pairs


def epoch_length(pairing: str, n_a: int, n_b: int, batch_size: int) -> int:
    """Batches per epoch: max(n_a, n_b) // batch_size for random pairing (CycleGAN), min(…) for index pairing."""
    return (max if pairing == "random" else min)(n_a, n_b) // batch_size


def random_window(images: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Cut a `size`×`size` window at a random position from each image (N, C, H, W)."""
    n, _, h, w = images.shape
    if (h, w) == (size, size):
        return images
    top = torch.randint(0, h - size + 1, (n,), generator=gen)
    left = torch.randint(0, w - size + 1, (n,), generator=gen)
    return torch.stack([img[:, t : t + size, x : x + size] for img, t, x in zip(images, top.tolist(), left.tolist())])
