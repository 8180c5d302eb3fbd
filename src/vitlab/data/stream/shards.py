"""WebDataset shards: write an image folder as `.tar` shards, read a shard pattern back through DataLoader workers.

Each sample in a shard holds the original encoded bytes (`<key>.jpg` or `<key>.png`), the class
index (`<key>.cls`) and the file's path below its split (`<key>.name`); `info.json` beside the
shards lists the class names and every shard's sample count. Writing and parsing go through the
`webdataset` package, so any tool that reads WebDataset reads these shards.

Nothing in a shard folder is executed. `info.json` is checked when read (read_info): its shard names
must be plain `*.tar` file names, and shard_paths turns them into files inside the folder (a link
leading out of it is refused). Shards are opened here as plain files and only parsed by webdataset,
whose own opener would run a `pipe:` name through a shell. Every sample's key and label are checked
(a sample number of its split, a class index), each error naming the shard and the sample.

Resume guarantee. WebDataset by itself gives none: its shuffles are seeded from the clock, and a
restarted iterator starts the shards over. Here a rank's shards (every world_size-th) are split
between workers (every workers-th), each worker's shard order and shuffle buffer are seeded by
(seed, epoch, rank, worker), and the crop by (seed, epoch, rank, worker, position), so an epoch is
a function of those alone. A run resumed at batch k with the same world size and worker count
gets the uninterrupted run's batches bit for bit: each worker re-reads, without decoding, the
samples it had served before batch k. With another world size or worker count it resumes at the
right sample count (batch k of the epoch, the same number of batches to go) but with a fresh
assignment and shuffle: in that epoch some samples are then seen twice and others not at all.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitlab.data.images import outside_note
from vitlab.data.stream.crops import CropDecoder
from vitlab.data.stream.files import DECODE_ERRORS, EVAL_SPLITS, holdout, scan_split
from vitlab.data.stream.samples import Sample, collate
from vitlab.data.stream.workers import StreamLoader
from vitlab.errors import VitlabError, brief

INFO = "info.json"
_IMAGE_FIELDS = ("jpg", "png")
_SHARD_NAME = re.compile(r"\w[\w.-]*\.tar")  # a plain file name: no folder, no `..`, no `scheme:`
_REWRITE = "rewrite the shards with `vitlab shard`"


def write_shards(
    folder: str | Path,
    out_dir: str | Path,
    max_count: int = 10_000,
    max_size: float = 1e9,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> dict:
    """Write `folder/{train,val,test}/<class>/…` as `OUT_DIR/<split>-NNNNNN.tar` shards and `OUT_DIR/info.json`.

    Each split is written in an order shuffled by `seed` (WebDataset's advice): read back shard by shard
    through a small buffer, the samples of a folder's order would come class by class. A sample's key
    stays its number in the split's sorted file list. A shard closes at `max_count` samples or
    `max_size` bytes. `val_fraction` > 0 also writes a `minival` split held out of train (the same
    stratified draw as the streaming folders). Returns the info written.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    if max_count < 1 or max_size <= 0:
        raise VitlabError(f"shards need max_count >= 1 and max_size > 0, got {max_count}, {max_size}")
    if not (folder / "train").is_dir():
        raise VitlabError(f"expected {folder}/train/<class>/*.jpg (and val/ or test/)")
    if out_dir.exists() and not out_dir.is_dir():
        raise VitlabError(f"{out_dir} is a file, not a folder; give a new or existing folder for the shards")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VitlabError(f"cannot create the shard folder {out_dir} ({exc.strerror}); give one that can be written") from None
    train = scan_split(folder / "train")
    kept, held = holdout(train.labels, val_fraction, seed)
    tables = {"train": train.subset(kept)}
    if len(held):
        tables["minival"] = train.subset(held)
    for split in EVAL_SPLITS:
        if (folder / split).is_dir():
            tables[split] = scan_split(folder / split, train.classes)
    splits = {}
    for split, table in tables.items():
        counts: dict[str, int] = {}  # shard file name -> samples, filled as each shard closes

        def closed(name: str) -> None:
            counts[Path(name).name] = writer.count

        pattern = str(out_dir / f"{split}-%06d.tar")
        writer = wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0, encoder=False, post=closed)
        with writer:
            for i in np.random.default_rng([abs(seed), 11]).permutation(len(table)):  # shards mix their classes
                path = table.path(i)
                field = "png" if path.suffix.lower() == ".png" else "jpg"
                label, name = str(int(table.labels[i])).encode(), table.files[i].tobytes()
                writer.write({"__key__": f"{i:09d}", field: path.read_bytes(), "cls": label, "name": name})
        last = len(counts) - 1
        splits[split] = {"pattern": f"{split}-{{{0:06d}..{last:06d}}}.tar", "samples": len(table), "shards": counts}
    info = {"classes": list(train.classes), "splits": splits}
    (out_dir / INFO).write_text(json.dumps(info, indent=1))
    return info


