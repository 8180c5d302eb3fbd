"""The runtime a command works out once: device, rank, world size, precision with its reason, threads."""

import torch

from vitlab.runtime.context import Runtime, local, start
from vitlab.runtime.precision import cpu_bf16_is_fast


def test_a_local_runtime_picks_the_precision_once_and_says_why():
    set_by_config = local("cpu", "fp32")
    assert set_by_config == Runtime(0, 1, torch.device("cpu"), "fp32", "set by train.precision")
    auto = local("cpu", "auto")
    assert auto.precision == ("bf16" if cpu_bf16_is_fast() else "fp32") and "CPU" in auto.precision_reason
    with auto.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if auto.precision == "bf16" else torch.float32)


def test_start_outside_torchrun_is_rank_0_of_1_and_sets_the_threads():
    before = torch.get_num_threads()
    try:
        runtime = start("cpu", "bf16", threads=1)
        assert (runtime.rank, runtime.world_size, runtime.is_main, runtime.distributed) == (0, 1, True, False)
        assert runtime.precision == "bf16" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
