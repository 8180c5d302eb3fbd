"""The data of a run from its config: how many DataLoader workers a streamed run starts, and why."""

from __future__ import annotations

import pytest

from vitlab.config import DataConfig
from vitlab.data.sources import MAX_AUTO_WORKERS, stream_workers
from vitlab.errors import VitlabError


@pytest.fixture
def sixteen_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_auto_workers_are_the_fewest_that_the_cpus_the_shards_and_the_cap_allow(sixteen_cpus, monkeypatch) -> None:
    auto = DataConfig(name="wds", root="shards")
    assert stream_workers(auto, world_size=1)[0] == MAX_AUTO_WORKERS == 8  # folders: the cap, below 16 CPUs
    workers, said = stream_workers(auto, world_size=2, shards=7)
    assert workers == 3 and said == (
        "3 per rank (data.workers: auto, the smallest of 16 CPU(s) per rank, the cap of 8, 3 training shard(s) per rank)"
    )
    assert stream_workers(auto, world_size=1, shards=1)[0] == 1  # a folder written as one shard
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's 8 processes share the 16 CPUs
    assert stream_workers(auto, world_size=8, shards=800)[0] == 2


def test_a_set_number_of_workers_is_kept_unless_the_shards_cannot_feed_it(sixteen_cpus) -> None:
    assert stream_workers(DataConfig(workers=12), world_size=1) == (12, "12 per rank (data.workers)")
    assert stream_workers(DataConfig(workers=3), world_size=2, shards=6)[0] == 3
    with pytest.raises(VitlabError) as caught:
        stream_workers(DataConfig(workers=4), world_size=1, shards=1)
    assert str(caught.value) == (
        "data.workers=4: 1 training shard(s) over 1 rank(s) feed at most 1 worker(s) per rank; "
        "set --set data.workers=1 (or auto), or write smaller shards (vitlab shard --max-count)"
    )