def read_info(path: str | Path) -> dict:
    """The `info.json` that write_shards put beside the shards, checked: anything else is a one-line VitlabError."""
    path = Path(path)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VitlabError(f"cannot read the shard info {path}: {exc}; it is written by `vitlab shard`") from None
    problem = _info_problem(info)
    if problem:
        raise VitlabError(
            f"{path} is not a shard info of `vitlab shard`: {problem}; rewrite it with `vitlab shard FOLDER {path.parent}`"
        )
    return info


def _count(value: object) -> bool:
    """Whether `value` is a JSON whole number >= 0 (not a bool, a float or a string)."""
    return type(value) is int and value >= 0


def _info_problem(info: object) -> str | None:
    """What keeps `info` from being what write_shards writes, or None."""
    if not isinstance(info, dict) or not isinstance(info.get("classes"), list) or not isinstance(info.get("splits"), dict):
        return "it needs a 'classes' list and a 'splits' map"
    classes = info["classes"]
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        return f"'classes' must be a non-empty list of distinct names, got {brief(classes)}"
    listed: set[str] = set()
    for split, facts in info["splits"].items():
        if (
            not isinstance(facts, dict)
            or not _count(facts.get("samples"))
            or not isinstance(facts.get("shards"), dict)
            or not isinstance(facts.get("pattern", ""), str)
        ):
            return f"split {brief(split)} needs 'samples' (a count), 'shards' (file name: count) and at most a 'pattern' string"
        for name, count in facts["shards"].items():
            if not _SHARD_NAME.fullmatch(name):
                return f"shard {brief(name)} of split {brief(split)} is not a plain *.tar file name"
            if name in listed:
                return f"shard {name} is listed twice"
            if not _count(count):
                return f"shard {name} has {brief(count)} samples, not a count"
            listed.add(name)
        if sum(facts["shards"].values()) != facts["samples"]:
            return f"split {brief(split)} has {facts['samples']} samples but its shards hold {sum(facts['shards'].values())}"
    return None


def shard_paths(root: str | Path, info: dict, split: str) -> list[Path]:
    """The shard files of `split` listed in `info` (from read_info), sorted: each a file inside `root`, never a link out of it."""
    root = Path(root).absolute()
    paths = [root / name for name in sorted(info["splits"][split]["shards"])]
    for path in paths:
        if not path.is_file():
            raise VitlabError(f"shard {path}, listed in {root / INFO}, is not a file; {_REWRITE}")
        note = outside_note(path, root)
        if note:
            raise VitlabError(f"cannot read shard {note}")
    return paths


