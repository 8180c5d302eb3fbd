"""Freed memory kept in the process: a training step stops page-faulting its activations in again."""

import json
import os
import platform
import subprocess
import sys

import pytest

from vitlab.runtime import allocator

FAULTS_PER_STEP = """
import json, resource, statistics, sys, torch, torch.nn.functional as F, vitlab
from vitlab.runtime.allocator import keep_freed_memory
state = keep_freed_memory() if sys.argv[1] == "keep" else "glibc defaults"
torch.manual_seed(0)
model = vitlab.create_model("vit-s/4", img_size=32, num_classes=10, depth=2)
opt = torch.optim.AdamW(model.parameters(), fused=True)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

counts = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    F.cross_entropy(model(x), y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": statistics.median(counts[2:]), "state": state}))  # after the first steps grew the heap
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_kept_memory_stops_the_page_faults_of_every_step():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", allocator.OPT_OUT)}
    result = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], env=env, capture_output=True, text=True, check=True)
        result[mode] = json.loads(out.stdout.splitlines()[-1])
    assert result["keep"]["state"].startswith("glibc, freed memory kept"), result
    assert result["default"]["faults"] > 20_000, result  # glibc's defaults hand the activations back every step
    assert result["keep"]["faults"] < result["default"]["faults"] / 10, result


def test_the_opt_out_and_a_tuned_malloc_are_left_alone(monkeypatch):
    def refuse(*args):
        raise AssertionError("mallopt must not be called")

    monkeypatch.setattr(allocator.ctypes, "CDLL", refuse)
    monkeypatch.setattr(allocator, "_state", allocator.host_memory())  # restored afterwards
    monkeypatch.setenv(allocator.OPT_OUT, "1")
    assert "VITLAB_SYSTEM_MALLOC is set" in allocator.keep_freed_memory()
    assert allocator.host_memory() == allocator.keep_freed_memory()
    monkeypatch.delenv(allocator.OPT_OUT)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert "MALLOC_*" in allocator.keep_freed_memory() or "not glibc" in allocator.keep_freed_memory()