class ShardStream(IterableDataset):
    """One rank's share of a list of shard files, as Samples: split by rank then worker, buffer-shuffled, cropped.

    `shards` are file paths (shard_paths gives a split's), `info` what read_info returns. An epoch is `samples_per_epoch` samples over all ranks, cut to whole batches per worker; a
    worker that runs out of shards starts its (reshuffled) list again. Evaluation (`decoder.train`
    False) reads every shard once, in order, without shuffling; ranks may then get different numbers
    of batches, so gather evaluation results after the loop rather than reducing them batch by batch.
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        decoder: CropDecoder,
        batch_size: int,
        *,
        info: dict,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 2000,
    ):
        if isinstance(shards, (str, Path)):
            raise VitlabError(f"ShardStream takes a list of shard files (see shard_paths), not one pattern: {brief(str(shards))}")
        self.urls = [os.path.abspath(shard) for shard in shards]  # opened as plain files, never as URLs
        self.counts = {name: n for split in info["splits"].values() for name, n in split["shards"].items()}
        # a sample's key is its number in its split: below the split's size
        self.split_sizes = {name: split["samples"] for split in info["splits"].values() for name in split["shards"]}
        unknown = [url for url in self.urls if os.path.basename(url) not in self.counts]
        if unknown:
            raise VitlabError(f"shard(s) {unknown[:3]} are not listed in the shard info; rewrite it with `vitlab shard`")
        if seed < 0 or batch_size < 1 or shuffle_buffer < 1 or not 0 <= rank < world_size or len(self.urls) < world_size:
            raise VitlabError(
                f"ShardStream needs seed >= 0, batch_size >= 1, shuffle_buffer >= 1, 0 <= rank < world_size "
                f"and at least one shard per rank, got seed={seed}, batch_size={batch_size}, "
                f"shuffle_buffer={shuffle_buffer}, rank={rank}, world_size={world_size}, "
                f"{len(self.urls)} shard(s)"
            )
        self.decoder, self.batch_size, self.seed, self.rank, self.world_size = decoder, batch_size, seed, rank, world_size
        self.classes = tuple(info["classes"])
        self.samples_per_epoch = samples_per_epoch or sum(self.counts[os.path.basename(u)] for u in self.urls)
        self.shuffle_buffer = shuffle_buffer
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Serve `epoch` from batch number `start_batch` on, at the next iteration."""
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_worker(self, workers: int) -> int:
        """Training batches each of `workers` workers serves per epoch."""
        batches = self.samples_per_epoch // (self.world_size * max(workers, 1) * self.batch_size)
        if batches < 1:
            raise VitlabError(
                f"{self.samples_per_epoch} samples per epoch do not fill one batch of {self.batch_size} "
                f"for each of {self.world_size} rank(s) x {max(workers, 1)} worker(s)"
            )
        return batches

    def _shard_samples(self, url: str) -> Iterator[dict]:
        """The raw samples of one shard; a shard cut short, unreadable or not of its listed size is a VitlabError naming it."""

        def fail(exc: Exception) -> bool:
            if isinstance(exc, VitlabError):  # webdataset appends its stream and url to the args of an error passing through
                raise VitlabError(exc.args[0]) from None
            reason = str(exc.args[0]).split(" @ ")[0] if exc.args else ""  # webdataset appends " @ <stream>"
            raise VitlabError(f"shard {url} is truncated or unreadable ({type(exc).__name__}: {reason}); {_REWRITE}")

        expected, seen = self.counts[os.path.basename(url)], 0
        try:
            stream = open(url, "rb")  # a plain file: webdataset's own opener (gopen) would run a "pipe:" name in a shell
        except OSError as exc:
            raise VitlabError(f"cannot open shard {url} ({exc.strerror}); {_REWRITE}") from None
        with stream:
            files = wds.tariterators.tar_file_expander(iter([{"url": url, "stream": stream}]), handler=fail)
            for sample in wds.tariterators.group_by_keys(files, handler=fail):
                seen += 1
                if seen > expected:
                    raise VitlabError(
                        f"shard {url} holds more than the {expected} samples info.json lists; "
                        "rewrite info.json with `vitlab shard`"
                    )
                yield sample
        if seen != expected:
            raise VitlabError(f"shard {url} is truncated: it holds {seen} of the {expected} samples info.json lists; {_REWRITE}")

    def _stream(self, shards: list[str], role: int) -> Iterator[dict]:
        """A worker's raw samples: its shards over and over, each pass in a new order through its own shuffle buffer.

        The buffer is emptied at the end of each pass, so a pass serves every sample of the worker's shards once.
        """
        for number in itertools.count():
            seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank, role, number]).generate_state(2)
            order = np.random.default_rng(seeds[0]).permutation(len(shards))
            one_pass = (sample for k in order for sample in self._shard_samples(shards[k]))
            yield from wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 500), seed=int(seeds[1]))(one_pass)

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        train = self.decoder.train
        # a restarted DataLoader asks worker 0 first: worker w plays the role of the worker that served batch start + w
        role = (worker + self.start_batch) % workers if train else worker
        shards = self.urls[self.rank :: self.world_size][role::workers]
        if not shards and not train:
            return
        if not shards:
            raise VitlabError(
                f"{len(self.urls)} shard(s) cannot feed {self.world_size} rank(s) x {workers} worker(s); "
                "write smaller shards (vitlab shard --max-count) or use fewer workers"
            )
        if not train:
            raw: Iterator[dict] = (s for url in shards for s in self._shard_samples(url))
            start = 0
        else:
            start = max(0, -(-(self.start_batch - role) // workers)) * self.batch_size
            stop = self.batches_per_worker(workers) * self.batch_size
            raw = itertools.islice(self._stream(shards, role), start, stop)
        for position, sample in enumerate(raw, start):
            yield self._decode(sample, role, position)

    def _decode(self, sample: dict, role: int, position: int) -> Sample:
        """Crop one raw sample; an undecodable image comes back as a Sample with its error set."""
        label, index = self._label_and_index(sample)
        name = f"{os.path.basename(sample['__url__'])}:{sample.get('name', b'?').decode(errors='backslashreplace')}"
        data = next((sample[f] for f in _IMAGE_FIELDS if f in sample), None)
        if data is None:
            return Sample(None, label, index, name, error=f"no {'/'.join(_IMAGE_FIELDS)} field")
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, role, position]) if self.decoder.train else None
        try:
            return Sample(self.decoder(io.BytesIO(data), rng), label, index, name)
        except DECODE_ERRORS as exc:
            return Sample(None, label, index, name, error=f"{type(exc).__name__}: {exc}")

    def _label_and_index(self, sample: dict) -> tuple[int, int]:
        """A raw sample's class index and number in its split, as `vitlab shard` writes them; anything else is a VitlabError."""
        key, label, url = sample["__key__"], sample.get("cls"), sample["__url__"]
        size = self.split_sizes[os.path.basename(url)]
        where = f"sample {brief(key)} of shard {url}"
        index = _below(key, size)
        if index is None:
            raise VitlabError(f"{where}: its key is not a sample number below {size}, as `vitlab shard` writes; {_REWRITE}")
        if label is None:
            raise VitlabError(f"{where} has no .cls label; {_REWRITE}")
        number = _below(label, len(self.classes))
        if number is None:
            shown = brief(label.decode(errors="backslashreplace"))
            raise VitlabError(f"{where}: label {shown} is not a class index in [0, {len(self.classes)}); {_REWRITE}")
        return number, index


def _below(text: str | bytes, bound: int) -> int | None:
    """`text` as a whole number in [0, bound), or None."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 and int(text) < bound else None


def make_shard_loader(
    stream: ShardStream, *, workers: int = 4, prefetch_factor: int = 2, pin_memory: bool | None = None, timeout_s: float = 600.0
) -> StreamLoader:
    """A StreamLoader over a ShardStream (workers are restarted every epoch so that they see the epoch)."""
    if workers < 0 or prefetch_factor < 1:
        raise VitlabError(f"make_shard_loader needs workers >= 0 and prefetch_factor >= 1, got {workers}, {prefetch_factor}")
    loader = DataLoader(
        stream,
        batch_size=stream.batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        prefetch_factor=prefetch_factor if workers else None,
        timeout=timeout_s if workers else 0,
        generator=torch.Generator().manual_seed(stream.seed),
    )
    if stream.decoder.train:
        steps = stream.batches_per_worker(workers) * max(workers, 1)
    else:  # every sample once: an upper bound; the epoch ends when the shards do
        steps = -(-stream.samples_per_epoch // (stream.world_size * stream.batch_size)) + max(workers, 1)
    return StreamLoader(loader, stream, steps)
